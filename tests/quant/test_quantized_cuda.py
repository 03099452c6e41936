"""On a CUDA GPU, quantized tiny models run the Triton kernels (the GEMV tuned at load,
SwiGLU fused, the GEMM for prompts), inside CUDA graphs, and give the logits of
transformers' model holding the dequantized weights, to bf16 precision; greedy decoding
through the engine gives the same tokens with and without CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from engine.config import load_config
from engine.layers.quant_kernels import TritonQuant
from engine.layers.quant_linear import QuantizedLinear
from engine.loader.engine_loader import load_model
from engine.runner.lifecycle import release_runner
from tests.quant.test_quantized_models import PROMPT, hearth_logits, reference_logits

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_quantized_logits_on_cuda_match_the_dequantized_reference(tiny_models, quant):
    config = load_config(str(tiny_models["llama3"]), device="cuda", dtype="bfloat16", quantization=quant,
                         max_model_len=256, num_blocks=64)
    loaded = load_model(config)
    try:
        runner = loaded.runner
        layers = [m for m in runner.model.modules() if isinstance(m, QuantizedLinear)]
        assert layers and all(isinstance(m.kernel, TritonQuant) for m in layers)
        got = hearth_logits(runner)
        want = reference_logits(tiny_models["llama3"], _cpu_copy(runner))
        err = (got - want).abs().max().item()
        assert err < 0.05 * want.abs().max().item(), err
    finally:
        release_runner(loaded.runner)


@pytest.mark.parametrize("family", ["llama3", "qwen2"])  # qwen2: q/k/v with a bias after the fused norm
@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_one_row_takes_the_norm_into_the_dp4a_prologue(tiny_models, quant, family, monkeypatch):
    """With dp4a configs on q/k/v and gate_up, a one-row forward runs each layer's norms inside
    those GEMVs' kernels (``quant_gemv_normed``, no norm kernel): the logits are as close to the
    dequantized reference as the norm-then-GEMV path's (closer to the float norm, which
    that path rounds first); more rows (a prompt) keep the norm kernel."""
    from engine.layers.norm import TritonRMSNorm
    from hearth_kernels import quant_gemv as qg

    config = load_config(str(tiny_models[family]), device="cuda", dtype="bfloat16", quantization=quant,
                         max_model_len=256, num_blocks=64)
    loaded = load_model(config)
    try:
        runner = loaded.runner
        cfg = qg.GemvConfig(16, 4, 4, qg.DP4A, 2)
        for layer in runner.model.model.layers:  # q/k/v: the norm in the prologue; gate_up: in x's quantizing
            for proj, norm, c in ((layer.self_attn.qkv_proj, layer.input_layernorm, cfg),
                                  (layer.mlp.gate_up_proj, layer.post_attention_layernorm, cfg._replace(qx=1))):
                proj.use_kernel(TritonQuant(c))
                assert isinstance(norm, TritonRMSNorm) and proj.kernel.fuses_norm(proj, norm)
        calls = []
        real = qg.quant_gemv_normed
        monkeypatch.setattr(qg, "quant_gemv_normed", lambda *a, **k: calls.append(1) or real(*a, **k))
        ids = [PROMPT[0]]
        fused = hearth_logits(runner, ids)
        assert len(calls) == 2 * len(runner.model.model.layers)
        hearth_logits(runner)  # a prompt: the norm kernel, then the GEMM
        assert len(calls) == 2 * len(runner.model.model.layers)
        monkeypatch.setattr(TritonQuant, "fuses_norm", lambda self, layer, norm: False)
        two_calls = hearth_logits(runner, ids)
        want = reference_logits(tiny_models[family], _cpu_copy(runner), ids)

        def err(got):
            return float((got - want).norm() / want.norm())

        assert err(fused) <= 1.25 * err(two_calls) + 1e-3, (err(fused), err(two_calls))
        assert float((fused - two_calls).norm() / two_calls.norm()) < 0.05
        assert (fused - want).abs().max().item() < 0.05 * want.abs().max().item()
    finally:
        release_runner(loaded.runner)


class _cpu_copy:
    """The runner's model seen from CPU tensors (reference_logits reads its weights)."""

    def __init__(self, runner) -> None:
        self.model = runner.model


def greedy_with_and_without_graphs(path, quantization: str) -> list[list[int]]:
    """24 greedy tokens of PROMPT through the engine on CUDA: with CUDA graphs, then eagerly."""
    from engine.api import Engine, Request, SamplingParams

    outs = []
    for eager in (False, True):
        eng = Engine.load(str(path), device="cuda", quantization=quantization, max_model_len=256,
                          enforce_eager=eager)
        try:
            params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
            outs.append(eng.generate([Request(prompt_token_ids=PROMPT, params=params)])[0].token_ids)
        finally:
            eng.shutdown()
    return outs


def test_greedy_tokens_with_and_without_cuda_graphs_agree(tiny_models):
    graphs, eager = greedy_with_and_without_graphs(tiny_models["llama3"], "int4")
    assert graphs == eager


def test_quantizing_on_the_gpu_never_holds_the_float_model(tmp_path, tokenizer_files):
    """Each float tensor is quantized as it streams in (in row chunks): on a model of many
    layers the load's peak on the GPU stays well under its float32 bytes."""
    from transformers import LlamaConfig

    from engine.layers.modules import module_bytes
    from tests.conftest import save_tiny

    cfg = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=12, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=1024, max_position_embeddings=256, tie_word_embeddings=True)
    path = save_tiny(cfg, tmp_path / "deep", tokenizer_files)
    float_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))  # float32 checkpoint
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    config = load_config(str(path), device="cuda", dtype="float32", quantization="int4", quant_head=True,
                         max_model_len=64, num_blocks=4, enforce_eager=True)
    loaded = load_model(config)
    try:
        peak = torch.cuda.max_memory_allocated() - base
        assert module_bytes(loaded.runner.model) < float_bytes / 4
        assert peak < 0.5 * float_bytes, (peak, float_bytes)
    finally:
        release_runner(loaded.runner)
