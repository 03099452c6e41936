"""``hearth eval``: perplexity of a model on a text, with what its weights cost.

    hearth eval [--model M] [--quant Q] [--text FILE] [--window N] [--stride N] [--json]

The default text is the bundled evaluation text (resources/text/evaluation.txt: Alice's
Adventures in Wonderland; resources/text/SOURCES.md). Perplexity is the engine's strided
sliding window (``Engine.perplexity``): the line and the JSON state the window and stride,
since perplexities are comparable only at the same ones, on the same text and tokenizer.
"""

from __future__ import annotations

import argparse
import codecs
import json
import sys
import time
from pathlib import Path

from app.commands.common import load_engine
from app.commands.load_options import add_load_args
from engine.api import (PERPLEXITY_STRIDE, PERPLEXITY_WINDOW, InvalidRequestError, PerplexityInterrupted,
                        format_bytes)
from resources.texts import evaluation_text_path


def add_eval_parser(sub) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to the ``hearth`` subparsers."""
    p = sub.add_parser(
        "eval", help="perplexity on a text, with the weights' bytes and the load time",
        description="Measure the model's perplexity on a text (default: the bundled evaluation text) "
                    "by a sliding window, and report its weight bytes and load time: compare "
                    "quantizations (--quant) of one model on the same text, window and stride.")
    p.add_argument("--text", default=None, metavar="FILE",
                   help="UTF-8 text to score (default: the bundled evaluation text, Alice's Adventures "
                        "in Wonderland)")
    p.add_argument("--window", type=int, default=None, metavar="N",
                   help=f"tokens per window (default {PERPLEXITY_WINDOW}, at most the context)")
    p.add_argument("--stride", type=int, default=None, metavar="N",
                   help=f"tokens between window starts, 1 to the window (the window: windows that don't "
                        f"overlap); each scored token sees at least window - stride tokens before it "
                        f"(default {PERPLEXITY_STRIDE} or half the window, whichever is less)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    add_load_args(p)
    return p


def check_window_args(args) -> None:
    """What --window and --stride can be refused for before the model loads (the engine
    checks them against the context and KV cache as loaded)."""
    if args.window is not None and args.window < 2:
        raise InvalidRequestError(f"--window {args.window}: a window needs at least 2 tokens (one to predict "
                                  "from, one to score).")
    if args.stride is not None and args.stride < 1:
        raise InvalidRequestError(f"--stride {args.stride}: the stride is at least 1 token.")
    window = args.window if args.window is not None else PERPLEXITY_WINDOW
    if args.stride is not None and args.stride > window:
        raise InvalidRequestError(f"--stride {args.stride} is longer than the window ({window} tokens): tokens "
                                  "between two windows would never be scored; use a stride of at most the window.")
    if args.window is not None and args.max_model_len is not None and args.window > args.max_model_len:
        raise InvalidRequestError(f"--window {args.window} is longer than the context asked for (--max-model-len "
                                  f"{args.max_model_len}): use a window of at most that.")


def _every_second(say, clock=time.monotonic):
    """A progress callback saying "scored D of T tokens" at most once a second, and at the
    end (a small --window means thousands of windows: a line each flooded the terminal)."""
    last = [float("-inf")]

    def progress(done: int, total: int) -> None:
        now = clock()
        if done >= total or now - last[0] >= 1.0:
            last[0] = now
            say(f"scored {done:,} of {total:,} tokens")

    return progress


def run_eval(args) -> int:
    check_window_args(args)  # before loading
    if args.text is not None and not args.text.strip():  # (it scored the bundled text without a word)
        raise InvalidRequestError("--text is empty: give a UTF-8 text file to score, or leave --text out for the "
                                  "bundled evaluation text.")
    path = Path(args.text) if args.text is not None else evaluation_text_path()
    text = read_text(path, "--text" if args.text is not None else "the bundled evaluation text")  # before loading
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"[hearth] {msg}", file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    engine = load_engine(args, quiet=args.quiet)
    load_s = time.perf_counter() - t0
    try:
        say(f"scoring {path.name}")
        try:
            res = engine.perplexity(text, window=args.window, stride=args.stride, progress=_every_second(say))
        except InvalidRequestError as e:
            raise InvalidRequestError(f"{path}: {e}", options=e.options) from None
        except PerplexityInterrupted as e:
            if e.partial is not None:  # what the wait was for, so far (on stderr: never the JSON's number)
                p = e.partial
                print(f"\n[hearth] interrupted after {p.scored:,} of {p.tokens - 1:,} tokens: perplexity "
                      f"{p.perplexity:.4f} on the first {p.scored + 1:,} tokens of {path.name} (window {p.window}, "
                      f"stride {p.stride}), not comparable with a whole text's", file=sys.stderr, flush=True)
            raise
        info = engine.model_info
    finally:
        engine.shutdown()
    row = {
        "quant": info.quantization,
        "perplexity": round(res.perplexity, 4),
        "nll": round(res.nll, 6),
        "weight_bytes": info.weight_bytes,
        "load_s": round(load_s, 3),
        "eval_s": round(res.seconds, 3),
        "tokens": res.tokens,
        "scored": res.scored,
        "window": res.window,
        "stride": res.stride,
        "model": info.name,
        "implementation": info.implementation,
        "device": info.device,
        "dtype": info.dtype,
        "text": str(path),
    }
    if args.json:
        print(json.dumps(row), flush=True)
    else:
        print(f"{info.name} ({info.quantization}, {info.dtype} on {info.device}): perplexity "
              f"{res.perplexity:.4f} on {path.name} ({res.tokens:,} tokens, window {res.window}, stride "
              f"{res.stride}); weights {format_bytes(info.weight_bytes)}, loaded in {load_s:.1f} s, scored in "
              f"{res.seconds:.1f} s", flush=True)
    return 0


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path`` (a byte-order mark dropped); InvalidRequestError naming
    ``what`` and the file when it can't be read, isn't UTF-8 or holds no text."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidRequestError(f"cannot read {what} {path}: {e.strerror or e}; give a UTF-8 text file.") from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"{what} {path} is not valid UTF-8 (byte 0x{data[e.start]:02X} at offset "
                                  f"{e.start}); save it as UTF-8.") from None
    if not text.strip():
        raise InvalidRequestError(f"{what} {path} is empty: give a text to score (at least 2 tokens; "
                                  "thousands for a stable perplexity).")
    return text
