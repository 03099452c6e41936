"""Where a batch-1 decode step's time goes: GPU graph time vs host work per phase.

    PYTHONPATH=. python benchmarks/profile_decode.py --shape llama-1b [--batch 1] [--json F]
        [--quant int4] [--kernels 20]

Loads ``shape:<name>`` through the real Engine (triton + CUDA graphs), streams one greedy
request, and wraps the engine's phases with host timers: schedule, the runner's input
building + graph launch, sampling (which waits for the GPU), scheduler update and
output processing. Then replays the captured graph alone in a loop with CUDA events to
get the pure GPU time of a step. Prints one table; writes JSON with --json.

``--kernels N`` also records N graph replays with torch.profiler and sums each kernel's
GPU time per step by name (the rest of the step's time is the gaps between kernels):
which projections and which other kernels the step spends its time on. With PDL on (the
default on Hopper, ``hearth_kernels/pdl.py``) a kernel starts while the one before it runs and
its profiled time includes that wait, so the per-kernel times overlap and sum past the step:
run with ``HEARTH_PDL=0`` to attribute time (the JSON records ``pdl``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quant", default="auto")
    ap.add_argument("--kernels", type=int, default=0, help="profile this many graph replays by kernel")
    args = ap.parse_args()

    from engine.api import Engine, Request, SamplingParams

    engine = Engine.load(f"shape:{args.shape}", device="cuda", max_model_len=2048,
                         max_num_seqs=max(args.batch, 1), quantization=args.quant)
    runner, sched = engine.runner, engine.scheduler
    acc: dict[str, list[float]] = defaultdict(list)

    def timed(obj, name, key):
        fn = getattr(obj, name)

        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                acc[key].append(time.perf_counter() - t)
        setattr(obj, name, wrapper)

    timed(sched, "schedule", "schedule")
    timed(sched, "update", "scheduler.update")
    timed(runner.graphs, "run", "graph inputs + launch")
    timed(runner, "sample", "sample (waits for GPU)")
    timed(runner, "execute", "runner.execute")
    timed(engine, "step", "engine.step")

    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (128,), generator=g).tolist() for _ in range(args.batch)]
    for _ in range(2):  # warm-up, then measure
        acc.clear()
        handles = [engine.submit(Request(prompt_token_ids=p, params=params)) for p in prompts]
        results = [h.result() for h in handles]
    rate = statistics.median(r.timings.decode_tok_s for r in results)

    graph = runner.graphs.graphs[runner.graphs.bucket_for(args.batch)]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    start.record()
    n = 100
    for _ in range(n):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    gpu_ms = start.elapsed_time(end) / n

    kernels = by_kernel(graph, args.kernels, gpu_ms) if args.kernels else None
    from hearth_kernels.pdl import pdl_on

    pdl = pdl_on(torch.device("cuda"))
    if kernels and pdl:
        print("PDL is on: each kernel's time includes its wait for the one before (they overlap and sum past "
              "the step); HEARTH_PDL=0 attributes time")

    rows = {k: {"calls": len(v), "mean_ms": 1e3 * statistics.mean(v), "median_ms": 1e3 * statistics.median(v)}
            for k, v in acc.items() if v}
    weight_bytes = engine.model_info.weight_bytes
    print(f"{args.shape} batch {args.batch} on {torch.cuda.get_device_name()}: {rate:.1f} tok/s per sequence")
    print(f"graph replay alone: {gpu_ms:.3f} ms/step -> {1e3 / gpu_ms:.0f} steps/s, "
          f"{weight_bytes / (gpu_ms * 1e-3) / 1e12:.2f} TB/s of weights")
    for k, r in rows.items():
        print(f"  {k:<24} {r['calls']:>5} calls  mean {r['mean_ms']:.3f} ms  median {r['median_ms']:.3f} ms")
    # What the load chose and measured: batch-1 kernels, prompt graphs (bucket -> replay ms,
    # eager ms).
    chosen = {k: getattr(engine.model_info, k) for k in ("batch1_matmul", "prompt_graph_tokens", "prompt_graph_ms")}
    print("prompt graphs (tokens: replay ms, eager ms):", chosen["prompt_graph_ms"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "quant": args.quant, "hearth_kernels": kernels, "batch": args.batch, "decode_tok_s": rate, "graph_ms": gpu_ms,
                       "weight_bytes": weight_bytes, "phases": rows, "load": chosen, "pdl": pdl,
                       "card": torch.cuda.get_device_name()}, f, indent=1)
    engine.shutdown()


def by_kernel(graph, n: int, step_ms: float) -> list[dict]:
    """Each kernel's GPU microseconds per step over ``n`` profiled replays (largest first),
    printed with its share of the step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            graph.replay()
        torch.cuda.synchronize()
    total: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    order: dict[str, list[float]] = defaultdict(list)  # each kernel's times in launch order
    events = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]
    for ev in sorted(events, key=lambda e: e.time_range.start):
        t = total[ev.name]
        t[0] += ev.device_time / n  # microseconds per step
        t[1] += 1
        order[ev.name].append(ev.device_time)
    out = []
    for k, v in total.items():
        row = {"kernel": k, "us_per_step": v[0], "calls_per_step": v[1] / n}
        per = len(order[k]) // n
        if per * n == len(order[k]):  # the i-th call of each step, averaged over the steps
            row["us_by_call"] = [sum(order[k][s * per + i] for s in range(n)) / n for i in range(per)]
        out.append(row)
    out.sort(key=lambda r: -r["us_per_step"])
    busy = sum(r["us_per_step"] for r in out)
    print(f"kernels: {busy:.0f} us busy of a {1e3 * step_ms:.0f} us step ({len(out)} kinds)")
    for r in out[:16]:
        print(f"  {r['us_per_step']:8.1f} us  {r['calls_per_step']:5.0f}/step  {r['kernel'][:90]}")
    return out


if __name__ == "__main__":
    main()
