"""``hearth bench``: decode / prefill / throughput suites, optionally beside transformers.

    hearth bench --shape llama-8b --suite decode,prefill --baseline hf --json out.json

Prints a table (always) and writes ``{"rows": [...]}`` in the BENCHMARKS.md shape with
``--json``. The measuring is done by ``engine.bench.run_bench`` (the bench's public face,
a client of ``engine.api``); this module only turns the command line into options and rows
into text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from app.commands.common import check_output_file
from app.commands.load_options import add_choice_flags, add_device_flags
from engine.api import InvalidRequestError
from engine.bench import BenchOptions, run_bench

SUITE_NAMES = ("decode", "prefill", "throughput", "serve")
# The engine group's flags, by their Engine.load keyword.
_LOAD_FLAGS = ("device", "dtype", "attention", "kv_cache_dtype", "quantization", "enforce_eager", "max_model_len",
               "kv_cache_memory", "max_num_seqs", "max_num_batched_tokens", "block_size", "quant_group_size",
               "quant_head", "float_head", "tokenizer", "devices", "split", "split_ratio")
# Load keywords whose flag is spelt otherwise (--quant, --group-size).
_FLAG_DEST = {"quantization": "quant", "quant_group_size": "group_size"}


def _int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 1,64; got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return vals


def add_bench_parser(sub) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to the ``hearth`` subparsers."""
    p = sub.add_parser(
        "bench", help="measure decode / prefill / throughput (optionally against transformers)",
        description="Benchmark Hearth on a random-weight shape or a real model. Sizes left out "
                    "default to the BENCHMARKS.md protocol on CUDA and to small ones on CPU.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--shape", help="random-weight model shape (tiny, llama-1b, llama-8b, qwen2.5-7b, ...)")
    what.add_argument("--model", help="default | Hub repo id | local folder | .gguf file")
    p.add_argument("--revision", default=None, help="Hub revision (with --model)")
    p.add_argument("--suite", action="append", default=None, metavar="NAME[,NAME]",
                   help=f"{', '.join(SUITE_NAMES)} or all; repeatable or comma list (default: decode)")
    p.add_argument("--baseline", default=None, metavar="hf|llamacpp",
                   help="also run transformers (hf) on the same weights and inputs, or llama.cpp "
                        "(llamacpp, needs llama-cpp-python) on the same GGUF --model, batch 1")
    p.add_argument("--json", default=None, metavar="FILE", help="write {\"rows\": [...]} to FILE")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    g = p.add_argument_group("engine")
    add_choice_flags(g, {"--kv-cache-dtype": "auto: the model's dtype; fp8: e4m3 (rows then carry kv_cache_dtype)"})
    add_device_flags(g)
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode")
    g.add_argument("--max-model-len", type=int, default=None, help="context (default: what the suites need)")
    g.add_argument("--kv-cache-memory", default=None, help="KV cache size, e.g. 20GiB")
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help="sequences per step (default: the largest --batch; with throughput at "
                        "least min(512, --num-requests) on CUDA, 64 on CPU)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget per step (default 8192 on CUDA, 2048 on CPU, at least the longest prefill)")
    g.add_argument("--block-size", type=int, default=16, help="KV block size in tokens")
    g.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="a local folder of tokenizer files instead of the model's own; with --shape, gives "
                        "the random weights text (the serve suite's JSON-schema run needs it)")
    s = p.add_argument_group("sizes (defaults: CUDA / CPU)")
    s.add_argument("--batch", type=_int_list, default=None, help="decode batch sizes (1,64 / 1,4)")
    s.add_argument("--prompt-len", type=int, default=None, help="decode prompt tokens (128 / 32)")
    s.add_argument("--output-len", type=int, default=None, help="decode new tokens (256 / 16)")
    s.add_argument("--prefill-lens", type=_int_list, default=None,
                   help="prefill prompt lengths (128,512,2048,8192 / 32,128)")
    s.add_argument("--num-requests", type=int, default=None, help="throughput requests (512 / 12)")
    s.add_argument("--min-len", type=int, default=None, help="throughput shortest prompt/output (128 / 8)")
    s.add_argument("--max-len", type=int, default=None, help="throughput longest prompt/output (1024 / 48)")
    s.add_argument("--hf-num-requests", type=int, default=None,
                   help="throughput requests the baseline runs, the first N (64 / 6)")
    s.add_argument("--repeats", type=int, default=None, help="timed repeats after a warm-up, median (3 / 2)")
    s.add_argument("--concurrency", type=_int_list, default=None,
                   help="serve: requests in flight over HTTP, each level a run (1,16,64 / 1,4); "
                        "--num-requests is then per level (default 4x / 2x the level)")
    s.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    return p


