"""Contracts of the ``hearth`` command line (``app.cli``).

These exact command forms are relied on elsewhere (docs, benchmarks, other issues), so
they are tested as a user types them: ``main([...])`` in-process with capsys (fast),
plus one real ``python -m app.cli`` subprocess against the bundled default model.
Tiny random-weight models keep everything but the default-model checks well under a second.
"""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app.cli import main

REPO = Path(__file__).resolve().parents[2]
ROW_KEYS = {"text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens",
            "ttft_ms", "tokens_per_s"}
RESULT_FIELDS = ("text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything printed before
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def json_rows(out: str) -> list[dict]:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return [json.loads(ln) for ln in lines]


def gen_args(model, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def tiny(tiny_models) -> Path:
    return tiny_models["llama-tied"]


# -- generate: one prompt --------------------------------------------------------------


def test_generate_json_one_object(capsys, tiny):
    rc, out, err = run_cli(capsys, *gen_args(tiny, "--prompt", "Once upon a time", "--max-tokens", "5",
                                             "--temperature", "0", "--ignore-eos", "--json"))
    assert rc == 0, err
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, f"--json must print ONE JSON object, got:\n{out}"
    row = json.loads(lines[0])
    assert isinstance(row, dict)
    assert ROW_KEYS <= row.keys(), f"missing keys: {ROW_KEYS - row.keys()}"
    assert row["finish_reason"] == "length"
    assert row["completion_tokens"] == len(row["token_ids"]) == 5
    assert all(isinstance(t, int) for t in row["token_ids"])
    assert isinstance(row["text"], str)
    assert isinstance(row["prompt_tokens"], int) and row["prompt_tokens"] > 0
    assert isinstance(row["ttft_ms"], (int, float)) and row["ttft_ms"] >= 0
    assert isinstance(row["tokens_per_s"], (int, float)) and row["tokens_per_s"] >= 0
    assert "logprobs" not in row  # only asked for with --logprobs
    # --json keeps stderr free of progress chatter (stdout is for machines)
    assert "[hearth]" not in err


def test_generate_plain_text_matches_json(capsys, tiny):
    common = ["--prompt", "Once upon a time", "--max-tokens", "5", "--temperature", "0", "--ignore-eos"]
    rc, out, _ = run_cli(capsys, *gen_args(tiny, *common, "--json"))
    assert rc == 0
    text = json_rows(out)[0]["text"]
    rc, out, err = run_cli(capsys, *gen_args(tiny, *common))
    assert rc == 0, err
    assert out == text + "\n"
    assert "5 tokens, finish: length" in err


def test_an_answer_ended_at_once_without_chat_suggests_chat(capsys, tiny, tmp_path):
    """A bare question to an instruct model often ends at its first token (its end-of-turn
    id): an empty answer would leave the user guessing, so generate says to add --chat."""
    import shutil

    common = ["--prompt", "What is the capital of France?", "--max-tokens", "5", "--temperature", "0"]
    rc, out, _ = run_cli(capsys, *gen_args(tiny, *common, "--json", "--ignore-eos"))
    row = json_rows(out)[0]
    first = row["token_ids"][0]
    model = tmp_path / "ends-at-once"
    shutil.copytree(tiny, model)  # the same model, its first greedy token made an end-of-sequence id
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": first}))
    rc, out, err = run_cli(capsys, *gen_args(model, *common))
    assert rc == 0 and out == "\n"
    assert "[1 token, finish: stop" in err and "add --chat" in err
    rc, out, err = run_cli(capsys, *gen_args(model, *common, "--chat"))
    assert "add --chat" not in err
    assert row["text"].strip()
    rc, out, err = run_cli(capsys, *gen_args(tiny, *common, "--stop", row["text"].strip()[:1]))
    assert "finish: stop" in err and "add --chat" not in err  # a stop string, not the model, ended it


def test_generate_logprobs(capsys, tiny):
    rc, out, err = run_cli(capsys, *gen_args(tiny, "--prompt", "Once upon a time", "--max-tokens", "5",
                                             "--temperature", "0", "--ignore-eos", "--json",
                                             "--logprobs", "2"))
    assert rc == 0, err
    (row,) = json_rows(out)
    lps = row["logprobs"]
    assert isinstance(lps, list) and len(lps) == 5
    assert [lp["token_id"] for lp in lps] == row["token_ids"]
    for lp in lps:
        assert len(lp["top"]) == 2
        assert lp["logprob"] <= 1e-6
        assert lp["top"][0]["logprob"] >= lp["top"][1]["logprob"]
        assert lp["top"][0]["token_id"] == lp["token_id"]  # greedy picks the most likely token
        assert isinstance(lp["token"], str)


# -- generate: a file of prompts (batched) ----------------------------------------------


def test_prompts_file_matches_single_runs(capsys, tiny, tmp_path):
    prompts = ["Hi", "The quick brown fox jumps over the lazy dog and", "Once upon a time there was"]
    f = tmp_path / "prompts.txt"
    f.write_text(f"{prompts[0]}\n\n{prompts[1]}\n   \n{prompts[2]}\n\n", encoding="utf-8")
    sampling = ["--max-tokens", "6", "--temperature", "0", "--ignore-eos", "--json"]
    rc, out, err = run_cli(capsys, *gen_args(tiny, "--prompts-file", f, *sampling))
    assert rc == 0, err
    rows = json_rows(out)
    assert len(rows) == 3, "one JSON object a line per non-blank prompt"
    assert len(set(r["prompt_tokens"] for r in rows)) == 3
    for prompt, row in zip(prompts, rows):  # input order
        assert ROW_KEYS <= row.keys()
        rc, out, err = run_cli(capsys, *gen_args(tiny, "--prompt", prompt, *sampling))
        assert rc == 0, err
        (alone,) = json_rows(out)
        assert {k: row[k] for k in RESULT_FIELDS} == {k: alone[k] for k in RESULT_FIELDS}, prompt
        assert row["completion_tokens"] == 6


def test_prompts_file_without_prompts(capsys, tiny, tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("\n  \n", encoding="utf-8")
    rc, out, err = run_cli(capsys, *gen_args(tiny, "--prompts-file", f, "--json"))
    assert rc == 2 and out == ""
    assert err.startswith("hearth: error:")


def test_prompts_file_says_why_a_prompt_failed(capsys, monkeypatch, tiny, tmp_path):
    """A failed request of a file of prompts (a step that failed, a tensor-parallel rank that
    ended) is named with its error on stderr: its partial text alone left it unsaid."""
    from tests.engine.rank_ended import end_steps

    end_steps(monkeypatch, "rank 1 (cpu) ended (killed by signal 9). The model can't run on: reload it.")
    f = tmp_path / "prompts.txt"
    f.write_text("Hi\nThere\n", encoding="utf-8")
    rc, out, err = run_cli(capsys, *gen_args(tiny, "--prompts-file", f, "--max-tokens", "3"))
    assert rc == 1
    assert f"hearth: line 1 of {f}: error: rank 1 (cpu) ended" in err
    assert f"hearth: line 2 of {f}: error: rank 1 (cpu) ended" in err


def test_prompts_file_after_the_engine_died_fails_the_rest_with_its_reason(capsys, monkeypatch, tiny, tmp_path):
    """A prompt submitted after the engine died (refused at its submit, not failed in a step)
    is a failed row with the reason too, in --json (valid JSON, "error"), not a traceback or an
    exit that drops the rows; the submit waits for the death here, as a slow tokenizer would."""
    import json
    import time

    from engine.api import Engine
    from tests.engine.rank_ended import end_steps

    plain_submit = Engine.submit
    why = "rank 1 (cpu) ended (killed by signal 9). The model can't run on: reload it."

    def submit(self, *args, **kwargs):
        if getattr(self, "_submitted", False):
            deadline = time.monotonic() + 30
            while not self.dead and time.monotonic() < deadline:
                time.sleep(0.01)
        self._submitted = True
        return plain_submit(self, *args, **kwargs)

    end_steps(monkeypatch, why)
    monkeypatch.setattr(Engine, "submit", submit)
    f = tmp_path / "prompts.txt"
    f.write_text("Hi\nThere\n", encoding="utf-8")
    rc, out, err = run_cli(capsys, *gen_args(tiny, "--prompts-file", f, "--max-tokens", "3", "--json"))
    assert rc == 1, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["line"], r["finish_reason"], r["error"]) for r in rows] == [(1, "error", why), (2, "error", why)]
    assert rows[1]["completion_tokens"] == 0 and rows[1]["text"] == ""


# -- generate: seeds ---------------------------------------------------------------------


def test_seed_reproducible_and_batch_invariant(capsys, tiny, tmp_path):
    sampling = ["--max-tokens", "8", "--temperature", "1", "--seed", "1234", "--ignore-eos", "--json"]
    prompt = "Once upon a time"
    runs = []
    for _ in range(2):
        rc, out, err = run_cli(capsys, *gen_args(tiny, "--prompt", prompt, *sampling))
        assert rc == 0, err
        runs.append(json_rows(out)[0])
    assert runs[0]["token_ids"] == runs[1]["token_ids"]
    assert len(runs[0]["token_ids"]) == 8

    f = tmp_path / "same.txt"
    f.write_text("\n".join([prompt] * 3) + "\n", encoding="utf-8")
    rc, out, err = run_cli(capsys, *gen_args(tiny, "--prompts-file", f, *sampling))
    assert rc == 0, err
    rows = json_rows(out)
    assert len(rows) == 3
    for row in rows:
        assert row["token_ids"] == runs[0]["token_ids"], "a seed must give the same tokens in a batch"
        assert row["text"] == runs[0]["text"]

    # The seed matters: another seed at temperature 1 over 8 tokens of a 49k vocabulary differs.
    other = [a if a != "1234" else "99" for a in sampling]
    rc, out, err = run_cli(capsys, *gen_args(tiny, "--prompt", prompt, *other))
    assert rc == 0, err
    assert json_rows(out)[0]["token_ids"] != runs[0]["token_ids"]


# -- generate: chat template (default model) ----------------------------------------------


def test_chat_and_system_with_default_model(capsys, default_model):
    base = ["generate", "--device", "cpu", "--prompt", "What is the capital of France?",
            "--max-tokens", "3", "--temperature", "0", "--json"]
    rc, out, err = run_cli(capsys, *base)
    assert rc == 0, err
    plain = json_rows(out)[0]
    rc, out, err = run_cli(capsys, *base, "--chat")
    assert rc == 0, err
    chat = json_rows(out)[0]
    rc, out, err = run_cli(capsys, *base, "--chat", "--system", "You answer in one word.")
    assert rc == 0, err
    chat_sys = json_rows(out)[0]
    long_system = "You are a careful assistant. You answer in one word, never more, and never explain."
    rc, out, err = run_cli(capsys, *base, "--chat", "--system", long_system)
    assert rc == 0, err
    chat_long_sys = json_rows(out)[0]
    assert chat["prompt_tokens"] > plain["prompt_tokens"]
    assert chat_sys["prompt_tokens"] > plain["prompt_tokens"]
    # SmolLM2's template has a default system message that --system replaces: the system
    # text must reach the prompt (a longer one gives a longer prompt).
    assert chat_sys["prompt_tokens"] != chat["prompt_tokens"]
    assert chat_long_sys["prompt_tokens"] > chat_sys["prompt_tokens"]
    assert chat_sys["completion_tokens"] == 3


def test_system_without_chat_is_rejected(capsys, tiny):
    rc, out, err = run_cli(capsys, *gen_args(tiny, "--prompt", "Hi", "--system", "Be terse.",
                                             "--max-tokens", "2", "--json"))
    assert rc == 2 and out == ""
    assert err.startswith("hearth: error:") and "--chat" in err
    assert "Traceback" not in err


def test_logprobs_without_json_is_rejected(capsys, tiny):
    """The plain text output has nowhere to put them: --logprobs was silently ignored."""
    rc, out, err = run_cli(capsys, *gen_args(tiny, "--prompt", "Hi", "--logprobs", "2", "--max-tokens", "2"))
    assert rc == 2 and out == ""
    assert err.startswith("hearth: error:") and "--json" in err and "Traceback" not in err


def test_an_empty_model_name_is_refused_without_saying_it_resolves_the_default(capsys):
    rc, out, err = run_cli(capsys, "generate", "--model", "", "--prompt", "Hi")
    assert rc == 2 and "the model name is empty" in err and "default" not in err.split("error:")[0], err


def test_text_to_a_random_weight_shape_points_at_the_tokenizer_flag(capsys):
    """The advice was the Python API's only (Request(prompt_token_ids=...)), which a command line can't send."""
    rc, out, err = run_cli(capsys, "generate", "--model", "shape:tiny", "--device", "cpu", "--prompt", "Hi",
                           "--max-tokens", "2")
    assert rc == 2 and out == "" and "--tokenizer DIR" in err and "Traceback" not in err, err


# -- bad input -------------------------------------------------------------------------------

BAD = {
    "empty-prompt": (["--prompt", ""], "prompt"),
    "max-tokens-0": (["--prompt", "Hi", "--max-tokens", "0"], "max_tokens"),
    "temperature-negative": (["--prompt", "Hi", "--temperature", "-1"], "temperature"),
    "top-p-0": (["--prompt", "Hi", "--top-p", "0"], "top_p"),
    "top-p-1.5": (["--prompt", "Hi", "--top-p", "1.5"], "top_p"),
    # Issue 12: nan sampled token 0 forever (exit 0); a seed past 2**64 - 1 failed mid-step.
    "temperature-nan": (["--prompt", "Hi", "--temperature", "nan"], "temperature"),
    "temperature-inf": (["--prompt", "Hi", "--temperature", "inf"], "temperature"),
    "repetition-penalty-nan": (["--prompt", "Hi", "--repetition-penalty", "nan"], "repetition_penalty"),
    "seed-2**64": (["--prompt", "Hi", "--seed", str(2**64)], "seed"),
    "seed-10**23": (["--prompt", "Hi", "--seed", str(10**23)], "seed"),
    # Issue 12: a ValueError traceback from parse_bytes; now the accepted forms.
    **{f"kv-cache-memory-{v}": (["--prompt", "Hi", f"--kv-cache-memory={v}"], f"{v!r}")
       for v in ("1.2.3", ".", "abc", "-1GiB", "0")},
    "unknown-model": (["--prompt", "Hi", "--model", "./nope"], "nope"),
    "cuda-without-gpu": (["--prompt", "Hi", "--device", "cuda"], "cuda"),
    "unknown-attention": (["--prompt", "Hi", "--attention", "no-such-backend"], "no-such-backend"),
    # Issue 12: checked before the model is even looked for (it was refused after the weights loaded).
    "attention-before-the-model": (["--prompt", "Hi", "--model", "./nope", "--attention", "xformers"], "xformers"),
    "missing-prompts-file": (["--prompts-file", "/nonexistent/prompts.txt"], "prompts-file"),
    "empty-prompts-file": (["--prompts-file", ""], "--prompts-file is empty"),  # a traceback
    "max-num-batched-tokens-0": (["--prompt", "Hi", "--max-num-batched-tokens", "0"], "max_num_batched_tokens"),
    "prompt-longer-than-context": (
        ["--prompt", "The quick brown fox jumps over the lazy dog " * 3, "--max-model-len", "8"],
        "--max-model-len"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_exits_2_with_one_line(capsys, tiny, name):
    extra, mention = BAD[name]
    if name == "cuda-without-gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    argv = ["generate", "--model", str(tiny), "--device", "cpu", "--max-tokens", "4", "--json"]
    # later flags win in argparse: the bad value overrides the defaults above
    rc, out, err = run_cli(capsys, *argv, *extra)
    assert rc == 2, f"{name}: rc={rc}, stderr:\n{err}"
    assert out == ""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"{name}: expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("hearth: error:"), lines[0]
    assert len(lines[0]) > len("hearth: error: ") + 10, "the message must say what is wrong"
    assert mention in lines[0], f"{name}: the message should name {mention!r}: {lines[0]}"


def test_kv_cache_memory_larger_than_free_ram_is_refused(capsys, monkeypatch, tiny):
    """Issue 12: --kv-cache-memory 100TiB on the CPU allocated until the OOM killer came.
    Free RAM is faked (530 MiB): nothing large is allocated."""
    import engine.runner.memory as load_memory

    monkeypatch.setattr(load_memory, "free_memory_bytes", lambda device: (530 * 2**20, 2**30))
    rc, out, err = run_cli(capsys, *gen_args(tiny, "--prompt", "Hi", "--kv-cache-memory", "100TiB", "--json"))
    assert rc == 2 and out == "" and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.strip()]
    assert line.startswith("hearth: error:") and "100.0 TiB" in line and "530.0 MiB free" in line, line


# -- doctor --------------------------------------------------------------------------------------


def test_doctor(capsys):
    rc, out, err = run_cli(capsys, "doctor")
    assert rc == 0, err
    lines = out.splitlines()
    torch_line = [ln for ln in lines if ln.split()[:1] == ["torch"] and torch.__version__.split("+")[0] in ln]
    assert torch_line, f"no torch version line in:\n{out}"
    backend = [ln for ln in lines if ln.split()[:1] == ["torch"] and ln.split()[1:2] == ["ok"]]
    assert backend, f"no 'torch  ok' attention backend line in:\n{out}"
    cuda = [ln for ln in lines if ln.split()[:1] and ln.split()[0].startswith("cuda")]
    assert cuda, f"no cuda line in:\n{out}"
    if not torch.cuda.is_available():
        assert "none" in cuda[0]
        # an fp8 KV cache runs on the CPU, in the C decode step: plain "ok", no caveat
        (fp8,) = [ln for ln in lines[lines.index("KV-cache dtypes"):] if ln.split()[:1] == ["fp8"]][:1]
        assert fp8.split() == ["fp8", "ok"]
    (kernel,) = [ln for ln in lines if ln.split()[:2] == ["cpu", "kernel"]]
    assert kernel.split()[2] in ("avx2:", "scalar:", "unavailable:")


def test_doctor_says_why_the_cpu_kernel_does_not_build(capsys, monkeypatch, tmp_path):
    """A compiler that fails (or none): the quantized CPU loads quietly ran the slow
    reference, and nothing said why; doctor now says it and what to do."""
    from hearth_kernels import cpu_quant

    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("HEARTH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_quant, "_PREBUILT_DIR", tmp_path / "none")
    for attr, value in (("_lib", None), ("_loaded", False), ("_problem", None)):
        monkeypatch.setattr(cpu_quant, attr, value)
    rc, out, err = run_cli(capsys, "doctor")
    assert rc == 0, err
    (kernel,) = [ln for ln in out.splitlines() if ln.split()[:2] == ["cpu", "kernel"]]
    assert "unavailable: compiling the CPU quantized kernel with" in kernel and "failed (exit 1)" in kernel
    assert "set CC to another compiler" in kernel  # (one is there: "install one" would be wrong)
    for attr, value in (("_lib", None), ("_loaded", False), ("_problem", None), ("_compiler", lambda: None)):
        monkeypatch.setattr(cpu_quant, attr, value)
    rc, out, err = run_cli(capsys, "doctor")
    (kernel,) = [ln for ln in out.splitlines() if ln.split()[:2] == ["cpu", "kernel"]]
    assert "no C compiler found" in kernel and "install gcc or clang" in kernel


def test_a_long_prompt_is_read_in_steps_of_the_budget_asked_for(capsys, tiny):
    """--max-num-batched-tokens: the prompt read in chunks of that many tokens, the answer the
    same, bit for bit (int8's C kernel and the prompt attention's fixed tiles)."""
    prompt = "The quick brown fox jumps over the lazy dog. " * 12
    answers = []
    for extra in ((), ("--max-num-batched-tokens", "16")):
        rc, out, err = run_cli(capsys, *gen_args(tiny, "--prompt", prompt, "--max-tokens", "5", "--temperature", "0",
                                                 "--ignore-eos", "--logprobs", "1", "--quant", "int8", "--json",
                                                 *extra))
        assert rc == 0, err
        (row,) = json_rows(out)
        answers.append(row)
    assert answers[0]["prompt_tokens"] > 100
    assert answers[0]["token_ids"] == answers[1]["token_ids"] and answers[0]["logprobs"] == answers[1]["logprobs"]


# -- chat ------------------------------------------------------------------------------------


def feed_input(monkeypatch, messages: list[str]) -> list[str]:
    """Make input() return the messages, then raise EOFError (Ctrl+D). Returns the prompts seen."""
    seen: list[str] = []
    pending = list(messages)

    def fake_input(prompt=""):
        seen.append(prompt)
        if not pending:
            raise EOFError
        return pending.pop(0)

    monkeypatch.setattr(builtins, "input", fake_input)
    return seen


def record_requests(monkeypatch) -> list:
    """Record every Request the engine took from the chat: its system prompt and the
    messages the model sees (a deep-ish copy: messages are mutated later; fit_context
    may have dropped the oldest)."""
    from engine.api import Engine

    seen = []
    orig = Engine.submit

    def submit(self, request, params=None, **kwargs):
        messages = [dict(m) for m in request.messages or []]
        handle = orig(self, request, params, **kwargs)
        seen.append((request.system, messages[handle.dropped_messages:]))
        return handle

    monkeypatch.setattr(Engine, "submit", submit)
    return seen


def chat_args(model, max_tokens: int = 5) -> list[str]:
    return ["chat", "--model", str(model), "--device", "cpu", "--max-tokens", str(max_tokens),
            "--temperature", "0", "--ignore-eos"]


def test_chat_two_messages(capsys, monkeypatch, tiny):
    prompts = feed_input(monkeypatch, ["Hello there", "And again"])
    reqs = record_requests(monkeypatch)
    rc, out, err = run_cli(capsys, *chat_args(tiny))
    assert rc == 0, err
    assert len(prompts) == 3  # two messages, then Ctrl+D
    assert err.count("[5 tokens") == 2, err
    assert "stopped" not in err
    assert len(reqs) == 2
    assert [m["role"] for m in reqs[0][1]] == ["user"]
    assert [m["role"] for m in reqs[1][1]] == ["user", "assistant", "user"]
    assert reqs[1][1][0]["content"] == "Hello there"
    assert reqs[1][1][2]["content"] == "And again"
    answer = reqs[1][1][1]["content"]
    assert answer and answer in out  # the first answer was streamed to stdout
    assert len(out) > len(answer)  # ... and so was the second


def test_chat_ends_when_the_engine_can_answer_no_more(capsys, monkeypatch, tiny):
    """A step that ends the engine (a tensor-parallel rank that ended) ends the chat with
    the reason, instead of taking message after message that each fail."""
    from tests.engine.rank_ended import end_steps

    end_steps(monkeypatch, "tensor parallel: rank 1 (cpu) ended (killed by signal 9). Reload the model.")
    prompts = feed_input(monkeypatch, ["Hello there", "And again"])
    rc, out, err = run_cli(capsys, *chat_args(tiny))
    assert rc == 1, err
    assert len(prompts) == 1  # the second message was never asked for
    assert "error: tensor parallel: rank 1 (cpu) ended" in err
    assert "hearth: error: the model can answer no more; start `hearth chat` again" in err


def test_chat_reset_and_system(capsys, monkeypatch, tiny):
    feed_input(monkeypatch, ["Hello there", "/reset", "/system Be brief.", "Fresh start", "/system",
                             "Third", "/exit", "never read"])
    reqs = record_requests(monkeypatch)
    rc, out, err = run_cli(capsys, *chat_args(tiny))
    assert rc == 0, err
    assert "(conversation cleared)" in err
    assert "(system prompt set)" in err and "(system prompt cleared)" in err
    assert len(reqs) == 3 and err.count("[5 tokens") == 3
    assert reqs[0] == (None, [{"role": "user", "content": "Hello there"}])
    assert reqs[1] == ("Be brief.", [{"role": "user", "content": "Fresh start"}])
    assert reqs[2][0] is None
    assert [m["role"] for m in reqs[2][1]] == ["user", "assistant", "user"]


class _InterruptOnce:
    """Iterator over a handle's events that raises KeyboardInterrupt once, at the second event.

    ``dies``: like a real Ctrl+C arriving while the main thread is blocked inside
    ``RequestHandle.__iter__`` (waiting on its queue): the generator is finished by the
    exception and only yields StopIteration afterwards. Otherwise the same iterator goes on
    (as if the Ctrl+C had landed in the consumer's own code between events).
    """

    def __init__(self, handle, dies: bool):
        self.inner = iter(handle)
        self.dies = dies
        self.n = 0
        self.dead = False
        self.dead_calls = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.dead:
            self.dead_calls += 1
            if self.dead_calls > 50:
                raise AssertionError("the chat keeps re-iterating an iterator that Ctrl+C ended "
                                     "(it would spin forever): iterate the handle afresh")
            raise StopIteration
        self.n += 1
        if self.n == 2:
            self.dead = self.dies
            raise KeyboardInterrupt
        return next(self.inner)


class _InterruptingHandle:
    def __init__(self, handle, dies: bool):
        self.handle = handle
        self.dies = dies
        self.iters = 0

    def __iter__(self):
        self.iters += 1
        if self.iters == 1:
            return _InterruptOnce(self.handle, self.dies)
        return iter(self.handle)  # a fresh iteration continues from the same event queue

    def __getattr__(self, name):
        return getattr(self.handle, name)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dies", [False, True], ids=["between-events", "inside-handle-iteration"])
def test_chat_ctrl_c_stops_the_answer_and_continues(capsys, monkeypatch, tiny, dies):
    from engine.api import Engine

    prompts = feed_input(monkeypatch, ["Tell me a long story", "Thanks"])
    reqs = record_requests(monkeypatch)
    recorded_submit = Engine.submit
    handles = []

    def submit(self, request, params=None):
        h = recorded_submit(self, request, params)
        if not handles:  # only the first answer is interrupted
            h = _InterruptingHandle(h, dies)
        handles.append(h)
        return h

    monkeypatch.setattr(Engine, "submit", submit)
    # Slow the engine down so the abort surely lands before 100 tokens are generated.
    orig_step = Engine.step

    def slow_step(self):
        time.sleep(0.01)
        return orig_step(self)

    monkeypatch.setattr(Engine, "step", slow_step)

    rc, out, err = run_cli(capsys, *chat_args(tiny, max_tokens=100))
    assert rc == 0, err
    assert len(prompts) == 3, "after Ctrl+C the chat must go on to the next input"
    notes = [ln for ln in err.splitlines() if ln.startswith("[") and "tok/s" in ln]
    assert len(notes) == 2, err
    assert notes[0].endswith(", stopped]"), notes[0]
    assert not notes[0].startswith("[100 tokens")
    assert notes[1].startswith("[100 tokens") and "stopped" not in notes[1]
    # the partial answer stays in the history
    assert len(reqs) == 2
    assert [m["role"] for m in reqs[1][1]] == ["user", "assistant", "user"]



class _StoppedBeforeTheFirstToken:
    """A handle whose first iteration is cut by Ctrl+C at once, and whose answer then has no
    text (as when the Ctrl+C lands while a long prompt is still being read)."""

    def __init__(self, handle):
        self.handle = handle
        self.iters = 0

    def __iter__(self):
        self.iters += 1
        if self.iters == 1:
            raise KeyboardInterrupt
        from engine.api import TokenEvent

        return (ev for ev in self.handle if not isinstance(ev, TokenEvent))

    def __getattr__(self, name):
        return getattr(self.handle, name)


@pytest.mark.timeout(60)
def test_chat_ctrl_c_before_the_first_token_does_not_keep_the_message(capsys, monkeypatch, tiny):
    """(it kept the message with an empty answer: the next turn read the whole, maybe huge,
    message again, and the model answered after an empty turn)"""
    from engine.api import Engine

    feed_input(monkeypatch, ["Hello there", "A long paste, stopped while it was read", "Thanks"])
    reqs = record_requests(monkeypatch)
    recorded_submit = Engine.submit

    def submit(self, request, params=None):
        h = recorded_submit(self, request, params)
        return _StoppedBeforeTheFirstToken(h) if len(reqs) == 2 else h

    monkeypatch.setattr(Engine, "submit", submit)
    orig_step = Engine.step

    def slow_step(self):
        time.sleep(0.01)  # the abort lands before the 100 tokens are done
        return orig_step(self)

    monkeypatch.setattr(Engine, "step", slow_step)
    rc, out, err = run_cli(capsys, *chat_args(tiny, max_tokens=100))
    assert rc == 0, err
    assert "stopped before the answer began" in err and "Traceback" not in err, err
    assert len(reqs) == 3
    assert [(m["role"], m["content"]) for m in reqs[2][1]][::2] == [("user", "Hello there"), ("user", "Thanks")]
    assert [m["role"] for m in reqs[2][1]] == ["user", "assistant", "user"]


# -- the real command, in a subprocess -----------------------------------------------------


def test_subprocess_generate_paris(default_model, hearth_cache):
    env = dict(os.environ)
    env["HEARTH_CACHE_DIR"] = str(hearth_cache)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "generate", "--prompt", "The capital of France is",
         "--max-tokens", "8", "--temperature", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout, proc.stdout
    assert "Converting" not in proc.stderr, "the session's converted default model must be reused"
    assert "8 tokens" in proc.stderr or "finish:" in proc.stderr


def test_no_subcommand_opens_the_gui_or_explains_why_not(monkeypatch, capsys):
    """`hearth` is the desktop app; without a display it says what to do instead of
    letting Qt abort the process."""
    for var in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "no display" in err and "hearth chat" in err and "xvfb-run" in err


def test_generate_with_an_fp8_kv_cache(capsys, tiny):
    rc, out, err = run_cli(capsys, *gen_args(tiny, "--prompt", "Once upon a time", "--max-tokens", "4",
                                             "--temperature", "0", "--ignore-eos", "--json",
                                             "--kv-cache-dtype", "fp8"))
    assert rc == 0, err
    assert json.loads(out)["completion_tokens"] == 4
    # the C decode step reads it on the CPU as it does float32: nothing to warn of
    assert "note:" not in err
    rc, _, err = run_cli(capsys, *gen_args(tiny, "--prompt", "Hi", "--kv-cache-dtype", "int2"))
    assert rc == 2 and "int2" in err and "fp8" in err


def test_a_reader_that_goes_away_ends_the_command_quietly(tiny, tmp_path):
    """``hearth generate ... | head -1``: when the pipe's reader closes early the command stops
    with the shell's SIGPIPE status (141) and no traceback, as other command-line tools do."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"Story number {i}\n" for i in range(240)))  # > 64 KiB of JSON: the pipe fills
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", *gen_args(tiny, "--prompts-file", prompts, "--max-tokens", "40",
                                                     "--json")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()  # what `head -1` reads, then it exits
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert json.loads(first)["text"] is not None
    assert proc.returncode == 141, err.decode()
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()


def test_chat_refuses_an_unknown_command_and_sends_a_slash_message_on_request(capsys, monkeypatch, tiny):
    """/reste (a typo of /reset) went to the model as a message; now it is refused, naming the
    commands; //text sends "/text"; a path is a message; /help lists the commands."""
    feed_input(monkeypatch, ["/reste", "/help", "//reset is a command", "/usr/bin/env is a path",
                             "// TODO: a comment", "/reset now", "/RESET", "/EXIT"])
    reqs = record_requests(monkeypatch)
    rc, out, err = run_cli(capsys, *chat_args(tiny))
    assert rc == 0, err
    assert "error: /reste is not a command here" in err and "/reset" in err and "begin it with //" in err
    assert "/system TEXT, /help, /exit" in err
    assert "error: /reset takes nothing after it" in err and "(conversation cleared)" in err  # /RESET works
    sent = [messages[-1]["content"] for _system, messages in reqs]
    assert sent == ["/reset is a command", "/usr/bin/env is a path", "// TODO: a comment"]


def test_prompts_file_dash_reads_standard_input(monkeypatch):
    """``--prompts-file -`` (generate) and ``--prompts -`` (compare) read standard input, as
    ``compare --json -`` writes to standard output (it was 'No such file: -')."""
    import io

    from app.commands.generate import read_prompts_file as generate_prompts
    from app.cli import build_parser
    from app.commands.compare import plan_from_args

    def stdin(data: bytes):
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))

    stdin("\ufeffHi\n\nThere\n".encode())
    assert generate_prompts("-") == ([(1, "Hi"), (3, "There")], [2])
    stdin(b"First\nprompt\n\nSecond\n")
    args = build_parser().parse_args(["compare", "--quants", "int8", "--prompts", "-"])
    assert plan_from_args(args).prompts == ("First\nprompt", "Second")


@pytest.mark.parametrize("flag", ["--devices", "--split-ratio"])
def test_an_empty_device_flag_is_refused_not_read_as_left_out(capsys, tiny, flag):
    """``--split-ratio ""`` (a shell variable that came out empty) was a load by free memory
    without a word; an empty --devices a load on one device."""
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", str(tiny), flag, " ", "--prompt", "hi"])
    assert info.value.code == 2
    assert f"argument {flag}: is empty" in capsys.readouterr().err
