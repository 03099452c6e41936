"""Batch-1 decode speed of the default model (SmolLM2-135M, its own Q4_1/Q8_0 weights) on
the CPU, with the whole decode step in one C call (engine/runner/cpu_step.py) and without
it (HEARTH_CPU_DECODE=0: eager torch ops around the C matmuls), on 1 and 2 threads.

Engine rows: greedy generation of --tokens tokens (ignore_eos) from a short prompt, decode
tok/s from the request's own timings (first token excluded), best of --reps. Step rows: the
C step alone (runner.cpu_step, fixed position ~64), and the split of its time: the same
step's matmuls timed alone (each prepared weight through cpu_quant's bound matmul, one
pass over all 30 layers + head: the weight stream) against the rest (norms, RoPE,
attention, SiLU, pool hand-offs). The machine is shared: the load average is recorded, and
the best run is the least disturbed one.

    python benchmarks/cpu_decode_step.py [--reps 5] [--tokens 128] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cpu_quant_gemv import _cpu_description  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _load(switch: str):
    from engine.api import Engine

    os.environ["HEARTH_CPU_DECODE"] = switch
    return Engine.load(None, device="cpu")


def engine_rows(engine, label: str, tokens: int, reps: int) -> list[dict]:
    from engine.api import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        engine.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8))  # warm
        runs = []
        for _ in range(reps):
            c = engine.generate([PROMPT], params)[0]
            runs.append(c.timings.decode_tok_s)
        rows.append({"path": label, "threads": threads, "tokens": tokens, "decode_tok_s_best": round(max(runs), 1),
                     "decode_tok_s_runs": [round(r, 1) for r in runs], "load_avg": os.getloadavg()[0]})
        print(rows[-1], flush=True)
    return rows


def _best(fn, reps: int, inner: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def step_rows(engine, reps: int) -> list[dict]:
    """The C step alone, and its matmuls alone."""
    from kernels.cpu_quant import PreparedWeight

    step = engine.runner.cpu_step
    model = step._model
    bs = model.block_size
    pos = 64
    table = list(range(pos // bs + 1))
    weights = [w for w in model._keep if isinstance(w, PreparedWeight)]
    # the tied embedding/head appears twice (embedding + head): the step streams it once
    unique = list({id(w): w for w in weights}.values())
    rows = []
    for threads in (1, 2):
        t_step = _best(lambda: model.step(123, pos, table, threads=threads), reps, 20)
        calls = []
        for w in unique:
            x = torch.randn(1, w.in_features)
            out = torch.empty(1, w.out_features)
            calls.append(w.bind(x, out, threads=threads))

        def matmuls():
            for c in calls:
                c()

        t_mm = _best(matmuls, reps, 20)
        rows.append({"threads": threads, "position": pos, "step_ms": round(t_step * 1e3, 3),
                     "matmuls_ms": round(t_mm * 1e3, 3), "rest_ms": round((t_step - t_mm) * 1e3, 3),
                     "weight_mb_per_token": round(sum(w.nbytes() for w in unique) / 1e6, 1),
                     "step_tok_s": round(1 / t_step, 1), "load_avg": os.getloadavg()[0]})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = {"what": "default model (SmolLM2-135M Q4_1 GGUF, own weights) batch-1 greedy decode on CPU",
              "cpu": _cpu_description(), "load_avg_start": os.getloadavg(),
              "note": "shared 2-core machine (other agents running): best of reps; 2-thread rows pessimistic"}
    engine = _load("1")
    try:
        result["model_info_cpu_decode"] = engine.model_info.cpu_decode
        result["c_step"] = step_rows(engine, args.reps)
        result["engine_c_step"] = engine_rows(engine, "c-step", args.tokens, args.reps)
    finally:
        engine.shutdown()
    engine = _load("0")
    try:
        result["engine_eager"] = engine_rows(engine, "eager", args.tokens, args.reps)
    finally:
        engine.shutdown()
    result["load_avg_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
