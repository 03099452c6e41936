"""What a comparison measured: ``PromptResult`` (one prompt on one configuration),
``ConfigResult`` (one configuration, with ``row()``: the flat JSON object of ``hearth
compare --json``) and ``ComparisonResult`` (the whole run, with its plan; what is saved and
reopened). Each has a JSON form that reads back (``to_dict`` / ``from_dict``, ``row`` /
``from_row``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from app.services.compare_metrics import mean
from app.services.compare_plan import CompareConfig, ComparePlan

#: ConfigResult.status values.
OK, ERROR, CANCELLED = "ok", "error", "cancelled"
#: Finish reasons of an answer that ended on its own terms (others: "abort", "error").
_COMPLETE = ("stop", "length")


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


@dataclass(slots=True)
class PromptResult:
    """One prompt's answer from one configuration.

    ``ttft_ms`` and ``decode_tok_s`` are the engine's own (``FinishedEvent.timings``):
    submit to first token, and output tokens after the first over the time since the
    first; None where they don't apply (no token; fewer than 2 tokens). ``agreement`` /
    ``prefix_agreement`` compare ``token_ids`` with the reference's answer to the same
    prompt (see ``compare_metrics.agreement``); None where either has no complete answer
    or no reference ran yet. ``error``: why the prompt has no (complete) answer."""

    prompt_index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    ttft_ms: float | None = None
    decode_tok_s: float | None = None
    error: str | None = None
    agreement: float | None = None
    prefix_agreement: float | None = None

    @property
    def complete(self) -> bool:
        """The answer ended on its own terms (EOS, a stop, or max_tokens)."""
        return self.error is None and self.finish_reason in _COMPLETE

    @property
    def output_tokens(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_index": self.prompt_index, "output": self.text, "token_ids": list(self.token_ids),
                "output_tokens": self.output_tokens, "finish_reason": self.finish_reason,
                "prompt_tokens": self.prompt_tokens, "ttft_ms": _round(self.ttft_ms, 3),
                "decode_tok_s": _round(self.decode_tok_s, 3), "agreement": _round(self.agreement, 4),
                "prefix_agreement": _round(self.prefix_agreement, 4), "error": self.error}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PromptResult":
        return cls(prompt_index=int(data["prompt_index"]), text=str(data.get("output") or ""),
                   token_ids=[int(t) for t in data.get("token_ids") or ()], finish_reason=data.get("finish_reason"),
                   prompt_tokens=int(data.get("prompt_tokens") or 0), ttft_ms=data.get("ttft_ms"),
                   decode_tok_s=data.get("decode_tok_s"), error=data.get("error"), agreement=data.get("agreement"),
                   prefix_agreement=data.get("prefix_agreement"))


@dataclass(slots=True)
class ConfigResult:
    """One configuration's run. ``status``: "ok" (it ran: ``error`` is None), "error"
    (``error`` says why, as the engine said it: out of memory, not available here, a load
    error) or "cancelled". What was measured before an error or a cancel is kept.

    ``weight_bytes`` / ``kv_bytes``: the loaded weights and the KV-cache pool
    (``ModelInfo``). ``peak_vram_bytes``: the peak while it ran, load to shutdown (CUDA:
    torch's peak allocated bytes; CPU: the process's peak RSS; ``peak_memory_source``
    says which). ``load_s``: ``Engine.from_config`` wall time (a first AWQ/GPTQ load
    includes its calibration). ``perplexity`` on the bundled evaluation text, over
    ``perplexity_tokens`` tokens at ``perplexity_window`` / ``perplexity_stride``.
    ``ttft_ms`` / ``decode_tok_s``: means over the prompts that have one. ``agreement`` /
    ``prefix_agreement``: means over the prompts both this configuration and the
    reference answered completely; the reference has 1.0.

    ``ran_with``: the indexes of the configurations that were loaded and answering at the
    same time as this one (a side-by-side plan, ``ComparePlan.side_by_side``); empty when
    it ran alone. Side by side, the speeds share the device with those, and
    ``peak_vram_bytes`` is the whole group's peak (``peak_memory_source`` says so); load
    time, weights, KV cache, perplexity and agreement are this configuration's own."""

    index: int
    config: CompareConfig
    status: str = OK
    error: str | None = None
    prompts: list[PromptResult] = field(default_factory=list)
    load_s: float | None = None
    weight_bytes: int | None = None
    kv_bytes: int | None = None
    peak_vram_bytes: int | None = None
    peak_memory_source: str | None = None
    perplexity: float | None = None
    perplexity_tokens: int | None = None
    perplexity_window: int | None = None
    perplexity_stride: int | None = None
    agreement: float | None = None
    prefix_agreement: float | None = None
    is_reference: bool = False
    seconds: float | None = None
    # What the load resolved (ModelInfo): the model's name, the device, the weights dtype,
    # and the attention backend / quantization / KV dtype that ran for the "auto"s asked.
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    attention_used: str | None = None
    quant_used: str | None = None
    kv_dtype_used: str | None = None
    quant_detail: str | None = None
    ran_with: list[int] = field(default_factory=list)

    @property
    def side_by_side(self) -> bool:
        """Measured side by side with other configurations: its speeds shared the device."""
        return bool(self.ran_with)

    @property
    def label(self) -> str:
        return self.config.label

    @property
    def shown_label(self) -> str:
        """The label with what the load made of it: what ``auto`` picked ("auto (gguf)"), and
        the dtype an unquantized bf16/fp16 ran in where it ran in another ("bf16 (float32)":
        the CPU runs them in float32)."""
        label = self.label
        if self.config.quant == "auto" and self.quant_used:
            label = label.replace("auto", f"auto ({self.quant_used})", 1)
        wanted = {"bf16": "bfloat16", "fp16": "float16"}.get(self.config.quant)
        if wanted and self.dtype and self.dtype != wanted:
            label = label.replace(self.config.quant, f"{self.config.quant} ({self.dtype})", 1)
        return label

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def outputs(self) -> list[str]:
        """Every prompt's output text, in prompt order ("" where a prompt has none)."""
        return [p.text for p in self.prompts]

    @property
    def output(self) -> str | None:
        """The first prompt's output (the JSON's ``output``); None if it has none."""
        return self.prompts[0].text if self.prompts else None

    @property
    def ttft_ms(self) -> float | None:
        return mean(p.ttft_ms for p in self.prompts)

    @property
    def decode_tok_s(self) -> float | None:
        return mean(p.decode_tok_s for p in self.prompts)

    def row(self) -> dict[str, Any]:
        """The flat JSON object of ``hearth compare --json`` (a contract: fields are only
        ever added). ``error`` is null when the configuration ran."""
        return {
            "label": self.label, "quant": self.config.quant, "attention": self.config.attention,
            "kv_dtype": self.config.kv_dtype, "status": self.status, "error": self.error,
            "output": self.output, "outputs": self.outputs,
            "ttft_ms": _round(self.ttft_ms, 3), "decode_tok_s": _round(self.decode_tok_s, 3),
            "weight_bytes": self.weight_bytes, "kv_bytes": self.kv_bytes, "peak_vram_bytes": self.peak_vram_bytes,
            "peak_memory_source": self.peak_memory_source, "load_s": _round(self.load_s, 3),
            "perplexity": _round(self.perplexity, 4), "perplexity_tokens": self.perplexity_tokens,
            "perplexity_window": self.perplexity_window, "perplexity_stride": self.perplexity_stride,
            "agreement": _round(self.agreement, 4), "prefix_agreement": _round(self.prefix_agreement, 4),
            "reference": self.is_reference, "seconds": _round(self.seconds, 3), "model": self.model,
            "device": self.device, "dtype": self.dtype, "attention_used": self.attention_used,
            "quant_used": self.quant_used, "kv_dtype_used": self.kv_dtype_used, "quant_detail": self.quant_detail,
            "prompts": [p.to_dict() for p in self.prompts], "index": self.index,
            "side_by_side": self.side_by_side, "ran_with": list(self.ran_with),
        }

    @classmethod
    def from_row(cls, data: Mapping[str, Any]) -> "ConfigResult":
        """Read ``row()``'s form back (a saved comparison). KeyError / TypeError /
        ValueError for a row that isn't one."""
        scalars = ("status", "error", "load_s", "weight_bytes", "kv_bytes", "peak_vram_bytes", "peak_memory_source",
                   "perplexity", "perplexity_tokens", "perplexity_window", "perplexity_stride", "agreement",
                   "prefix_agreement", "seconds", "model", "device", "dtype", "attention_used", "quant_used",
                   "kv_dtype_used", "quant_detail")
        values = {k: data[k] for k in scalars if k in data}
        if values.get("status", OK) not in (OK, ERROR, CANCELLED):
            raise ValueError(f"unknown status {values['status']!r}")
        return cls(index=int(data["index"]), config=CompareConfig.from_dict(data),
                   prompts=[PromptResult.from_dict(p) for p in data.get("prompts") or ()],
                   is_reference=bool(data.get("reference", False)),
                   ran_with=[int(i) for i in data.get("ran_with") or ()], **values)


