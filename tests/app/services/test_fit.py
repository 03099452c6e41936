"""The fit estimate against numbers computed by hand (in the comments) from the formulas,
and against what the real engine loads on CPU with the same options."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from app.services import fit
from app.services.fit import AS_PUBLISHED, GIB, MemoryTarget
from engine import gguf_memory as gm
from engine.api import SpecSummary
from tests.app.hub_fixtures import GATED, GGUF_REPO, TINY, TINY_CONFIG, TINY_TENSORS, fake_hub
from tests.app.services.fake_nvml import GIB as NVML_GIB
from tests.app.services.fake_nvml import no_driver, two_gpus

__all__ = ["fake_hub"]

# Llama-3-8B's config.json (the fields the estimate reads).
LLAMA3_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "vocab_size": 128256, "max_position_embeddings": 8192, "tie_word_embeddings": False}


def test_shape_from_llama3_config():
    s = SpecSummary.from_config(LLAMA3_8B)
    assert (s.num_layers, s.num_kv_heads, s.head_dim) == (32, 8, 128)    # 4096 / 32 heads
    assert s.embedding_params == 2 * 128256 * 4096                        # untied: embed + head
    assert s.max_context == 8192
    tied = SpecSummary.from_config({**LLAMA3_8B, "tie_word_embeddings": True, "head_dim": 256})
    assert tied.embedding_params == 128256 * 4096 and tied.head_dim == 256
    # Multimodal configs keep the language model under text_config.
    assert SpecSummary.from_config({"text_config": LLAMA3_8B}).num_layers == 32
    assert not SpecSummary.from_config({}).has_kv_shape


def test_kv_cache_bytes_by_hand():
    # Llama-3-8B at 8192 tokens: 2 * 32 layers * 8 heads * 128 dims * 2 bytes * 8192 = 1 GiB exactly.
    assert SpecSummary(32, 8, 128).kv_bytes_per_token(2) * 8192 == 1 * GIB
    assert SpecSummary(2, 2, 16).kv_bytes_per_token(2) * 100 == 2 * 2 * 2 * 16 * 2 * 100


def test_weight_bytes_per_quantization():
    n = 8_030_261_248  # Llama-3-8B's parameter count on the Hub
    assert fit.weight_bytes(n, "bf16") == 2 * n
    assert fit.weight_bytes(n, "fp32") == 4 * n
    assert fit.weight_bytes(n, "int8") == n
    # int4: half a byte per weight plus a 2-byte scale and a 2-byte zero per 128 weights.
    assert fit.weight_bytes(n, "int4") == round(n * (0.5 + 4 / 128))
    # Embeddings stay in 16 bit: 1000 of 10_000 params at 2 B, the rest at 0.53125 B.
    assert fit.weight_bytes(10_000, "awq", embedding_params=1000) == 2000 + round(9000 * 0.53125)
    assert fit.weight_bytes(10_000, "nf4", embedding_params=1000) == 2000 + round(9000 * (0.5 + 4 / 64))
    # ... but a 16-bit choice ignores the split.
    assert fit.weight_bytes(10_000, "fp16", embedding_params=1000) == 20_000
    with pytest.raises(ValueError, match="unknown weights dtype or quantization 'int3'"):
        fit.weight_bytes(1, "int3")


def test_verdicts_and_numbers():
    shape = SpecSummary.from_config(LLAMA3_8B)
    n = 8_030_261_248
    weights, kv = 2 * n, 1 * GIB                      # bf16, one 8192-token context
    need = weights + kv + round((weights + kv) * 0.10)
    big = MemoryTarget("cuda:0", "GPU 0 (H100)", 80 * GIB, 80 * GIB)
    est = fit.estimate(num_params=n, shape=shape, weights="bf16", context_len=8192, target=big)
    # On a GPU the load gives the KV cache the rest of the card: the verdict counts one context.
    assert est.kv_fills_device and est.kv_context_bytes == kv
    assert (est.weights_bytes, est.total_bytes, est.dtype) == (weights, need, "bfloat16")
    assert est.verdict == "fits"
    # The pool: 90% of 80 GiB less the weights, capped at 64 sequences x 8192 tokens (64 GiB).
    assert est.kv_cache_bytes == (72 * GIB - weights) // (2 * 1024 * 1024) * 2 * 1024 * 1024
    assert "the KV cache then takes about 57.0 GiB of the rest" in est.summary()
    # weights 14.96 GiB + KV 1 GiB = 15.96 GiB, plus 10% = 17.55 GiB.
    assert need / GIB == pytest.approx(17.553, abs=1e-3)
    # 19 GiB free: 17.55 > 0.9 * 19 = 17.1 -> tight; 17 GiB -> won't fit.
    tight = fit.estimate(num_params=n, shape=shape, weights="bf16", context_len=8192,
                         target=MemoryTarget("cuda:1", "GPU 1", 19 * GIB, 24 * GIB))
    assert tight.verdict == "tight"
    # On the CPU the pool is a quarter of the free RAM, at most 1 GiB: here 1 GiB, one context.
    nofit = fit.estimate(num_params=n, shape=shape, weights="bf16", context_len=8192,
                         target=MemoryTarget("cpu", "RAM", 17 * GIB, 32 * GIB))
    assert nofit.verdict == "won't fit" and nofit.kv_cache_bytes == 1 * GIB and not nofit.kv_fills_device
    assert nofit.summary().startswith("won't fit: needs 17.6 GiB (weights 15.0 bfloat16 + KV cache 1.0 + "
                                      "overhead 1.6), RAM has 17.0 GiB free: pick a smaller dtype")
    # int4: the embedding kept in 16 bit, the untied head int8 (525M weights each):
    # 5.25e8 * 2 + 5.25e8 * 1 + 6.98e9 * 0.53125 = 5.28e9 B = 4.92 GiB, + 1 GiB KV (one bf16
    # context: a GPU computes in bf16), + 10% = 6.51 GiB: fits in 19 GiB.
    assert shape.head_params == 1_050_673_152 // 2
    q = fit.estimate(num_params=n, shape=shape, weights="int4", context_len=8192,
                     target=MemoryTarget("cuda:1", "GPU 1", 19 * GIB, 24 * GIB))
    assert q.weights_bytes == round(525_336_576 * 2 + 525_336_576 * 1 + (n - 1_050_673_152) * 0.53125)
    assert q.total_bytes / GIB == pytest.approx(6.51, abs=0.01) and q.verdict == "fits"
    assert "weights 4.9 int4 + " in q.summary()


def test_auto_weights_follow_the_engine_rule_for_the_device():
    """dtype=auto loads float32 on the CPU and bf16 on a GPU: the estimate says the same."""
    shape = SpecSummary.from_config(LLAMA3_8B)
    n = 135_000_000
    cpu = fit.estimate(num_params=n, shape=shape, target=MemoryTarget("cpu", "RAM", 64 * GIB, 64 * GIB))
    assert (cpu.dtype, cpu.weights_bytes) == ("float32", 4 * n)
    gpu = fit.estimate(num_params=n, shape=shape, target=MemoryTarget("cuda:0", "GPU 0", 64 * GIB, 80 * GIB))
    assert (gpu.dtype, gpu.weights_bytes) == ("bfloat16", 2 * n)
    # The KV cache is kept in the weights' dtype: float32 on the CPU, 4 bytes an element.
    assert cpu.kv_context_bytes == SpecSummary(32, 8, 128).kv_bytes_per_token(4) * 8192
    # No context given: the model's maximum (8192), as the load dialog's default.
    assert cpu.context_len == 8192 and "weights 0.50 float32" in cpu.summary()


def test_kv_pool_is_sized_as_the_engine_sizes_it():
    # 2 layers x 2 KV heads x 16 dims, float32: 512 B a token, 8 KiB a 16-token block.
    shape = SpecSummary(num_layers=2, num_kv_heads=2, head_dim=16, max_context=512)
    mib = 1 << 20

    def kv(free, **kw):
        t = MemoryTarget("cpu", "RAM", free, free)
        return fit.estimate(num_params=1000, shape=shape, target=t, **kw)

    # A quarter of 24 MiB free RAM: 6 MiB (below 64 sequences x 512 tokens = 16 MiB).
    assert kv(24 * mib).kv_cache_bytes == 6 * mib
    # Plenty of RAM: no more than 64 full contexts could use (64 x 32 blocks x 8 KiB).
    assert kv(64 * GIB).kv_cache_bytes == 16 * mib
    # An explicit kv_cache_memory is the budget, and max_model_len shortens the cap.
    assert kv(64 * GIB, kv_cache_memory=3 * mib).kv_cache_bytes == 3 * mib
    assert kv(64 * GIB, context_len=128).kv_cache_bytes == 8 * 64 * 8 * 1024
    assert kv(64 * GIB, context_len=128, kv_cache_dtype="fp8").kv_cache_bytes == 8 * 64 * 2 * 1024
    # A pool smaller than one context is refused by a load: the estimate says won't fit.
    small = kv(64 * GIB, kv_cache_memory=100 * 1024)
    assert small.verdict == "won't fit" and any("fewer tokens than one 512-token context" in n for n in small.notes)


def test_unknown_shape_and_size_say_so():
    t = MemoryTarget("cpu", "RAM", 8 * GIB, 16 * GIB)
    est = fit.estimate(num_params=1000, shape=SpecSummary(), weights="bf16", context_len=4096, target=t)
    assert est.kv_cache_bytes == 0 and any("KV cache not counted" in n for n in est.notes)
    est = fit.estimate(num_params=None, shape=SpecSummary(), weights="bf16", context_len=4096, target=t)
    assert est.verdict == "unknown"
    est = fit.estimate(num_params=None, shape=SpecSummary(), weights=AS_PUBLISHED, context_len=4096,
                       target=t, published_weight_bytes=3 * GIB)
    assert est.weights_bytes == 3 * GIB and est.verdict == "fits"
    long = fit.estimate(num_params=1000, shape=SpecSummary(1, 1, 1, 0, 2048), weights="bf16",
                        context_len=4096, target=t)
    assert any("at most 2048 tokens" in n for n in long.notes)


def test_memory_targets_from_nvml_and_psutil():
    vm = SimpleNamespace(available=12 * GIB, total=64 * GIB)
    targets = fit.memory_targets(nvml=two_gpus(), psutil_module=SimpleNamespace(virtual_memory=lambda: vm))
    assert [(t.key, t.free_bytes, t.total_bytes) for t in targets] == [
        ("cuda:0", 50 * NVML_GIB, 80 * NVML_GIB), ("cuda:1", 23 * NVML_GIB, 24 * NVML_GIB),
        ("cpu", 12 * GIB, 64 * GIB)]
    assert targets[0].label == "GPU 0 (NVIDIA H100 80GB HBM3)"
    # the compute capability where NVML gives it; a GPU whose capability can't be read is still listed
    assert [t.capability for t in targets] == [(9, 0), None, None]
    # asked here, on the caller's worker thread, not by each estimate on the GUI's: whether auto
    # keeps a GGUF's own weights (an unknown capability is taken as able; the CPU: the C kernel)
    assert targets[0].keeps_gguf is True and targets[1].keeps_gguf is True and isinstance(targets[2].keeps_gguf, bool)
    nvml = no_driver()
    only_ram = fit.memory_targets(nvml=nvml, psutil_module=SimpleNamespace(virtual_memory=lambda: vm))
    assert [t.key for t in only_ram] == ["cpu"]
    assert "nvmlShutdown" not in nvml.calls  # never shut down what did not start


def test_estimate_for_a_hub_repo(fake_hub):
    """Param count from the Hub's safetensors metadata, shape from config.json alone."""
    n = sum(math.prod(s) for s in TINY_TENSORS.values())
    t = MemoryTarget("cpu", "RAM", 1 * GIB, 2 * GIB)
    est = fit.estimate_for_repo(TINY, weights="int8", context_len=1024, target=t)
    embed = 2 * 1000 * 64                                  # untied 1000 x 64 embeddings
    # int8 layers and head; the embedding stays float32, the CPU's dtype (4 bytes each)
    assert est.weights_bytes == round(embed // 2 * 4 + (n - embed // 2) * 1.0)
    head_dim = TINY_CONFIG["hidden_size"] // TINY_CONFIG["num_attention_heads"]
    # One 1024-token context of K and V in float32 (an int8 model computes in the CPU's dtype).
    assert est.kv_context_bytes == 2 * 2 * 2 * head_dim * 4 * 1024
    assert est.verdict == "fits" and est.notes == ()
    # Only the small files were fetched: no weights, nothing in the HF cache.
    assert fake_hub.downloads("model.safetensors") == 0
    assert not fake_hub.cache.exists() or not any(fake_hub.cache.iterdir())


def test_the_repo_estimate_reads_config_json_once_through_the_engines_spec(fake_hub, monkeypatch):
    """The fit estimate has no config.json reader of its own: the engine's model spec reads
    it, once, and the KV bytes per token follow the KV-cache choice (fp8: half of bf16)."""
    from engine.models.spec import ModelSpec

    read = []
    real = ModelSpec.from_config.__func__

    def counting(cls, cfg, source="config.json"):
        read.append(cfg)
        return real(cls, cfg, source)

    monkeypatch.setattr(ModelSpec, "from_config", classmethod(counting))
    t = MemoryTarget("cpu", "RAM", 1 * GIB, 2 * GIB)
    auto = fit.estimate_for_repo(TINY, weights="bf16", context_len=1024, target=t)
    assert read == [TINY_CONFIG]  # one reading, by the engine's spec (a native llama config)
    fp8 = fit.estimate_for_repo(TINY, weights="bf16", context_len=1024, target=t, kv_cache_dtype="fp8")
    head_dim = TINY_CONFIG["hidden_size"] // TINY_CONFIG["num_attention_heads"]
    assert auto.kv_context_bytes == 2 * 2 * 2 * head_dim * 2 * 1024  # bf16: 2 bytes a value
    assert fp8.kv_context_bytes * 2 == auto.kv_context_bytes
    assert fp8.kv_cache_bytes * 2 == auto.kv_cache_bytes
    shape, _ = fit.load_shape(TINY)
    assert shape.native and shape.num_params == ModelSpec.from_config(TINY_CONFIG).num_params()


def test_weights_choices_are_the_registrys(monkeypatch):
    """A quantization the engine registers is a weights choice of the estimate at once,
    with the bytes it registered (no list of the estimate's own)."""
    from engine import choices

    monkeypatch.setitem(choices._REGISTRY, "quantization", dict(choices._REGISTRY["quantization"]))
    choices.register(choices.Choice("quantization", "int3", "int3", ("i3",), bytes_per_param=0.375))
    assert fit.bytes_per_param()["int3"] == 0.375
    assert fit.weight_bytes(1000, "i3") == 375
    assert set(fit.bytes_per_param()) == {"bfloat16", "float16", "float32"} | {
        c.name for c in choices.defined("quantization") if c.bytes_per_param}


def test_estimate_for_gguf_and_gated_repos(fake_hub, monkeypatch):
    from app.services.hub import model_details

    t = MemoryTarget("cpu", "RAM", 1 * GIB, 2 * GIB)
    d = model_details(GGUF_REPO)
    est = fit.estimate_for_repo(GGUF_REPO, weights=AS_PUBLISHED, context_len=512, target=t, details=d,
                                gguf_file="tiny-chat.Q8_0.gguf")
    assert est.weights_bytes == 250_004 and est.kv_cache_bytes == 0
    assert any("KV cache not counted" in n for n in est.notes)
    # auto where the engine keeps a GGUF's own weights (the C kernel runs here): Q8_0 takes
    # its file's bytes, Q4_K_M more (its Q6_K tensors as int8, its scales as float16)
    monkeypatch.setattr(fit, "gguf_kept_on", lambda device_type, capability: True)
    kept = fit.estimate_for_repo(GGUF_REPO, context_len=512, target=t, details=d, gguf_file="tiny-chat.Q8_0.gguf")
    assert kept.weights_bytes == 250_004 and any("Q8_0 weights load as they are" in n for n in kept.notes)
    mixed = fit.estimate_for_repo(GGUF_REPO, context_len=512, target=t, details=d, gguf_file="tiny-chat.Q4_K_M.gguf")
    assert mixed.weights_bytes == round(150_004 * gm.memory_ratio("Q4_K_M"))
    assert any("about 1.22x the file's size" in n for n in mixed.notes)
    assert "(weights 0.00 Q4_K_M + " in mixed.summary()  # what it loads as, not the dtype
    # where it doesn't (no compiler): dequantized, 1M parameters x 4 B of float32
    monkeypatch.setattr(fit, "gguf_kept_on", lambda device_type, capability: False)
    loaded = fit.estimate_for_repo(GGUF_REPO, context_len=512, target=t, details=d, gguf_file="tiny-chat.Q8_0.gguf")
    assert loaded.weights_bytes == 4 * 1_000_000
    assert any("loads dequantized to float32 here" in n for n in loaded.notes)
    # quantization "gguf" keeps them whatever the device (the load dialog greys it out where it can't)
    chosen = fit.estimate_for_repo(GGUF_REPO, weights="gguf", context_len=512, target=t, details=d,
                                   gguf_file="tiny-chat.Q8_0.gguf")
    assert chosen.weights_bytes == 250_004
    gated = fit.estimate_for_repo(GATED, weights="bf16", context_len=512, target=t)
    assert gated.weights_bytes == 2 * 64 and any("config.json unavailable (gated)" in n for n in gated.notes)


def test_a_gguf_is_sized_as_a_load_holds_its_type():
    """llama.cpp's type from the file's name: a kept mix at its ratio, a type Hearth
    dequantizes (or no type) in the load dtype; on a GPU by its compute capability."""
    def weights(name, *, weights="gguf", target=MemoryTarget("cuda:0", "GPU 0", 80 * GIB, 80 * GIB), params=8 * 10**9):
        est = fit.estimate(num_params=params, shape=SpecSummary(), target=target, weights=weights,
                           published_weight_bytes=4_916_730_464, gguf_file=name)
        held = {"Q3_K_M": "bfloat16", "Q4_K_M": "Q4_K_M"}.get(gm.file_label(name) or "")
        if held and weights == "gguf" and gm.split_part(name) is None:
            assert f"(weights {fit.gib(est.weights_bytes)} {held} + " in est.summary()
        return est.weights_bytes, est.notes[0]

    assert weights("Llama-3.1-8B-Q4_K_M.gguf")[0] == round(4_916_730_464 * gm.memory_ratio("Q4_K_M"))
    size, note = weights("Llama-3.1-8B-Q3_K_M.gguf")
    assert size == 16 * 10**9 and "is Q3_K_M: Hearth keeps only" in note and "loads dequantized to bfloat16" in note
    size, note = weights("Llama-3.1-8B.gguf")
    assert size == 16 * 10**9 and "has no GGUF type in its name" in note
    size, note = weights("Llama-3.1-8B-IQ4_XS.gguf", params=None)
    assert size == 4_916_730_464 and "counted at its file size" in note
    turing = MemoryTarget("cuda:0", "GPU 0 (Tesla T4)", 15 * GIB, 16 * GIB, (7, 5))
    ampere = MemoryTarget("cuda:0", "GPU 0 (RTX 3090)", 23 * GIB, 24 * GIB, (8, 6))
    assert weights("Llama-3.1-8B-Q4_K_M.gguf", weights="auto", target=turing)[0] == 16 * 10**9
    assert weights("Llama-3.1-8B-Q4_K_M.gguf", weights="auto", target=ampere)[0] < 6.1e9
    # a split file's part: not the whole file's size (counted as floats, as before)
    size, note = weights("Llama-3.1-70B-Q4_K_M-00001-of-00002.gguf")
    assert size == 16 * 10**9 and "part 1 of 2 of a split file" in note
    assert fit.gguf_keeps_own("x-Q4_K_M.gguf", ampere) and not fit.gguf_keeps_own("x-IQ4_XS.gguf", ampere)
    assert not fit.gguf_keeps_own("x-Q4_K_M.gguf", turing)
    # the file's size only for "as published"; int4 by its bits, whatever the file
    assert weights("Llama-3.1-8B-Q4_K_M.gguf", weights=AS_PUBLISHED)[0] == 4_916_730_464
    assert weights("Llama-3.1-8B-Q4_K_M.gguf", weights="int4")[0] == round(8 * 10**9 * (0.5 + 4 / 128))


@pytest.mark.parametrize("options", [
    {},                                                              # dtype auto, model's maximum, auto KV
    {"dtype": "float32", "max_model_len": 256, "kv_cache_memory": "3MiB"},
    {"dtype": "bfloat16", "max_model_len": 128},
], ids=["defaults", "float32-kv3MiB-256", "bf16-128"])
def test_the_estimate_matches_what_the_engine_loads(fake_hub, tiny_models, monkeypatch, options):
    """The estimate for a Hub repo and Engine.load of the same checkpoint with the same
    options agree on weight and KV bytes (within 10%) on the CPU."""
    from engine.api import Engine, parse_bytes
    import engine.runner.memory as load_memory

    folder = tiny_models["llama-tied"]
    fake_hub.add_repo("acme/real-tiny", {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})
    # 24 MiB of free RAM, for both: the default CPU pool is a quarter of it (6 MiB), which
    # is less than 64 full contexts would use, so the RAM rule itself is compared.
    ram = 24 << 20
    monkeypatch.setattr(load_memory, "available_ram_bytes", lambda: ram)
    kv_memory = options.get("kv_cache_memory")
    est = fit.estimate_for_repo("acme/real-tiny", target=MemoryTarget("cpu", "RAM", ram, 4 * ram),
                                weights=options.get("dtype", "auto"), context_len=options.get("max_model_len"),
                                kv_cache_memory=parse_bytes(kv_memory) if kv_memory else None)
    engine = Engine.load(str(folder), device="cpu", **options)
    try:
        info = engine.model_info
    finally:
        engine.shutdown()
    assert est.dtype == info.dtype and est.context_len == info.max_model_len
    assert est.weights_bytes == pytest.approx(info.weight_bytes, rel=0.10)
    assert est.kv_cache_bytes == pytest.approx(info.kv_cache_bytes, rel=0.10)


def test_a_checkpoints_own_quantization_is_counted_at_its_file_size():
    t = MemoryTarget("cpu", "RAM", 8 * GIB, 16 * GIB)
    for own in ("gguf", "awq", "gptq", "compressed-tensors"):
        est = fit.estimate(num_params=135_000_000, shape=SpecSummary(), target=t, weights=own,
                           published_weight_bytes=98_362_432)
        assert est.weights_bytes == 98_362_432 and not est.notes[:-1]
    # int4 of the same model is counted by its bits (the float32 embedding aside)
    est = fit.estimate(num_params=135_000_000, shape=SpecSummary(), target=t, weights="int4",
                       published_weight_bytes=98_362_432)
    assert est.weights_bytes == round(135_000_000 * (0.5 + 4 / 128))


def test_the_bundled_gguf_is_estimated_as_the_engine_loads_it(default_model):
    """The real SmolLM2 Q4_1 file (Q8_0 tied embedding): the estimate from its name and size,
    with the engine's own rule for this CPU (its weights kept where the C kernel runs, else
    float32), against what Engine.load holds."""
    import gguf
    from engine.api import Engine, default_model_file

    path = default_model_file()
    params = sum(int(t.n_elements) for t in gguf.GGUFReader(str(path)).tensors)
    est = fit.estimate(num_params=params, shape=SpecSummary(), target=MemoryTarget("cpu", "RAM", 8 * GIB, 16 * GIB),
                       published_weight_bytes=path.stat().st_size, gguf_file=path.name)
    engine = Engine.load(None, device="cpu", max_model_len=256, num_blocks=16)
    try:
        held = engine.model_info.weight_bytes
    finally:
        engine.shutdown()
    assert est.weights_bytes == pytest.approx(held, rel=0.10), (est.weights_bytes, held, est.notes)
