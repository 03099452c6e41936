"""Where served throughput goes at many streams: the real engine behind the real host, app
and uvicorn in this process (as ``hearth serve`` runs them), streaming clients in other
processes (the serve suite's load generator), then the same engine's own closed loop
(``engine.bench.closed_loop``: the serve suite's offline figure) — each run's engine steps
as a timeline (when each step ended, its sampled rows and prompt tokens), so a wave's
ramp (requests arriving over HTTP, prompts admitted in several steps, the engine idle
between) can be compared with the offline one's.

    PYTHONPATH=. python benchmarks/serve_waves.py --model shape:llama-8b [--concurrency 64]
        [--requests 256] [--prompt-len 128] [--output-len 128] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


#: The engine keeps its recent steps (``Engine._gen_window``, for its token rates) this long.
WINDOW_S = 10.0


def timeline(engine, since: float) -> list[tuple[float, int, int]]:
    """(ms after ``since``, sampled rows, prompt tokens) per step since then; refused for a
    run longer than the engine keeps (its first steps would be gone)."""
    if time.perf_counter() - since > WINDOW_S * 0.95:
        raise SystemExit(f"a run took over {WINDOW_S * 0.95:.1f} s: the engine keeps only its last {WINDOW_S:g} s "
                         "of steps. Use fewer --requests.")
    return [(round((t - since) * 1e3, 3), n, p) for t, n, p in list(engine._gen_window) if t >= since]


def ramps(steps: list[tuple[float, int, int]]) -> dict:
    """The steps that read prompt tokens, and the gaps (ms) between steps over 2x the median."""
    gaps = [b[0] - a[0] for a, b in zip(steps, steps[1:])]
    med = statistics.median(gaps) if gaps else 0.0
    return {"steps": len(steps), "median_step_ms": med, "prompt_steps": sum(1 for s in steps if s[2]),
            "long_gaps_ms": [round(g, 2) for g in gaps if g > 2 * med],
            "time_in_long_gaps_ms": sum(g for g in gaps if g > 2 * med)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="shape:llama-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--switch-intervals", default="",
                    help="also serve with these sys.setswitchinterval values (ms, comma-separated)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from app.commands.serve import load_model
    from app.services.engine_host import EngineHost
    from benchmarks.serve_overhead import serve_in_thread
    from app.services.serve_load import completion_bodies, drive
    from engine.bench import latency_summary, serve_prompts
    from engine.bench.serving import closed_loop

    c = args.concurrency
    host = EngineHost()
    load_model(host, {"model": args.model, "device": args.device, "max_num_seqs": c,
                      "max_model_len": args.prompt_len + args.output_len + 64})
    engine = host.engine
    vocab = engine.model_info.vocab_size
    server, thread, base = serve_in_thread(host, 4 * c + 64)
    name = engine.model_info.name
    prompts = serve_prompts(vocab, args.requests, args.prompt_len, 0)
    warm = serve_prompts(vocab, c, args.prompt_len, 0, stream=1)

    drive(base, None, completion_bodies(name, warm, args.output_len), c)
    runs = {}
    default = sys.getswitchinterval()
    variants = [("served", None), *((f"served, switch interval {x} ms", float(x))
                                    for x in args.switch_intervals.split(",") if x)]
    for label, ms in variants:
        sys.setswitchinterval(default if ms is None else ms / 1e3)
        t0 = time.perf_counter()
        timings, wall = drive(base, None, completion_bodies(name, prompts, args.output_len), c)
        steps = timeline(engine, t0)
        label = label if label not in runs else f"{label} (again, {len(runs)})"
        runs[label] = ({**latency_summary(timings, wall), **ramps(steps)}, steps)
    sys.setswitchinterval(default)
    server.should_exit = True
    thread.join(10)

    closed_loop(engine, warm, args.output_len, c)
    t0 = time.perf_counter()
    offline = {**closed_loop(engine, prompts, args.output_len, c)}
    offline_steps = timeline(engine, t0)
    offline.update(ramps(offline_steps))
    host.shutdown()
    for label, fig in (*((k, v[0]) for k, v in runs.items()), ("offline", offline)):
        print(f"{label}: {fig['output_tok_s']:8.0f} tok/s  TTFT p50 {fig['ttft_p50_ms']:6.1f} ms  steps "
              f"{fig['steps']} (median {fig['median_step_ms']:.2f} ms, {fig['prompt_steps']} read prompts)  "
              f"long gaps {fig['time_in_long_gaps_ms']:.0f} ms in all"
              + (f"  engine TTFT p50 {fig['engine_ttft_p50_ms']:.1f} / HTTP {fig['http_ttft_p50_ms']:.1f} ms"
                 if fig.get("engine_ttft_p50_ms") is not None else ""))
    for label, (fig, _) in runs.items():
        print(f"{label} / offline: {fig['output_tok_s'] / offline['output_tok_s']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "concurrency": c, "requests": args.requests,
                       "prompt_len": args.prompt_len, "output_len": args.output_len,
                       "runs": {k: v[0] for k, v in runs.items()}, "offline": offline,
                       "steps": {**{k: v[1] for k, v in runs.items()}, "offline": offline_steps}}, f)


if __name__ == "__main__":
    main()
