"""Result rows in the BENCHMARKS.md shape: one flat dict per measurement.

Every row has suite, engine, card, model, quant, attention, batch, prompt_len,
output_len, date, commit, torch, plus the figures its suite measures (decode_tok_s,
ttft_ms, output_tok_s, kv_waste_pct, weight_bytes) and a few extra columns.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path

import torch

ROW_KEYS = ("suite", "engine", "card", "model", "quant", "attention", "batch", "prompt_len",
            "output_len", "date", "commit", "torch")
FIGURES = ("decode_tok_s", "ttft_ms", "output_tok_s", "kv_waste_pct", "perplexity", "weight_bytes")
_QUANT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def card_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name()`` of the device, or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def quant_name(dtype: torch.dtype, quantization: str = "none") -> str:
    """The weights' number format: the quantization ("int4", "gguf", ...), or the dtype's
    "bf16", "fp16", "fp32" for unquantized weights."""
    if quantization not in ("none", "auto", "bf16", "fp16"):
        return quantization
    return _QUANT.get(dtype, str(dtype).removeprefix("torch."))


def commit_id() -> str:
    """$HEARTH_COMMIT if set (a copied tree on a GPU box may carry a stale .git), else
    ``git rev-parse --short HEAD`` of Hearth's checkout, else "unknown"."""
    if os.environ.get("HEARTH_COMMIT"):
        return os.environ["HEARTH_COMMIT"]
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass  # no git here
    return "unknown"


#: environment switches that change which kernels run, or how long choosing them takes
#: (``HEARTH_TUNE_THREADS``: rows' ``batch1_tune_s``) (recorded in rows when set, so an A/B
#: pair of runs in one session says which side each row is)
KERNEL_KNOBS = ("HEARTH_PDL", "HEARTH_QUANT_DP4A", "HEARTH_QUANT_TMA", "HEARTH_QUANT_KERNEL", "HEARTH_QUANT_MMA_AHEAD",
                "HEARTH_QUANT_SWAP_INT8", "HEARTH_FP8_MMA", "HEARTH_QUANT_MMA_WIDE128",
                "HEARTH_GEMV_PIN", "HEARTH_TUNE_THREADS", "HEARTH_QUANT_MMA_GLUON", "HEARTH_QUANT_MMA_GLUON_SPLIT",
                "HEARTH_SPLIT_FENCE", "HEARTH_DECODE_V_PAIRS", "HEARTH_DECODE_TABLE_AHEAD")


def kernel_knobs() -> dict[str, str]:
    """The ``KERNEL_KNOBS`` set in this process's environment."""
    return {k: os.environ[k] for k in KERNEL_KNOBS if k in os.environ}


class RowMaker:
    """Fills in the fields every row of one run shares."""

    def __init__(self, model: str, device: torch.device, dtype: torch.dtype, attention: str,
                 quantization: str = "none") -> None:
        self.common = {
            "card": card_name(device),
            "model": model,
            "quant": quant_name(dtype, quantization),
            "date": datetime.date.today().isoformat(),
            "commit": commit_id(),
            "torch": torch.__version__,
        }
        knobs = kernel_knobs()
        if knobs:
            self.common["knobs"] = knobs
        self.attention = attention

    def row(self, suite: str, engine: str, batch: int, prompt_len: int, output_len: int,
            **figures) -> dict:
        """One row; ``engine`` "hf" rows get attention "sdpa"."""
        attention = "sdpa" if engine == "hf" else self.attention
        row = {"suite": suite, "engine": engine, **self.common, "attention": attention,
               "batch": batch, "prompt_len": prompt_len, "output_len": output_len}
        row.update({k: v for k, v in figures.items() if v is not None})
        return {k: row[k] for k in (*ROW_KEYS, *[k for k in row if k not in ROW_KEYS])}


def leading_match(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy outputs share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
