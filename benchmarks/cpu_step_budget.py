"""What the CPU's step budget (max_num_batched_tokens) costs and buys, on the bundled model.

For each budget: the time to the first token of a long prompt read alone (best of
``--repeats``); how long a Stop (abort) sent mid-prompt takes to end the request; and the
longest wait between two tokens of a request that is decoding while that prompt is read.

    python benchmarks/cpu_step_budget.py --budgets 128,256,512,2048 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import threading
import time

from engine.api import Engine, Request, SamplingParams


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(n)]


def first_token_s(engine: Engine, n: int, seed: int) -> float:
    t = time.perf_counter()
    engine.submit(Request(prompt_token_ids=prompt(n, seed)),
                  SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)).result()
    return time.perf_counter() - t


def stop_latency_s(engine: Engine, n: int, seed: int, after_s: float) -> float:
    """Submit an n-token prompt, abort it ``after_s`` later: seconds until it has ended."""
    handle = engine.submit(Request(prompt_token_ids=prompt(n, seed)),
                           SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    time.sleep(after_s)
    t = time.perf_counter()
    handle.abort()
    for _ in handle:  # ends when the engine has taken the abort
        pass
    return time.perf_counter() - t


def longest_gap_s(engine: Engine, n: int, seed: int) -> float:
    """A request decoding while an n-token prompt is read: its longest wait between tokens."""
    stamps: list[float] = []
    streaming = engine.submit(Request(prompt_token_ids=prompt(16, seed + 1)),
                              SamplingParams(max_tokens=100_000, temperature=0, ignore_eos=True))
    done = threading.Event()

    def read():
        for _ in streaming:
            stamps.append(time.perf_counter())
            if done.is_set():
                break

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(1.0)
    first_token_s(engine, n, seed)
    time.sleep(0.5)
    done.set()
    streaming.abort()
    reader.join()
    return max(b - a for a, b in zip(stamps, stamps[1:]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--budgets", default="128,256,512,2048")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        engine = Engine.load(args.model, device="cpu", max_num_batched_tokens=budget,
                             max_model_len=args.prompt_len + 512, enable_prefix_caching=False)
        try:
            ttft = [round(first_token_s(engine, args.prompt_len, seed), 3) for seed in range(args.repeats)]
            stops = [round(stop_latency_s(engine, args.prompt_len, 10 + i, 0.3 + 0.7 * i), 3) for i in range(3)]
            gap = round(longest_gap_s(engine, args.prompt_len, 20), 3)
        finally:
            engine.shutdown()
        row = {"max_num_batched_tokens": budget, "prompt_tokens": args.prompt_len, "first_token_s": ttft,
               "first_token_best_s": min(ttft), "prompt_tok_per_s": round(args.prompt_len / min(ttft), 1),
               "stop_to_end_s": stops, "other_stream_longest_gap_s": gap}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        with open(args.json, "w") as f:
            json.dump({"what": __doc__.strip().splitlines()[0], "model": args.model, "device": "cpu",
                       "machine": platform.processor() or platform.machine(), "commit": commit,
                       "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
