"""Issue 12: bad text on the command line, in a prompts file or typed into ``hearth chat``
gives one clear error (never a traceback), and a message the chat can't send leaves the
conversation as it was. Runs ``main([...])`` in-process on the tiny model, as test_cli.py.
"""

from __future__ import annotations

import codecs
import os
import subprocess
import sys
import time

import pytest

from tests.app.test_cli import (REPO, chat_args, feed_input, gen_args, json_rows, record_requests,
                                run_cli)

BAD = "hi \udcff there"  # what argv or a surrogateescape stdin holds for b"hi \xff there"
SAMPLING = ["--max-tokens", "2", "--temperature", "0", "--ignore-eos"]


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models["llama-tied"]


def one_error_line(rc: int, out: str, err: str) -> str:
    assert rc == 2, f"rc={rc}, stderr:\n{err}"
    assert out == "" and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    # One line: also proves the model never started loading ("[hearth] resolving model ...").
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("hearth: error:"), lines[0]
    return lines[0]


# -- generate: a prompts file ----------------------------------------------------------------


def test_prompts_file_that_is_not_utf8_names_the_file_and_the_byte(capsys, tiny, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_bytes(b"Hello\ncaf\xe9 au lait\n")  # Latin-1, not UTF-8
    line = one_error_line(*run_cli(capsys, *gen_args(tiny, "--prompts-file", f, *SAMPLING)))
    assert str(f) in line and "not valid UTF-8" in line, line
    assert "0xE9" in line and "byte offset 9" in line and "line 2" in line, line
    f.write_bytes(codecs.BOM_UTF16_LE + "Hi\n".encode("utf-16-le"))
    line = one_error_line(*run_cli(capsys, *gen_args(tiny, "--prompts-file", f, *SAMPLING)))
    assert "UTF-16" in line and "line 1" in line, line


def test_prompts_file_bom_is_not_sent_and_rows_carry_their_line(capsys, tiny, tmp_path):
    rc, out, err = run_cli(capsys, *gen_args(tiny, "--prompt", "Hello world", *SAMPLING, "--json"))
    assert rc == 0, err
    (alone,) = json_rows(out)
    assert "line" not in alone  # no file, no line numbers
    f = tmp_path / "prompts.txt"
    # A BOM (Windows editors write one), blank and blank-looking lines, CRLF endings.
    f.write_bytes(codecs.BOM_UTF8 + b"Hello world\r\n\r\nHello world\n   \nThe end\n\n")
    rc, out, err = run_cli(capsys, *gen_args(tiny, "--prompts-file", f, *SAMPLING, "--json"))
    assert rc == 0, err
    rows = json_rows(out)
    assert [r["line"] for r in rows] == [1, 3, 5]
    # The BOM did not reach the model: the first line reads exactly as the plain prompt.
    assert rows[0]["prompt_tokens"] == rows[1]["prompt_tokens"] == alone["prompt_tokens"]
    assert rows[0]["token_ids"] == alone["token_ids"]
    assert "skipped blank lines 2, 4 and 6" in err and '"line"' in err, err
    # Files joined with cat, each with its own BOM: a BOM that starts a line isn't sent either,
    # and a line of only a BOM is blank.
    f.write_bytes(codecs.BOM_UTF8 + b"Hello world\n" + codecs.BOM_UTF8 + b"\n" + codecs.BOM_UTF8 + b"Hello world\n")
    rc, out, err = run_cli(capsys, *gen_args(tiny, "--prompts-file", f, *SAMPLING, "--json"))
    assert rc == 0, err
    rows = json_rows(out)
    assert [r["line"] for r in rows] == [1, 3] and "skipped blank line 2" in err, err
    assert rows[1]["token_ids"] == alone["token_ids"] and rows[1]["prompt_tokens"] == alone["prompt_tokens"]


def test_a_prompt_the_engine_refuses_is_named_by_its_line(capsys, tiny, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("Hi\n" + "The quick brown fox jumps over the lazy dog " * 3 + "\n", encoding="utf-8")
    line = one_error_line(*run_cli(capsys, *gen_args(tiny, "--prompts-file", f, *SAMPLING, "--json",
                                                     "--max-model-len", "8")))
    assert f"line 2 of {f}" in line and "--max-model-len" in line, line


# -- text arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize("argv, flag", [
    (["generate", "--prompt", BAD], "--prompt"),
    (["generate", "--prompt", "Hi", "--chat", "--system", BAD], "--system"),
    (["generate", "--prompt", "Hi", "--stop", "ok", "--stop", "\udcff"], "--stop #2"),
    (["chat", "--system", BAD], "--system"),
], ids=["prompt", "system", "stop", "chat-system"])
def test_text_argument_that_is_not_utf8_is_refused_before_loading(capsys, monkeypatch, tiny, argv, flag):
    from engine.api import Engine

    def no_load(*a, **kw):
        raise AssertionError("the model must not load for a bad argument")

    monkeypatch.setattr(Engine, "load", no_load)
    line = one_error_line(*run_cli(capsys, *argv, "--model", tiny, "--device", "cpu"))
    assert f"{flag} is not valid UTF-8" in line and "0xFF" in line, line


