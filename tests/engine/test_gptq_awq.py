"""GPTQ and AWQ (engine.quant.gptq / awq) and their layer-wise driver (engine.quant.calibrate),
on synthetic correlated inputs and tiny random Hearth Llama models (CPU, small)."""

from __future__ import annotations

import pytest
import torch

from engine.errors import LoadCancelledError
from engine.layers.attention import AttentionMetadata, TorchAttention
from engine.models.spec import ModelSpec
from engine.quant.awq import (awq_clip_search, awq_quantize, awq_search, fake_quant_int4, fold_layer_scales,
                              o_proj_scalable)
from engine.quant.calibrate import LAYER_LINEARS, calibrate, check_calibration, sequence_hidden_states
from engine.quant.gptq import gptq_quantize
from engine.quant.rtn import quantize_int4, zero_points
from engine.runner.bring_up import build_on_meta


def correlated_inputs(t: int, k: int, seed: int = 0, outliers: int = 0) -> torch.Tensor:
    """Rows of correlated features (a random mixing of Gaussians), ``outliers`` channels
    scaled up 30x (the activations LLMs show)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * 0.4 + torch.eye(k)
    x = torch.randn(t, k, generator=g) @ mix
    if outliers:
        x[:, torch.randperm(k, generator=g)[:outliers]] *= 30.0
    return x


def output_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return (x.double() @ (w.double() - wq.double()).T).norm().item()


def weight(n: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


# -- GPTQ ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_gptq_with_an_identity_hessian_is_round_to_nearest(group_size):
    w = weight(48, 128)
    q = gptq_quantize(w, torch.eye(128, dtype=torch.float64), group_size=group_size)
    r = quantize_int4(w, group_size)
    assert q.perm is None
    assert torch.equal(q.qweight, r.qweight) and torch.equal(q.scales, r.scales) and torch.equal(q.mins, r.mins)
    assert zero_points(q).min() >= 0  # integer zero points: writable as GPTQ/AWQ/compressed-tensors


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("group_size", [32, 64])
def test_gptq_beats_round_to_nearest_and_act_order_is_not_worse(seed, group_size):
    k = 128
    x = correlated_inputs(1024, k, seed=seed, outliers=4)
    w = weight(64, k, seed=seed + 10)
    h = x.double().T @ x.double()
    rtn = output_error(x, w, quantize_int4(w, group_size).dequantize())
    plain = gptq_quantize(w, h, group_size=group_size)
    ordered = gptq_quantize(w, h.float(), group_size=group_size, act_order=True)
    e_plain = output_error(x, w, plain.dequantize())
    e_ordered = output_error(x, w, ordered.dequantize(unpermute=True))
    assert e_plain < 0.9 * rtn
    assert e_ordered <= e_plain


def test_act_order_perm_sorts_inputs_by_use_and_keeps_groups_contiguous():
    k, G = 128, 32
    x = correlated_inputs(512, k, outliers=3)
    w = weight(40, k)
    h = x.double().T @ x.double()
    q = gptq_quantize(w, h, group_size=G, act_order=True)
    assert torch.equal(torch.sort(q.perm).values, torch.arange(k))
    assert torch.equal(q.perm, torch.argsort(torch.diagonal(h), descending=True, stable=True))
    stored = q.dequantize()  # stored column order: group j // G of column j
    torch.testing.assert_close(stored, q.dequantize(unpermute=True)[:, q.perm])
    # GPTQ's g_idx (the group of each original input) is argsort(perm) // G
    g_idx = torch.argsort(q.perm) // G
    scales_per_input = q.scales.float()[:, g_idx]
    assert torch.equal(scales_per_input[:, q.perm], q.scales.float().repeat_interleave(G, dim=1))
    right = output_error(x, w, q.dequantize(unpermute=True))
    assert right < 0.5 * output_error(x, w, stored)  # the stored order is not the checkpoint's
    assert right < output_error(x, w, quantize_int4(w, G).dequantize())


def test_gptq_result_does_not_depend_on_the_lazy_block_size():
    k = 128
    x = correlated_inputs(512, k, seed=3)
    w = weight(32, k, seed=4)
    h = x.double().T @ x.double()
    a = gptq_quantize(w, h, group_size=64, block_size=48)  # groups straddle the blocks
    b = gptq_quantize(w, h, group_size=64, block_size=128)
    assert (a.codes() != b.codes()).float().mean() < 0.01  # at most a few float-rounding ties
    assert output_error(x, w, a.dequantize()) == pytest.approx(output_error(x, w, b.dequantize()), rel=1e-3)


def test_gptq_handles_inputs_the_calibration_never_used():
    k = 96
    x = correlated_inputs(256, k)
    x[:, 32:64] = 0.0  # one whole group dead, plus one more input
    x[:, 5] = 0.0
    w = weight(16, k)
    q = gptq_quantize(w, x.T @ x, group_size=32)
    dq = q.dequantize()
    assert torch.isfinite(dq).all() and torch.isfinite(q.scales.float()).all()
    assert output_error(x, w, dq) < output_error(x, w, quantize_int4(w, 32).dequantize())


def test_gptq_8_bit_symmetric_and_asymmetric():
    k = 64
    x = correlated_inputs(256, k)
    w = weight(16, k)
    h = x.T @ x
    sym = gptq_quantize(w, h, bits=8, group_size=k, sym=True)
    asym = gptq_quantize(w, h, bits=8, group_size=32)
    assert sym.bits == 8 and sym.qweight.dtype == torch.int8 and sym.mins is None
    assert asym.mins is not None
    four = output_error(x, w, gptq_quantize(w, h, group_size=32).dequantize())
    assert output_error(x, w, sym.dequantize()) < four / 4
    assert output_error(x, w, asym.dequantize()) < four / 4


def test_gptq_symmetric_int4_stores_zero_point_8():
    k = 64
    x = correlated_inputs(256, k)
    q = gptq_quantize(weight(8, k), x.T @ x, group_size=32, sym=True)
    assert torch.equal(zero_points(q), torch.full_like(zero_points(q), 8))


def test_gptq_refuses_a_group_size_that_does_not_divide_the_inputs():
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(weight(8, 96), torch.eye(96), group_size=64)


# -- AWQ -----------------------------------------------------------------------------------------------


def test_fake_quant_matches_round_to_nearest():
    w = weight(24, 128)
    torch.testing.assert_close(fake_quant_int4(w, 32), quantize_int4(w, 32).dequantize(), rtol=0, atol=0)


def test_awq_scales_reduce_the_error_on_inputs_with_outlier_channels():
    k, G = 128, 64
    x = correlated_inputs(1024, k, seed=5, outliers=4)
    ws = [weight(48, k, seed=6), weight(32, k, seed=7)]  # two linears sharing the input, as q and k
    s = awq_search(ws, x, group_size=G)
    assert s.shape == (k,) and (s > 0).all() and not torch.allclose(s, torch.ones(k))
    for w in ws:
        rtn = output_error(x, w, quantize_int4(w, G).dequantize())
        awq = output_error(x, w, awq_quantize(w * s, G).dequantize() / s)
        assert awq < 0.9 * rtn


def test_awq_clipping_does_not_increase_the_error():
    k, G = 128, 64
    x = correlated_inputs(256, k, seed=8)
    w = weight(32, k, seed=9)
    w[:, 3] *= 8.0  # a few large weights stretch their groups' ranges
    clip = awq_clip_search(w, x, group_size=G, rows_per_batch=16)
    assert clip.shape == (32, k // G)
    assert (clip <= w.abs().reshape(32, -1, G).amax(-1) + 1e-7).all()
    assert output_error(x, w, awq_quantize(w, G, clip).dequantize()) \
        <= output_error(x, w, quantize_int4(w, G).dequantize())


# -- tiny models -------------------------------------------------------------------------------------------


def tiny_model(model_type="llama", kv_heads=4, seed=0, **extra):
    cfg = dict(model_type=model_type, vocab_size=512, hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
               max_position_embeddings=256, tie_word_embeddings=True, **extra)
    spec = ModelSpec.from_config(cfg)
    model = build_on_meta(spec, torch.float32, 128)
    model.materialize(torch.device("cpu"))
    model.init_random(seed, std=0.1)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # norms and biases that matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def ids(n=3, length=40, seed=0):
    return torch.randint(0, 512, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("extra", [{}, {"sliding_window": 8, "model_type": "mistral", "kv_heads": 2}])
def test_the_calibration_forward_is_the_models_own(extra):
    """Whole-sequence causal attention without a cache gives the paged torch backend's result."""
    extra = dict(extra)
    model = tiny_model(extra.pop("model_type", "llama"), extra.pop("kv_heads", 4), **extra)
    seq = ids(1, 40)[0]
    n, bs = seq.numel(), 16
    for layer in model.model.layers:
        a = layer.self_attn
        a.attn = TorchAttention(a.num_heads, a.num_kv_heads, a.head_dim, a.scale, a.sliding_window)
    spec = model.spec
    caches = [torch.zeros(2, 4, bs, spec.num_kv_heads, spec.head_dim) for _ in model.model.layers]
    meta = AttentionMetadata(slot_mapping=torch.arange(n), block_tables=torch.arange(4, dtype=torch.int32)[None],
                             seq_lens=torch.tensor([n], dtype=torch.int32),
                             query_start=torch.tensor([0, n], dtype=torch.int32),
                             seq_lens_cpu=[n], query_lens_cpu=[n], max_seq_len=n, block_size=bs)
    with torch.no_grad():
        paged = model(seq, torch.arange(n), caches, meta)
    torch.testing.assert_close(sequence_hidden_states(model, seq), paged, atol=1e-5, rtol=1e-5)
    assert isinstance(model.model.layers[0].self_attn.attn, TorchAttention)  # put back


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_the_awq_fold_keeps_the_float_model_unchanged(model_type):
    model = tiny_model(model_type, kv_heads=4, mlp_bias=True)  # MHA: o_proj is scaled too
    seq = ids(1, 24)[0]
    before = sequence_hidden_states(model, seq)
    g = torch.Generator().manual_seed(3)
    for layer in model.model.layers:
        assert o_proj_scalable(layer.self_attn)
        scales = {key: torch.rand(layer.get_submodule(path).in_features, generator=g) * 4 + 0.25
                  for key, path in LAYER_LINEARS.items()}
        fold_layer_scales(layer, scales)
    after = sequence_hidden_states(model, seq)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones(64))


