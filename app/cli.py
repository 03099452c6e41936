"""The ``hearth`` command line. Headless subcommands import no Qt.

    hearth generate --prompt TEXT [...]   one-shot (or --prompts-file, batched)
    hearth chat                           interactive terminal chat
    hearth doctor                         what can run here, and why not
    hearth bench --shape llama-8b [...]   decode / prefill / throughput, --baseline hf
    hearth eval [--quant Q] [--text FILE] perplexity, weight bytes, load time
    hearth compare --quants bf16,int8,int4 the same prompts across configurations, side by side
    hearth serve [--model M] [--port 8000] an OpenAI-compatible API server
    hearth setup                          install the bundled default model (after pip install)
    hearth desktop-entry install|remove   put Hearth in (or take it out of) the desktop's launcher
    hearth  |  hearth gui                 the desktop app
    hearth --version
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=temperature)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    # The load flags (and the EngineConfig built from them) live beside the commands that
    # load; their choices come from the engine's registry.
    from app.commands.load_options import add_load_args

    from app.services.version import hearth_version

    parser = argparse.ArgumentParser(prog="hearth", description="Run LLMs locally, fast.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    parser.add_argument("--version", action="version", version=f"hearth {hearth_version()}")
    sub = parser.add_subparsers(dest="command")

    gen = sub.add_parser("generate", help="complete a prompt (or a file of prompts)")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompts-file",
                     help="UTF-8, one prompt a line (blank lines are skipped); all are batched together; "
                          "- reads standard input")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--system", default=None,
                     help="system prompt, with --chat; an empty one (--system \"\") sends an empty system "
                          "message, so a template that adds a default system prompt when none is given (as "
                          "SmolLM2's does) adds none")
    gen.add_argument("--logprobs", type=int, default=None, metavar="N",
                     help='top-N logprobs per token, in each --json row\'s "logprobs" (needs --json)')
    gen.add_argument("--json", action="store_true",
                     help='print JSON (one object a line; with --prompts-file each has the "line" of its prompt)')
    add_load_args(gen)
    _add_sampling_args(gen, temperature=0.7)

    chat = sub.add_parser("chat", help="interactive chat in the terminal")
    chat.add_argument("--system", default=None,
                      help="system prompt; an empty one (--system \"\") sends an empty system message, so a "
                           "template that adds a default system prompt when none is given (as SmolLM2's does) "
                           "adds none (/system with no text clears it: the default again)")
    add_load_args(chat)
    _add_sampling_args(chat, temperature=0.7)

    sub.add_parser("doctor", help="versions, devices, and what can run here")

    from app.commands.bench import add_bench_parser

    add_bench_parser(sub)
    from app.commands.quantize import add_quantize_parser

    add_quantize_parser(sub)
    from app.commands.eval import add_eval_parser

    add_eval_parser(sub)
    from app.commands.compare import add_compare_parser

    add_compare_parser(sub)
    from app.commands.serve import add_serve_parser

    add_serve_parser(sub)
    from app.commands.setup import add_setup_parser

    add_setup_parser(sub)
    from app.commands.desktop_entry import add_desktop_entry_parser

    add_desktop_entry_parser(sub)
    gui = sub.add_parser("gui", help="the desktop app (the default with no subcommand)")
    gui.add_argument("--quit-after-start", action="store_true",
                     help="open the window, then close it at once (checks that the app starts here)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    from engine.api import HearthError

    try:
        rc = _dispatch(args)
        if sys.stdout is not None:
            sys.stdout.flush()  # here, inside the try: a reader that went away shows up now
        return rc
    except HearthError as e:
        print(f"hearth: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (``hearth generate ... | head -1``): stop quietly,
        # as other command-line tools do, with the shell's status for SIGPIPE; stdout points at
        # /dev/null so that the interpreter's last flush doesn't raise again
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141


def _dispatch(args) -> int:
    """Run the subcommand ``args`` names; its exit status."""
    if args.command == "generate":
        from app.commands.generate import run_generate

        return run_generate(args)
    if args.command == "bench":
        from app.commands.bench import run_bench_command

        return run_bench_command(args)
    if args.command == "quantize":
        from app.commands.quantize import run_quantize

        return run_quantize(args)
    if args.command == "eval":
        from app.commands.eval import run_eval

        return run_eval(args)
    if args.command == "compare":
        from app.commands.compare import run_compare

        return run_compare(args)
    if args.command == "serve":
        from app.commands.serve import run_serve

        return run_serve(args)
    if args.command == "setup":
        from app.commands.setup import run_setup

        return run_setup(args)
    if args.command == "desktop-entry":
        from app.commands.desktop_entry import run_desktop_entry

        return run_desktop_entry(args)
    if args.command == "doctor":
        from app.commands.doctor import run_doctor

        return run_doctor(args)
    if args.command in ("gui", None):
        from app.gui.app import run_gui

        return run_gui(quit_after_start=getattr(args, "quit_after_start", False))
    if args.command == "chat":
        from app.commands.chat import run_chat

        return run_chat(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
