"""llama.cpp (llama-cpp-python) alone in its own process on the default model's GGUF:
batch-1 greedy decode tok/s at 1 and 2 threads, best of 3, and the time to read a
1,000-token prompt. ``benchmarks/cpu_decode_step.py`` runs llama.cpp in the same process
as Hearth, which on some machines slows llama.cpp's threads (2 threads ran at 23 tok/s
there against 76 alone on 2026-12-02): this is the baseline's fair figure.

    python benchmarks/llamacpp_standalone.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PROMPT = b"Write a short story about a lighthouse keeper who finds a message in a bottle."


def decode_runs(llm, prompt: bytes, tokens: int, reps: int = 3) -> list[float]:
    """Greedy decode tok/s of ``llm`` (a ``llama_cpp.Llama``) after ``prompt``, ``reps``
    times from a fresh context (the prompt's reading not timed)."""
    runs = []
    for _ in range(reps):
        llm.reset()
        llm.eval(llm.tokenize(prompt))
        t = time.perf_counter()
        for _ in range(tokens):
            llm.eval([llm.sample(temp=0.0)])
        runs.append(tokens / (time.perf_counter() - t))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    import llama_cpp

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.cpu_quant_gemv import _cpu_description
    from engine.bench.llamacpp_baseline import gguf_file

    path = str(gguf_file(None))
    result = {"what": "llama.cpp alone (own process) on the default model's GGUF, batch-1 greedy decode",
              "llama_cpp_python": llama_cpp.__version__, "cpu": _cpu_description(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_avg_start": os.getloadavg(), "rows": []}
    for threads in (1, 2):
        llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
        runs = decode_runs(llm, PROMPT, args.tokens)
        prompt = (llm.tokenize(PROMPT) * 100)[:1000]
        prefill = []
        for _ in range(2):
            llm.reset()
            t = time.perf_counter()
            llm.eval(prompt)
            prefill.append((time.perf_counter() - t) * 1e3)
        result["rows"].append({"threads": threads, "tokens": args.tokens, "decode_tok_s_best": round(max(runs), 1),
                               "decode_tok_s_runs": [round(r, 1) for r in runs],
                               "prefill_ms_1000_best": round(min(prefill), 1), "load_avg": os.getloadavg()[0]})
        print(result["rows"][-1], flush=True)
        del llm
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
