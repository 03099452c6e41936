"""GPTQ onto float8 e4m3 (``gptq_quantize_fp8``; ``hearth quantize --quant fp8 --calibrate
gptq``): checked against round-to-nearest (``rtn.quantize_fp8``: bit for bit when nothing
propagates), against the layer error it minimises (computed in float64 from the stored
values), at saturation, and through the written checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from app.cli import main
from engine.errors import InvalidRequestError
from engine.quant.export import quantize_model
from engine.quant.gptq import gptq_quantize_fp8
from engine.quant.rtn import quantize_fp8
from engine.runner.lifecycle import release_runner
from tests.quant.test_fp8 import load_cpu
from tests.quant.test_shape_calibration import small_calibration  # noqa: F401  (a fixture)

E4M3 = torch.float8_e4m3fn


def layer_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    """||x w^T - x q^T||^2 in float64 (the error GPTQ minimises)."""
    d = (w.double() - q.double()) @ x.double().T
    return float((d * d).sum())


def correlated_inputs(tokens: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    scale = torch.exp(torch.randn(k, generator=g))  # some inputs far larger than others
    return (torch.randn(tokens, k, generator=g) @ mix) * scale  # one distribution per seed


def test_a_diagonal_hessian_gives_round_to_nearest_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g) * torch.exp(torch.randn(24, 1, generator=g))
    h = torch.diag(torch.rand(40, generator=g) + 0.5)
    got, rtn = gptq_quantize_fp8(w, h, block_size=16), quantize_fp8(w)
    assert got.fmt == rtn.fmt == "e4m3" and got.qweight.dtype == E4M3 and got.group_size == 40
    assert torch.equal(got.scales, rtn.scales)
    assert torch.equal(got.qweight.view(torch.uint8), rtn.qweight.view(torch.uint8))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_layer_error_below_round_to_nearest(act_order):
    g = torch.Generator().manual_seed(1)
    n, k = 48, 64
    w = torch.randn(n, k, generator=g)
    rows = correlated_inputs(1024, k, seed=2)
    x, held = rows[:512], rows[512:]  # calibration rows, and held-out rows of the same distribution
    got = gptq_quantize_fp8(w, x.double().T @ x.double(), block_size=16, act_order=act_order)
    assert torch.equal(got.scales, quantize_fp8(w).scales)  # the same grid: only the rounding differs
    assert got.perm is None  # stored in input order
    ours, rtn = got.dequantize(torch.float64), quantize_fp8(w).dequantize(torch.float64)
    assert layer_error(w, ours, x) < 0.7 * layer_error(w, rtn, x)
    assert layer_error(w, ours, held) < 0.9 * layer_error(w, rtn, held)  # not only on the calibration rows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch's CPU cast to e4m3 saturates by "
                    "itself, so there a missing clamp could not fail this test")
def test_a_column_pushed_past_its_rows_range_saturates_at_448_instead_of_nan():
    # two inputs, the second rarely used but tied to the first: GPTQ moves the first column's
    # rounding error onto the second about nine times over (H = [[a, c], [c, b]], ratio c / b).
    # On CUDA a cast past 464 is NaN (mutation-checked on an H200: it fails without the clamp).
    w = torch.tensor([[303.0, 448.0]], device="cuda")  # scale 1: the row's max is 448; 303 -> 288 (step 32)
    h = torch.tensor([[100.0, 9.0], [9.0, 1.0]], dtype=torch.float64)
    got = gptq_quantize_fp8(w, h, damp=0.0)
    codes = got.qweight.float()
    assert torch.isfinite(codes).all()
    assert codes[0, 0] == 288.0 and codes[0, 1] == 448.0  # 448 + 15 * 9 would be NaN in e4m3fn


def test_hearth_quantize_fp8_calibrated_by_gptq_writes_the_fp8_layout(tiny_models, tmp_path, capsys):
    from safetensors import safe_open

    src = tiny_models["llama3"]
    out, rtn_out = tmp_path / "fp8-gptq", tmp_path / "fp8"
    assert main(["quantize", "--model", str(src), "--quant", "fp8", "--calibrate", "gptq", "--out", str(out),
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["quant"] == "fp8" and row["layout"] == "compressed-tensors" and row["layers"] == 2 * 7
    quantize_model(str(src), rtn_out, quantization="fp8")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "float-quantized"
    assert cfg["hearth_quantized"]["method"] == "fp8" and cfg["hearth_quantized"]["rounding"] == "gptq"
    changed = 0
    with safe_open(str(out / "model.safetensors"), "pt") as f, safe_open(str(rtn_out / "model.safetensors"), "pt") as r:
        for name in [n for n in f.keys() if n.endswith("_proj.weight")]:
            w, s = f.get_tensor(name), f.get_tensor(name + "_scale")
            assert w.dtype == E4M3 and torch.isfinite(w.float()).all()
            assert torch.equal(s, r.get_tensor(name + "_scale"))  # round-to-nearest's per-channel scales
            changed += int((w.view(torch.uint8) != r.get_tensor(name).view(torch.uint8)).sum())
    assert changed > 0  # the rounding moved
    back = load_cpu(out)
    try:
        assert back.info.quantization == "fp8"
    finally:
        release_runner(back.runner)


@pytest.mark.parametrize("options, match", [
    ({"quantization": "int4", "calibrate": "gptq"}, "applies to fp8.*--quant gptq"),
    ({"quantization": "fp8", "calibrate": "awq"}, "unknown calibration"),
    ({"quantization": "fp8", "calibrate": "gptq", "group_size": 32}, "per output channel"),
    ({"quantization": "fp8", "calibrate": "gptq", "layout": "gptq"}, "compressed-tensors"),
])
def test_calibrated_fp8_refuses_what_it_cannot_write_before_loading(tiny_models, tmp_path, options, match):
    with pytest.raises(InvalidRequestError, match=match):
        quantize_model(str(tiny_models["llama3"]), tmp_path / "x", **options)
    assert not (tmp_path / "x").exists()


def test_fp8_gptq_is_a_quantization_refused_on_the_cpu_like_fp8(tiny_models):
    from engine.choices import get
    from tests.quant.test_quantized_models import load

    choice = get("quantization", "fp8-gptq", "cpu")
    assert choice.name == "fp8-gptq" and choice.bytes_per_param == 1.0
    assert choice.reasons == get("quantization", "fp8", "cpu").reasons != []
    with pytest.raises(InvalidRequestError, match="fp8-gptq.*can't be used here"):
        load(tiny_models["llama3"], quantization="fp8-gptq")


def test_a_load_asking_fp8_gptq_calibrates_once_then_loads_what_hearth_quantize_writes(tiny_models, tmp_path):
    """(On the CPU as ``hearth quantize`` loads: ``writing``; the GPU runs the same plan.)"""
    from engine.config import load_config
    from engine.loader.engine_loader import load_model
    from tests.quant.test_quantized_models import hearth_logits

    def load_with(said):
        config = load_config(str(tiny_models["llama3"]), device="cpu", dtype="float32", attention="torch",
                             num_blocks=8, max_model_len=128, quantization="fp8-gptq")
        return load_model(config, progress=said.append, writing=True)

    first: list[str] = []
    loaded = load_with(first)
    try:
        assert loaded.info.quantization == "fp8-gptq"
        assert loaded.info.quant_detail == "8 x fp8 e4m3 channel, GPTQ-rounded"
        assert loaded.config.model.quantization == "fp8-gptq"  # loading it again asks the same
        assert "fp8 (GPTQ): layer 2 of 2 quantized" in first
        logits = hearth_logits(loaded.runner)
    finally:
        release_runner(loaded.runner)
    again: list[str] = []
    loaded = load_with(again)
    try:
        assert not any("calibrat" in m for m in again)  # the cached checkpoint loads as it is
        assert torch.equal(hearth_logits(loaded.runner), logits)
    finally:
        release_runner(loaded.runner)
    # the same as `hearth quantize --quant fp8-gptq` (fp8 --calibrate gptq) writes and loads back
    out = quantize_model(str(tiny_models["llama3"]), tmp_path / "q", quantization="fp8-gptq").out_dir
    written = load_cpu(out)
    try:
        assert written.info.quantization == "fp8"  # anyone's fp8 checkpoint: as it is
        assert torch.equal(hearth_logits(written.runner), logits)
    finally:
        release_runner(written.runner)
    with pytest.raises(InvalidRequestError, match="already quantized with fp8: load it as it is"):
        load_cpu(out, quantization="fp8-gptq")


def test_a_shape_in_fp8_gptq_says_its_calibration_is_for_speed_only(small_calibration):
    from engine.config import load_config
    from engine.loader.engine_loader import load_model
    from engine.loader.shape_model import SHAPE_CALIBRATION_NOTE

    config = load_config("shape:tiny", device="cpu", dtype="float32", attention="torch", num_blocks=8,
                         max_model_len=64, quantization="fp8-gptq")
    loaded = load_model(config, writing=True)
    try:
        assert loaded.info.quantization == "fp8-gptq"
        assert loaded.info.quant_detail == f"8 x fp8 e4m3 channel, GPTQ-rounded ({SHAPE_CALIBRATION_NOTE})"
    finally:
        release_runner(loaded.runner)


def test_quant_head_with_fp8_gptq_says_what_it_keeps(tiny_models):
    with pytest.raises(InvalidRequestError, match="fp8-gptq keeps the embedding and head in the model's dtype"):
        load_cpu(tiny_models["llama3"], quantization="fp8-gptq", quant_head=True)
