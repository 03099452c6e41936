"""check_model, the pre-flight of every load in the app: what it says a load takes is what
the load takes; it refuses, before the loaded model is given up, what the load would
refuse; it says whether a model fits beside the loaded one (RAM faked). And a load stops
between weight tensors when asked to, freeing what it had loaded."""

from __future__ import annotations

import pytest

from engine.api import Engine, InvalidRequestError, LoadCancelledError, OutOfMemoryError, check_model
from engine.memory_plan import kv_headroom

OPTIONS = dict(device="cpu", dtype="float32", attention="torch", max_model_len=256)
TOTAL = 64 * 2**30


@pytest.fixture
def model(tiny_models) -> str:
    return str(tiny_models["llama-tied"])


@pytest.fixture
def fake_ram(monkeypatch):
    """``fake_ram["free"] = n``: the RAM check_model sees free, of ``fake_ram["total"]``
    (the load itself is not fooled)."""
    import engine.loader.load_check as load_check

    fake = {"free": None, "total": TOTAL}
    real = load_check.free_memory_bytes
    monkeypatch.setattr(load_check, "free_memory_bytes",
                        lambda device: (fake["free"], fake["total"]) if fake["free"] is not None else real(device))
    return fake


@pytest.mark.parametrize("kv_cache_memory", ["16MiB", None])
def test_the_check_says_what_the_load_takes(model, kv_cache_memory):
    check = check_model(model, kv_cache_memory=kv_cache_memory, **OPTIONS)
    engine = Engine.load(model, kv_cache_memory=kv_cache_memory, **OPTIONS)
    try:
        info = engine.model_info
        assert (check.name, check.device) == (info.name, "cpu")
        assert check.weights_bytes == info.weight_bytes
        assert check.kv_cache_bytes == info.kv_cache_bytes
        assert check.need_bytes == info.weight_bytes + info.kv_cache_bytes
        assert check.fits_beside  # nothing loaded
    finally:
        engine.shutdown()


def test_on_the_cpu_it_fits_beside_only_with_room_to_spare(model, fake_ram):
    need = check_model(model, kv_cache_memory="16MiB", **OPTIONS).need_bytes
    beside = dict(loaded_device="cpu", loaded_bytes=2**30, kv_cache_memory="16MiB", **OPTIONS)
    fake_ram["free"] = need + kv_headroom(TOTAL)
    assert check_model(model, **beside).fits_beside
    fake_ram["free"] -= 1
    check = check_model(model, **beside)
    assert not check.fits_beside and check.free_bytes == fake_ram["free"]
    # A model on another device gives back no RAM: nothing to gain by unloading it.
    assert check_model(model, **dict(beside, loaded_device="cuda:0", loaded_bytes=0,
                                     kv_cache_memory="1MiB")).fits_beside


def test_the_default_cpu_kv_pool_must_come_out_as_large_as_alone(model, fake_ram):
    """Beside another model the load sizes its pool from less free RAM (review finding 2):
    a quarter of what the weights leave, at most 1 GiB (allowing many sequences here, so
    that cap is what binds alone)."""
    gib = 2**30
    many = dict(OPTIONS, max_num_seqs=100_000)
    weights = check_model(model, **many).weights_bytes
    fake_ram.update(total=8 * gib)  # 0.5 GiB kept spare: never what decides here
    beside = dict(loaded_device="cpu", loaded_bytes=2 * gib, **many)
    fake_ram["free"] = weights + int(4.5 * gib)  # a quarter of 4.5 GiB: the full 1 GiB pool
    assert check_model(model, **beside).fits_beside
    fake_ram["free"] = weights + int(3.5 * gib)  # 0.875 GiB beside A, 1 GiB with A gone
    check = check_model(model, **beside)
    assert not check.fits_beside and check.kv_cache_bytes > int(0.99 * gib)


