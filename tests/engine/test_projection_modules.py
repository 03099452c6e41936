"""Every projection is a module the model calls: one swapped in at load (through the model
transforms hook, as a quantized or sharded linear will be) is what runs. A plain float64
reference of one layer's o_proj gives the model's logits; a wrong one does not. The kernel
plan makes the fused-kernel choices as module choices, sharing the parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.config import load_config
from engine.layers.attention import TorchAttention
from engine.layers.kernel_plan import KernelPlan, apply_kernel_plan
from engine.layers.linear import SwiGLUDownLinear
from engine.layers.modules import replace_module
from engine.layers.norm import RMSNorm, TritonRMSNorm
from engine.layers.rotary import TritonRotaryEmbedding
from engine.models.spec import ModelSpec, read_config
from engine.runner.gemv_tuning import _kinds
from engine.runner.model_runner import ModelRunner

PROMPT = [5, 17, 99, 3, 1024, 7, 42, 8, 300, 11, 12, 13, 2048]
O_PROJ = "model.layers.1.self_attn.o_proj"


class Float64Linear(nn.Module):
    """``x @ W.T`` computed in float64 and cast back: no kernel object, no Hearth code."""

    def __init__(self, in_features: int, out_features: int, wrong: str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.wrong = wrong
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        w = self.weight.double()
        if self.wrong == "transposed":
            w = w.T
        elif self.wrong == "scaled":
            w = w * 1.01
        return (x.double() @ w.T).to(x.dtype)


def swap_o_proj(wrong: str | None = None):
    def transform(model: nn.Module) -> None:
        old = model.get_submodule(O_PROJ)
        replace_module(model, O_PROJ, Float64Linear(old.in_features, old.out_features, wrong))
    return transform


def prompt_logits(path, transforms=()) -> tuple[torch.Tensor, ModelRunner]:
    spec = ModelSpec.from_config(read_config(path))
    config = load_config(device="cpu", dtype="float32", attention="torch", num_blocks=8)
    runner = ModelRunner.create(config, spec, path, device=torch.device("cpu"), dtype=torch.float32,
                                attention="torch", max_model_len=128, transforms=list(transforms))
    n = len(PROMPT)
    with torch.inference_mode():
        meta = runner._metadata([[0]], [0], [n])
        hidden = runner.model(torch.tensor(PROMPT), torch.arange(n), runner.kv_caches, meta)
        return runner.model.compute_logits(hidden).clone(), runner


@pytest.fixture(scope="module")
def reference(tiny_models):
    logits, _ = prompt_logits(tiny_models["llama3"])
    return logits


def test_a_float64_reference_projection_gives_the_same_logits(tiny_models, reference):
    logits, runner = prompt_logits(tiny_models["llama3"], [swap_o_proj()])
    swapped = runner.model.get_submodule(O_PROJ)
    assert isinstance(swapped, Float64Linear) and swapped.calls == 1  # the model called it
    assert swapped not in _kinds(runner.model)["o"]  # the GEMV tuner leaves it alone
    torch.testing.assert_close(logits, reference, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("wrong", ["transposed", "scaled"])
def test_a_wrong_reference_projection_changes_the_logits(tiny_models, reference, wrong):
    logits, _ = prompt_logits(tiny_models["llama3"], [swap_o_proj(wrong)])
    assert (logits - reference).abs().max() > 1e-3


class RecordingNormed(nn.Module):
    """A projection that takes its norm (``normed``) and records each call, then does the
    two calls itself."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.normed_rows: list[int] = []

    def forward(self, x):
        return self.inner(x)

    def normed(self, x, residual, norm):
        from engine.layers.linear import norm_then_project

        self.normed_rows.append(x.shape[0])
        return norm_then_project(self, x, residual, norm)


