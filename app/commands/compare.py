"""``hearth compare``: one model's quantizations (x attention backends x KV-cache dtypes) on the
same prompts, side by side: speed, memory and quality in one table.

    hearth compare [--model M] --quants bf16,int8,int4,awq,gptq [--attention A[,A]] [--kv-dtype D[,D]]
                   [--prompts FILE] [--max-tokens N] [--seed S] [--eval-tokens N | --no-perplexity]
                   [--side-by-side] [--json OUT] [--save [NAME]]

The configurations are every combination of the lists (quantization first), at most six;
they run one after another (``app.services.compare.run_comparison``), or with
``--side-by-side`` those that fit in memory together load together and answer each prompt
at the same time (their speeds then share the device: the table says so). The table goes to
stdout (to stderr with ``--json -``), progress lines to stderr. Exit code: 0 when at least
one configuration ran and answered a prompt, 1 when none did (each row's ``error`` says why), 2 for bad
arguments, 130 when interrupted (Ctrl-C cancels: the finished configurations are still
printed and written).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from threading import Event, Thread
from pathlib import Path

from app.commands.common import check_output_file
from app.commands.load_options import choice_help
from app.services.compare import CompareConfig, ComparePlan, run_comparison
from app.services.compare_events import (ConfigFinished, ConfigProgress, ConfigStarted, PromptFinished,
                                         SideBySidePlanned)
from app.services.compare_export import to_json, to_text_table
from app.services.compare_plan import MAX_CONFIGS
from app.services.compare_prompts import bundled_prompt_texts, prompts_from_bytes, read_prompts_file
from engine.api import InvalidRequestError


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected one name or a comma-separated list, e.g. bf16,int8,int4")
    return names


def add_compare_parser(sub) -> argparse.ArgumentParser:
    """Add the ``compare`` subcommand to the ``hearth`` subparsers."""
    p = sub.add_parser(
        "compare", help="the same prompts across quantizations / attention backends: speed, memory, quality",
        description="Run the same prompts on one model in several configurations, one after another (each loaded, "
                    "measured and unloaded; or, with --side-by-side, those that fit together at once), and print "
                    "TTFT, decode tokens/s, weight, KV-cache and peak memory, load time, perplexity on the bundled "
                    "evaluation text and token agreement with the first configuration that ran. The configurations "
                    f"are every combination of --quants, --attention and --kv-dtype (at most {MAX_CONFIGS}).")
    p.add_argument("--quants", type=_names, required=True, metavar="Q[,Q...]",
                   help=choice_help("quantization", "comma-separated; the first configuration is the reference"))
    p.add_argument("--attention", type=_names, default=("auto",), metavar="A[,A...]",
                   help=choice_help("attention", "comma-separated (default auto)"))
    p.add_argument("--kv-dtype", "--kv-cache-dtype", dest="kv_dtype", type=_names, default=("auto",),
                   metavar="D[,D...]",
                   help=choice_help("kv_cache_dtype", "comma-separated (default auto)"))
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompts file: plain text, one prompt per block of lines, blocks separated by a blank line; or "
                        "a .json list of strings (default: the bundled set: a factual question, a summary, code, a "
                        "translation, a long-context recall); - reads plain text from standard input")
    p.add_argument("--max-tokens", type=int, default=128, metavar="N", help="new tokens per prompt at most (128)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="sample with this one seed for every configuration (default: greedy)")
    p.add_argument("--temperature", type=float, default=None, metavar="T", help="with --seed (default 0.7)")
    p.add_argument("--no-chat", action="store_true",
                   help="send the prompts as raw text (default: the model's chat template where it has one)")
    ppl = p.add_mutually_exclusive_group()
    ppl.add_argument("--eval-tokens", type=int, default=None, metavar="N",
                     help="score only the first N tokens of the evaluation text (default: all of it, ~37k tokens)")
    ppl.add_argument("--no-perplexity", action="store_true", help="skip the perplexity measurement")
    p.add_argument("--side-by-side", action="store_true",
                   help="load the configurations that fit in memory together and send each prompt to all of them "
                        "at once (checked before loading; the rest run one after another). Their speeds then share "
                        "the device: each JSON object's side_by_side / ran_with say so")
    p.add_argument("--json", default=None, metavar="OUT",
                   help='write the results to OUT as a JSON list, one object per configuration ("-": stdout; '
                        "the table then goes to stderr)")
    p.add_argument("--save", nargs="?", const="", default=None, metavar="NAME",
                   help="also save the comparison in the data folder, where the app's Compare page reopens it")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    g = p.add_argument_group("model loading (the same for every configuration)")
    g.add_argument("--model", default=None, help="default | Hub repo id | local folder | .gguf file | shape:NAME")
    g.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    g.add_argument("--device", default="auto", metavar="NAME", help=choice_help("device", "or cuda:N"))
    g.add_argument("--dtype", default="auto", metavar="NAME",
                   help=choice_help("dtype", "the weights dtype; auto: bfloat16 on a GPU, float32 on the CPU"))
    g.add_argument("--group-size", type=int, default=None, metavar="G", help="int4's group size: 32, 64, 128 or 256")
    g.add_argument("--quant-head", action="store_true", help="quantize the embedding and LM head too (int8/int4)")
    g.add_argument("--float-head", action="store_true",
                   help="keep an untied LM head in the model's dtype (int8/int4 make it int8 by default)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context in tokens; the KV cache holds one sequence of it (default: the model's)")
    g.add_argument("--kv-cache-memory", default=None,
                   help="KV cache size, e.g. 2GiB (default: one full context, as memory allows)")
    g.add_argument("--enforce-eager", action="store_true", help="decode without CUDA graphs")
    return p


def plan_from_args(args) -> ComparePlan:
    """The checked plan of the command line (InvalidRequestError for a bad value)."""
    configs = tuple(CompareConfig(q, a, k) for q, a, k in itertools.product(args.quants, args.attention, args.kv_dtype))
    if args.prompts is not None and not args.prompts.strip():  # (it compared the bundled prompts without a word)
        raise InvalidRequestError("--prompts is empty: give a prompts file, or - for standard input, or leave "
                                  "--prompts out for the bundled set.")
    if args.prompts == "-":  # standard input, as plain text
        prompts = prompts_from_bytes(sys.stdin.buffer.read(), Path("<stdin>"))
    else:
        prompts = read_prompts_file(args.prompts) if args.prompts else bundled_prompt_texts()
    load = {"revision": args.revision, "dtype": args.dtype, "quant_group_size": args.group_size,
            "quant_head": args.quant_head, "float_head": args.float_head, "max_model_len": args.max_model_len,
            "kv_cache_memory": args.kv_cache_memory, "enforce_eager": args.enforce_eager}
    plan = ComparePlan(configs=configs, prompts=tuple(prompts), model=args.model, max_tokens=args.max_tokens,
                       seed=args.seed, temperature=args.temperature, perplexity=not args.no_perplexity,
                       eval_tokens=args.eval_tokens, device=args.device, chat=False if args.no_chat else None,
                       load_options={k: v for k, v in load.items() if v is not None and v is not False},
                       side_by_side=args.side_by_side)
    if args.temperature is not None and args.seed is None:
        raise InvalidRequestError("--temperature needs --seed (without one, every configuration decodes greedily).")
    return plan.checked()


def run_compare(args) -> int:
    plan = plan_from_args(args)
    out_path = None if args.json in (None, "-") else Path(args.json)
    if out_path is not None:
        check_output_file(args.json)  # fail before minutes of measuring
    printer = _ProgressPrinter(plan, quiet=args.quiet)
    cancel, done = Event(), Event()
    box: dict = {}

    def work() -> None:
        try:
            box["result"] = run_comparison(plan, on_event=printer, cancel=cancel)
        except BaseException as e:  # handed to the main thread, raised there
            box["error"] = e
        finally:
            done.set()

    # The comparison runs on a worker so that Ctrl-C here cancels it cleanly: the answer
    # in flight is aborted, the engine shut down, the finished configurations kept. The
    # wait is a sleep, not Thread.join: a join that Ctrl-C interrupts marks the thread
    # stopped while it still runs (Python 3.11, bpo-45274), and the result was then lost.
    worker = Thread(target=work, name="hearth-compare", daemon=True)
    worker.start()
    interrupted = False
    while not done.is_set():
        try:
            time.sleep(0.1)
        except KeyboardInterrupt:
            if interrupted:
                raise
            interrupted = True
            cancel.set()
            print("[hearth] cancelling (Ctrl-C again to quit at once)", file=sys.stderr, flush=True)
    if "error" in box:
        raise box["error"]
    result = box["result"]
    table = to_text_table(result)
    print(table, file=sys.stderr if args.json == "-" else sys.stdout, flush=True)
    if args.json == "-":
        sys.stdout.write(to_json(result))
        sys.stdout.flush()
    elif out_path is not None:
        try:
            out_path.write_text(to_json(result), encoding="utf-8")
        except OSError as e:
            raise InvalidRequestError(f"cannot write --json {out_path}: {e.strerror or e}") from None
    if args.save is not None:
        from app.services.compare_store import save_comparison

        saved = save_comparison(result, args.save or None)
        print(f"[hearth] saved as {saved}", file=sys.stderr, flush=True)
    if interrupted:
        return 130
    if any(_answered(r) for r in result.results):
        return 0
    if any(r.ok for r in result.results):  # they loaded, but not one prompt was answered
        print("hearth: error: no configuration answered a prompt (the error column says why): nothing was "
              "compared.", file=sys.stderr, flush=True)
    return 1


def _answered(r) -> bool:
    """A configuration that ran and answered at least one prompt (a comparison whose every
    prompt failed everywhere, e.g. all longer than the context, measured nothing: exit 1)."""
    return r.ok and (not r.prompts or any(not p.error for p in r.prompts))


class _ProgressPrinter:
    """The comparison's events as ``[hearth]`` lines on stderr (perplexity progress at most
    every few seconds)."""

    PERPLEXITY_EVERY_S = 5.0

    def __init__(self, plan: ComparePlan, quiet: bool) -> None:
        self.labels = plan.labels
        self.total = len(plan.configs)
        self.prompts = len(plan.prompts)
        self.quiet = quiet
        self._last_ppl = 0.0

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(f"[hearth] {msg}", file=sys.stderr, flush=True)

    def __call__(self, ev) -> None:
        if isinstance(ev, SideBySidePlanned):
            for group in ev.groups:
                names = " + ".join(self.labels[i] for i in group)
                self.say(f"side by side: {names} (loaded together)" if len(group) > 1 else f"{names}: runs alone")
            for note in ev.notes:
                self.say(note)
        elif isinstance(ev, ConfigStarted):
            self.say(f"{ev.config.label} ({ev.index + 1} of {ev.total}): loading")
        elif isinstance(ev, ConfigProgress):
            if ev.stage == "perplexity" and ev.done not in (0, ev.total):
                now = time.monotonic()
                if now - self._last_ppl < self.PERPLEXITY_EVERY_S:
                    return
                self._last_ppl = now
            if ev.stage != "prompt":  # each prompt's own line follows
                self.say(f"{self.labels[ev.index]}: {ev.message}")
        elif isinstance(ev, PromptFinished):
            r = ev.result
            what = f"error: {r.error}" if r.error else f"{r.output_tokens} tokens ({r.finish_reason})"
            if r.ttft_ms is not None:
                what += f", TTFT {r.ttft_ms:.1f} ms"
            if r.decode_tok_s is not None:
                what += f", {r.decode_tok_s:.1f} tok/s"
            self.say(f"{self.labels[ev.index]}: prompt {ev.prompt_index + 1} of {self.prompts}: {what}")
        elif isinstance(ev, ConfigFinished):
            r = ev.result
            done = {"ok": f"done in {r.seconds or 0:.1f} s", "cancelled": "cancelled"}.get(r.status,
                                                                                           f"failed: {r.error}")
            self.say(f"{r.label}: {done}")
