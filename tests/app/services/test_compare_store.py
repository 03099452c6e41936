"""Saving, listing and reopening comparisons (a damaged file is skipped with a clear
reason, never a crash), and the CSV / JSON / Markdown exports."""

from __future__ import annotations

import csv
import io
import json

import pytest

from app.services.compare_export import CSV_FIELDS, export_comparison, to_csv, to_json, to_markdown, to_text_table
from app.services.compare_plan import CompareConfig, ComparePlan
from app.services.compare_results import ComparisonResult, ConfigResult, PromptResult
from app.services.compare_store import (ComparisonFileError, delete_comparison, list_comparisons, load_comparison,
                                        save_comparison)


def sample(cancelled: bool = False) -> ComparisonResult:
    """A finished comparison of three configurations, without running a model."""
    plan = ComparePlan(configs=(CompareConfig("bf16"), CompareConfig("int4", "torch"), CompareConfig("fp8")),
                       prompts=("Say hi | twice", "Count"), model="tiny", device="cpu", eval_tokens=64)

    def answer(i, text, ids):
        return PromptResult(i, text, ids, "length", 5, ttft_ms=10.0 + i, decode_tok_s=100.0 + i)

    ref = ConfigResult(0, plan.configs[0], prompts=[answer(0, "hi hi", [1, 2]), answer(1, "1 2 3", [3, 4, 5])],
                       load_s=1.5, weight_bytes=4000, kv_bytes=512, peak_vram_bytes=9000,
                       peak_memory_source="process peak RSS (VmHWM)", perplexity=12.5, perplexity_tokens=64,
                       agreement=1.0, prefix_agreement=1.0, is_reference=True, device="cpu", dtype="float32")
    other = ConfigResult(1, plan.configs[1], prompts=[answer(0, "hi ho", [1, 9]), answer(1, "1 2 3", [3, 4, 5])],
                         load_s=0.5, weight_bytes=1200, kv_bytes=512, peak_vram_bytes=7000, perplexity=13.25,
                         agreement=0.75, prefix_agreement=0.75, device="cpu")
    failed = ConfigResult(2, plan.configs[2], status="cancelled" if cancelled else "error",
                          error="cancelled before it ran" if cancelled else "fp8 can't be used here")
    return ComparisonResult(plan=plan, results=[ref, other, failed], reference_index=0, cancelled=cancelled,
                            started="2026-12-01T21:00:00+00:00", seconds=4.0, model="tiny")


def test_save_then_list_then_reopen(tmp_path):
    result = sample()
    path = save_comparison(result, "int4 vs bf16", folder=tmp_path)
    assert path.parent == tmp_path and path.suffix == ".json" and "int4-vs-bf16" in path.name
    (listed,) = list_comparisons(tmp_path)
    assert listed.path == path and listed.name == "int4 vs bf16" and listed.model == "tiny"
    assert listed.labels == ("bf16", "int4 · torch", "fp8") and not listed.cancelled
    again = load_comparison(path)
    assert again.rows() == result.rows() and again.plan == result.plan
    assert again.reference_index == 0 and again.name == "int4 vs bf16"
    delete_comparison(path)
    assert list_comparisons(tmp_path) == []


def test_saved_in_the_data_folder_by_default_with_a_default_name(tmp_path, monkeypatch):
    monkeypatch.setenv("HEARTH_DATA_DIR", str(tmp_path / "data"))
    first = save_comparison(sample(cancelled=True))
    second = save_comparison(sample())  # same second: a new file, not an overwrite
    assert first != second and first.parent == tmp_path / "data" / "comparisons"
    listed = list_comparisons()
    assert {s.path for s in listed} == {first, second}
    assert listed[0].name == "tiny: bf16, int4 · torch, fp8"
    assert load_comparison(first).cancelled


