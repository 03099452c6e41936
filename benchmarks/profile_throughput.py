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

``--kernel-samples N`` also profiles N single steps (every 20th from step 100 on, or the
steps listed by ``--kernel-steps 3,9,...``) with torch.profiler and sums their CUDA kernel
time by category (GEMM, decode attention, prefill attention, norms, ...), per kind of
step, keeping each sample's largest kernels by name. Profiled steps are slower, so the
run's tok/s is then not a benchmark figure. The JSON also holds a per-step timeline
(kind, sequences, tokens, milliseconds) of every step.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

CATEGORIES = (("gemv", ("_gemv",)), ("decode attention", ("_decode_",)),
              ("prefill attention", ("_prefill_kernel", "flash", "fmha", "attention")),
              ("fp8 rounding", ("_quantize_rows",)),
              ("gemm", ("nvjet", "cutlass", "gemm", "xmma", "splitK", "sm90_", "f8f8")),
              ("norm", ("_rms",)), ("rotary", ("_rotary",)), ("kv write", ("_write_kv",)),
              ("activation", ("_silu",)), ("copies", ("Memcpy", "Memset")))


def category(kernel: str) -> str:
    for name, keys in CATEGORIES:
        if any(k in kernel for k in keys):
            return name
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-requests", type=int, default=512)
    ap.add_argument("--min-len", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--json", default=None)
    ap.add_argument("--kernel-samples", type=int, default=0)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"))
    ap.add_argument("--quant", default="auto", help="the weights' quantization (fp8, int8, int4, ...)")
    ap.add_argument("--kernel-steps", default="", help="comma-separated step numbers to profile")
    args = ap.parse_args()

    import torch

    from engine.api import Engine, Request, SamplingParams
    from engine.bench.workload import Workload

    engine = Engine.load(f"shape:{args.shape}", device=args.device,
                         max_model_len=2 * args.max_len + 16, max_num_seqs=args.max_num_seqs,
                         max_num_batched_tokens=args.max_num_batched_tokens,
                         kv_cache_dtype=args.kv_cache_dtype, quantization=args.quant)
    runner = engine.runner
    stats: dict[str, dict] = defaultdict(lambda: {"steps": 0, "execute_s": 0.0, "step_s": 0.0,
                                                  "tokens": 0, "seqs": 0})
    current = {}

    execute = runner.execute

    def timed_execute(inp):
        if not inp.rows:  # the engine handing over finished requests while idle
            return execute(inp)
        lens = [len(r.token_ids) for r in inp.rows]
        prefill = sum(n for n, r in zip(lens, inp.rows) if n > 1 or not r.sample)
        used_before = getattr(runner, "steps_ahead_used", 0)
        replays_before = runner.graphs.replays if getattr(runner, "graphs", None) else 0
        t = time.perf_counter()
        res = execute(inp)
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
        row["tokens"] += sum(lens)
        row["seqs"] += len(inp.rows)
        current.update(kind=kind, seqs=len(inp.rows), tokens=sum(lens))
        return res

    runner.execute = timed_execute
    step = engine.step

    timeline: list[list] = []  # [kind, seqs, tokens, step ms] per step that ran the model

    def timed_step():
        current.pop("kind", None)
        t = time.perf_counter()
        step()
        kind = current.get("kind")
        if kind is not None:
            dt = time.perf_counter() - t
            stats[kind]["step_s"] += dt
            timeline.append([kind, current["seqs"], current["tokens"], round(1e3 * dt, 3)])

    samples: list[dict] = []
    if args.kernel_samples:
        from torch.profiler import ProfilerActivity, profile

        counter = {"n": 0}
        wanted = {int(x) for x in args.kernel_steps.split(",") if x.strip()}

        def sampled_step():
            counter["n"] += 1
            n = counter["n"]
            chosen = n in wanted if wanted else (n >= 100 and n % 20 == 0)
            if not chosen or len(samples) >= args.kernel_samples:
                return timed_step()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                timed_step()
                torch.cuda.synchronize()
            per = defaultdict(float)
            by_name = defaultdict(float)
            for ev in prof.events():
                if ev.device_type == torch.autograd.DeviceType.CUDA:
                    t = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
                    per[category(ev.name)] += t / 1e3
                    by_name[ev.name[:90]] += t / 1e3
            top = sorted(by_name.items(), key=lambda kv: -kv[1])[:10]
            samples.append({"step": n, "kind": current.get("kind"), "seqs": current.get("seqs"),
                            "tokens": current.get("tokens"), "ms_by_category": dict(per),
                            "top_kernels_ms": {k: round(v, 3) for k, v in top}})

        engine.step = sampled_step
    else:
        engine.step = timed_step

    reqs = Workload(engine.model_info.vocab_size, 0).throughput_requests(
        args.num_requests, args.min_len, args.max_len)
    t0 = time.perf_counter()
    handles = [engine.submit(Request(prompt_token_ids=r.prompt, params=SamplingParams(
        max_tokens=r.output_len, temperature=0.0, ignore_eos=True))) for r in reqs]
    results = [h.result() for h in handles]
    wall = time.perf_counter() - t0
    out_tokens = sum(r.completion_tokens for r in results)
    graphs = getattr(runner, "graphs", None)
    bucket_ms = {b: round(ms, 3) for b, ms in graphs.bucket_ms.items()} if graphs is not None else {}
    routes = (engine.model_info.cuda_graph_routes or {})
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
    if samples:
        print("CUDA kernel ms per profiled step (a pipelined step's kernels are its successor's):")
        for kind in sorted({s["kind"] for s in samples if s["kind"]}):
            got = [s["ms_by_category"] for s in samples if s["kind"] == kind]
            cats = sorted({c for g in got for c in g}, key=lambda c: -sum(g.get(c, 0) for g in got))
            print(f"  {kind} ({len(got)} steps): " + ", ".join(
                f"{c} {sum(g.get(c, 0) for g in got) / len(got):.2f}" for c in cats))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "card": card, "wall_s": wall, "output_tokens": out_tokens,
                       "output_tok_s": out_tokens / wall, "kinds": stats, "kernel_samples": samples,
                       "timeline": timeline, "graph_bucket_ms": bucket_ms, "graph_routes": routes},
                      f, indent=1)


if __name__ == "__main__":
    main()