def test_the_awq_fold_refuses_o_proj_with_grouped_query_attention():
    layer = tiny_model(kv_heads=2).model.layers[0]
    assert not o_proj_scalable(layer.self_attn)
    with pytest.raises(ValueError, match="grouped-query"):
        fold_layer_scales(layer, {"o": torch.ones(64)})


def apply(model, result):
    """The model's float weights replaced by the result's (dequantized) ones, and AWQ's folds."""
    with torch.no_grad():
        for name, qw in result.weights.items():
            lin = model.get_submodule(name)
            lin.weight.copy_(qw.dequantize(unpermute=True))
        params = dict(model.named_parameters())
        for name, value in result.float_params.items():
            params[name].copy_(value)


@pytest.mark.parametrize("method, kv_heads, options", [
    ("gptq", 2, {"act_order": True}),
    ("gptq", 4, {}),
    ("awq", 4, {"awq_clip": False}),
    ("awq", 2, {"awq_grid": 5}),
])
def test_the_driver_quantizes_every_linear_and_the_model_still_runs(method, kv_heads, options):
    model = tiny_model(kv_heads=kv_heads)
    calib = ids(3, 40)
    before = {n: p.clone() for n, p in model.named_parameters()}
    float_out = sequence_hidden_states(model, calib[0])
    seen = []
    result = calibrate(model, calib, method=method, group_size=32, progress=lambda d, t: seen.append((d, t)),
                       **options)
    assert seen == [(1, 2), (2, 2)]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # left as it was
    names = {f"model.layers.{i}.{path}" for i in range(2) for path in LAYER_LINEARS.values()}
    assert set(result.weights) == names
    for name, qw in result.weights.items():
        lin = model.get_submodule(name)
        assert (qw.bits, qw.group_size, qw.out_features, qw.in_features) == (4, 32, lin.out_features,
                                                                            lin.in_features)
        assert (qw.perm is not None) == (method == "gptq" and options.get("act_order", False))
    if method == "awq":
        assert "model.layers.0.input_layernorm.weight" in result.float_params
    else:
        assert result.float_params == {}
    apply(model, result)
    out = sequence_hidden_states(model, calib[0])
    assert torch.isfinite(out).all()
    assert (out - float_out).norm() < 0.5 * float_out.norm()


