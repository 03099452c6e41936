"""Why serving lost throughput at 64 in flight (issue 16): the engine's closed loop with
its successors sent at once (the offline twin) against sent after an HTTP-like
turnaround (a few ms, random), with and without admission batching
(``SchedulerConfig.admit_ratio`` / ``max_hold_steps``). Counts the steps that decode on
graphs and the mixed ones (a prompt admitted beside decoding sequences runs eagerly) and
times each kind.

    PYTHONPATH=. python benchmarks/serve_admission.py [--shape llama-8b] [--json F]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-8b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--turnaround-ms", default="0.5,5", help="lo,hi of the uniform turnaround")
    ap.add_argument("--policies", default="0:0,0.3:16,0.3:8,0.5:16", help="admit_ratio:max_hold_steps,...")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from engine.api import Engine
    from engine.bench.rows import commit_id
    from engine.bench.serving import closed_loop, serve_prompts

    engine = Engine.load(f"shape:{args.shape}", device=args.device, max_num_seqs=args.concurrency,
                         max_model_len=args.prompt_len + args.output_len + 64, progress=lambda m: None)
    runner, sched = engine.runner, engine.scheduler
    steps: list[tuple[str, float]] = []
    execute = runner.execute

    def timed(inp):
        t = time.perf_counter()
        out = execute(inp)
        kind = "idle" if not inp.rows else "decode" if all(len(r.token_ids) == 1 and r.sample for r in inp.rows) \
            else "prompt" if all(len(r.token_ids) > 1 or not r.sample for r in inp.rows) else "mixed"
        steps.append((kind, time.perf_counter() - t))
        return out

    runner.execute = timed
    lo, hi = (float(x) / 1e3 for x in args.turnaround_ms.split(","))
    rng = random.Random(0)
    result = {"shape": args.shape, "device": engine.model_info.device, "commit": commit_id(),
              "concurrency": args.concurrency, "requests": args.requests, "prompt_len": args.prompt_len,
              "output_len": args.output_len, "turnaround_ms": [lo * 1e3, hi * 1e3], "runs": []}
    vocab = engine.model_info.vocab_size
    closed_loop(engine, serve_prompts(vocab, args.concurrency, args.prompt_len, 0, stream=1), args.output_len,
                args.concurrency)  # warm-up
    for policy in args.policies.split(","):
        ratio, hold = policy.split(":")
        sched.admit_ratio, sched.max_hold_steps = float(ratio), int(hold)
        for label, turn in (("at once", None), ("turnaround", lambda: rng.uniform(lo, hi))):
            steps.clear()
            fig = closed_loop(engine, serve_prompts(vocab, args.requests, args.prompt_len, 0), args.output_len,
                              args.concurrency, turnaround=turn)
            kinds = {}
            for kind, dt in steps:
                k = kinds.setdefault(kind, [0, 0.0])
                k[0] += 1
                k[1] += dt
            run = {"admit_ratio": float(ratio), "max_hold_steps": int(hold), "successor": label,
                   **{k: fig[k] for k in ("output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
                                          "wall_s")},
                   "steps": {k: {"count": v[0], "ms_each": 1e3 * v[1] / v[0]} for k, v in kinds.items()}}
            result["runs"].append(run)
            print(f"ratio {ratio:>4} hold {hold:>3} {label:<10} {fig['output_tok_s']:8.1f} tok/s  TTFT p50 "
                  f"{fig['ttft_p50_ms']:7.1f} p99 {fig['ttft_p99_ms']:7.1f} ms  ITL p99 {fig['itl_p99_ms']:6.1f}  "
                  + "  ".join(f"{k} {v[0]}x{1e3 * v[1] / v[0]:.1f}ms" for k, v in sorted(kinds.items())), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=1)
    engine.shutdown()


if __name__ == "__main__":
    sys.exit(main())