@dataclass(slots=True)
class ComparisonResult:
    """A whole comparison: the plan, one ``ConfigResult`` per configuration (in the plan's
    order, every one present: cancelled ones too), which one is the reference (the first
    that ran without an error; None if none did), whether it was cancelled, when it
    started (ISO 8601, local time with offset) and how long it took. ``name``: set when
    saved (``compare_store``)."""

    plan: ComparePlan
    results: list[ConfigResult]
    reference_index: int | None = None
    cancelled: bool = False
    started: str = ""
    seconds: float = 0.0
    model: str | None = None  # the model's display name (None until a configuration loaded)
    name: str | None = None

    def rows(self) -> list[dict[str, Any]]:
        """``hearth compare --json``: one ``ConfigResult.row()`` per configuration."""
        return [r.row() for r in self.results]

    @property
    def reference(self) -> ConfigResult | None:
        return None if self.reference_index is None else self.results[self.reference_index]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "started": self.started, "seconds": round(self.seconds, 3),
                "cancelled": self.cancelled, "reference_index": self.reference_index, "plan": self.plan.to_dict(),
                "results": self.rows()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ComparisonResult":
        """Read ``to_dict``'s form back. KeyError / TypeError / ValueError for a document
        that isn't one (``compare_store`` turns them into one clear error)."""
        results = [ConfigResult.from_row(r) for r in data["results"]]
        reference = data.get("reference_index")
        if reference is not None and not 0 <= int(reference) < len(results):
            raise ValueError(f"reference_index {reference} is not one of the {len(results)} results")
        return cls(plan=ComparePlan.from_dict(data["plan"]), results=results,
                   reference_index=None if reference is None else int(reference),
                   cancelled=bool(data.get("cancelled", False)), started=str(data.get("started") or ""),
                   seconds=float(data.get("seconds") or 0.0), model=data.get("model"), name=data.get("name"))