@pytest.mark.parametrize("content, mention", [
    (b"{not json", "is damaged (not JSON"),
    (b'{"format": "hearth-comparison", "name": "cut sho', "(not JSON: Unterminated string starting at line 1)"),
    (b"\xff\xfe\x00", "not UTF-8"),
    (b'{"format": "something-else"}', "is not a saved Hearth comparison"),
    (b'{"format": "hearth-comparison", "version": 99}', "newer than this Hearth reads"),
    (b'{"format": "hearth-comparison", "version": 1, "results": [{"index": "x"}]}', "is damaged"),
])
def test_a_damaged_file_is_skipped_in_the_list_and_refused_clearly(tmp_path, content, mention):
    save_comparison(sample(), "good", folder=tmp_path)
    bad = tmp_path / "20991231-000000-bad.json"
    bad.write_bytes(content)
    problems: list[str] = []
    listed = list_comparisons(tmp_path, problems)
    assert [s.name for s in listed] == ["good"]
    assert len(problems) == 1 and str(bad) in problems[0] and mention in problems[0]
    with pytest.raises(ComparisonFileError) as info:
        load_comparison(bad)
    assert str(bad) in str(info.value) and mention in str(info.value)
    assert bad.exists()  # left for the user, not deleted


def test_a_folder_that_cannot_be_created_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ComparisonFileError, match="cannot create the folder"):
        save_comparison(sample(), folder=blocker / "comparisons")
    problems: list[str] = []
    assert list_comparisons(blocker / "comparisons", problems) == [] and problems


def test_json_export_is_the_list_of_rows_with_the_issue_fields():
    rows = json.loads(to_json(sample()))
    assert isinstance(rows, list) and len(rows) == 3
    for row in rows:
        assert {"quant", "attention", "output", "ttft_ms", "decode_tok_s", "weight_bytes", "peak_vram_bytes",
                "load_s", "perplexity", "agreement", "error", "kv_dtype", "kv_bytes", "prefix_agreement",
                "outputs", "label"} <= set(row)
    assert rows[0]["error"] is None and rows[0]["output"] == "hi hi" and rows[0]["outputs"] == ["hi hi", "1 2 3"]
    assert rows[0]["ttft_ms"] == 10.5 and rows[1]["attention"] == "torch"
    assert rows[2]["error"] == "fp8 can't be used here" and rows[2]["output"] is None


def test_csv_export_has_one_line_per_configuration():
    lines = list(csv.DictReader(io.StringIO(to_csv(sample()))))
    assert len(lines) == 3 and list(lines[0]) == list(CSV_FIELDS)
    assert lines[1]["label"] == "int4 · torch" and lines[1]["weight_bytes"] == "1200"
    assert lines[2]["perplexity"] == "" and lines[2]["error"] == "fp8 can't be used here"


def test_markdown_export_has_the_table_and_every_output():
    md = to_markdown(sample())
    assert "| config | TTFT ms |" in md and "| bf16 (float32) (ref) | 10.5 |" in md
    assert "Say hi \\| twice" not in md.split("## Prompt 1")[0]  # prompts are below the table
    assert "## Prompt 1" in md and "> Say hi | twice" in md and "### int4 · torch" in md and "hi ho" in md
    assert "*fp8 can't be used here*" in md


def test_text_table_names_the_columns_and_says_speeds_are_means():
    table = to_text_table(sample())
    head, titles, *rows = table.splitlines()
    assert "means over the prompts" in head and "greedy" in head
    for title in ("TTFT ms", "decode tok/s", "weights", "KV cache", "peak memory", "load s", "perplexity",
                  "agreement", "error"):
        assert title in titles
    assert rows[0].startswith("bf16 (float32) (ref)") and "75.0%" in rows[1] and "can't be used here" in rows[2]


def test_table_says_what_auto_picked():
    from app.services.compare_export import cells

    result = sample()
    result.results[0].config = CompareConfig("auto")
    result.results[0].quant_used = "gguf"
    assert cells(result.results[0])["config"] == "auto (gguf) (ref)"
    assert cells(result.results[1])["config"] == "int4 · torch"


def test_export_by_suffix_and_unknown_suffix(tmp_path):
    for suffix in (".csv", ".json", ".md"):
        path = export_comparison(sample(), tmp_path / f"out{suffix}")
        assert path.read_text(encoding="utf-8")
    with pytest.raises(ComparisonFileError, match="use a .csv, .json or .md file"):
        export_comparison(sample(), tmp_path / "out.png")
