"""Batch-1 decode speed of the default model (SmolLM2-135M, its own Q4_1/Q8_0 weights) on
the CPU, with the whole decode step in one C call (engine/runner/cpu_step.py) and without
it (HEARTH_CPU_DECODE=0: eager torch ops around the C matmuls), on 1 and 2 threads.

Engine rows: greedy generation of --tokens tokens (ignore_eos) from a short prompt, decode
tok/s from the request's own timings (first token excluded), best of --reps. Step rows: the
C step alone (runner.cpu_step, position 64, and 16..2000 for attention's share), and the split of its time: the same
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine as _hearth_engine  # noqa: E402,F401  (first: it sets OpenMP's idle policy before torch loads)
import torch  # noqa: E402

from benchmarks.cpu_quant_gemv import _cpu_description  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _load(switch: str):
    from engine.api import Engine

    os.environ["HEARTH_CPU_DECODE"] = switch
    return Engine.load(None, device="cpu")


def engine_row(switch: str, threads: int, tokens: int, reps: int) -> dict:
    """A fresh engine per thread count: torch fixes a thread's count at its first op, so
    the engine's loop thread keeps the count set before the load."""
    from engine.api import SamplingParams

    torch.set_num_threads(threads)
    engine = _load(switch)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        engine.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8))  # warm
        runs = []
        for _ in range(reps):
            c = engine.generate([PROMPT], params)[0]
            runs.append(c.timings.decode_tok_s)
        row = {"path": "c-step" if switch == "1" else "eager", "threads": threads, "tokens": tokens,
               "cpu_decode": engine.model_info.cpu_decode, "decode_tok_s_best": round(max(runs), 1),
               "decode_tok_s_runs": [round(r, 1) for r in runs], "load_avg": os.getloadavg()[0]}
    finally:
        engine.shutdown()
    print(row, flush=True)
    return row


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
    from hearth_kernels.cpu_quant import PreparedWeight

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
        by_pos = {}
        for p in (16, 256, 1000, 2000):  # attention's share grows with the context
            tp = list(range(p // bs + 1))
            by_pos[p] = round(_best(lambda: model.step(123, p, tp, threads=threads), reps, 5) * 1e3, 3)
        rows.append({"threads": threads, "position": pos, "step_ms": round(t_step * 1e3, 3),
                     "step_ms_by_position": by_pos,
                     "matmuls_ms": round(t_mm * 1e3, 3), "rest_ms": round((t_step - t_mm) * 1e3, 3),
                     "weight_mb_per_token": round(sum(w.nbytes() for w in unique) / 1e6, 1),
                     "step_tok_s": round(1 / t_step, 1), "load_avg": os.getloadavg()[0]})
        print(rows[-1], flush=True)
    return rows


def llamacpp_rows(tokens: int, reps: int, ttft_tokens: int) -> list[dict]:
    """llama.cpp (llama-cpp-python) on the same GGUF file, same threads, in the same run."""
    try:
        from engine.bench.llamacpp_baseline import LlamaCppBaseline, gguf_file
        base_cls, path = LlamaCppBaseline, gguf_file(None)
    except Exception as e:  # the optional extra is absent
        return [{"skipped": str(e)}]
    rows = []
    for threads in (1, 2):
        base = base_cls(path, n_ctx=2048, n_threads=threads)
        try:
            prompt = base.llm.tokenize(PROMPT.encode())
            runs = [base.decode(prompt, tokens)[0] for _ in range(reps)]
            long_prompt = (prompt * (ttft_tokens // len(prompt) + 1))[:ttft_tokens]
            ttft = [base.prefill_ms(long_prompt) for _ in range(2)] if ttft_tokens else []
        finally:
            base.close()
        rows.append({"path": "llama.cpp " + base.version, "threads": threads, "tokens": tokens,
                     "decode_tok_s_best": round(max(runs), 1), "decode_tok_s_runs": [round(r, 1) for r in runs],
                     f"prefill_ms_{ttft_tokens}_best": round(min(ttft), 1) if ttft else None,
                     "load_avg": os.getloadavg()[0]})
        print(rows[-1], flush=True)
    return rows


def ttft_row(threads: int, ttft_tokens: int) -> dict:
    """Hearth's time to first token for a ttft_tokens prompt (eager prefill), best of 2."""
    from engine.api import Request, SamplingParams

    torch.set_num_threads(threads)
    engine = _load("1")
    try:
        ids = engine.tokenizer.encode(PROMPT)
        ids = (ids * (ttft_tokens // len(ids) + 1))[:ttft_tokens]
        params = SamplingParams(temperature=0.0, max_tokens=1)
        runs = []
        for r in range(2):  # a different first token each time: no prefix-cache hit
            c = engine.generate([Request(prompt_token_ids=[ids[0] + 1 + r] + ids[1:], params=params)])[0]
            runs.append(c.timings.ttft_ms)
    finally:
        engine.shutdown()
    row = {"path": "hearth (eager prefill)", "threads": threads, f"ttft_ms_{ttft_tokens}_best": round(min(runs), 1),
           "runs": [round(r, 1) for r in runs], "load_avg": os.getloadavg()[0]}
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--ttft-tokens", type=int, default=1000, help="prompt length for TTFT rows (0: none)")
    args = ap.parse_args()
    result = {"what": "default model (SmolLM2-135M Q4_1 GGUF, own weights) batch-1 greedy decode on CPU",
              "cpu": _cpu_description(), "load_avg_start": os.getloadavg(),
              "note": "shared 2-core machine (other agents running): best of reps; 2-thread rows pessimistic",
              # Hearth's torch runs with this OpenMP idle policy (engine/__init__.py); llama.cpp's
              # own OpenMP runtime with the user's (unset: its default)
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "user_omp_wait_policy": _hearth_engine.USER_OMP_WAIT_POLICY}
    engine = _load("1")
    try:
        result["model_info_cpu_decode"] = engine.model_info.cpu_decode
        result["c_step"] = step_rows(engine, args.reps)
    finally:
        engine.shutdown()
    result["engine"] = [engine_row(switch, threads, args.tokens, args.reps)
                        for threads in (1, 2) for switch in ("1", "0")]
    result["llamacpp"] = llamacpp_rows(args.tokens, args.reps, args.ttft_tokens)
    if args.ttft_tokens:
        result["ttft"] = [ttft_row(threads, args.ttft_tokens) for threads in (1, 2)]
    result["load_avg_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