def test_gptq_through_the_driver_beats_round_to_nearest_on_its_calibration_text():
    model = tiny_model()
    calib = ids(4, 48, seed=1)
    ref = [sequence_hidden_states(model, s) for s in calib]

    def error():
        return sum((sequence_hidden_states(model, s) - r).pow(2).sum().item() for s, r in zip(calib, ref))

    result = calibrate(model, calib, method="gptq", group_size=32)
    saved = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for name in result.weights:
            lin = model.get_submodule(name)
            lin.weight.copy_(quantize_int4(lin.weight, 32).dequantize())
    rtn = error()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    apply(model, result)
    assert error() < rtn


def test_cancelling_stops_the_driver_and_leaves_the_model_as_it_was():
    model = tiny_model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    done = []
    with pytest.raises(LoadCancelledError):
        calibrate(model, ids(2, 32), method="gptq", group_size=32, progress=lambda d, t: done.append(d),
                  should_stop=lambda: len(done) >= 1)
    assert done == [1]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert model.model.layers[0].self_attn.attn is None  # the model's own backend slot put back


def test_a_group_size_that_does_not_fit_is_refused_naming_the_layer():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.qkv_proj: group size 48"):
        check_calibration(model, "gptq", 4, 48)
    with pytest.raises(ValueError, match="4 bits only"):
        calibrate(model, ids(1, 8), method="awq", bits=8, group_size=32)


