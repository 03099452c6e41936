"""``hearth generate``: complete one prompt, or a file of prompts batched together."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from app.commands.common import load_engine, sampling_from_args
from engine.api import Completion, FinishedEvent, InvalidRequestError, Request, TokenEvent


def run_generate(args) -> int:
    params = sampling_from_args(args, logprobs=args.logprobs)  # validate before loading
    if args.system is not None and not args.chat:
        raise InvalidRequestError("--system needs --chat (it goes into the chat template)")
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise InvalidRequestError(f"cannot read --prompts-file: {e}") from None
        prompts = [ln for ln in lines if ln.strip()]
        if not prompts:
            raise InvalidRequestError(f"{args.prompts_file} has no prompts (one a line)")
    else:
        prompts = [args.prompt]
        if not args.prompt.strip():
            raise InvalidRequestError("the prompt is empty: give --prompt some text")

    engine = load_engine(args, quiet=args.json)
    try:
        requests = [
            Request(messages=[{"role": "user", "content": p}], system=args.system, params=params)
            if args.chat else Request(prompt=p, params=params)
            for p in prompts
        ]
        handles = [engine.submit(r) for r in requests]
        if len(handles) == 1 and not args.json:
            fin = None
            for ev in handles[0]:
                if isinstance(ev, TokenEvent):
                    sys.stdout.write(ev.text)
                    sys.stdout.flush()
                else:
                    fin = ev
            sys.stdout.write("\n")
            _report(fin)
            return 0 if fin.reason != "error" else 1
        rc = 0
        for h in handles:  # results print in input order
            c = h.result()
            if c.finish_reason == "error":
                rc = 1
            if args.json:
                print(json.dumps(completion_json(c, engine), ensure_ascii=False), flush=True)
            else:
                print(c.text, flush=True)
        return rc
    finally:
        engine.shutdown()


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
        "model": engine.model_info["name"],
        "implementation": engine.model_info["implementation"],
        "device": engine.model_info["device"],
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
    msg = (f"[{fin.usage.completion_tokens} tokens, finish: {fin.reason}, TTFT {t.ttft_ms:.0f} ms, "
           f"{t.decode_tok_s:.1f} tok/s]")
    if fin.error:
        msg += f" error: {fin.error}"
    print(msg, file=sys.stderr)
