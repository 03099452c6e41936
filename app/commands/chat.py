"""``hearth chat``: interactive terminal chat with streaming output.

Ctrl+C stops the current answer (the partial answer stays in the history; stopped before
its first word, the message is not kept either); at the prompt
it only reminds how to quit. Ctrl+D or /exit quits. /reset clears the conversation,
/system TEXT sets the system prompt, /help says so; another /word is refused (not sent to the
model), and // begins a message that starts with /.
"""

from __future__ import annotations

import re
import sys

from app.commands.common import check_text_args, load_engine, sampling_from_args
from engine.api import (EngineDeadError, FinishedEvent, HearthError, InvalidRequestError, Request, TokenEvent,
                        check_text)

HELP = "Type a message. Ctrl+C stops an answer; /reset, /system TEXT, /help, /exit (or Ctrl+D)."
#: A line whose first word is this is a command, known or not (a path such as /usr/bin/env is
#: a message); "//" sends a message that starts with "/".
COMMAND = re.compile(r"/[A-Za-z?]+")


def run_chat(args) -> int:
    check_text_args(args)  # --system and --stop: refused before the model loads
    params = sampling_from_args(args)
    system = args.system
    engine = load_engine(args)
    info = engine.model_info
    print(f"Hearth chat — {info.name} on {info.device} ({info.implementation}). {HELP}", file=sys.stderr)
    history: list[dict] = []
    _line_editing()
    restore_stdin = _undecodable_input_as_surrogates()
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
            except UnicodeDecodeError as e:  # stdin that could not be told to keep going
                print(f"error: that line is not valid UTF-8 text (the byte 0x{e.object[e.start]:02X} "
                      "is not part of a UTF-8 character): it was not sent; the conversation is "
                      "unchanged.", file=sys.stderr)
                continue
            try:
                check_text(line, "that line")
            except InvalidRequestError as e:
                print(f"error: {str(e).rstrip('.')}. It was not sent; the conversation is unchanged.",
                      file=sys.stderr)
                continue
            text = line.strip()
            if not text:
                continue
            word, _, rest = text.partition(" ")
            command = word.lower() if COMMAND.fullmatch(word) else None
            if command in ("/exit", "/quit", "/reset", "/help", "/?") and rest.strip():
                print(f"error: {word} takes nothing after it. It was not sent; to send a message that starts with "
                      "/, begin it with //.", file=sys.stderr)
                continue
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                history.clear()
                print("(conversation cleared)", file=sys.stderr)
                continue
            if command == "/system":
                system = rest.strip() or None
                print(f"(system prompt {'set' if system else 'cleared'})", file=sys.stderr)
                continue
            if command in ("/help", "/?"):
                print(HELP + " Begin a message with // to send one that starts with /.", file=sys.stderr)
                continue
            if command is not None:
                print(f"error: {word} is not a command here: the commands are /reset, /system TEXT, /help and "
                      "/exit (or /quit). It was not sent; to send a message that starts with /, begin it with //.",
                      file=sys.stderr)
                continue
            if text.startswith("//") and COMMAND.fullmatch(text[1:].split()[0]):
                text = text[1:]  # "//reset" sends "/reset" (a "// comment" goes as it is)
            # The history changes only once the engine has taken the message: a refused
            # one (too long, ...) leaves the conversation as it was. A conversation longer
            # than the context loses its oldest turns (fit_context), here too.
            messages = [*history, {"role": "user", "content": text}]
            try:
                handle = engine.submit(Request(messages=messages, system=system, params=params,
                                               fit_context=True))
            except EngineDeadError as e:  # nothing more can be answered: say why and end
                print(f"hearth: error: {e}", file=sys.stderr)
                return 1
            except HearthError as e:
                print(f"error: {e}\n(the message was not sent; the conversation is unchanged)",
                      file=sys.stderr)
                continue
            dropped = handle.dropped_messages
            if dropped:
                print(f"(the conversation outgrew the context: dropped the {dropped} oldest messages)",
                      file=sys.stderr)
            before = history
            history = messages[dropped:]
            answer, fin = _stream(handle)
            history.append({"role": "assistant", "content": answer})
            t = fin.timings
            note = f"[{fin.usage.completion_tokens} tokens, {t.decode_tok_s:.1f} tok/s, TTFT {t.ttft_ms:.0f} ms"
            note += ", stopped]" if fin.reason == "abort" else "]"
            if fin.error:
                note += f" error: {fin.error}"
            if fin.reason == "abort" and not answer.strip():
                # Stopped before the answer began (a long prompt still being read): keeping the
                # message with an empty answer made the next turn read it all again and the
                # model answer the empty turn; the conversation stays as it was instead.
                history = before
                note += "\n(stopped before the answer began: that message was not kept; the conversation is as it was)"
            print(f"\n{note}", file=sys.stderr)
            if engine.dead:  # the answer's error ended the engine (a tensor-parallel rank ended)
                print("hearth: error: the model can answer no more; start `hearth chat` again to reload it.",
                      file=sys.stderr)
                return 1
    finally:
        restore_stdin()
        engine.shutdown()


def _line_editing() -> None:
    """On a terminal, read lines through GNU readline, as ``input()`` does once the module
    is imported: without it the terminal's own line discipline cut a pasted line at 4,095
    bytes without a word (the model got the first 4 KB of a long paste), and the arrow keys
    typed escape sequences into the message. Tab inserts a tab (a pasted code block keeps
    its tabs) instead of completing file names. Nothing changes when stdin or stdout is not
    a terminal (``input()`` then reads stdin directly), or without readline."""
    if not (_isatty(sys.stdin) and _isatty(sys.stdout)):
        return
    try:
        import readline
    except ImportError:  # a Python built without it: the terminal's line editing, as before
        return
    if "libedit" not in (readline.__doc__ or ""):
        readline.parse_and_bind("tab: self-insert")


def _isatty(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def _undecodable_input_as_surrogates():
    """Make ``input()`` hand back bytes that aren't UTF-8 as lone surrogates (which the
    chat then refuses, line by line) instead of raising UnicodeDecodeError, which ended
    the session and lost the conversation; a terminal's ``input()`` decodes with
    ``sys.stdin.errors`` too. Returns the function that puts stdin back."""
    stdin = sys.stdin
    before = getattr(stdin, "errors", None)
    try:
        stdin.reconfigure(errors="surrogateescape")
    except (AttributeError, ValueError, OSError):  # not a text file (tests, embedders)
        return lambda: None

    def restore() -> None:
        try:
            stdin.reconfigure(errors=before)
        except (AttributeError, ValueError, OSError):
            pass

    return restore


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