# -- chat --------------------------------------------------------------------------------------


def test_chat_line_that_is_not_utf8_keeps_the_session_and_the_conversation(capsys, monkeypatch, tiny):
    prompts = feed_input(monkeypatch, ["Hello there", BAD, "/system \udcff", "And again"])
    reqs = record_requests(monkeypatch)
    rc, out, err = run_cli(capsys, *chat_args(tiny))
    assert rc == 0, err
    assert len(prompts) == 5  # every line read, then Ctrl+D
    assert err.count("not valid UTF-8") == 2 and "0xFF" in err and "not sent" in err, err
    assert "system prompt set" not in err
    assert len(reqs) == 2
    assert reqs[1][0] is None
    assert [(m["role"], m["content"]) for m in reqs[1][1]][::2] == [("user", "Hello there"),
                                                                   ("user", "And again")]


def test_chat_too_long_message_leaves_the_conversation_as_it_was(capsys, monkeypatch, tiny):
    long_message = "The quick brown fox jumps over the lazy dog. " * 12  # about 120 tokens
    feed_input(monkeypatch, ["Hello there", long_message, "And again"])
    reqs = record_requests(monkeypatch)
    rc, out, err = run_cli(capsys, *chat_args(tiny), "--max-model-len", "96")
    assert rc == 0, err
    assert "Traceback" not in err
    # The user hears how long the message was and what the limit is ...
    assert "this message is 1" in err and "tokens long" in err and "context holds 96" in err, err
    assert "--max-model-len" in err and "not sent" in err
    assert "outgrew" not in err  # ... and nothing was dropped for it
    # ... and the next turn carries the whole conversation, without the refused message.
    assert len(reqs) == 2
    assert [m["role"] for m in reqs[1][1]] == ["user", "assistant", "user"]
    assert reqs[1][1][0]["content"] == "Hello there" and reqs[1][1][2]["content"] == "And again"


