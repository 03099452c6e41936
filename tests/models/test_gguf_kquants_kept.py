"""A GGUF file with Q4_K, Q5_K and Q6_K tensors (a 3-layer cut of the bundled SmolLM2 whose
down projections are rewritten as random K-quant super-blocks with the gguf writer): the
default load keeps them quantized (Q4_K as int4, Q5_K as int8 codes with mins, groups of
32; Q6_K as int8 in groups of 16) and, with exact float activations, its logits are
transformers' for the file's own dequantized weights (tolerance: the scales and mins
rounded once to float16); the C kernel, per layer and in the whole-model decode step, too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.api import Engine
from tests.models.test_parity import gguf_reference_model, native_logits
from tests.quant.test_gguf_kquants import dequantize, random_blocks

gguf = pytest.importorskip("gguf")

LAYERS = 3
DOWN_TYPES = {0: "Q4_K", 1: "Q5_K", 2: "Q6_K"}


def write_cut(path, down_types: dict[int, str]):
    """The bundled SmolLM2 cut to LAYERS layers, with each listed layer's down projection
    rewritten as random blocks of its type; returns ``path``."""
    from engine.loader.resolve import default_gguf_path

    reader = gguf.GGUFReader(str(default_gguf_path()))
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = LAYERS if name == "llama.block_count" else field.contents()
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= LAYERS:
            continue
        kind = down_types.get(int(t.name.split(".")[1])) if t.name.endswith("ffn_down.weight") else None
        if kind in ("Q4_K", "Q5_K", "Q6_K"):  # [576 rows, 1536 inputs]: 6 super-blocks a row
            rows = int(t.shape[1])
            data = random_blocks(kind, rows, int(t.shape[0]) // 256, seed=len(kind) + rows)
            writer.add_tensor(t.name, data, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
        elif kind == "F16":
            data = np.random.default_rng(1).normal(0, 0.02, size=(int(t.shape[1]), int(t.shape[0])))
            writer.add_tensor(t.name, data.astype(np.float16), raw_dtype=gguf.GGMLQuantizationType.F16)
        elif kind is not None:  # any other type: random bytes of its size
            qtype = getattr(gguf.GGMLQuantizationType, kind)
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            rows, cols = int(t.shape[1]), int(t.shape[0])
            data = np.random.default_rng(0).integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
            writer.add_tensor(t.name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def kquant_gguf(default_model, tmp_path_factory):
    return write_cut(tmp_path_factory.mktemp("kquant") / "smol-3layer-kquants.gguf", DOWN_TYPES)


@pytest.mark.parametrize("kernel", ["reference", "fast"])
def test_q4_k_and_q5_k_are_kept_quantized_and_match_the_files_weights(kquant_gguf, monkeypatch, kernel):
    """With exact float activations (the reference kernel) the logits are transformers' for
    the file's dequantized weights up to the float16 scales (measured: 0.012 at a largest
    logit of 34); Hearth's C kernel rounds activations to int8 blocks, as llama.cpp does,
    which moves them a little more (with random blocks in the down projections the logits
    are nearly flat, so near-ties may swap: the fast kernel is held to its distance)."""
    if kernel == "reference":
        monkeypatch.setenv("HEARTH_QUANT_KERNEL", "reference")
    else:
        monkeypatch.delenv("HEARTH_QUANT_KERNEL", raising=False)
    ref_model = gguf_reference_model(kquant_gguf)
    eng = Engine.load(str(kquant_gguf), device="cpu", dtype="float32", num_blocks=64, max_model_len=512)
    try:
        info = eng.model_info
        assert info.quantization == "gguf"
        for kind in ("Q4_K", "Q5_K", "Q6_K"):
            assert f"1 {kind} tensors kept" in info.quant_detail, info.quant_detail
        downs = [layer.mlp.down_proj for layer in eng.runner.model.model.layers]
        assert [(m.bits, m.group_size, m.mins is not None) for m in downs] == [(4, 32, True), (8, 32, True),
                                                                               (8, 16, False)]
        ids = eng.tokenizer.encode("The capital of France is Paris. The capital of Germany is")
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids])).logits[0].float()
        got = native_logits(eng, ids, [len(ids)])
        if kernel == "reference":
            torch.testing.assert_close(got, ref, atol=2e-3 * ref.abs().max().item(), rtol=0)
            assert torch.equal(got.argmax(-1), ref.argmax(-1))
        else:  # measured: mean 0.088, largest 0.67
            top = ref.abs().max()
            assert (got - ref).abs().mean() < 0.01 * top and (got - ref).abs().max() < 0.05 * top
    finally:
        eng.shutdown()


def test_mixed_fused_groups_widen_or_say_why_they_stay_float():
    """q/k/v (and gate/up) run as one matmul, so their kept forms must agree: kept members
    of different forms in groups of 32 become int8 codes with mins (exactly), with a member
    in groups of 16 (Q4_K_M's Q6_K v) int8 codes with mins in groups of 16 (exactly), and a
    group with a member that stays float stays float, counted as such in the model's info."""
    from types import SimpleNamespace

    import engine.loader.gguf as g
    from engine.quant.gguf_kquants import read_kquant, to_weight

    q4k = read_kquant(random_blocks("Q4_K", 8, 1, seed=1), "Q4_K")
    q5k = read_kquant(random_blocks("Q5_K", 8, 1, seed=2), "Q5_K")
    w4, w5 = to_weight(q4k), to_weight(q5k)
    widened = g._as_int8_with_mins(w4)
    assert (widened.bits, widened.group_size) == (8, 32) and torch.equal(widened.dequantize(), w4.dequantize())
    assert g._as_int8_with_mins(w5) is w5
    w6 = to_weight(read_kquant(random_blocks("Q6_K", 8, 1, seed=6), "Q6_K"))
    for w in (w4, w5, w6):
        g16 = g._as_int8_g16_with_mins(w)
        assert (g16.bits, g16.group_size, g16.mins is not None) == (8, 16, True)
        assert torch.equal(g16.dequantize(torch.float64), w.dequantize(torch.float64))
    raw = {}
    tensors = {}
    layers = {0: ("Q4_K", "Q4_K", "Q5_K"), 1: ("Q4_K", "Q4_K", "Q6_K"), 2: ("Q4_K", "Q4_K", "Q6_K")}
    for layer, kinds in layers.items():
        for proj, kind, seed in zip(("q_proj", "k_proj", "v_proj"), kinds, (3, 4, 5)):
            blocks = random_blocks(kind, 8, 1, seed=seed + 10 * layer)
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            raw[name] = SimpleNamespace(tensor_type=getattr(gguf.GGMLQuantizationType, kind), data=blocks)
            tensors[name] = torch.from_numpy(dequantize(blocks, getattr(gguf.GGMLQuantizationType, kind)))

    # layer 2's v has rows the reader gives in another order than the file's blocks hold
    # (no exact match: it stays float), so the whole group does
    v2 = "model.layers.2.self_attn.v_proj.weight"
    tensors[v2] = tensors[v2] + 1.0

    def fake_tensors(path, cfg, names):
        return raw

    import pytest as _pytest

    with _pytest.MonkeyPatch.context() as mp:
        mp.setattr(g, "_gguf_tensors", fake_tensors)
        kept, types = g.kept_quantized(None, None, tensors)
    layer0 = [kept[f"model.layers.0.self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")]
    assert {(w.bits, w.group_size, w.mins is not None) for w in layer0} == {(8, 32, True)}
    for w, name in zip(layer0, ("q_proj", "k_proj", "v_proj")):
        torch.testing.assert_close(w.dequantize(), tensors[f"model.layers.0.self_attn.{name}.weight"],
                                   rtol=2e-3, atol=2e-3 * w.dequantize().abs().max().item())
    layer1 = [kept[f"model.layers.1.self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")]
    assert {(w.bits, w.group_size, w.mins is not None) for w in layer1} == {(8, 16, True)}
    for w, name in zip(layer1, ("q_proj", "k_proj", "v_proj")):
        torch.testing.assert_close(w.dequantize(), tensors[f"model.layers.1.self_attn.{name}.weight"],
                                   rtol=2e-3, atol=2e-3 * w.dequantize().abs().max().item())
    assert not any(n.startswith("model.layers.2.") for n in kept)
    assert types == {"kept": {"Q4_K": 4, "Q5_K": 1, "Q6_K": 1}, "dequantized": {"Q6_K": 1},
                     "fused_float": {"Q4_K": 2}}


def _c_step_gives_the_eager_tokens(monkeypatch, path):
    """The whole-model C decode step on ``path`` gives the eager steps' greedy tokens, and it ran."""
    from engine.api import SamplingParams
    from tests.engine.test_cpu_decode_step import _both_ways

    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    runs, infos, calls = _both_ways(monkeypatch, path, "auto", ["The capital of France is"], params)
    if infos[1] is not True:
        pytest.skip(f"the C decode step can't run here: {infos[1]}")
    assert runs[0][0].token_ids == runs[1][0].token_ids
    assert len(calls) >= 10


def test_the_c_decode_step_runs_the_kept_k_quants(kquant_gguf, monkeypatch):
    """The whole-model C decode step takes every kept form here (int4 g32, int8 g32 with
    mins, int8 g16): the same greedy tokens as the eager steps, and it ran."""
    monkeypatch.delenv("HEARTH_QUANT_KERNEL", raising=False)
    _c_step_gives_the_eager_tokens(monkeypatch, kquant_gguf)


@pytest.fixture(scope="module")
def q4_k_m_gguf(default_model, tmp_path_factory):
    """A 2-layer file in llama.cpp's Q4_K_M mix (random super-blocks, SmolLM2's tokenizer):
    layer 1's attn_v is Q6_K beside Q4_K q and k (``use_more_bits``), layer 0's all Q4_K."""
    from benchmarks.kquant_gguf import KQuantShape, write_metadata_only, write_q4_k_m
    from engine.loader.resolve import default_gguf_path

    folder = tmp_path_factory.mktemp("q4km")
    write_metadata_only(default_gguf_path(), folder / "meta.gguf")
    shape = KQuantShape(hidden=256, layers=2, ffn=512, heads=4, kv_heads=2, context=512)
    write_q4_k_m(folder / "tiny-q4_k_m.gguf", shape, folder / "meta.gguf", seed=5)
    return folder / "tiny-q4_k_m.gguf"


@pytest.mark.slow
def test_a_q4_k_m_q_k_v_with_a_q6_k_v_runs_kept_quantized(q4_k_m_gguf, monkeypatch):
    """The q/k/v of Q4_K q/k and a Q6_K v loads as one int8 projection in groups of 16 with
    mins (not float), so nothing of the file is dequantized at load. With exact float
    activations (the reference kernel) the logits are transformers' for the file's own
    dequantized weights (up to the float16 scales); the C kernel's int8 activation blocks
    move them a little (all weights random here: a mean bound), and the whole-model C
    decode step gives the eager steps' tokens."""
    logits = {}
    for kernel in ("reference", "fast"):
        if kernel == "reference":
            monkeypatch.setenv("HEARTH_QUANT_KERNEL", "reference")
        else:
            monkeypatch.delenv("HEARTH_QUANT_KERNEL", raising=False)
        eng = Engine.load(str(q4_k_m_gguf), device="cpu", dtype="float32", num_blocks=64, max_model_len=256)
        try:
            detail = eng.model_info.quant_detail
            assert "dequantized" not in detail and "Q6_K tensors kept" in detail, detail
            qkv = [layer.self_attn.qkv_proj for layer in eng.runner.model.model.layers]
            assert [(m.bits, m.group_size, m.mins is not None) for m in qkv] == [(4, 32, True), (8, 16, True)]
            if kernel == "fast" and type(qkv[1].kernel).__name__ == "CpuQuant":
                # the C kernel on this layer (one row: decode; 12: a prompt's rows) against
                # float64, within its documented bound (int8 activation blocks)
                from tests.kernels.test_cpu_quant import _check

                for rows in (1, 12):
                    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
                    with torch.no_grad():
                        _check(qkv[1](x), qkv[1].quantized_weight(), x)
            ids = eng.tokenizer.encode("The capital of France is Paris. The capital of Germany is")
            logits[kernel] = native_logits(eng, ids, [len(ids)])
        finally:
            eng.shutdown()
    with torch.no_grad():
        want = gguf_reference_model(q4_k_m_gguf)(torch.tensor([ids])).logits[0].float()
    top = want.abs().max().item()
    torch.testing.assert_close(logits["reference"], want, atol=2e-3 * top, rtol=0)
    assert (logits["fast"] - want).abs().mean() < 0.01 * top
    _c_step_gives_the_eager_tokens(monkeypatch, q4_k_m_gguf)


def test_a_tensor_type_gguf_cannot_read_is_named_with_its_type(default_model, tmp_path):
    """A file with a tensor in a type the reader has no dequantization for: refused before
    anything loads, naming the tensor and the type, and what to use instead."""
    from engine.errors import UnsupportedModelError

    path = write_cut(tmp_path / "smol-q1_0.gguf", {1: "Q1_0"})
    with pytest.raises(UnsupportedModelError, match=r"blk\.1\.ffn_down\.weight.*\(Q1_0\).*Q4_K_M") as err:
        Engine.load(str(path), device="cpu", dtype="float32", num_blocks=16, max_model_len=64)
    assert "cannot read" in str(err.value)


def _stub_timing(monkeypatch):
    import engine.runner.gemv_tuning as gt

    monkeypatch.setattr(gt, "_time", lambda fn, count, graphed=True, reps=3: (fn(0), 1.0)[1])
    return gt


def test_the_batch1_tuner_tunes_each_form_of_a_kind_apart(kquant_gguf, monkeypatch):
    """Down projections stored as Q4_K, Q5_K and Q6_K: each form gets its own candidates
    (Q6_K's groups of 16 only the CUDA-core kernels). CUDA's candidate lists stood in for
    on the CPU, timing stubbed."""
    import engine.layers.quant_linear as ql
    from engine.layers.quant_kernels import TritonQuant, triton_reads
    from hearth_kernels.quant_gemv import quant_gemv_configs

    gt = _stub_timing(monkeypatch)
    eng = Engine.load(str(kquant_gguf), device="cpu", dtype="float32", num_blocks=16, max_model_len=64)
    try:
        model = eng.runner.model

        def cuda_like_candidates(layer):
            if not triton_reads(layer) or layer.in_features != 1536:  # only the down kind is timed here
                return [layer.kernel]
            return [TritonQuant(c) for c in quant_gemv_configs(layer.out_features, layer.in_features, layer.bits,
                                                                layer.group_size)[:2]]

        monkeypatch.setattr(ql, "kernel_candidates", cuda_like_candidates)
        choices = gt.tune_gemv(model, torch.device("cpu"))
        downs = [layer.mlp.down_proj for layer in model.model.layers]
        assert [isinstance(d.kernel, TritonQuant) for d in downs] == [True, True, True]
        assert choices["down"].count("triton quant gemv") == 3  # Q4_K's, Q5_K's and Q6_K's, each its own
    finally:
        eng.shutdown()


def test_the_batch1_tuner_with_float_and_quantized_modules_of_one_kind(default_model, tmp_path, monkeypatch):
    """A kind of float and quantized modules (a GGUF with some projections float, as an F16
    one here) tunes each apart (float candidates bound to a quantized one raised)."""
    path = write_cut(tmp_path / "smol-float-first.gguf", {0: "F16", 1: "Q4_K", 2: "Q4_K"})
    gt = _stub_timing(monkeypatch)
    eng = Engine.load(str(path), device="cpu", dtype="float32", num_blocks=16, max_model_len=64)
    try:
        model = eng.runner.model
        downs = [layer.mlp.down_proj for layer in model.model.layers]
        assert not hasattr(downs[0], "qweight") and all(hasattr(d, "qweight") for d in downs[1:])
        gt.tune_gemv(model, torch.device("cpu"))
    finally:
        eng.shutdown()


def test_the_gpu_kernels_keep_groups_of_16_and_a_layout_no_kernel_reads_becomes_float(kquant_gguf):
    """A Q6_K layer (int8 in groups of 16) stays quantized on a GPU: the Triton kernels
    (here under the interpreter) give dequantize+matmul's products for one row (the
    default GEMV; the tuner is offered the two CUDA-core kernels and dp4a) and for more (the SCALE_B
    GEMM), SwiGLU applied to ``[gate | up]``, and nothing extra sizes the load. A layout the
    GPU kernels don't read (int8 in groups of 48, say) becomes a float projection at load:
    the same products as dequantize+matmul, and counted so in the load's bytes. (One test:
    the load is most of its time.)"""
    from engine.layers.linear import SwiGLUDownLinear
    from engine.layers.quant_kernels import DequantMatmul, TritonQuant, triton_reads
    from engine.layers.quant_linear import gpu_float_extra
    from hearth_kernels.quant_gemv import DP4A, DP4A_TMA, KLOOP, ROWS, quant_gemv_configs

    eng = Engine.load(str(kquant_gguf), device="cpu", dtype="float32", num_blocks=16, max_model_len=64)
    try:
        down = eng.runner.model.model.layers[2].mlp.down_proj
        assert (down.bits, down.group_size) == (8, 16) and triton_reads(down) and not down.float_on_gpu
        assert gpu_float_extra(eng.runner.model) == 0
        ref = DequantMatmul().bind(down)
        for rows in (1, 3):
            x = torch.randn(rows, 2 * down.in_features)
            want = ref(x, down)
            # the default kernel (the interpreter is slow; tests/kernels checks every kind)
            got = TritonQuant().bind(down)(x, down)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        kinds = {c.kind for c in quant_gemv_configs(down.out_features, down.in_features, 8, 16)}
        assert kinds == {KLOOP, ROWS, DP4A, DP4A_TMA}  # not the tensor-core ones (the dp4a kinds scale halves apart)

        # regroup its codes in threes (48 inputs share the first sub-block's scale: another
        # weight, a layout no GPU kernel reads)
        down.scales = torch.nn.Parameter(down.scales[:, ::3].contiguous(), requires_grad=False)
        down.group_size = 48
        assert down.float_on_gpu
        lin = down.as_float()
        assert isinstance(lin, SwiGLUDownLinear) and lin.weight.dtype == torch.float32
        x = torch.randn(2, 2 * down.in_features)
        torch.testing.assert_close(lin(x), DequantMatmul().bind(down)(x, down))
        codes = sum(t.numel() * t.element_size() for t in (down.qweight, down.scales))
        assert gpu_float_extra(eng.runner.model) == down.out_features * down.in_features * 4 - codes
    finally:
        eng.shutdown()


def test_a_k_quant_whose_scales_overflow_float16_stays_float(monkeypatch):
    from types import SimpleNamespace

    import engine.loader.gguf as g
    from engine.quant.gguf_kquants import read_kquant

    raw = random_blocks("Q6_K", 4, 1, seed=3)
    raw[:, 192:208] = 127  # int8 sub-scales
    raw[:, 208:210] = np.array([60000.0], dtype=np.float16).view(np.uint8)  # d * 127 > 65504
    exact = read_kquant(raw, "Q6_K").dequantize(torch.float32)
    name = "model.layers.0.mlp.down_proj.weight"
    monkeypatch.setattr(g, "_gguf_tensors", lambda path, cfg, names: {
        name: SimpleNamespace(tensor_type=gguf.GGMLQuantizationType.Q6_K, data=raw)})
    kept, types = g.kept_quantized(None, None, {name: exact})
    assert name not in kept and types["dequantized"] == {"Q6_K": 1}


@pytest.mark.gpu
def test_gpu_a_k_quant_gguf_with_mixed_down_projections_loads_and_decodes(kquant_gguf):
    eng = Engine.load(str(kquant_gguf), device="cuda", num_blocks=64, max_model_len=256)
    try:
        from engine.api import Request, SamplingParams

        out = eng.submit(Request(prompt_token_ids=[1, 2, 3], params=SamplingParams(max_tokens=4, temperature=0.0)))
        assert len(out.result().token_ids) == 4
        downs = [layer.mlp.down_proj for layer in eng.runner.model.model.layers]
        assert [hasattr(d, "qweight") for d in downs] == [True, True, True]  # Q6_K too: int8 in groups of 16
        from engine.layers.quant_kernels import DequantMatmul, TritonQuant

        q6 = downs[2]
        assert q6.group_size == 16 and isinstance(q6.kernel, TritonQuant)
        for rows in (1, 5, 1100):  # the batch-1 kernel the tuner picked, the fused GEMM, dequantize + cuBLAS
            x = torch.randn(rows, 2 * q6.in_features, device="cuda", dtype=q6.dtype)
            want = DequantMatmul()(x.float(), q6).float()
            got = q6(x).float()
            torch.testing.assert_close(got, want, rtol=2 ** -6, atol=2 ** -6 * want.abs().max().item())
    finally:
        eng.shutdown()
