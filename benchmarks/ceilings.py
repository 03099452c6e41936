"""The card's own ceilings, measured, so every figure can be put against its floor (GPU only).

    PYTHONPATH=. python benchmarks/ceilings.py [--shape llama-8b] [--json F]

1. Memory bandwidth: a large device-to-device copy (bytes read + written over time).
   Batch-1 decode can't beat weight bytes / this rate.
2. Matrix rate: one 8192^3 bf16 product on random data (the usual quoted figure), and the
   rate *sustained* over a whole prefill's GEMMs: the model's four projections (qkv, o,
   gate_up, down) for every layer, each layer with its own weights, at M = 2,048 and 8,192
   rows, back to back as a prefill runs them. Long runs of dense products draw more power
   than a short burst, so the sustained rate is the one a TTFT is bound by.
3. Causal attention: torch SDPA (cuDNN on Hopper) on the model's head layout.

The prefill floor printed at the end is GEMM chain + attention x layers + the least bytes
the elementwise kernels must move (RMSNorm with residual, SiLU-and-mul, RoPE, KV write)
at the copy bandwidth: what a prefill costs with every kernel at its measured ceiling.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from _timing import cuda_ms


def copy_tb_s(gib: float = 4.0) -> float:
    n = int(gib * 2**30) // 2
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = cuda_ms(lambda: b.copy_(a), warmup=3, reps=20)
    return 2 * a.numel() * a.element_size() / (ms * 1e-3) / 1e12


def square_gemm_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = cuda_ms(lambda: a @ b, warmup=3, reps=10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def prefill_gemm_chain(cfg: dict, rows: int) -> dict:
    """ms and TFLOP/s of every layer's four projections at ``rows`` tokens, back to back."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kvh = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // heads
    shapes = [((heads + 2 * kvh) * d, h), (h, heads * d), (2 * i, h), (h, i)]  # (out, in)
    layers = cfg["num_hidden_layers"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = [[torch.randn(o, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
                for o, k in shapes] for _ in range(layers)]
    xs = {k: torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen) for _, k in shapes}

    def chain():
        for ws in weights:
            for w in ws:
                F.linear(xs[w.shape[1]], w)

    ms = cuda_ms(chain, warmup=2, reps=5)
    flops = 2 * rows * layers * sum(o * k for o, k in shapes)
    del weights
    torch.cuda.empty_cache()
    return {"rows": rows, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}


def causal_sdpa(cfg: dict, tokens: int) -> dict:
    heads, kvh = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg["hidden_size"] // heads
    q = torch.randn(1, heads, tokens, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, kvh, tokens, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    ms = cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                 warmup=3, reps=10)
    flops = 4 * heads * d * tokens * tokens / 2  # QK^T and PV, half of them under the mask
    return {"tokens": tokens, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}


def elementwise_floor_ms(cfg: dict, tokens: int, tb_s: float) -> float:
    """Least bytes the non-GEMM kernels of one prefill move, at ``tb_s``."""
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = 2 * cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    q = h
    per_layer = (
        2 * 4 * tokens * h  # two RMSNorms with residual: read x, residual; write both
        + 3 * tokens * i  # SiLU-and-mul: read gate and up, write the product
        + 2 * tokens * (q + kv // 2)  # RoPE on q and k in place: read + write
        + 2 * tokens * kv  # KV write: read k, v; write the cache
    )
    return 2 * layers * per_layer / (tb_s * 1e12) * 1e3  # bf16: 2 bytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-8b")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from engine.shapes import shape_config

    cfg = shape_config(args.shape)
    out = {"card": torch.cuda.get_device_name(), "shape": args.shape, "torch": torch.__version__}
    out["copy_tb_s"] = copy_tb_s()
    out["gemm_8192_tflops"] = square_gemm_tflops()
    out["prefill"] = []
    for tokens in (2048, 8192):
        chain = prefill_gemm_chain(cfg, tokens)
        attn = causal_sdpa(cfg, tokens)
        elem = elementwise_floor_ms(cfg, tokens, out["copy_tb_s"])
        floor = chain["ms"] + cfg["num_hidden_layers"] * attn["ms"] + elem
        out["prefill"].append({"tokens": tokens, "gemm_chain": chain, "sdpa": attn,
                               "elementwise_floor_ms": elem, "floor_ms": floor})
    print(f"{out['card']}: copy {out['copy_tb_s']:.2f} TB/s, 8192^3 bf16 GEMM "
          f"{out['gemm_8192_tflops']:.0f} TFLOP/s")
    for p in out["prefill"]:
        c, a = p["gemm_chain"], p["sdpa"]
        print(f"prefill {p['tokens']:5d} ({args.shape}): GEMMs {c['ms']:.1f} ms ({c['tflops']:.0f} TFLOP/s "
              f"sustained) + attention {cfg['num_hidden_layers']}x{a['ms']:.3f} ms ({a['tflops']:.0f} "
              f"TFLOP/s) + elementwise >= {p['elementwise_floor_ms']:.1f} ms = floor {p['floor_ms']:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
