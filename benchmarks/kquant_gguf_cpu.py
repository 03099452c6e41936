"""Batch-1 greedy decode on the CPU of a GGUF file in llama.cpp's Q4_K_M mix, Hearth against
llama.cpp (llama-cpp-python) on the same file, each alone in its own process, best of 3.

The file is written by ``benchmarks/kquant_gguf.py``: a Llama shape whose widths are
multiples of 256 (K-quant super-blocks; SmolLM2's 576 are not, so its own Q4_K_M falls back
to other types), random super-blocks, SmolLM2's tokenizer and metadata, the types as
llama.cpp's ``Q4_K_M`` chooses them. Random weights: speed only (the text is noise).

    python benchmarks/kquant_gguf_cpu.py [--hidden 1024 --layers 8 --ffn 2816] [--threads 2]
        [--tokens 64] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def run_hearth(path: str, threads: int, tokens: int) -> dict:
    import engine  # noqa: F401  (sets OpenMP's idle policy before torch loads)
    import torch

    from engine.api import Engine, Request, SamplingParams

    torch.set_num_threads(threads)
    os.environ.setdefault("HEARTH_CPU_THREADS", str(threads))
    eng = Engine.load(path, device="cpu", max_model_len=1024)
    try:
        ids = eng.tokenizer.encode(PROMPT)
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        eng.submit(Request(prompt_token_ids=ids, params=SamplingParams(max_tokens=4, temperature=0.0))).result()
        runs = [eng.submit(Request(prompt_token_ids=ids, params=params)).result().timings.decode_tok_s
                for _ in range(3)]
        info = eng.model_info
        return {"path": "hearth", "threads": threads, "decode_tok_s_best": round(max(runs), 1),
                "decode_tok_s_runs": [round(r, 1) for r in runs], "quant_detail": info.quant_detail,
                "cpu_decode": info.cpu_decode, "weight_bytes": info.weight_bytes, "load_avg": os.getloadavg()[0]}
    finally:
        eng.shutdown()


def run_llamacpp(path: str, threads: int, tokens: int) -> dict:
    import llama_cpp

    sys.path.insert(0, str(ROOT))
    from benchmarks.llamacpp_standalone import decode_runs

    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
    runs = decode_runs(llm, PROMPT.encode(), tokens)
    return {"path": f"llama.cpp {llama_cpp.__version__}", "threads": threads, "decode_tok_s_best": round(max(runs), 1),
            "decode_tok_s_runs": [round(r, 1) for r in runs], "load_avg": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--file", type=Path, default=Path("/tmp/hearth-q4_k_m-bench.gguf"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only", choices=("hearth", "llamacpp"), help=argparse.SUPPRESS)  # the child processes
    args = ap.parse_args()
    if args.only:
        row = (run_hearth if args.only == "hearth" else run_llamacpp)(str(args.file), args.threads, args.tokens)
        print("ROW " + json.dumps(row), flush=True)
        return
    sys.path.insert(0, str(ROOT))
    from benchmarks.cpu_quant_gemv import _cpu_description

    from benchmarks.kquant_gguf import KQuantShape, write_q4_k_m

    types = write_q4_k_m(args.file, KQuantShape(args.hidden, args.layers, args.ffn, args.heads, args.kv_heads))
    result = {"what": "Q4_K_M-mix GGUF (random super-blocks), batch-1 greedy decode on the CPU, each engine "
                      "alone in its own process, best of 3",
              "shape": {"hidden": args.hidden, "layers": args.layers, "ffn": args.ffn, "heads": args.heads,
                        "kv_heads": args.kv_heads}, "file_types": types, "file_bytes": args.file.stat().st_size,
              "cpu": _cpu_description(), "load_avg_start": os.getloadavg(), "tokens": args.tokens, "rows": []}
    for who in ("hearth", "llamacpp"):
        cmd = [sys.executable, __file__, "--only", who, "--file", str(args.file), "--threads", str(args.threads),
               "--tokens", str(args.tokens)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
        line = next((x for x in out.stdout.splitlines() if x.startswith("ROW ")), None)
        if line is None:
            raise SystemExit(f"{who} failed:\n{out.stderr[-3000:]}")
        result["rows"].append(json.loads(line[4:]))
        print(result["rows"][-1], flush=True)
    h, l = (r["decode_tok_s_best"] for r in result["rows"])
    result["hearth_vs_llamacpp"] = round(h / l, 3)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
