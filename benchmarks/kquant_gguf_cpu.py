"""Batch-1 greedy decode on the CPU of a GGUF file in llama.cpp's Q4_K_M mix, Hearth against
llama.cpp (llama-cpp-python) on the same file, each alone in its own process, best of 3.

The file is written here with the gguf writer: a Llama shape whose widths are multiples of
256 (K-quant super-blocks; SmolLM2's 576 are not, so its own Q4_K_M falls back to other
types), random super-blocks, SmolLM2's tokenizer and metadata. Types as llama.cpp's
``Q4_K_M`` chooses them: Q4_K everywhere but ``attn_v`` and ``ffn_down`` in the layers its
``use_more_bits`` picks (the first and last eighth and every third between: Q6_K) and the
output head (Q6_K). Random weights: speed only (the text is noise).

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


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v / ffn_down get Q6_K in Q4_K_M."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def write_q4_k_m(path: Path, hidden: int, layers: int, ffn: int, heads: int, kv_heads: int) -> dict:
    """Write the file; returns its tensor types by count."""
    import gguf
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from engine.loader.resolve import default_gguf_path
    from tests.quant.test_gguf_kquants import random_blocks

    reader = gguf.GGUFReader(str(default_gguf_path()))
    vocab = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[1])
    head_dim = hidden // heads
    meta = {"llama.embedding_length": hidden, "llama.block_count": layers, "llama.feed_forward_length": ffn,
            "llama.attention.head_count": heads, "llama.attention.head_count_kv": kv_heads,
            "llama.rope.dimension_count": head_dim, "llama.context_length": 4096}
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = meta.get(name, field.contents())
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub)
    types: dict[str, int] = {}
    seed = [0]

    def quant(name: str, rows: int, cols: int, kind: str) -> None:
        seed[0] += 1
        writer.add_tensor(name, random_blocks(kind, rows, cols // 256, seed=seed[0]),
                          raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
        types[kind] = types.get(kind, 0) + 1

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(hidden, dtype=np.float32))
        types["F32"] = types.get("F32", 0) + 1

    quant("token_embd.weight", vocab, hidden, "Q4_K")
    norm("output_norm.weight")
    quant("output.weight", vocab, hidden, "Q6_K")
    for i in range(layers):
        more = use_more_bits(i, layers)
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
        quant(f"blk.{i}.attn_q.weight", hidden, hidden, "Q4_K")
        quant(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden, "Q4_K")
        quant(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden, "Q6_K" if more else "Q4_K")
        quant(f"blk.{i}.attn_output.weight", hidden, hidden, "Q4_K")
        quant(f"blk.{i}.ffn_gate.weight", ffn, hidden, "Q4_K")
        quant(f"blk.{i}.ffn_up.weight", ffn, hidden, "Q4_K")
        quant(f"blk.{i}.ffn_down.weight", hidden, ffn, "Q6_K" if more else "Q4_K")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


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

    types = write_q4_k_m(args.file, args.hidden, args.layers, args.ffn, args.heads, args.kv_heads)
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
