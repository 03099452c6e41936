"""Where the offline-throughput workload's time goes, by kind of engine step.

    PYTHONPATH=. python benchmarks/profile_throughput.py --shape llama-8b [--num-requests 512] [--json F]
    PYTHONPATH=. python benchmarks/profile_throughput.py --shape tiny --device cpu --num-requests 16 --max-len 48

Runs the same workload as ``hearth bench --suite throughput`` (seeded lengths uniform in
[min, max], EOS ignored) through the real Engine and classifies every step:

* ``decode-ahead``  pure decode served by a step launched ahead (pipelined)
* ``decode-graph``  pure decode by graph replay, not launched ahead
* ``decode-eager``  pure decode run eagerly (no graphs, or a batch beyond the largest one)
* ``mixed``         a step with prefill tokens (eager; decode rows share the prefill kernel)

and reports steps, wall time (runner.execute and the whole engine step), tokens, and the
host time outside the runner per step. Prints a table; writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-requests", type=int, default=512)
    ap.add_argument("--min-len", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from engine.api import Engine, Request, SamplingParams
    from engine.bench.workload import Workload

    engine = Engine.load(f"shape:{args.shape}", device=args.device,
                         max_model_len=2 * args.max_len + 16, max_num_seqs=args.max_num_seqs,
                         max_num_batched_tokens=args.max_num_batched_tokens)
    runner = engine.runner
    stats: dict[str, dict] = defaultdict(lambda: {"steps": 0, "execute_s": 0.0, "step_s": 0.0,
                                                  "tokens": 0, "seqs": 0})
    current = {}

    execute = runner.execute

    def timed_execute(out):
        prefill = sum(sc.num_new_tokens for sc in out.scheduled if sc.num_new_tokens > 1 or not sc.sample)
        used_before = getattr(runner, "steps_ahead_used", 0)
        replays_before = runner.graphs.replays if getattr(runner, "graphs", None) else 0
        t = time.perf_counter()
        res = execute(out)
        dt = time.perf_counter() - t
        if prefill:
            kind = "mixed"
        elif getattr(runner, "steps_ahead_used", 0) > used_before:
            kind = "decode-ahead"
        elif getattr(runner, "graphs", None) and runner.graphs.replays > replays_before:
            kind = "decode-graph"
        else:
            kind = "decode-eager"
        row = stats[kind]
        row["steps"] += 1
        row["execute_s"] += dt
        row["tokens"] += out.num_batched_tokens
        row["seqs"] += len(out.scheduled)
        current["kind"] = kind
        return res

    runner.execute = timed_execute
    step = engine.step

    def timed_step():
        current.pop("kind", None)
        t = time.perf_counter()
        step()
        kind = current.get("kind")
        if kind is not None:
            stats[kind]["step_s"] += time.perf_counter() - t

    engine.step = timed_step

    reqs = Workload(engine.model_info["vocab_size"], 0).throughput_requests(
        args.num_requests, args.min_len, args.max_len)
    t0 = time.perf_counter()
    handles = [engine.submit(Request(prompt_token_ids=r.prompt, params=SamplingParams(
        max_tokens=r.output_len, temperature=0.0, ignore_eos=True))) for r in reqs]
    results = [h.result() for h in handles]
    wall = time.perf_counter() - t0
    out_tokens = sum(r.completion_tokens for r in results)
    engine.shutdown()

    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{args.shape} on {card}: {args.num_requests} requests, {out_tokens} output tokens "
          f"in {wall:.1f} s = {out_tokens / wall:.0f} tok/s")
    print(f"{'kind':<14}{'steps':>7}{'seqs/step':>11}{'exec ms/step':>14}{'host ms/step':>14}{'share':>8}")
    total = sum(r["step_s"] for r in stats.values()) or 1.0
    for kind, r in sorted(stats.items()):
        n = max(r["steps"], 1)
        print(f"{kind:<14}{r['steps']:>7}{r['seqs'] / n:>11.1f}{1e3 * r['execute_s'] / n:>14.2f}"
              f"{1e3 * (r['step_s'] - r['execute_s']) / n:>14.2f}{100 * r['step_s'] / total:>7.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "card": card, "wall_s": wall, "output_tokens": out_tokens,
                       "output_tok_s": out_tokens / wall, "kinds": stats}, f, indent=1)


if __name__ == "__main__":
    main()
