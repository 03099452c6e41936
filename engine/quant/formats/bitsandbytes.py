"""A bitsandbytes checkpoint's settings (transformers' ``BitsAndBytesConfig`` as saved in
config.json's ``quantization_config``, ``quant_method: "bitsandbytes"``), parsed into one
frozen ``BnbCheckpoint``; what Hearth can't read is refused naming the field.

Its tensors, per quantized linear (transformers' names): 4-bit ``weight`` (uint8, packed),
``weight.absmax``, ``weight.quant_map``, ``weight.quant_state.bitsandbytes__nf4`` (the
shape, block size and dtype, packed as JSON bytes) and with double quantization
``weight.nested_absmax`` and ``weight.nested_quant_map``; 8-bit ``weight`` (int8) and
``SCB`` (the absmax of each row), with ``weight_format`` (0: row-major). Modules it kept
in float (``llm_int8_skip_modules``, the LM head) have their plain ``weight``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.errors import UnsupportedModelError

_TODO = ("load the model's unquantized checkpoint and quantize it with --quant (bnb-nf4, bnb-int8, int4 or int8) "
         "instead")


@dataclass(frozen=True, slots=True)
class BnbCheckpoint:
    """``method``: the Hearth choice it loads as (``bnb-nf4``, ``bnb-nf4-dq``, ``bnb-int8``);
    ``threshold``: LLM.int8()'s outlier threshold; ``not_converted``: the checkpoint's
    ``llm_int8_skip_modules``; ``compute_dtype``: its ``bnb_4bit_compute_dtype`` (Hearth
    computes in the load's dtype)."""

    method: str
    threshold: float = 6.0
    not_converted: tuple[str, ...] = ()
    compute_dtype: str | None = None
    source: str = ""

    @property
    def bits(self) -> int:
        return 8 if self.method == "bnb-int8" else 4


def _refuse(source: str, field: str, problem: str) -> UnsupportedModelError:
    where = f" in {source}" if source else ""
    return UnsupportedModelError(f"quantization_config.{field}{where}: {problem}; {_TODO}")


def parse_bitsandbytes(qc: Mapping[str, Any], source: str = "") -> BnbCheckpoint:
    """``quantization_config`` of a checkpoint saved by transformers with bitsandbytes."""
    four = bool(qc.get("load_in_4bit", qc.get("_load_in_4bit", False)))
    eight = bool(qc.get("load_in_8bit", qc.get("_load_in_8bit", False)))
    if four == eight:
        raise _refuse(source, "load_in_4bit", "exactly one of load_in_4bit and load_in_8bit must be true")
    skip = tuple(qc.get("llm_int8_skip_modules") or ())
    if eight:
        if qc.get("llm_int8_has_fp16_weight"):
            raise _refuse(source, "llm_int8_has_fp16_weight", "the weights are kept in fp16 (a training set-up), "
                          "not as int8")
        threshold = qc.get("llm_int8_threshold", 6.0)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
            raise _refuse(source, "llm_int8_threshold", f"{threshold!r} is not a non-negative number")
        return BnbCheckpoint("bnb-int8", float(threshold), skip, None, source)
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")  # transformers' default is fp4
    if quant_type != "nf4":
        raise _refuse(source, "bnb_4bit_quant_type", f"bitsandbytes {quant_type!r} weights are not supported (nf4 "
                      "and int8 are)")
    storage = qc.get("bnb_4bit_quant_storage", "uint8")
    if storage not in (None, "uint8", "torch.uint8"):
        raise _refuse(source, "bnb_4bit_quant_storage", f"4-bit codes stored as {storage!r} are not supported "
                      "(uint8)")
    method = "bnb-nf4-dq" if qc.get("bnb_4bit_use_double_quant") else "bnb-nf4"
    compute = qc.get("bnb_4bit_compute_dtype")
    return BnbCheckpoint(method, float(qc.get("llm_int8_threshold", 6.0) or 0.0), skip,
                         None if compute is None else str(compute), source)
