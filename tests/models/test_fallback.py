"""Architectures without a native implementation run through the transformers fallback."""

from __future__ import annotations

import torch

from engine.api import Engine, Request, SamplingParams
from tests.conftest import engine_device, save_tiny


def test_gpt2_runs_through_fallback_and_matches_transformers(tmp_path, tokenizer_files):
    from transformers import AutoModelForCausalLM, GPT2Config

    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=49152, n_positions=256,
                     initializer_range=0.08, bos_token_id=1, eos_token_id=2)
    path = save_tiny(cfg, tmp_path / "gpt2", tokenizer_files)
    eng = Engine.load(str(path), device=engine_device(), dtype="float32", num_blocks=64)
    try:
        assert eng.model_info.implementation == "transformers-fallback"
        assert "gpt2" in eng.model_info.fallback_reason
        ids = [5, 600, 7000, 42, 9, 31000, 77]
        ref_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        with torch.no_grad():
            ref = ref_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32,
                                     min_new_tokens=32, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
        # two requests batched together, each must match running alone in transformers
        h1 = eng.submit(Request(prompt_token_ids=ids, params=params))
        h2 = eng.submit(Request(prompt_token_ids=ids[:3], params=params))
        events = list(h1)
        assert events[-1].implementation == "transformers-fallback"
        assert [t for ev in events[:-1] for t in ev.token_ids] == ref
        assert h2.result().finish_reason == "length"
    finally:
        eng.shutdown()


def test_forced_fallback_on_a_native_family(tiny_models):
    native = Engine.load(str(tiny_models["qwen2"]), device=engine_device(), dtype="float32", num_blocks=64,
                         max_model_len=256)
    fallback = Engine.load(str(tiny_models["qwen2"]), device=engine_device(), dtype="float32", num_blocks=64,
                           max_model_len=256, force_fallback=True)
    try:
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        ids = [9, 8, 7, 600, 5000, 12]
        a = native.submit(Request(prompt_token_ids=ids, params=params)).result()
        b = fallback.submit(Request(prompt_token_ids=ids, params=params)).result()
        assert fallback.model_info.implementation == "transformers-fallback"
        assert a.token_ids == b.token_ids
    finally:
        native.shutdown()
        fallback.shutdown()


def test_a_fallback_model_that_does_not_fit_the_device_is_refused_and_freed(tmp_path, tokenizer_files, monkeypatch):
    """Running out of memory while the fallback moves its model to the device: a clear
    error naming what to do, and none of the model's tensors kept."""
    from transformers import GPT2Config

    import engine.runner.lifecycle as lifecycle
    from engine.api import OutOfMemoryError

    path = save_tiny(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=49152, n_positions=64),
                     tmp_path / "gpt2", tokenizer_files)
    freed = []
    real_release, real_to = lifecycle.release_module, torch.nn.Module.to

    def release(model):
        freed.append(model)
        real_release(model)

    def to(self, *args, **kwargs):  # the move to the device runs out of memory; freeing (to meta) works
        if args and str(args[0]) != "meta":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(lifecycle, "release_module", release)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    try:
        Engine.load(str(path), device="cpu", dtype="float32", num_blocks=8)
    except OutOfMemoryError as e:
        assert "--device cpu" in str(e) and e.options == ("device",)
    else:
        raise AssertionError("the load should have been refused")
    assert len(freed) == 1 and all(p.is_meta for p in freed[0].parameters())


def test_a_checkpoint_missing_weights_is_refused_not_filled_with_random_values(tmp_path, tokenizer_files):
    """transformers fills what a checkpoint lacks with random values and goes on (a config
    naming another architecture, a partial checkpoint): the fallback refuses, naming them."""
    import pytest
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config

    from engine.api import ModelLoadError

    path = save_tiny(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=49152, n_positions=64,
                                bos_token_id=1, eos_token_id=2), tmp_path / "gpt2", tokenizer_files)
    weights = load_file(path / "model.safetensors")
    del weights["transformer.h.1.mlp.c_fc.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"1 of the model's \d+ weight tensors are not in the checkpoint "
                                             r"\(e.g. transformer.h.1.mlp.c_fc.weight\).*random values"):
        Engine.load(str(path), device="cpu", dtype="float32", num_blocks=8)
