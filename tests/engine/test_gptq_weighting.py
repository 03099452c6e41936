"""GPTQ's per-token weighted Hessians (engine.quant.calibrate._gptq_statistics): the attention
each key receives and each token's residual norm decide how much its error counts.

Plain GPTQ (one vote per token) tied round-to-nearest on SmolLM2-135M: the first token of
every sequence is an attention sink that most queries attend to, and GPTQ pushed the
rounding error into the input directions only the sink uses (its held-out key/value error
was 13-28x round-to-nearest's in the middle layers). The model here has such a sink."""

from __future__ import annotations

import pytest
import torch

from engine.layers.linear_kernels import silu_and_mul_reference
from engine.models.spec import ModelSpec
from engine.quant.calibrate import (LAYER_LINEARS, CausalAttention, _gptq_statistics, calibrate,
                                    calibration_attention, run_layer, sequence_hidden_states)
from engine.quant.rtn import quantize_int4
from engine.runner.bring_up import build_on_meta

HIDDEN, HEADS, HEAD_DIM = 64, 4, 16


@pytest.mark.parametrize("kv_heads, window", [(4, None), (2, None), (2, 5)])
def test_recording_attention_gives_the_same_output_and_what_each_key_receives(kv_heads, window):
    g = torch.Generator().manual_seed(0)
    n = 12
    q = torch.randn(n, HEADS, HEAD_DIM, generator=g)
    k = torch.randn(n, kv_heads, HEAD_DIM, generator=g)
    v = torch.randn(n, kv_heads, HEAD_DIM, generator=g)
    u = torch.rand(n, generator=g) + 0.5
    attn = CausalAttention(HEADS, kv_heads, HEAD_DIM ** -0.5, window)
    plain = attn.forward(q, k, v)
    assert attn.received is None
    attn.query_weights = u
    recorded = attn.forward(q, k, v)
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)
    # by hand: softmax over the allowed keys, summed over queries with weights u, mean over heads
    kk = k.repeat_interleave(HEADS // kv_heads, dim=1)
    scores = torch.einsum("ihd,jhd->hij", q, kk) * HEAD_DIM ** -0.5
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    p = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    expected = torch.einsum("i,hij->j", u, p) / HEADS
    torch.testing.assert_close(attn.received, expected, atol=1e-5, rtol=1e-5)


def sink_model(seed: int) -> "torch.nn.Module":
    """One Qwen2-style layer whose token 0, the first of every sequence, is an attention sink:
    every query's bias points along the sink's key, so most of the attention goes to it.
    The other tokens' embeddings are strongly anisotropic (variances falling 100x across
    a random basis) and the sink sits mostly in their low-variance directions, as on
    SmolLM2."""
    cfg = dict(model_type="qwen2", vocab_size=512, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=1,
               num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=256,
               tie_word_embeddings=True, rope_theta=1e6)  # rope barely turns the sink's dimension
    model = build_on_meta(ModelSpec.from_config(cfg), torch.float32, 128)
    model.materialize(torch.device("cpu"))
    model.init_random(seed, std=0.1)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        basis = torch.linalg.qr(torch.randn(HIDDEN, HIDDEN, generator=g))[0]
        spread = 0.01 ** torch.linspace(0, 1, HIDDEN)
        emb = model.model.embed_tokens.weight
        emb.copy_((torch.randn(512, HIDDEN, generator=g) * spread) @ basis.T)
        emb[0] = (torch.randn(HIDDEN, generator=g) * spread.flip(0)) @ basis.T
        layer = model.model.layers[0]
        sink_dir = torch.nn.functional.normalize(layer.input_layernorm(emb[:1])[0], dim=0)
        attn = layer.self_attn
        for h in range(HEADS):  # dimension 7 of each head: the slowest rotary pair
            attn.qkv_proj.bias[h * HEAD_DIM + 7] = 3.0
            attn.qkv_proj.weight[attn.q_size + h * HEAD_DIM + 7] = sink_dir
    return model


def sequences(n: int, seed: int) -> torch.Tensor:
    s = torch.randint(1, 512, (n, 64), generator=torch.Generator().manual_seed(seed))
    s[:, 0] = 0
    return s


@pytest.mark.parametrize("seed", [0, 1])
def test_gptq_keeps_an_attention_sinks_keys_and_values(seed):
    model = sink_model(seed)
    calib, held_out = sequences(32, seed + 1), sequences(8, seed + 100)
    layer = model.model.layers[0]
    with torch.no_grad(), calibration_attention([layer]):  # the sink really is one
        backend = layer.self_attn.attn
        backend.query_weights = torch.ones(64)
        run_layer(model, layer, model.model.embed_tokens(held_out[0]))
        assert backend.received[0] > 40  # of 64 queries' attention
        backend.query_weights = None

    qkv = layer.self_attn.qkv_proj.weight.detach().clone()
    ref = [sequence_hidden_states(model, s) for s in held_out]
    result = calibrate(model, calib, method="gptq", group_size=32, damp=0.01)
    gptq_qkv = result.weights["model.layers.0.self_attn.qkv_proj"].dequantize()
    rtn_qkv = quantize_int4(qkv, 32).dequantize()

    with torch.no_grad():
        x = torch.cat([layer.input_layernorm(model.model.embed_tokens(s)) for s in held_out])
    sink = torch.zeros(x.shape[0], dtype=torch.bool)
    sink[::64] = True
    kv = slice(layer.self_attn.q_size, None)

    def sink_kv_error(w):
        return (x[sink] @ (qkv - w)[kv].T).pow(2).sum().item()

    # one vote per token left it at 0.3-0.5x round-to-nearest's; weighted by attention, ~0.02x
    assert sink_kv_error(gptq_qkv) < 0.15 * sink_kv_error(rtn_qkv)

    def output_error(weights):
        saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for name, w in weights.items():
                model.get_submodule(name).weight.copy_(w)
            err = sum((sequence_hidden_states(model, s) - r).pow(2).sum().item() for s, r in zip(held_out, ref))
            for n, p in model.named_parameters():
                p.copy_(saved[n])
        return err

    names = list(result.weights)
    gptq = output_error({n: result.weights[n].dequantize() for n in names})
    rtn = output_error({n: quantize_int4(model.get_submodule(n).weight, 32).dequantize() for n in names})
    assert gptq < 0.5 * rtn


def test_the_hessians_weigh_each_token_as_documented():
    """q rows and o_proj: 1 / (mean(h^2) + eps) of the layer's input residual; gate_up and
    down: of its output residual; k/v rows: the attention the token receives, the queries
    weighted as for q."""
    model = sink_model(0)
    layer = model.model.layers[0]
    eps = layer.input_layernorm.eps
    seqs = [model.model.embed_tokens(s).detach() for s in sequences(2, 5)]
    seen = {}
    hooks = [layer.get_submodule(p).register_forward_hook(lambda m, a, o, k=k: seen.setdefault(k, []).append(a[0]))
             for k, p in LAYER_LINEARS.items()]
    received, outs = [], []
    with torch.no_grad(), calibration_attention([layer]):
        backend = layer.self_attn.attn
        for h in seqs:
            backend.query_weights = 1.0 / (h.pow(2).mean(-1) + eps)
            outs.append(run_layer(model, layer, h))
            received.append(backend.received)
        backend.query_weights = None
        for hook in hooks:
            hook.remove()
        hessians = _gptq_statistics(model, layer, seqs)
        assert backend.query_weights is None and backend.received is None  # recording stops after
    assert set(hessians) == {"q", "kv", "o", "gate_up", "down"}

    def weighted(xs, ws):
        x, w = torch.cat(xs).double(), torch.cat(ws).double()
        return (x * w[:, None]).T @ x

    inw = [1.0 / (h.pow(2).mean(-1) + eps) for h in seqs]
    outw = [1.0 / (o.pow(2).mean(-1) + eps) for o in outs]
    down_in = [silu_and_mul_reference(x) for x in seen["down"]]
    expected = {"q": weighted(seen["qkv"], inw), "kv": weighted(seen["qkv"], received), "o": weighted(seen["o"], inw),
                "gate_up": weighted(seen["gate_up"], outw), "down": weighted(down_in, outw)}
    for key, h in expected.items():
        torch.testing.assert_close(hessians[key].double(), h, rtol=1e-4, atol=1e-6 * h.abs().max().item())
    # the sink gets most of the attention: its k/v weight dwarfs the others'
    assert received[0][0] > 20 * received[0][1:].median()


def test_true_sequential_quantizes_each_linear_on_the_inputs_of_the_ones_before_it_quantized():
    from engine.quant.calibrate import CalibrationOptions, calibrate_layer, calibration_inputs
    from engine.quant.gptq import gptq_quantize

    model = sink_model(1)
    layer = model.model.layers[0]
    hs = calibration_inputs(model, sequences(4, 7))
    one = CalibrationOptions("gptq", group_size=32)
    plain, _, _ = calibrate_layer(model, 0, hs, one)
    seq, _, _ = calibrate_layer(model, 0, hs, CalibrationOptions("gptq", group_size=32, true_sequential=True))
    name = "model.layers.0."
    qkv = name + LAYER_LINEARS["qkv"]
    assert torch.equal(seq[qkv].qweight, plain[qkv].qweight)  # the first step is the same
    # o_proj: on the inputs the layer gives with qkv quantized
    saved = layer.self_attn.qkv_proj.weight.detach().clone()
    with torch.no_grad(), calibration_attention([layer]):
        layer.self_attn.qkv_proj.weight.copy_(seq[qkv].dequantize())
        hessians = _gptq_statistics(model, layer, hs, ["o"])
        layer.self_attn.qkv_proj.weight.copy_(saved)
    assert set(hessians) == {"o"}
    o = gptq_quantize(layer.self_attn.o_proj.weight, hessians["o"], group_size=32)
    assert torch.equal(seq[name + LAYER_LINEARS["o"]].qweight, o.qweight)
    assert not torch.equal(seq[name + LAYER_LINEARS["o"]].qweight, plain[name + LAYER_LINEARS["o"]].qweight)
    assert torch.equal(layer.self_attn.qkv_proj.weight, saved)  # the layer is left as it was