def test_chat_drops_the_oldest_turns_once_the_conversation_outgrows_the_context(capsys, monkeypatch, tiny):
    """The engine's fit_context trims, and the chat says so and keeps what the model saw."""
    turn = "alpha beta gamma delta epsilon"
    feed_input(monkeypatch, [f"{i} {turn}" for i in range(6)])
    reqs = record_requests(monkeypatch)
    rc, out, err = run_cli(capsys, *chat_args(tiny, max_tokens=8), "--max-model-len", "96")
    assert rc == 0, err
    assert len(reqs) == 6 and "Traceback" not in err
    notes = [ln for ln in err.splitlines() if "outgrew the context" in ln]
    assert notes, err
    dropped = [int(ln.split("dropped the ")[1].split()[0]) for ln in notes]
    assert all(n > 0 and n % 2 == 0 for n in dropped)  # whole turns
    # Each request is what the model saw last time less its oldest turns, the answer and
    # the new message: the chat's history is what the model saw, and says what it dropped.
    seen_dropped = []
    for (_, before), (_, after) in zip(reqs, reqs[1:]):
        assert [m["role"] for m in after[-2:]] == ["assistant", "user"]
        kept = after[:-2]
        assert kept == before[len(before) - len(kept):]
        if len(kept) < len(before):
            seen_dropped.append(len(before) - len(kept))
    assert seen_dropped == dropped
    assert reqs[-1][1][-1]["content"] == "5 " + turn


@pytest.mark.slow
def test_chat_subprocess_survives_undecodable_stdin(tiny, hearth_cache):
    """The real thing: bytes that aren't UTF-8 on a strict stdin (a UTF-8 terminal's
    locale) raised UnicodeDecodeError out of input() and ended the session."""
    env = dict(os.environ, HEARTH_CACHE_DIR=str(hearth_cache), PYTHONIOENCODING="utf-8:strict")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", *chat_args(tiny)],
        input=b"Hello there\nhi \xff there\nAnd again\n", cwd=REPO, env=env,
        capture_output=True, timeout=300,
    )
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "not valid UTF-8" in err and "0xFF" in err, err
    assert err.count("[5 tokens") == 2, err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a pseudo-terminal with Linux's line discipline")
@pytest.mark.timeout(60)
def test_chat_on_a_terminal_reads_a_pasted_line_longer_than_4_kib_whole():
    """On a terminal, input() without readline reads through the kernel's line discipline,
    which cut a pasted line at 4,095 bytes without a word: the model got the first 4 KB
    of a long paste. The chat reads through readline there (a Tab stays a Tab)."""
    import pty
    import select

    line = "x" * 20_000 + "\tEND"
    code = ("import sys; from app.commands.chat import _line_editing; _line_editing(); "
            "s = input('> '); print('GOT', len(s), repr(s[-4:]))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    pid, fd = pty.fork()
    if pid == 0:  # the child: the chat's reading, on the terminal
        os.chdir(REPO)
        os.execve(sys.executable, [sys.executable, "-c", code], env)
    seen = b""

    def read_for(seconds: float) -> None:
        nonlocal seen
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if select.select([fd], [], [], 0.05)[0]:
                try:
                    seen += os.read(fd, 65536)
                except OSError:  # the child has exited
                    return

    try:
        deadline = time.monotonic() + 30
        while b"> " not in seen and time.monotonic() < deadline:
            read_for(0.1)
        data = (line + "\n").encode()
        for i in range(0, len(data), 1024):  # as a paste arrives: the terminal's buffer is small
            os.write(fd, data[i:i + 1024])
            read_for(0.002)
        while b"GOT" not in seen and time.monotonic() < deadline:
            read_for(0.1)
        read_for(0.2)
    finally:
        os.kill(pid, 9) if b"GOT" not in seen else None
        os.waitpid(pid, 0)
        os.close(fd)
    got = seen[seen.find(b"GOT"):].split(b"\r")[0].decode()
    assert got == f"GOT {len(line)} '\\tEND'", got


def test_compressed_tensors_on_a_model_not_stored_that_way_says_what_it_is_for(capsys, tiny):
    """(it said "not implemented yet", though it loads compressed-tensors checkpoints)"""
    rc, _, err = run_cli(capsys, "generate", "--model", str(tiny), "--device", "cpu", "--quant", "compressed-tensors",
                         "--prompt", "hi", "--max-tokens", "2")
    assert rc == 2 and "not implemented" not in err
    assert "loads a checkpoint stored that way" in err and "this model is not pre-quantized" in err
    assert "Use int4 or int8" in err