def test_each_norm_goes_with_the_projection_after_it(tiny_models, reference):
    """The decoder layer hands q/k/v and gate_up their norms (``normed``; the first layer's
    q/k/v without a residual), and a projection without ``normed`` gets the norm then
    itself: the logits don't change either way."""
    _, runner = prompt_logits(tiny_models["llama3"])
    model = runner.model
    layer = model.model.layers[1]  # the pairs the GEMV tuner times together
    assert layer.normed_projections() == ((layer.self_attn.qkv_proj, layer.input_layernorm),
                                          (layer.mlp.gate_up_proj, layer.post_attention_layernorm))
    qkv, gate_up, plain = ("model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.gate_up_proj",
                           "model.layers.1.self_attn.qkv_proj")
    for name in (qkv, gate_up):
        replace_module(model, name, RecordingNormed(model.get_submodule(name)))
    old = model.get_submodule(plain)
    f64 = Float64Linear(old.in_features, old.out_features)
    f64.weight.data = old.weight.data
    replace_module(model, plain, f64)
    n = len(PROMPT)
    with torch.inference_mode():
        meta = runner._metadata([[0]], [0], [n])
        logits = model.compute_logits(model(torch.tensor(PROMPT), torch.arange(n), runner.kv_caches, meta))
    assert model.get_submodule(qkv).normed_rows == [n] and model.get_submodule(gate_up).normed_rows == [n]
    assert f64.calls == 1
    torch.testing.assert_close(logits, reference, atol=2e-5, rtol=1e-5)


def _tiny_model():
    from engine.runner.bring_up import build_on_meta
    from engine.shapes import shape_config

    spec = ModelSpec.from_config(shape_config("tiny"))
    model = build_on_meta(spec, torch.float32, 64)
    model.materialize(torch.device("cpu"))
    model.init_random(0)
    return model


def test_the_kernel_plan_replaces_modules_on_the_same_parameters():
    model = _tiny_model()
    params = dict(model.named_parameters())
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    apply_kernel_plan(model, KernelPlan(attention=TorchAttention, fused=True))
    assert all(type(m) is TritonRMSNorm for m in model.modules() if isinstance(m, RMSNorm))
    assert len([m for m in model.modules() if isinstance(m, RMSNorm)]) == len(norms)
    assert isinstance(model.rotary, TritonRotaryEmbedding) and model.rotary.cos is not None
    from hearth_kernels.activation import silu_and_mul

    downs = [m for m in model.modules() if isinstance(m, SwiGLUDownLinear)]
    assert downs and all(m.kernel.act is silu_and_mul for m in downs)
    after = dict(model.named_parameters())
    assert after.keys() == params.keys() and all(after[k] is params[k] for k in params)  # nothing copied
    for layer in model.model.layers:
        attn = layer.self_attn
        assert isinstance(attn.attn, TorchAttention)
        assert (attn.attn.num_heads, attn.attn.num_kv_heads, attn.attn.head_dim) == \
            (attn.num_heads, attn.num_kv_heads, attn.head_dim)


def test_rope_goes_into_the_kv_write_under_the_triton_plan_only():
    """With the Triton backend the cache write rotates q and k (one kernel); the torch
    backend and calibration's attention (which writes no cache) leave RoPE to the rotary."""
    from engine.layers.triton_attention import TritonAttention
    from engine.quant.calibrate import calibration_attention

    model = _tiny_model()
    apply_kernel_plan(model, KernelPlan(attention=TritonAttention, fused=True))
    layers = list(model.model.layers)
    assert model.rotary.in_place and all(layer.self_attn.rope_in_kv_write for layer in layers)
    with calibration_attention(layers):
        assert not any(layer.self_attn.rope_in_kv_write for layer in layers)
    assert all(layer.self_attn.rope_in_kv_write for layer in layers)
    for plan in (KernelPlan(attention=TorchAttention, fused=True), KernelPlan(attention=TorchAttention, fused=False)):
        model = _tiny_model()
        apply_kernel_plan(model, plan)
        assert not any(layer.self_attn.rope_in_kv_write for layer in model.model.layers)


def test_the_reference_plan_keeps_plain_torch():
    model = _tiny_model()
    apply_kernel_plan(model, KernelPlan(attention=TorchAttention, fused=False))
    assert not any(isinstance(m, (TritonRMSNorm, TritonRotaryEmbedding)) for m in model.modules())
    assert all(m.kernel.act.__module__ == "engine.layers.linear_kernels"
               for m in model.modules() if isinstance(m, SwiGLUDownLinear))
