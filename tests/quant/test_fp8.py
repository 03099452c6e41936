"""``--quant fp8``: e4m3 weights per output channel, activations rounded to e4m3 per token.

Checked against independent references: the weight cast against a float64 computation of
e4m3's grid, the products against float64 matmuls of the dequantized operands, a whole
tiny model against transformers' model holding the dequantized weights (to within the
activations' rounding), and the checkpoint layouts (compressed-tensors float-quantized,
vLLM's ``fp8``) against hand-built tensors and a round trip. fp8 is refused on the CPU for
chat loads (it needs fp8 tensor cores); a load for writing (``load_model(writing=True)``,
what ``hearth quantize`` does) runs the same arithmetic in float32 (``hearth_kernels.fp8.scaled_mm``),
and these tests load that way.
"""

from __future__ import annotations

import json

import pytest
import torch

from app.cli import main
from engine.choices import get
from engine.config import load_config
from engine.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
from engine.layers.quant_kernels import Fp8Kernel
from engine.layers.quant_linear import QuantizedLinear
from engine.loader.engine_loader import load_model
from engine.quant.export import quantize_model
from engine.quant.formats import parse_quantization_config, read_fp8
from engine.quant.rtn import quantize_fp8
from engine.runner.lifecycle import release_runner
from hearth_kernels.fp8 import quantize_rows, quantize_rows_reference, scaled_mm
from tests.quant.test_quantized_models import hearth_logits, load, reference_logits


def load_cpu(path, **options):
    """A CPU load of fp8 weights, as ``hearth quantize`` makes one (``writing``)."""
    config = load_config(str(path), device="cpu", dtype="float32", attention="torch", num_blocks=8,
                         max_model_len=128, **options)
    return load_model(config, writing=True)

E4M3 = torch.float8_e4m3fn


