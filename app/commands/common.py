"""Helpers shared by the headless commands."""

from __future__ import annotations

import sys

from app.commands.load_options import config_from_args
from engine.api import Engine, SamplingParams, check_text


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
