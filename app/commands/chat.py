"""``hearth chat``: interactive terminal chat with streaming output.

Ctrl+C stops the current answer (the partial answer stays in the history); at the prompt
it only reminds how to quit. Ctrl+D or /exit quits. /reset clears the conversation,
/system TEXT sets the system prompt.
"""

from __future__ import annotations

import sys

from app.commands.common import load_engine, sampling_from_args
from engine.api import FinishedEvent, HearthError, Request, TokenEvent

HELP = "Type a message. Ctrl+C stops an answer; /reset, /system TEXT, /exit (or Ctrl+D)."


def fit_history(engine, messages: list[dict], system: str | None, max_tokens: int) -> tuple[list[dict], int]:
    """Drop the oldest turns until prompt + answer fit the context. Returns (messages, dropped)."""
    dropped = 0
    msgs = list(messages)
    while True:
        n = len(engine.tokenizer.apply_chat_template(msgs, system=system))
        if n + min(max_tokens, 64) <= engine.max_model_len or len(msgs) <= 1:
            return msgs, dropped
        # Drop a user turn and the assistant answer after it.
        cut = 2 if len(msgs) > 2 and msgs[1]["role"] == "assistant" else 1
        msgs = msgs[cut:]
        dropped += cut


def run_chat(args) -> int:
    params = sampling_from_args(args)
    system = args.system
    engine = load_engine(args)
    print(f"Hearth chat — {engine.model_info['name']} on {engine.model_info['device']} "
          f"({engine.model_info['implementation']}). {HELP}", file=sys.stderr)
    history: list[dict] = []
    try:
        while True:
            try:
                line = input("\n> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
            except KeyboardInterrupt:
                print("\n(Ctrl+D or /exit to quit)", file=sys.stderr)
                continue
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return 0
            if text == "/reset":
                history.clear()
                print("(conversation cleared)", file=sys.stderr)
                continue
            if text == "/system" or text.startswith("/system "):
                system = text[len("/system"):].strip() or None
                print(f"(system prompt {'set' if system else 'cleared'})", file=sys.stderr)
                continue
            history.append({"role": "user", "content": text})
            history, dropped = fit_history(engine, history, system, params.max_tokens)
            if dropped:
                print(f"(the conversation outgrew the context: dropped the {dropped} oldest messages)",
                      file=sys.stderr)
            try:
                handle = engine.submit(Request(messages=history, system=system, params=params))
            except HearthError as e:
                print(f"error: {e}", file=sys.stderr)
                history.pop()
                continue
            answer, fin = _stream(handle)
            history.append({"role": "assistant", "content": answer})
            t = fin.timings
            note = f"[{fin.usage.completion_tokens} tokens, {t.decode_tok_s:.1f} tok/s, TTFT {t.ttft_ms:.0f} ms"
            note += ", stopped]" if fin.reason == "abort" else "]"
            if fin.error:
                note += f" error: {fin.error}"
            print(f"\n{note}", file=sys.stderr)
    finally:
        engine.shutdown()


def _stream(handle) -> tuple[str, FinishedEvent]:
    parts: list[str] = []
    while True:
        try:
            # A fresh iterator each pass: Ctrl+C inside the handle's generator closes it,
            # but the events keep arriving on the handle's queue.
            for ev in handle:
                if isinstance(ev, TokenEvent):
                    parts.append(ev.text)
                    sys.stdout.write(ev.text)
                    sys.stdout.flush()
                else:
                    return "".join(parts), ev
        except KeyboardInterrupt:
            handle.abort()  # keep draining: the engine sends the final event promptly
