"""``hearth eval``: one JSON object with the measured fields, a readable line, and bad
input refused in one line before (or instead of) a traceback."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.app.test_cli import run_cli

FIELDS = {"quant", "perplexity", "weight_bytes", "load_s", "tokens", "window", "stride", "model", "device",
          "dtype", "text"}


@pytest.fixture(scope="module")
def tiny(tiny_models) -> Path:
    return tiny_models["llama-tied"]


@pytest.fixture
def short_text(tmp_path) -> Path:
    path = tmp_path / "short.txt"
    path.write_text("Alice was beginning to get very tired of sitting by her sister on the bank, and of having "
                    "nothing to do: once or twice she had peeped into the book her sister was reading.\n",
                    encoding="utf-8")
    return path


def eval_args(model, *extra) -> list[str]:
    return ["eval", "--model", str(model), "--device", "cpu", "--dtype", "float32", *extra]


def test_eval_json_prints_one_object_with_the_fields(capsys, tiny, short_text):
    from engine.api import Engine

    rc, out, err = run_cli(capsys, *eval_args(tiny, "--text", short_text, "--window", "16", "--stride", "8",
                                              "--quant", "none", "--json"))
    assert rc == 0, err
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, f"--json must print ONE JSON object, got:\n{out}"
    row = json.loads(lines[0])
    assert FIELDS <= set(row), FIELDS - set(row)
    assert row["quant"] == "none" and row["device"] == "cpu" and row["dtype"] == "float32"
    assert (row["window"], row["stride"]) == (16, 8)
    assert row["text"] == str(short_text) and row["load_s"] > 0
    with Engine.load(str(tiny), device="cpu", dtype="float32") as eng:
        expected = eng.perplexity(short_text.read_text(encoding="utf-8"), window=16, stride=8)
        assert row["weight_bytes"] == eng.model_info.weight_bytes > 0
    assert row["tokens"] == expected.tokens > 16
    assert row["perplexity"] == pytest.approx(expected.perplexity, rel=1e-4)
    assert math.isfinite(row["perplexity"])


def test_eval_plain_line_states_window_and_stride(capsys, tiny, short_text):
    rc, out, err = run_cli(capsys, *eval_args(tiny, "--text", short_text, "--window", "16", "--stride", "8"))
    assert rc == 0, err
    (line,) = [ln for ln in out.splitlines() if ln.strip()]
    assert "perplexity" in line and "window 16, stride 8" in line and "short.txt" in line
    assert "[hearth] scored" in err  # progress on stderr, not in the result


def test_ctrl_c_says_the_perplexity_so_far_and_prints_no_result(capsys, tiny, short_text, monkeypatch):
    """An interrupted eval says what it scored on stderr (exit 130), and --json prints nothing:
    a partial number must not pass for the text's."""
    from app.commands import eval as eval_command

    def stop_after_two(say):
        seen = []

        def progress(done, total):
            seen.append(done)
            if len(seen) == 2:
                raise KeyboardInterrupt
        return progress

    monkeypatch.setattr(eval_command, "_every_second", stop_after_two)
    rc, out, err = run_cli(capsys, *eval_args(tiny, "--text", short_text, "--window", "16", "--stride", "8",
                                              "--json"))
    assert rc == 130 and out == ""
    assert "[hearth] interrupted after 23 of " in err and "first 24 tokens of short.txt" in err  # windows of 15 + 8


def test_eval_defaults_to_the_bundled_evaluation_text(capsys, tiny, monkeypatch):
    """No --text: the bundled text is scored (cut short here by a stand-in that keeps the
    test fast: the engine is asked to score the bundled file's text)."""
    from engine.api import Engine
    from resources.texts import evaluation_text_path

    seen = []
    real = Engine.perplexity

    def first_lines(self, text, **kw):
        seen.append(text)
        return real(self, text[:300], **kw)

    monkeypatch.setattr(Engine, "perplexity", first_lines)
    rc, out, err = run_cli(capsys, *eval_args(tiny, "--window", "32", "--stride", "16", "--json", "-q"))
    assert rc == 0, err
    assert seen == [evaluation_text_path().read_text(encoding="utf-8")]
    assert json.loads(out)["text"] == str(evaluation_text_path())
    assert err == ""


@pytest.mark.parametrize("case, mention", [
    ("missing", "cannot read --text"),
    ("empty", "is empty"),
    ("one-token", "1 token long"),
    ("not-utf8", "not valid UTF-8"),
    ("window-past-context", "--max-model-len"),
    ("stride-past-window", "--stride 40 is longer than the window (32 tokens)"),
    ("window-1", "--window 1"),
    ("empty-path", "--text is empty"),
])
def test_eval_bad_input_exits_2_with_one_line(capsys, tiny, tmp_path, case, mention):
    path = tmp_path / "t.txt"
    extra = []
    if case == "empty":
        path.write_text("  \n\n", encoding="utf-8")
    elif case == "one-token":
        path.write_text("Hi", encoding="utf-8")
    elif case == "not-utf8":
        path.write_bytes(b"caf\xe9 au lait")
    elif case == "window-past-context":
        path.write_text("Some text to score. " * 20, encoding="utf-8")
        extra = ["--max-model-len", "64", "--window", "65"]
    elif case == "stride-past-window":
        extra = ["--window", "32", "--stride", "40"]
    elif case == "window-1":
        extra = ["--window", "1"]
    elif case == "empty-path":  # (it scored the bundled text)
        path = ""
    rc, out, err = run_cli(capsys, *eval_args(tiny, "--text", path, "--json", *extra))
    assert rc == 2, f"{case}: rc={rc}, stderr:\n{err}"
    assert out == "" and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[hearth]")]
    assert len(lines) == 1, f"{case}: expected one error line, got:\n{err}"
    assert lines[0].startswith("hearth: error:") and mention in lines[0], lines[0]
    if case in ("window-past-context", "stride-past-window", "window-1", "empty-path"):  # before the model loads
        assert "[hearth]" not in err
    elif case != "missing":
        assert str(path) in lines[0]  # names the file


def test_quant_is_the_quantization_flag():
    from app.cli import build_parser

    args = build_parser().parse_args(["eval", "--quant", "int8"])
    assert args.quant == "int8"
    args = build_parser().parse_args(["generate", "--prompt", "x", "--quantization", "int4", "--group-size", "64"])
    assert args.quant == "int4" and args.group_size == 64
    assert build_parser().parse_args(["chat"]).quant == "auto"  # a GGUF's own weights, else none


def test_progress_is_said_at_most_once_a_second_and_at_the_end():
    """Thousands of small windows used to print a line each."""
    from app.commands import eval as eval_command

    clock = iter([0.0, 0.2, 0.5, 1.1, 1.3, 2.4, 2.5])
    said = []
    progress = eval_command._every_second(said.append, clock=lambda: next(clock))
    for done in (10, 20, 30, 40, 50, 60, 70):
        progress(done, 70)
    assert said == ["scored 10 of 70 tokens", "scored 40 of 70 tokens", "scored 60 of 70 tokens",
                    "scored 70 of 70 tokens"]
