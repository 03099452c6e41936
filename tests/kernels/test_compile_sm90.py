"""The kernels compile for an H100 (sm_90) on any machine, GPU or not, and fit it well.

The interpreter that runs the CPU tests accepts code the GPU compiler rejects and ignores
launch settings (num_warps, num_stages); this compiles the real thing ahead of time with
the ptxas bundled in the Triton wheel, in a subprocess without TRITON_INTERPRET.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

H100_SHARED_PER_BLOCK = 227 * 1024


def _ptxas() -> Path | None:
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return path if path.is_file() else None


TESTED_TRITON = "3.6."


@pytest.fixture(scope="module")
def report() -> dict[str, dict]:
    if _ptxas() is None:
        pytest.skip("Triton's NVIDIA backend (bundled ptxas) is not installed")
    import triton

    if not triton.__version__.startswith(TESTED_TRITON):
        # Newer Triton releases emit PTX that their bundled ptxas may not take offline;
        # the limits below were also read off 3.6's code generation.
        pytest.skip(f"the sm_90 compile check is calibrated for Triton {TESTED_TRITON}.x (the "
                    f"GPU box's and the test set-up's); this is Triton {triton.__version__}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-m", "tests.kernels.sm90_compile"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    return {row.pop("kernel"): row for row in rows}


def test_every_kernel_compiles_without_spills(report):
    assert set(report) == {"decode", "decode_merge", "prefill", "write_kv", "fused_add_rms_norm",
                           "rotary", "silu_and_mul", "decode_fp8", "decode_fp8_plain", "prefill_fp8",
                           "write_kv_fp8", "rotary_write_kv",
                           "rotary_write_kv_fp8", "fp8_mma_1", "fp8_mma_64", "norm_quantize_rows"}
    for name, row in report.items():
        assert row["spill_bytes"] == 0, f"{name} spills registers: {row}"
        assert 0 < row["registers"] <= 255, (name, row)
        assert row["shared"] <= H100_SHARED_PER_BLOCK, (name, row)


def test_attention_loops_are_pipelined_and_prefill_uses_wgmma(report):
    for suffix in ("", "_fp8"):
        assert report["decode" + suffix]["pipelined"] and report["prefill" + suffix]["pipelined"]
        assert report["prefill" + suffix]["wgmma"]
    # Several decode programs must fit on one SM to keep enough loads in flight.
    assert report["decode"]["shared"] * 3 <= H100_SHARED_PER_BLOCK


def test_fp8_decode_reads_v_without_byte_gathers(report):
    """Over an e4m3 cache the decode kernel reads V as pairs (paged_decode's V_PAIRS, the
    default): without them (``decode_fp8_plain``) the sm_90 build gathers the PV dot's operand
    from shared memory a byte at a time (128 single-byte loads a thread a 128-key tile, 212
    registers). With the block numbers a tile ahead K and V get their second buffers, and two
    programs still fit an SM."""
    from hearth_kernels import paged_decode

    assert report["decode_fp8_plain"]["byte_shared_loads"] > 0, report["decode_fp8_plain"]
    row = report["decode_fp8"]
    assert paged_decode.V_PAIRS_DEFAULT and row["byte_shared_loads"] == 0 and row["ldmatrix"], row
    block_n = paged_decode._config(128, torch.bfloat16, torch.float8_e4m3fn, True)[0]
    # two buffers of each fp8 K and V tile (3 stages), beside V's fp16 tile for ldmatrix
    assert row["registers"] <= 168 and row["shared"] >= 2 * 2 * block_n * 128 + block_n * 128 * 2, row
    assert row["shared"] * 2 <= H100_SHARED_PER_BLOCK, row


def test_the_fp8_weight_stationary_kernel_streams_into_wgmma(report):
    """Its weight tiles go from the cp.async ring to the e4m3 wgmma, untouched by the CUDA cores."""
    for name in ("fp8_mma_1", "fp8_mma_64"):
        assert report[name]["pipelined"] and report[name]["wgmma"] and not report[name]["ldmatrix"], report[name]