def test_what_the_load_would_refuse_is_refused_first(model, fake_ram):
    """Review finding 14: a context longer than the model's, an explicit KV cache or
    weights that can't fit even with the loaded model unloaded."""
    with pytest.raises(InvalidRequestError, match="longer than the model's"):
        check_model(model, **dict(OPTIONS, max_model_len=100_000))
    fake_ram.update(free=100 * 2**20, total=8 * 2**30)  # less than the 512 MiB kept spare
    with pytest.raises(OutOfMemoryError, match="KV cache does not fit.*with the loaded model unloaded"):
        check_model(model, kv_cache_memory="16MiB", loaded_device="cpu", loaded_bytes=2**20, **OPTIONS)
    fake_ram["free"] = 2**20
    with pytest.raises(OutOfMemoryError, match=r"weights need .* \(.* with the loaded model unloaded\)"):
        check_model(model, loaded_device="cpu", loaded_bytes=2**20, **OPTIONS)


def test_a_load_stops_between_weight_tensors_and_frees_what_it_loaded(model, monkeypatch):
    """Review finding 7: a cancel is seen inside the weights loop, not after it."""
    import weakref

    import engine.runner.bring_up as bring_up
    from engine.models.llama import LlamaForCausalLM

    yielded, built = [], []
    real_iter, real_materialize = bring_up.iter_weights, LlamaForCausalLM.materialize

    def counting_iter(path):
        for item in real_iter(path):
            yielded.append(item[0])
            yield item

    def recording_materialize(self, device):
        built.append(weakref.ref(self))
        return real_materialize(self, device)

    monkeypatch.setattr(bring_up, "iter_weights", counting_iter)
    monkeypatch.setattr(LlamaForCausalLM, "materialize", recording_materialize)
    total = len(list(real_iter(model)))
    with pytest.raises(LoadCancelledError) as caught:
        Engine.load(model, should_stop=lambda: len(yielded) >= 2, **OPTIONS)
    assert len(yielded) == 2 < total
    # While the error is held (its traceback keeps the half-built model's frames alive, as
    # a caller handling it does, or a reference cycle would), the model holds no memory.
    assert caught.value.__traceback__ is not None
    partial = built[0]()
    assert partial is not None and all(p.is_meta for p in partial.parameters())


def test_a_cancel_after_the_weights_frees_them(model, monkeypatch):
    import engine.runner.bring_up as bring_up

    built, released = [], []
    real_load, real_release = bring_up.materialize_weights, bring_up.release_runner
    monkeypatch.setattr(bring_up, "materialize_weights", lambda *a, **k: (real_load(*a, **k), built.append(1))[0])
    monkeypatch.setattr(bring_up, "release_runner", lambda r: (released.append(r), real_release(r)))
    with pytest.raises(LoadCancelledError):
        Engine.load(model, should_stop=lambda: bool(built), **OPTIONS)
    assert len(released) == 1 and released[0].model is None


@pytest.mark.gpu
def test_on_a_gpu_a_model_never_loads_beside_another_on_the_same_card(model):
    gpu = dict(OPTIONS, device="cuda:0", dtype="bfloat16", attention="auto", kv_cache_memory="16MiB")
    assert not check_model(model, loaded_device="cuda:0", loaded_bytes=2**20, **gpu).fits_beside
    assert check_model(model, loaded_device="cpu", loaded_bytes=2**20, **gpu).fits_beside


@pytest.fixture
def fake_gpu(monkeypatch):
    """check_model sees the load go to ``cuda:0`` with ``fake_gpu["free"]`` of
    ``fake_gpu["total"]`` bytes free (the choices are checked on the CPU, then moved)."""
    import dataclasses

    import torch

    import engine.loader.load_check as load_check

    real = load_check.check_load_choices
    fake = {"free": 80 * 2**30, "total": 80 * 2**30}
    monkeypatch.setattr(load_check, "check_load_choices",
                        lambda config: dataclasses.replace(real(config), device=torch.device("cuda", 0)))
    monkeypatch.setattr(load_check, "free_memory_bytes", lambda device: (fake["free"], fake["total"]))
    return fake


