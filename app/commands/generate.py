"""``hearth generate``: complete one prompt, or a file of prompts batched together."""

from __future__ import annotations

import codecs
import json
import sys
from pathlib import Path

from app.commands.common import check_text_args, load_engine, sampling_from_args
from engine.api import (Completion, EngineDeadError, FinishedEvent, InvalidRequestError, Request, Timings,
                        TokenEvent)


def run_generate(args) -> int:
    check_text_args(args)  # undecodable bytes in --prompt etc.: refused before loading
    params = sampling_from_args(args, logprobs=args.logprobs)  # validate before loading
    if args.system is not None and not args.chat:
        raise InvalidRequestError("--system needs --chat (it goes into the chat template)")
    if args.logprobs is not None and not args.json:
        raise InvalidRequestError("--logprobs needs --json (the logprobs are printed in its rows, one per token)")
    if args.prompts_file is not None:
        if not args.prompts_file.strip():  # (read as no file given: a traceback on the missing --prompt)
            raise InvalidRequestError("--prompts-file is empty: give a UTF-8 file of prompts (one a line), or - "
                                      "for standard input.")
        prompts, blank = read_prompts_file(args.prompts_file)
        if not prompts:
            raise InvalidRequestError(f"{args.prompts_file} has no prompts (one a line)")
        if blank:
            # Blank lines are skipped: one result per prompt. Say so, since results no
            # longer pair with input lines by position; each --json row has its "line".
            print(f"hearth: skipped blank {_line_list(blank)} of {args.prompts_file}"
                  + (' (each JSON row has the "line" of its prompt)' if args.json else ""),
                  file=sys.stderr)
    else:
        prompts = [(None, args.prompt)]
        if not args.prompt.strip():
            raise InvalidRequestError("the prompt is empty: give --prompt some text")

    engine = load_engine(args, quiet=args.json)
    try:
        handles = []
        for line, p in prompts:
            request = (Request(messages=[{"role": "user", "content": p}], system=args.system, params=params)
                       if args.chat else Request(prompt=p, params=params))
            try:
                handles.append(engine.submit(request))
            except InvalidRequestError as e:
                if line is None:
                    raise
                raise InvalidRequestError(f"line {line} of {args.prompts_file}: {e}",
                                          options=e.options) from None
            except EngineDeadError as e:  # an earlier prompt's step ended the engine (a rank that ended)
                if line is None:
                    raise
                handles.append(_failed(str(e)))  # this prompt fails with it, as the ones before did
        if len(handles) == 1 and not args.json:
            fin = None
            said = False
            for ev in handles[0]:
                if isinstance(ev, TokenEvent):
                    sys.stdout.write(ev.text)
                    sys.stdout.flush()
                    said = said or bool(ev.text.strip())
                else:
                    fin = ev
            sys.stdout.write("\n")
            _report(fin)
            if not said and not args.chat and isinstance(fin.stop, int) and engine.tokenizer.has_chat_template:
                # an instruct model given a bare question often ends at once: say what to do
                print("hearth: the model ended its answer without any text; it has a chat template, so it "
                      "may be a chat model: add --chat to send the prompt as a user message", file=sys.stderr)
            return 0 if fin.reason != "error" else 1
        rc = 0
        for (line, _), h in zip(prompts, handles):  # results print in input order
            c = h.result()
            if c.finish_reason == "error":
                rc = 1
                if not args.json:  # (a --json row has its "error"; the text alone left it unsaid)
                    print(f"hearth: line {line} of {args.prompts_file}: error: {c.error}", file=sys.stderr)
            if args.json:
                row = completion_json(c, engine)
                if line is not None:
                    row = {"line": line, **row}
                print(json.dumps(row, ensure_ascii=False), flush=True)
            else:
                print(c.text, flush=True)
        return rc
    finally:
        engine.shutdown()


def read_prompts_file(path: str) -> tuple[list[tuple[int, str]], list[int]]:
    """The prompts of a ``--prompts-file`` as (line number, text), and the numbers of its
    blank lines. The file must be UTF-8 (a byte-order mark at its start, or at a line's start,
    is dropped, not sent to the model); lines end at "\n" (or "\r\n") only, so the numbers are the ones
    an editor shows. Raises InvalidRequestError naming the file and where it went wrong."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()  # "-": standard input
    except OSError as e:
        raise InvalidRequestError(f"cannot read --prompts-file: {e}") from None
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(_not_utf8(path, data, bom + e.start)) from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line starts no line of its own
    prompts: list[tuple[int, str]] = []
    blank: list[int] = []
    for number, line in enumerate(lines, start=1):
        # a byte-order mark that starts a line (files joined with cat, each with its own) is
        # dropped like the file's first: it is not text anyone meant to send
        line = line.removesuffix("\r").removeprefix("\ufeff")
        if line.strip():
            prompts.append((number, line))
        else:
            blank.append(number)
    return prompts, blank


def _not_utf8(path: str, data: bytes, offset: int) -> str:
    line = data.count(b"\n", 0, offset) + 1
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    hint = ""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        hint = " (it starts with a UTF-16 byte-order mark)"
    return (f"--prompts-file {path} is not valid UTF-8{hint}: the byte 0x{data[offset]:02X} at "
            f"byte offset {offset} (line {line}, byte {column} of the line) is not part of a "
            "UTF-8 character; save the file as UTF-8.")


def _line_list(numbers: list[int], shown: int = 10) -> str:
    """'line 4', 'lines 2, 5 and 9', 'lines 2, 3, … and 40 more'."""
    if len(numbers) == 1:
        return f"line {numbers[0]}"
    if len(numbers) <= shown:
        return "lines " + ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}"
    return "lines " + ", ".join(map(str, numbers[:shown])) + f", … and {len(numbers) - shown} more"


class _failed:
    """A prompt of a file that could not be submitted (the engine had died): its result is
    a failed Completion, as one that failed in a step."""

    def __init__(self, error: str) -> None:
        self.error = error

    def result(self) -> Completion:
        return Completion("", "", [], "error", 0, 0, 0, Timings(0.0, 0.0, 0.0, 0.0, 0.0), None, self.error)


def completion_json(c: Completion, engine) -> dict:
    t = c.timings
    out = {
        "text": c.text,
        "token_ids": c.token_ids,
        "finish_reason": c.finish_reason,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "cached_prompt_tokens": c.cached_prompt_tokens,
        "ttft_ms": round(t.ttft_ms, 3),
        "tokens_per_s": round(t.decode_tok_s, 3),
        "itl_ms": round(t.itl_ms, 3),
        "total_ms": round(t.total_ms, 3),
        "model": engine.model_info.name,
        "implementation": engine.model_info.implementation,
        "device": engine.model_info.device,
    }
    if c.error:
        out["error"] = c.error
    if c.logprobs is not None:
        tok = engine.tokenizer
        out["logprobs"] = [
            {"token_id": lp.token_id, "token": tok.decode([lp.token_id], skip_special_tokens=False),
             "logprob": lp.logprob, "rank": lp.rank,
             "top": [{"token_id": i, "token": tok.decode([i], skip_special_tokens=False), "logprob": v}
                     for i, v in lp.top]}
            for lp in c.logprobs
        ]
    return out


def _report(fin: FinishedEvent) -> None:
    t = fin.timings
    n = fin.usage.completion_tokens
    msg = (f"[{n} token{'' if n == 1 else 's'}, finish: {fin.reason}, TTFT {t.ttft_ms:.0f} ms, "
           f"{t.decode_tok_s:.1f} tok/s]")
    if fin.error:
        msg += f" error: {fin.error}"
    print(msg, file=sys.stderr)