def run_bench_command(args) -> int:
    suites = []
    for item in args.suite or ["decode"]:
        suites.extend(x.strip() for x in item.split(",") if x.strip())
    for name in suites:
        if name not in SUITE_NAMES and name != "all":
            raise InvalidRequestError(f"unknown suite {name!r}; choose from {', '.join(SUITE_NAMES)} (or all: "
                                      "every suite but serve).")
    serve = "serve" in suites  # over HTTP (app/commands/serve_bench.py); the rest in engine.bench
    suites = [s for s in suites if s != "serve"]
    if args.concurrency is not None and not serve:
        raise InvalidRequestError("--concurrency applies to --suite serve; add it or drop the flag.")
    # The engine's load options: Engine.load's keywords, the sizes left out (None) for the
    # bench to fit to its suites.
    load = {name: getattr(args, _FLAG_DEST.get(name, name)) for name in _LOAD_FLAGS
            if getattr(args, _FLAG_DEST.get(name, name)) is not None}
    opts = None
    if suites:
        opts = BenchOptions(
            suites=tuple(suites), shape=args.shape, model=args.model, revision=args.revision,
            baseline=args.baseline, load=load, batch=args.batch, prompt_len=args.prompt_len,
            output_len=args.output_len, prefill_lens=args.prefill_lens, num_requests=args.num_requests,
            min_len=args.min_len, max_len=args.max_len, hf_num_requests=args.hf_num_requests,
            repeats=args.repeats, seed=args.seed,
        )
    elif args.baseline:
        raise InvalidRequestError("--suite serve has no --baseline: it compares the server with the engine "
                                  "itself (offline, same requests); drop --baseline.")
    out_path = Path(args.json) if args.json is not None else None
    if out_path is not None:
        check_output_file(args.json)  # fail before minutes of measuring

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"[hearth] {msg}", file=sys.stderr, flush=True)

    rows = run_bench(opts, progress=progress) if opts is not None else []
    if rows:
        print(format_table(rows))
    if serve:
        from app.commands.serve_bench import format_serve_table, run_serve_suite

        served = run_serve_suite(args, progress)
        print(format_serve_table(served))
        rows += served
    if out_path is not None:
        try:
            out_path.write_text(json.dumps({"rows": rows}, indent=1) + "\n", encoding="utf-8")
        except OSError as e:
            raise InvalidRequestError(f"cannot write --json {out_path}: {e}") from None
    return 0


# -- the table ---------------------------------------------------------------------------
_COLUMNS = (  # title, key, format
    ("suite", "suite", "{}"), ("engine", "engine", "{}"), ("batch", "batch", "{}"),
    ("prompt", "prompt_len", "{}"), ("output", "output_len", "{}"),
    ("decode tok/s", "decode_tok_s", "{:.1f}"), ("TTFT ms", "ttft_ms", "{:.2f}"),
    ("output tok/s", "output_tok_s", "{:.1f}"), ("KV waste %", "kv_waste_pct", "{:.2f}"),
)


def _partner_key(row: dict) -> tuple:
    if row["suite"] == "decode":
        return ("decode", row["batch"])
    if row["suite"] == "prefill":
        return ("prefill", row["prompt_len"])
    return (row["suite"],)


def speedup_vs_hf(row: dict, hf_row: dict) -> float | None:
    """How many times faster Hearth is (rates: hearth / hf; TTFT: hf / hearth)."""
    for key in ("decode_tok_s", "output_tok_s"):
        if row.get(key) and hf_row.get(key) and row["suite"] != "prefill":
            return row[key] / hf_row[key]
    if row["suite"] == "prefill" and row.get("ttft_ms") and hf_row.get("ttft_ms"):
        return hf_row["ttft_ms"] / row["ttft_ms"]
    return None


def format_table(rows: list[dict]) -> str:
    """One line per row, aligned; Hearth rows get "vs <baseline>" (speed-up) where one ran."""
    if not rows:
        return "(no rows)"
    base = next((r["engine"] for r in rows if r["engine"] != "hearth"), "hf")
    hf = {_partner_key(r): r for r in rows if r["engine"] == base}
    cells = []
    for r in rows:
        line = [fmt.format(r[key]) if r.get(key) is not None else "" for _, key, fmt in _COLUMNS]
        partner = hf.get(_partner_key(r)) if r["engine"] != base else None
        ratio = speedup_vs_hf(r, partner) if partner else None
        line.append(f"{ratio:.2f}x" if ratio is not None else "")
        line.append(f"{r['match_tokens']}/{r['output_len']}" if "match_tokens" in r else "")
        cells.append(line)
    titles = [t for t, _, _ in _COLUMNS] + [f"vs {base}", "greedy match"]
    widths = [max(len(t), *(len(c[i]) for c in cells)) for i, t in enumerate(titles)]

    def fmt_line(values):  # text columns left, numbers right
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    first = rows[0]
    head = (f"{first['model']} on {first['card']}, {first['quant']}, attention {first['attention']}, "
            f"torch {first['torch']}, commit {first['commit']}, {first['date']}")
    return "\n".join([head, fmt_line(titles), *(fmt_line(c) for c in cells)])