def test_on_a_gpu_a_full_context_that_does_not_fit_is_refused_first(model, fake_gpu):
    """Review 2 finding 5: the default GPU pool takes what the card has left after the
    weights, and must hold one full context; the check refused nothing, so the app
    unloaded the working model before the load failed with the same complaint."""
    check = check_model(model, **OPTIONS)
    weights, kv = check.weights_bytes, check.kv_cache_bytes
    fits = weights + kv + kv_headroom(fake_gpu["total"])
    fake_gpu["free"] = fits
    assert check_model(model, **OPTIONS).kv_cache_bytes == kv
    fake_gpu["free"] = fits - 1
    with pytest.raises(OutOfMemoryError, match="one full context of 256 tokens needs 256.*--max-model-len"):
        check_model(model, **OPTIONS)
    # What unloading the model on the same card gives back counts.
    assert not check_model(model, loaded_device="cuda:0", loaded_bytes=1, **OPTIONS).fits_beside
    fake_gpu["free"] = weights  # nothing at all left for the KV cache
    with pytest.raises(OutOfMemoryError, match="no memory left on the GPU cuda:0 for the KV cache"):
        check_model(model, **OPTIONS)


def test_a_truncated_weights_file_is_refused_before_the_loaded_model_goes(model, tmp_path):
    """Review 2 finding 6: only the safetensors headers are read, not the weights."""
    import shutil
    from pathlib import Path

    from engine.api import ModelLoadError

    broken = tmp_path / "broken"
    shutil.copytree(Path(model), broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        check_model(str(broken), **OPTIONS)


@pytest.mark.gpu
def test_on_a_gpu_a_full_context_that_does_not_fit_beside_what_is_used_is_refused(model):
    """The real card: memory taken by something else leaves less than one full context."""
    import torch

    gpu = dict(OPTIONS, device="cuda:0", dtype="bfloat16", attention="auto")
    check = check_model(model, **gpu)
    free, total = torch.cuda.mem_get_info(0)
    hog_bytes = free - kv_headroom(total) - check.weights_bytes - check.kv_cache_bytes // 2
    hog = torch.empty(hog_bytes, dtype=torch.uint8, device="cuda:0")
    try:
        # Half a context left, or nothing (the allocator rounds up by more than a tiny
        # model's context takes): either way the check refuses, naming the KV cache.
        with pytest.raises(OutOfMemoryError, match="KV cache"):
            check_model(model, **gpu)
        # With the memory held counted as the loaded model's, it would fit once that goes.
        assert not check_model(model, loaded_device="cuda:0", loaded_bytes=hog_bytes, **gpu).fits_beside
    finally:
        del hog
        torch.cuda.empty_cache()


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_awq_and_gptq_of_float_weights_are_checked_as_the_int4_they_become(model, method):
    """The GUI checks every load first: calibrating float weights happens at the load, into
    int4 of the same group size, so the check passes and sizes it as int4 (it used to refuse)."""
    check = check_model(model, quantization=method, **OPTIONS)
    int4 = check_model(model, quantization="int4", **OPTIONS)
    plain = check_model(model, **OPTIONS)
    assert check.weights_bytes == int4.weights_bytes < plain.weights_bytes


def test_a_first_awq_load_is_refused_when_the_float_model_it_calibrates_does_not_fit(model, fake_ram, monkeypatch,
                                                                                     tmp_path):
    """Nothing calibrated yet: the load holds the float model first; int4's room is not enough.
    (A models cache of its own: another test's cached awq checkpoint would make it no first load.)"""
    monkeypatch.setenv("HEARTH_CACHE_DIR", str(tmp_path / "cache"))
    int4 = check_model(model, quantization="int4", **OPTIONS)
    plain = check_model(model, **OPTIONS)
    fake_ram["free"] = (int4.weights_bytes + plain.weights_bytes) // 2  # int4 fits, the float model doesn't
    with pytest.raises(OutOfMemoryError, match="calibrates the float weights first"):
        check_model(model, quantization="awq", **OPTIONS)
