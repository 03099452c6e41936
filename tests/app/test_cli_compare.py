"""``hearth compare``: the JSON contract (a list, one object per configuration, with the
issue's fields), the table, exit codes, and bad arguments refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.app.test_cli import run_cli

ISSUE_FIELDS = {"quant", "attention", "output", "ttft_ms", "decode_tok_s", "weight_bytes", "peak_vram_bytes",
                "load_s", "perplexity", "agreement", "error"}


@pytest.fixture(scope="module")
def tiny(tiny_models) -> Path:
    return tiny_models["llama-tied"]


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("Once upon a time\n\nThe capital of France is\n", encoding="utf-8")
    return path


def compare_args(model, prompts, *extra) -> list[str]:
    return ["compare", "--model", str(model), "--device", "cpu", "--prompts", str(prompts), "--max-tokens", "6",
            *extra]


def test_json_lists_every_configuration_with_the_issue_fields(capsys, tiny, prompts_file, tmp_path):
    out_path = tmp_path / "out.json"
    rc, out, err = run_cli(capsys, *compare_args(tiny, prompts_file, "--quants", "bf16,int8,int4",
                                                 "--eval-tokens", "48", "--json", out_path))
    assert rc == 0, err
    rows = json.loads(out_path.read_text(encoding="utf-8"))
    assert isinstance(rows, list) and [r["quant"] for r in rows] == ["bf16", "int8", "int4"]
    for row in rows:
        assert ISSUE_FIELDS <= set(row), ISSUE_FIELDS - set(row)
        assert row["error"] is None and row["attention"] == "auto"
        assert 0.0 <= row["agreement"] <= 1.0 and 0.0 <= row["prefix_agreement"] <= row["agreement"]
        assert row["ttft_ms"] > 0 and row["decode_tok_s"] > 0 and row["load_s"] > 0 and row["perplexity"] > 1
        assert row["peak_vram_bytes"] > row["weight_bytes"]  # peak process memory on the CPU
        assert isinstance(row["output"], str) and len(row["outputs"]) == 2
    assert rows[0]["agreement"] == 1.0 and rows[0]["reference"]  # the reference agrees with itself
    assert rows[0]["weight_bytes"] > rows[1]["weight_bytes"] > rows[2]["weight_bytes"]
    # the table on stdout, progress on stderr
    assert "decode tok/s" in out and "bf16 (float32) (ref)" in out and "int4" in out
    assert "[hearth] int8 (2 of 3): loading" in err


def test_json_dash_writes_only_json_to_stdout(capsys, tiny, prompts_file):
    rc, out, err = run_cli(capsys, *compare_args(tiny, prompts_file, "--quants", "int8", "--no-perplexity",
                                                 "--json", "-", "-q"))
    assert rc == 0, err
    (row,) = json.loads(out)
    assert row["perplexity"] is None and row["agreement"] == 1.0
    assert "decode tok/s" in err and "[hearth]" not in err  # the table moved to stderr, no progress


def test_side_by_side_is_in_the_json_and_the_table_says_speeds_share_the_device(capsys, tiny, prompts_file):
    rc, out, err = run_cli(capsys, *compare_args(tiny, prompts_file, "--quants", "bf16,int8", "--no-perplexity",
                                                 "--side-by-side", "--json", "-"))
    assert rc == 0, err
    rows = json.loads(out)
    assert [r["side_by_side"] for r in rows] == [True, True] and [r["ran_with"] for r in rows] == [[1], [0]]
    for row in rows:
        assert ISSUE_FIELDS <= set(row) and row["error"] is None and 0.0 <= row["agreement"] <= 1.0
    assert "[hearth] side by side: bf16 + int8 (loaded together)" in err
    assert "measured side by side: speeds share the device (bf16 + int8)" in err  # the table's summary


def test_a_failing_configuration_is_reported_and_the_exit_code_is_zero(capsys, tiny, prompts_file, monkeypatch):
    from engine.api import Engine, OutOfMemoryError

    real = Engine.from_config.__func__

    def from_config(cls, config, **kw):
        if config.model.quantization == "int4":
            raise OutOfMemoryError("out of memory loading the weights (test)")
        return real(cls, config, **kw)

    monkeypatch.setattr(Engine, "from_config", classmethod(from_config))
    rc, out, err = run_cli(capsys, *compare_args(tiny, prompts_file, "--quants", "int8,int4", "--no-perplexity",
                                                 "--json", "-", "-q"))
    assert rc == 0, err
    rows = json.loads(out)
    assert rows[0]["error"] is None and rows[1]["error"] == "out of memory loading the weights (test)"
    assert "out of memory loading the weights (test)" in err  # in the table's error column
    assert "Traceback" not in err

    rc, out, err = run_cli(capsys, *compare_args(tiny, prompts_file, "--quants", "int4", "--no-perplexity",
                                                 "--json", "-", "-q"))
    assert rc == 1  # every configuration failed
    assert json.loads(out)[0]["error"]


def test_every_prompt_failing_everywhere_is_exit_code_1(capsys, tiny, tmp_path):
    """(each configuration loaded, but every prompt was longer than the context: nothing was
    compared, and the exit code was 0)"""
    prompts = tmp_path / "long.txt"
    prompts.write_text("word " * 200 + "\n", encoding="utf-8")
    rc, out, err = run_cli(capsys, *compare_args(tiny, prompts, "--quants", "int8,int4", "--no-perplexity",
                                                 "--max-model-len", "64", "--json", "-", "-q"))
    assert rc == 1, err
    rows = json.loads(out)  # still well-formed, one row per configuration
    assert [r["error"] for r in rows] == [None, None]
    assert all(p["error"] for r in rows for p in r["prompts"])
    assert "no configuration answered a prompt" in err and "Traceback" not in err


def test_save_puts_it_where_the_app_reopens_it(capsys, tiny, prompts_file, tmp_path, monkeypatch):
    from app.services.compare_store import list_comparisons

    monkeypatch.setenv("HEARTH_DATA_DIR", str(tmp_path / "data"))
    rc, out, err = run_cli(capsys, *compare_args(tiny, prompts_file, "--quants", "int8", "--no-perplexity",
                                                 "--save", "my run", "-q"))
    assert rc == 0, err
    (saved,) = list_comparisons()
    assert saved.name == "my run" and f"saved as {saved.path}" in err


@pytest.mark.parametrize("extra, mention", [
    (["--quants", "int8,int3"], "configuration 2 (int3): unknown quantization 'int3'"),
    (["--quants", "int8,int8"], "is the same as configuration 1"),
    (["--quants", "none,int8,int4,awq", "--attention", "auto,torch"], "8 configurations are too many"),
    (["--quants", "int8", "--attention", "warp"], "unknown attention backend 'warp'"),
    (["--quants", "int8", "--kv-dtype", "int2"], "kv_cache_dtype must be one of"),
    (["--quants", "int8", "--max-tokens", "0"], "max_tokens must be a positive"),
    (["--quants", "int8", "--eval-tokens", "1"], "eval_tokens must be at least 2"),
    (["--quants", "int8", "--temperature", "0.5"], "--temperature needs --seed"),
    (["--quants", "int8", "--json", "/no/such/folder/out.json"], "does not exist"),
    # a folder, or a place no file can be made, failed only after the whole comparison ran
    (["--quants", "int8", "--json", str(Path(__file__).parent)], "it is a folder"),
    (["--quants", "int8", "--json", ""], "--json is empty"),  # was "it is a folder" (the current one)
    (["--quants", "int8", "--json", "/proc/out.json"], "cannot write --json /proc/out.json"),
    (["--quants", "int8", "--prompts", ""], "--prompts is empty"),  # the bundled prompts were compared
])
def test_bad_arguments_exit_2_with_one_line_before_loading(capsys, tiny, prompts_file, extra, mention):
    rc, out, err = run_cli(capsys, *compare_args(tiny, prompts_file, *extra))
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hearth: error:") and mention in lines[0], err
    assert "[hearth]" not in err  # nothing loaded


def test_empty_prompts_file_is_refused(capsys, tiny, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    rc, _, err = run_cli(capsys, *compare_args(tiny, empty, "--quants", "int8"))
    assert rc == 2 and "has no prompts" in err


def test_quants_is_required_and_the_lists_are_parsed():
    from app.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare"])
    args = build_parser().parse_args(["compare", "--quants", "bf16, int8,", "--kv-cache-dtype", "auto,fp8"])
    assert args.quants == ("bf16", "int8") and args.kv_dtype == ("auto", "fp8") and args.attention == ("auto",)


def test_ctrl_c_cancels_and_still_writes_what_it_has(capsys, tiny, prompts_file, monkeypatch):
    import time as real_time
    from types import SimpleNamespace

    import app.commands.compare as command

    calls = []

    def sleep(seconds):
        """The main thread's wait for the worker is interrupted once (Ctrl-C)."""
        calls.append(seconds)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real_time.sleep(seconds)

    monkeypatch.setattr(command, "time", SimpleNamespace(sleep=sleep, monotonic=real_time.monotonic))
    rc, out, err = run_cli(capsys, *compare_args(tiny, prompts_file, "--quants", "int8,int4", "--no-perplexity",
                                                 "--json", "-"))
    assert rc == 130
    assert "cancelling" in err and "CANCELLED" in err  # the table's summary says so
    rows = json.loads(out)
    assert [r["status"] for r in rows] == ["cancelled", "cancelled"]


