"""A comparison as text: CSV, JSON (``hearth compare --json``'s list), Markdown (a table and
every output) and the aligned table ``hearth compare`` prints. PNG (the charts) is the GUI's.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from app.services.compare_results import ComparisonResult, ConfigResult
from app.services.compare_store import ComparisonFileError
from engine.api import format_bytes

#: CSV columns: the row's scalar fields (``outputs`` and per-prompt details are in the JSON).
CSV_FIELDS = ("label", "quant", "attention", "kv_dtype", "status", "error", "ttft_ms", "decode_tok_s", "weight_bytes",
              "kv_bytes", "peak_vram_bytes", "load_s", "perplexity", "agreement", "prefix_agreement", "reference",
              "device", "dtype", "attention_used", "quant_used", "kv_dtype_used", "output", "side_by_side")
#: Formats ``export_comparison`` writes, by file suffix.
FORMATS = {".csv": "csv", ".json": "json", ".md": "markdown", ".markdown": "markdown"}


def to_json(result: ComparisonResult) -> str:
    """The list of ``ConfigResult.row()`` objects, one per configuration."""
    return json.dumps(result.rows(), ensure_ascii=False, indent=1) + "\n"


def to_csv(result: ComparisonResult) -> str:
    """One line per configuration with ``CSV_FIELDS`` (numbers unformatted; empty where
    none; the first prompt's output)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in result.rows():
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_FIELDS})
    return buf.getvalue()


# -- human-readable cells --------------------------------------------------------------
def cells(r: ConfigResult) -> dict[str, str]:
    """The table's cells of one configuration, formatted ("" where there's no number)."""
    def num(value, fmt: str) -> str:
        return "" if value is None else fmt.format(value)

    return {
        "config": r.shown_label + (" (ref)" if r.is_reference else ""),  # "auto (gguf)", "bf16 (float32)"
        "ttft": num(r.ttft_ms, "{:.1f}"),
        "decode": num(r.decode_tok_s, "{:.1f}"),
        "weights": "" if r.weight_bytes is None else format_bytes(r.weight_bytes),
        "kv": "" if r.kv_bytes is None else format_bytes(r.kv_bytes),
        "peak": "" if r.peak_vram_bytes is None else format_bytes(r.peak_vram_bytes),
        "load": num(r.load_s, "{:.1f}"),
        "ppl": num(r.perplexity, "{:.3f}"),
        "agree": num(None if r.agreement is None else 100 * r.agreement, "{:.1f}%"),
        "prefix": num(None if r.prefix_agreement is None else 100 * r.prefix_agreement, "{:.1f}%"),
        "error": r.error or _prompt_errors(r),
    }


def _prompt_errors(r: ConfigResult) -> str:
    failed = [p for p in r.prompts if p.error]
    if not failed:
        return ""
    return f"{len(failed)} prompt(s) failed; prompt {failed[0].prompt_index + 1}: {failed[0].error}"


#: (key of ``cells``, title, right-aligned)
COLUMNS = (("config", "config", False), ("ttft", "TTFT ms", True), ("decode", "decode tok/s", True),
           ("weights", "weights", True), ("kv", "KV cache", True), ("peak", "peak memory", True),
           ("load", "load s", True), ("ppl", "perplexity", True), ("agree", "agreement", True),
           ("prefix", "prefix agr.", True), ("error", "error", False))


def summary_line(result: ComparisonResult) -> str:
    """What was compared, how: model, prompts, sampling, and that speeds are means."""
    plan = result.plan
    sampling = "greedy" if plan.seed is None else f"sampled, seed {plan.seed}"
    where = next((r.device for r in result.results if r.device), plan.device)
    ppl = "no perplexity"
    if plan.perplexity:
        cap = f" (first {plan.eval_tokens:,} tokens)" if plan.eval_tokens else ""
        ppl = f"perplexity on the bundled evaluation text{cap}"
    return (f"{result.model or 'model'} on {where}: {len(plan.prompts)} prompt(s), {sampling}, up to {plan.max_tokens} "
            f"tokens each; TTFT and decode tok/s are means over the prompts; {ppl}" + side_by_side_note(result)
            + ("; CANCELLED" if result.cancelled else ""))


def side_by_side_groups(result: ComparisonResult) -> list[list[int]]:
    """The configurations measured side by side, as groups of indexes (``ran_with``)."""
    groups: list[list[int]] = []
    for r in result.results:
        group = sorted({r.index, *r.ran_with})
        if r.ran_with and group not in groups:
            groups.append(group)
    return groups


def side_by_side_note(result: ComparisonResult) -> str:
    """"; measured side by side: speeds share the device (bf16 + int8) ..." where any
    configurations ran together, so nobody reads their speeds as each one's alone."""
    groups = side_by_side_groups(result)
    if not groups:
        return ""
    labels = {r.index: r.label for r in result.results}
    named = "; ".join(" + ".join(labels[i] for i in g) for g in groups)
    return f"; measured side by side: speeds share the device ({named}), peak memory is each group's"


def to_text_table(result: ComparisonResult) -> str:
    """The aligned table ``hearth compare`` prints, under ``summary_line``."""
    rows = [cells(r) for r in result.results]
    widths = {key: max(len(title), *(len(c[key]) for c in rows)) for key, title, _ in COLUMNS}

    def line(values: dict[str, str]) -> str:
        return "  ".join(values[k].rjust(widths[k]) if right else values[k].ljust(widths[k])
                         for k, _, right in COLUMNS).rstrip()

    return "\n".join([summary_line(result), line({k: t for k, t, _ in COLUMNS}), *(line(c) for c in rows)])


def to_markdown(result: ComparisonResult) -> str:
    """A heading, the summary, the table, then every prompt with each configuration's
    output."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    out = [f"# {cell(result.name or 'Comparison')}", "", summary_line(result) + f" (started {result.started}).", "",
           "| " + " | ".join(t for _, t, _ in COLUMNS) + " |",
           "| " + " | ".join("---:" if right else "---" for _, _, right in COLUMNS) + " |"]
    for r in result.results:
        c = cells(r)
        out.append("| " + " | ".join(cell(c[k]) for k, _, _ in COLUMNS) + " |")
    for p, prompt in enumerate(result.plan.prompts):
        out += ["", f"## Prompt {p + 1}", "", *(f"> {line}" for line in prompt.splitlines() or [""])]
        for r in result.results:
            answer = r.prompts[p] if p < len(r.prompts) else None
            out += ["", f"### {r.label}", ""]
            if answer is None:
                out.append(f"*{r.error or 'no answer'}*")
                continue
            out += ["```text", answer.text.replace("```", "`\u200b``"), "```"]
            if answer.error:
                out.append(f"*{answer.error}*")
    return "\n".join(out) + "\n"


def export_comparison(result: ComparisonResult, path: str | Path, fmt: str | None = None) -> Path:
    """Write ``result`` to ``path`` as ``fmt`` ("csv", "json", "markdown"; default: by the
    file's suffix, see ``FORMATS``). ComparisonFileError for an unknown format or a disk
    that refuses."""
    path = Path(path)
    fmt = fmt or FORMATS.get(path.suffix.lower())
    writers = {"csv": to_csv, "json": to_json, "markdown": to_markdown}
    if fmt not in writers:
        raise ComparisonFileError(f"cannot export as {fmt or path.suffix or 'a file without a suffix'!r}: use a .csv, "
                                  ".json or .md file.")
    try:
        path.write_text(writers[fmt](result), encoding="utf-8", newline="")
    except OSError as e:
        raise ComparisonFileError(f"cannot write {path}: {e.strerror or e}.") from None
    return path