def test_one_layer_calibrates_while_the_others_are_not_loaded():
    """A streaming load calls calibrate_layer as each layer's weights arrive: the other
    layers may still be on the meta device, and the result is the whole-model driver's."""
    from engine.layers.modules import materialize
    from engine.quant.calibrate import CalibrationOptions, calibrate_layer, calibration_inputs

    full = tiny_model()
    calib = ids(2, 32)
    whole = calibrate(full, calib, method="gptq", group_size=32)
    partial = build_on_meta(full.spec, torch.float32, 128)
    for part in (partial.model.embed_tokens, partial.model.layers[0]):
        materialize(part, torch.device("cpu"))
    partial.rotary.build(torch.device("cpu"), torch.float32)
    state = dict(full.named_parameters())
    with torch.no_grad():
        for name, p in partial.named_parameters():
            if not p.is_meta:
                p.copy_(state[name])
    assert partial.model.layers[1].self_attn.qkv_proj.weight.is_meta
    hs = calibration_inputs(partial, calib)
    weights, float_params, next_hs = calibrate_layer(partial, 0, hs, CalibrationOptions("gptq", group_size=32))
    assert set(weights) == {f"model.layers.0.{p}" for p in LAYER_LINEARS.values()} and float_params == {}
    for name, qw in weights.items():
        assert torch.equal(qw.qweight, whole.weights[name].qweight)
    assert len(next_hs) == 2 and next_hs[0].shape == (32, 64)


def test_awq_scales_are_normalised_powers_of_the_mean_activation():
    from engine.quant.awq import activation_scales

    x = correlated_inputs(64, 32, outliers=2)
    s = activation_scales(x, 0.5)
    assert s.max() * s.min() == pytest.approx(1.0, rel=1e-5)
    ratio = s / x.abs().mean(0).sqrt()
    torch.testing.assert_close(ratio, ratio[0].expand(32))
    torch.testing.assert_close(activation_scales(x, 0.0), torch.ones(32))