@pytest.mark.slow
def test_a_real_ctrl_c_keeps_the_finished_configurations(tiny, prompts_file, tmp_path):
    """SIGINT to the command while its second configuration runs: exit 130, the first
    configuration's results written, no traceback (an interrupted Thread.join used to lose
    them: the worker looked finished while it ran, and the process aborted at exit)."""
    import os
    import signal
    import subprocess
    import sys

    out_path = tmp_path / "out.json"
    args = compare_args(tiny, prompts_file, "--quants", "int8,int4", "--no-perplexity", "--max-tokens", "400",
                        "--json", str(out_path))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # SIGINT as a terminal delivers it: a job started in the background (CI) inherits it
    # ignored, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", *args], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env, cwd=Path(__file__).resolve().parents[2],
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "int4 (2 of 2): loading" in line:
                proc.send_signal(signal.SIGINT)
                break
        out, rest = proc.communicate(timeout=300)
    finally:
        proc.kill()
    err = "".join(seen) + rest
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "cancelling" in err
    rows = json.loads(out_path.read_text(encoding="utf-8"))
    assert rows[0]["status"] == "ok" and rows[0]["outputs"], rows[0]
    assert rows[1]["status"] in ("cancelled", "ok")  # (it may finish before the signal lands)


def test_compare_flags_list_the_registrys_choices():
    from app.cli import build_parser
    from engine.api import choice_names

    compare = build_parser()._subparsers._group_actions[0].choices["compare"]
    for flag, kind in (("--quants", "quantization"), ("--attention", "attention"), ("--kv-dtype", "kv_cache_dtype"),
                       ("--device", "device"), ("--dtype", "dtype")):
        help_text = next(a.help for a in compare._actions if flag in a.option_strings)
        assert help_text.split(":")[0].split(" | ") == list(choice_names(kind)), flag


def test_group_size_goes_to_the_configurations_it_applies_to(capsys, tiny, prompts_file, tmp_path):
    """--group-size 32 compares int4 in groups of 32 with bf16 and int8 as they are (it was
    given to every configuration, and bf16 and int8 failed on it); with no configuration it
    applies to, the command is refused before anything loads."""
    out_path = tmp_path / "out.json"
    rc, _, err = run_cli(capsys, *compare_args(tiny, prompts_file, "--quants", "bf16,int8,int4", "--group-size", "32",
                                               "--no-perplexity", "--json", out_path))
    assert rc == 0, err
    rows = json.loads(out_path.read_text())
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"], [r.get("error") for r in rows]
    assert "g32" in (rows[2]["quant_detail"] or ""), rows[2]["quant_detail"]
    rc, _, err = run_cli(capsys, *compare_args(tiny, prompts_file, "--quants", "bf16,int8", "--group-size", "32"))
    assert rc == 2 and "--group-size applies to int4, awq, gptq: none of the configurations is one" in err