def e4m3_grid() -> torch.Tensor:
    """Every finite e4m3 value, from its bit patterns by the format's definition (float64)."""
    vals = []
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue  # NaN in e4m3fn
            v = (m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
            vals += [v, -v]
    return torch.tensor(sorted(set(vals)), dtype=torch.float64)


def nearest_on_grid(x: torch.Tensor) -> torch.Tensor:
    grid = e4m3_grid()
    idx = (x.double().unsqueeze(-1) - grid).abs().argmin(-1)
    return grid[idx]


def test_the_weight_cast_is_per_row_absmax_and_round_to_nearest_on_the_e4m3_grid():
    torch.manual_seed(0)
    w = torch.randn(24, 80) * torch.logspace(-3, 1, 24).unsqueeze(1)
    w[3] = 0.0  # an all-zero row keeps a usable scale
    qw = quantize_fp8(w)
    assert qw.fmt == "e4m3" and qw.qweight.dtype == E4M3 and qw.scales.shape == (24, 1)
    assert qw.scales.dtype == torch.float32 and qw.mins is None and qw.group_size == 80
    amax = w.abs().amax(1, keepdim=True).double()
    expected_scale = (amax / 448).clamp_min(2.0 ** -126)
    assert torch.allclose(qw.scales.double(), expected_scale, rtol=1e-7)
    want = nearest_on_grid(w.double() / qw.scales.double())
    assert torch.equal(qw.qweight.double(), want)
    assert (qw.qweight[:, :].double().abs().amax(1)[torch.arange(24) != 3] == 448).all()  # max lands on 448
    deq = qw.dequantize(torch.float64)
    assert torch.equal(deq, qw.qweight.double() * qw.scales.double())
    assert (deq - w.double()).abs().max() <= (amax * 2 ** -4).max()  # e4m3: 3 mantissa bits


@pytest.mark.parametrize("swiglu", [False, True])
def test_activations_round_per_token_like_the_reference(swiglu):
    torch.manual_seed(1)
    x = torch.randn(5, 2 * 48 if swiglu else 48) * torch.tensor([[1e-3], [1.0], [30.0], [0.0], [5.0]])
    q, s = quantize_rows(x, swiglu=swiglu)
    src = x if not swiglu else torch.nn.functional.silu(x[:, :48]) * x[:, 48:]
    amax = src.abs().amax(1, keepdim=True).double()
    assert torch.allclose(s.double(), (amax / 448).clamp_min(1e-12), rtol=1e-6)
    assert torch.equal(q.double(), nearest_on_grid(src.double() / s.double()))
    assert torch.equal(q[3].float(), torch.zeros(48))  # an all-zero token: zeros, not NaN


def test_the_scaled_product_is_the_float64_product_of_the_rounded_operands():
    torch.manual_seed(2)
    x = torch.randn(7, 96)
    qw = quantize_fp8(torch.randn(40, 96) * 0.05)
    xq, xs = quantize_rows_reference(x)
    bias = torch.randn(40)
    got = scaled_mm(xq, xs, qw.qweight, qw.scales, torch.float32, bias)
    want = (xq.double() * xs.double()) @ (qw.qweight.double() * qw.scales.double()).t() + bias.double()
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


def test_fp8_is_refused_on_the_cpu_with_what_to_pick_instead(tiny_models):
    reasons = get("quantization", "fp8", "cpu").reasons
    assert reasons and "int8" in reasons[0] and "8.9" in reasons[0]
    with pytest.raises(InvalidRequestError, match="fp8.*can't be used here"):
        load(tiny_models["llama3"], quantization="fp8")
    assert get("quantization", "e4m3").name == "fp8"


@pytest.fixture(scope="module")
def fp8_model(tiny_models):
    loaded = load_cpu(tiny_models["llama3"], quantization="fp8")
    yield loaded
    release_runner(loaded.runner)


def test_a_tiny_model_in_fp8_gives_the_logits_of_its_dequantized_weights(tiny_models, fp8_model):
    runner = fp8_model.runner
    layers = {n: m for n, m in runner.model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(layers) == 4 * 2 + 1 and "lm_head" in layers  # every projection and the untied head
    assert all(m.fmt == "e4m3" and isinstance(m.kernel, Fp8Kernel) for m in layers.values())
    assert fp8_model.info.quantization == "fp8"
    assert "fp8 e4m3 channel" in (fp8_model.info.quant_detail or "")
    got, want = hearth_logits(runner), reference_logits(tiny_models["llama3"], runner)
    # the activations' rounding to e4m3 (3 mantissa bits) is the only difference
    rel = ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()
    assert 1e-4 < rel < 0.08, rel
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75
    for m in layers.values():  # a byte per weight and a float32 scale per row (float32 weights here: 4)
        assert m.weight_bytes() == m.out_features * m.in_features + 4 * m.out_features


def test_float_head_keeps_the_untied_head_float(tiny_models):
    loaded = load_cpu(tiny_models["llama3"], quantization="fp8", float_head=True)
    try:
        assert not isinstance(loaded.runner.model.lm_head, QuantizedLinear)
    finally:
        release_runner(loaded.runner)


def test_hearth_quantize_fp8_writes_compressed_tensors_that_load_back_bit_for_bit(tiny_models, tmp_path, capsys):
    out = tmp_path / "fp8"
    assert main(["quantize", "--model", str(tiny_models["llama3"]), "--quant", "fp8", "--out", str(out),
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["layout"] == "compressed-tensors" and row["quant"] == "fp8" and row["layers"] == 2 * 7
    from engine.quant.transform import quantization_plan

    # no input_scale in this layout: nothing optional is waited for, each layer converts as it streams in
    assert quantization_plan("auto", out).default.optional == ()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "float-quantized"
    group = qc["config_groups"]["group_0"]
    assert group["weights"]["type"] == "float" and group["weights"]["strategy"] == "channel"
    assert group["input_activations"]["dynamic"] is True and group["input_activations"]["strategy"] == "token"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        s = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale")
        assert w.dtype == E4M3 and s.shape == (w.shape[0], 1)
        assert f.get_tensor("lm_head.weight").dtype == torch.float32  # the head as the checkpoint has it
    direct = load_cpu(tiny_models["llama3"], quantization="fp8", float_head=True)
    back = load_cpu(out)
    try:
        assert back.info.quantization == "fp8"
        assert torch.equal(hearth_logits(back.runner), hearth_logits(direct.runner))
    finally:
        release_runner(back.runner)
        release_runner(direct.runner)
    with pytest.raises(InvalidRequestError, match="already quantized with fp8"):
        load(out, quantization="int8")
    # a chat load of the fp8 checkpoint (quantization auto) on the CPU: refused, saying what to do
    with pytest.raises(InvalidRequestError, match="stores its weights as fp8, which can't run here.*unquantized"):
        load(out)


def test_sizes_the_fp8_gemm_cannot_take_keep_the_head_float_and_refuse_a_projection(tmp_path, tokenizer_files):
    from transformers import LlamaConfig

    from tests.conftest import save_tiny

    def tiny(name, vocab, inter):
        cfg = LlamaConfig(hidden_size=64, intermediate_size=inter, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128,
                          tie_word_embeddings=False)
        return save_tiny(cfg, tmp_path / name, tokenizer_files)

    loaded = load_cpu(tiny("odd-vocab", 1001, 96), quantization="fp8")  # a 1,001-row head: float
    try:
        layers = {n for n, m in loaded.runner.model.named_modules() if isinstance(m, QuantizedLinear)}
        assert "lm_head" not in layers and len(layers) == 4
    finally:
        release_runner(loaded.runner)
    with pytest.raises(InvalidRequestError, match=r"layer model\.layers\.0\.mlp\.\w+ \(\[.*multiples of 16.*int8"):
        load_cpu(tiny("odd-mlp", 1024, 72), quantization="fp8")


def test_hearth_quantize_fp8_refuses_another_layout(tiny_models, tmp_path):
    with pytest.raises(InvalidRequestError, match="compressed-tensors"):
        quantize_model(str(tiny_models["llama3"]), tmp_path / "x", quantization="fp8", layout="gptq")


def _vllm_fp8_folder(tiny, folder, per_tensor: bool):
    """vLLM's / AutoFP8's layout, built by hand from the float checkpoint: e4m3 weights and
    one float32 scale per tensor (per_tensor) or per row, ``input_scale`` beside them."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tiny / "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        if name.endswith("_proj.weight"):
            base = name.removesuffix(".weight")
            amax = t.abs().amax() if per_tensor else t.abs().amax(1, keepdim=True)
            scale = (amax / 448).float()
            out[name] = (t / scale).clamp(-448, 448).to(E4M3)
            out[f"{base}.weight_scale"] = scale.reshape(()) if per_tensor else scale
            out[f"{base}.input_scale"] = torch.tensor(0.05)
        else:
            out[name] = t
    folder.mkdir()
    save_file(out, str(folder / "model.safetensors"))
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static",
                                  "ignored_layers": ["lm_head"]}
    (folder / "config.json").write_text(json.dumps(cfg))
    for f in tiny.iterdir():
        if f.name.startswith("tokenizer"):
            (folder / f.name).write_bytes(f.read_bytes())
    return out


@pytest.mark.parametrize("per_tensor", [True, False])
def test_a_vllm_fp8_checkpoint_loads_its_own_weights_and_scales(tiny_models, tmp_path, per_tensor):
    tensors = _vllm_fp8_folder(tiny_models["llama3"], tmp_path / "v", per_tensor)
    from engine.quant.transform import quantization_plan

    assert quantization_plan("auto", tmp_path / "v").default.optional == ("input_scale",)
    loaded = load_cpu(tmp_path / "v")
    try:
        assert loaded.info.quantization == "fp8"
        qkv = loaded.runner.model.model.layers[0].self_attn.qkv_proj
        qw = qkv.quantized_weight()
        start, rows = qkv.shard_offsets["k"] if "k" in qkv.shard_offsets else list(qkv.shard_offsets.values())[1]
        k_w = tensors["model.layers.0.self_attn.k_proj.weight"]
        k_s = tensors["model.layers.0.self_attn.k_proj.weight_scale"]
        assert torch.equal(qw.qweight[start:start + rows].view(torch.uint8), k_w.view(torch.uint8))
        assert torch.equal(qw.scales[start:start + rows], k_s.reshape(-1, 1).expand(rows, 1).float())
        assert not isinstance(loaded.runner.model.lm_head, QuantizedLinear)  # ignored_layers
    finally:
        release_runner(loaded.runner)


def test_fp8_checkpoint_fields_hearth_cannot_read_are_refused_naming_them():
    with pytest.raises(UnsupportedModelError, match="weight_block_size"):
        parse_quantization_config({"quant_method": "fp8", "weight_block_size": [128, 128]}, "c.json")
    group = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "block"}}
    with pytest.raises(UnsupportedModelError, match=r"weights\.strategy"):
        parse_quantization_config({"quant_method": "compressed-tensors", "format": "float-quantized",
                                   "config_groups": {"g": group}}, "c.json")
    q = parse_quantization_config({"quant_method": "fp8", "activation_scheme": "dynamic"})
    with pytest.raises(UnsupportedModelError, match="e4m3"):
        read_fp8({"weight": torch.zeros(4, 8, dtype=torch.float8_e5m2), "weight_scale": torch.ones(1)}, q)
    with pytest.raises(UnsupportedModelError, match="per block"):
        read_fp8({"weight": torch.zeros(4, 8, dtype=E4M3), "weight_scale": torch.ones(2, 2)}, q)
    with pytest.raises(UnsupportedModelError, match="positive finite"):
        read_fp8({"weight": torch.zeros(4, 8, dtype=E4M3), "weight_scale": torch.tensor([1.0, 0.0, 1.0, 1.0])}, q)


def test_a_checkpoint_missing_a_scale_is_refused(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    _vllm_fp8_folder(tiny_models["llama3"], tmp_path / "v", per_tensor=False)
    tensors = load_file(str(tmp_path / "v" / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight_scale"]
    save_file(tensors, str(tmp_path / "v" / "model.safetensors"))
    with pytest.raises((ModelLoadError, UnsupportedModelError), match="down_proj"):
        load_cpu(tmp_path / "v")


# -- on the GPU (fp8 tensor cores) ----------------------------------------------------------
needs_fp8_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                   reason="needs an Ada or Hopper GPU (fp8 tensor cores)")


@pytest.mark.gpu
@needs_fp8_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fp8_on_the_gpu_gives_the_logits_of_its_dequantized_weights(tiny_models, dtype):
    from engine.config import load_config
    from engine.loader.engine_loader import load_model
    from tests.quant.test_quantized_cuda import _cpu_copy

    config = load_config(str(tiny_models["llama3"]), device="cuda", dtype=dtype, quantization="fp8",
                         max_model_len=256, num_blocks=64)
    loaded = load_model(config)
    try:
        runner = loaded.runner
        layers = [m for m in runner.model.modules() if isinstance(m, QuantizedLinear)]
        assert len(layers) == 9 and all(isinstance(m.kernel, Fp8Kernel) for m in layers)
        got = hearth_logits(runner)  # the PROMPT reference_logits reads
        want = reference_logits(tiny_models["llama3"], _cpu_copy(runner))
        rel = ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()
        assert rel < 0.08, rel
    finally:
        release_runner(loaded.runner)


@pytest.mark.gpu
@needs_fp8_gpu
def test_fp8_prompts_take_the_norm_into_the_rounding_with_the_same_logits(tiny_models, monkeypatch):
    """Several rows: the RMSNorm before q/k/v and gate_up writes the e4m3 rows itself
    (``Fp8Kernel.normed_rows``), the same logits as the norm then the rounding pass."""
    from engine.config import load_config
    from engine.loader.engine_loader import load_model

    config = load_config(str(tiny_models["llama3"]), device="cuda", quantization="fp8", max_model_len=256,
                         num_blocks=64)
    loaded = load_model(config)
    try:
        calls = []
        real = Fp8Kernel.normed_rows
        monkeypatch.setattr(Fp8Kernel, "normed_rows", lambda self, *a: calls.append(1) or real(self, *a))
        fused = hearth_logits(loaded.runner)
        layers = len(loaded.runner.model.model.layers)
        assert len(calls) == 2 * layers  # q/k/v's norm and gate_up's, each layer
        monkeypatch.setattr(Fp8Kernel, "fuses_norm_rows", lambda self, layer, norm: False)  # the norm kernel, then the rounding
        calls.clear()
        assert torch.equal(hearth_logits(loaded.runner), fused) and not calls
    finally:
        release_runner(loaded.runner)


@pytest.mark.gpu
@needs_fp8_gpu
def test_fp8_greedy_tokens_with_and_without_cuda_graphs_agree_and_batch_one_is_the_gemv(tiny_models):
    from engine.api import Engine, Request, SamplingParams

    outs = []
    for eager in (False, True):
        eng = Engine.load(str(tiny_models["llama3"]), device="cuda", quantization="fp8", max_model_len=256,
                          enforce_eager=eager)
        try:
            info = eng.model_info
            assert "fp8 gemv" in str(info.batch1_matmul) or "fp8 mma" in str(info.batch1_matmul) or eager, \
                info.batch1_matmul
            params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
            reqs = [Request(prompt_token_ids=[5, 17, 99, 3, 1024, 7], params=params),
                    Request(prompt_token_ids=[8, 300, 11, 12], params=params)]
            outs.append([o.token_ids for o in eng.generate(reqs)])
            outs.append([eng.generate([reqs[0]])[0].token_ids])  # alone: batch-1 steps
        finally:
            eng.shutdown()
    assert outs[0] == outs[2] and outs[1] == outs[3]
    assert all(len(t) == 24 for t in outs[0])


def test_the_batch_one_tuner_times_the_tensor_core_kernel_where_k_steps_evenly(monkeypatch):
    """fp8's batch-1 candidates: the GEMVs, then ``fp8_mma``'s configs (5-tuples) for the 8B
    shapes' K (4096, 14336), none for a K no step divides."""
    from engine.layers.linear_kernels import fp8_gemv_configs
    from engine.layers.quant_kernels import Fp8Kernel
    from hearth_kernels.fp8 import FP8_MMA_CONFIGS

    for k in (4096, 14336):
        mma = [c for c in fp8_gemv_configs(4096, k) if len(c) == 5]
        assert mma and set(mma) <= set(FP8_MMA_CONFIGS)
    assert not [c for c in fp8_gemv_configs(64, 96) if len(c) == 5]
    assert Fp8Kernel((64, 256, 4, 4, 4)).name == "fp8 mma 64x256/4w s4 split4"
    monkeypatch.setenv("HEARTH_FP8_MMA", "0")  # left out: batch-1 steps keep x exact
    assert not [c for c in fp8_gemv_configs(4096, 4096) if len(c) == 5]
