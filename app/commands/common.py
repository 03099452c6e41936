"""Helpers shared by the headless commands."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from app.commands.load_options import config_from_args
from engine.api import Engine, InvalidRequestError, SamplingParams, check_text


def load_engine(args, quiet: bool = False) -> Engine:
    """Load the model of the command line's load flags: one EngineConfig, built and
    checked before anything loads (``config_from_args``)."""
    def progress(msg: str) -> None:
        if not quiet or msg.startswith("note: "):  # (a choice's caveat is said even then: on stderr)
            print(f"[hearth] {msg}", file=sys.stderr, flush=True)

    return Engine.from_config(config_from_args(args), progress=progress)


def sampling_from_args(args, logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos, logprobs=logprobs,
    )


def check_text_args(args) -> None:
    """Refuse text arguments that aren't valid UTF-8 (undecodable bytes reach Python as
    lone surrogates) before the model loads, naming the flag; raises InvalidRequestError."""
    for flag in ("prompt", "system"):
        value = getattr(args, flag, None)
        if isinstance(value, str):
            check_text(value, f"--{flag}")
    for i, stop in enumerate(getattr(args, "stop", None) or (), start=1):
        check_text(stop, "--stop" if len(args.stop) == 1 else f"--stop #{i}")


def check_output_file(value: str | Path, flag: str = "--json") -> None:
    """Refuse an output file that can't be written before minutes of measuring: its folder
    missing, a folder in its place, or a folder that takes no new file (read-only, /proc).
    Raises InvalidRequestError; leaves nothing behind (a file it creates to try is removed)."""
    if not str(value).strip():  # (as a Path, '' is the current folder)
        raise InvalidRequestError(f"{flag} is empty: give the file to write, e.g. {flag} out.json.")
    path = Path(value)
    if not path.parent.is_dir():
        raise InvalidRequestError(f"cannot write {flag} {path}: the folder {path.parent} does not exist; "
                                  "create it or pick another path.")
    if path.is_dir():
        raise InvalidRequestError(f"cannot write {flag} {path}: it is a folder; give a file name "
                                  f"(e.g. {path / 'out.json'}).")
    if path.exists() and not path.is_file():
        # A FIFO, a terminal, /dev/stdout on a pipe: opening one to try would block (a FIFO
        # no one reads yet) or end its reader's input (it sees the try's close): the
        # permission has to do.
        if not os.access(path, os.W_OK):
            raise InvalidRequestError(f"cannot write {flag} {path}: permission denied; pick another path.")
        return
    # The file the write makes: a link's target (a dangling link's try made the target and
    # then deleted the link, leaving that empty file behind).
    target = Path(os.path.realpath(path))
    if not target.parent.is_dir():
        raise InvalidRequestError(f"cannot write {flag} {path}: it links to {target}, whose folder does not "
                                  "exist; fix the link or pick another path.")
    existed = target.exists()
    try:
        with open(target, "a", encoding="utf-8"):  # (appends nothing: an existing file is kept as it is)
            pass
    except OSError as e:
        raise InvalidRequestError(f"cannot write {flag} {path}: {e.strerror or e}; pick another path.") from None
    if not existed:
        target.unlink(missing_ok=True)
