"""Batch-1 linear layers of a decode step: cuBLAS vs Hearth's Triton GEMV (GPU only).

    PYTHONPATH=. python benchmarks/profile_gemv.py [--shape llama-8b] [--json F] [--sweep]

For each weight shape of the model (qkv, o, gate_up, down with SwiGLU fused, lm_head) it
times one [1, K] x [K, N] product, rotating over enough copies of the weight that they
cannot stay in the 50 MB L2 (as in a real step, where each layer has its own weights),
inside a CUDA graph (no launch gaps), and reports microseconds per call and TB/s of
weight read. ``--sweep`` tries a grid of (BLOCK_N, BLOCK_K, warps) for the Triton kernel.
``--fp8``: e4m3 weights with a scale per row (``--quant fp8``): the row-scaled GEMV against
the activations rounded to e4m3 and ``torch._scaled_mm`` (in the "cublas" column).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os

import torch
import torch.nn.functional as F
from _timing import cuda_ms


def shapes_of(name: str) -> dict[str, tuple[int, int, bool]]:
    from engine.shapes import SHAPES

    c = SHAPES[name]
    h, heads, kvh = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    d = c.get("head_dim", h // heads)
    inter, vocab = c["intermediate_size"], c["vocab_size"]
    return {"qkv": ((heads + 2 * kvh) * d, h, False), "o": (h, heads * d, False),
            "gate_up": (2 * inter, h, False), "down+swiglu": (h, inter, True), "lm_head": (vocab, h, False)}


def time_graph(fn, copies: int, reps: int = 5) -> float:
    """Microseconds per call of fn(i) for i over the copies, captured in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(copies):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return 1e3 * a.elapsed_time(b) / (reps * copies)


def prefill_gemms(shape: str, m: int) -> list[dict]:
    """[m, K] x [K, N] for each projection: F.linear on the [N, K] weight (what the model
    runs) against a matmul on a pre-transposed [K, N] copy (cuBLAS picks other kernels)."""
    dt = torch.bfloat16
    rows = []
    for name, (n, k, _) in shapes_of(shape).items():
        if name == "lm_head":
            continue
        w = (0.02 * torch.randn(n, k, device="cuda")).to(dt)
        wt = w.t().contiguous()
        x = torch.randn(m, k, device="cuda", dtype=dt)
        row = {"layer": name, "m": m, "n": n, "k": k}
        for label, fn in (("linear", lambda: F.linear(x, w)), ("pretransposed", lambda: x @ wt)):
            ms = cuda_ms(fn)
            row[f"{label}_ms"] = ms
            row[f"{label}_tflops"] = 2 * m * n * k / ms / 1e9
        rows.append(row)
        print(f"prefill gemm {name:<12} M={m} N={n} K={k}: linear {row['linear_tflops']:.0f} TFLOP/s, "
              f"pre-transposed {row['pretransposed_tflops']:.0f}")
        del w, wt, x
    return rows


def main() -> None:
    from hearth_kernels.activation import silu_and_mul
    from hearth_kernels.gemv import default_config, gemv

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-8b")
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--fp8", action="store_true", help="e4m3 weights: the fp8 GEMV against _scaled_mm")
    ap.add_argument("--rows", action="store_true",
                    help="with --fp8: sweep the x-stationary kernel (hearth_kernels/fp8.fp8_gemv_rows) instead of the K-loop")
    ap.add_argument("--mma", action="store_true",
                    help="with --fp8: also time the weight-stationary tensor-core kernel (hearth_kernels/fp8.fp8_mma, "
                         "x rounded per token first: its time includes the rounding kernel); with --sweep, a grid of it")
    ap.add_argument("--prefill-m", type=int, default=0, help="only time prefill GEMMs with this many rows")
    args = ap.parse_args()
    if args.prefill_m:
        rows = prefill_gemms(args.shape, args.prefill_m)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"card": torch.cuda.get_device_name(), "shape": args.shape, "prefill_rows": rows}, f,
                          indent=1)
        return
    dt = torch.bfloat16
    rows = []
    for name, (n, k, swiglu) in shapes_of(args.shape).items():
        nbytes = n * k * (1 if args.fp8 else 2)
        copies = max(2, math.ceil(400e6 / nbytes))
        scales = [None] * copies
        if args.fp8:
            from engine.quant.rtn import quantize_fp8
            from hearth_kernels.fp8 import quantize_rows, scaled_mm

            qws = [quantize_fp8(0.02 * torch.randn(n, k, device="cuda")) for _ in range(copies)]
            ws, scales = [q.qweight for q in qws], [q.scales for q in qws]
        else:
            ws = [(0.02 * torch.randn(n, k, device="cuda")).to(dt) for _ in range(copies)]
        x = torch.randn(1, 2 * k if swiglu else k, device="cuda", dtype=dt)
        y = torch.empty(1, n, device="cuda", dtype=dt)
        act = torch.empty(1, k, device="cuda", dtype=dt)

        def cublas(i):
            if args.fp8:  # the activations rounded per token, then the fp8 tensor-core GEMM
                xq, xs = quantize_rows(x, swiglu=swiglu)
                y.copy_(scaled_mm(xq, xs, ws[i], scales[i], dt))
                return
            xin = silu_and_mul(x, out=act) if swiglu else x
            torch.matmul(xin, ws[i].t(), out=y)

        results = {"cublas": time_graph(cublas, copies)}
        configs = [default_config(n, k)]
        if args.rows:  # 4-tuples: (rows per program, rows per step, warps, stages)
            configs += list(itertools.product((16, 32, 64), (2, 4, 8), (8, 16), (3,)))
        elif args.sweep:
            grid = (((2, 4, 8, 16), (512, 1024, 2048), (4, 8)) if args.fp8 else
                    ((1, 2, 4, 8, 16), (256, 512, 1024), (2, 4, 8)))
            configs += list(itertools.product(*grid))
        best = None
        for cfg in configs:
            try:
                if len(cfg) == 4:
                    from hearth_kernels.fp8 import fp8_gemv_rows

                    us = time_graph(lambda i: fp8_gemv_rows(x, ws[i], scales[i], swiglu=swiglu, out=y, config=cfg),
                                    copies)
                else:
                    us = time_graph(lambda i: gemv(x, ws[i], swiglu=swiglu, out=y, config=cfg, scale=scales[i]),
                                    copies)
            except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                print(f"  {name} {cfg}: {type(e).__name__}")
                continue
            if cfg == configs[0]:
                results["triton_default"] = us
            if best is None or us < best[1]:
                best = (cfg, us)
        results["triton_best"] = best[1]
        xin = silu_and_mul(x) if swiglu else x
        w0 = ws[0].float() * scales[0] if args.fp8 else ws[0]
        if len(best[0]) == 4:
            from hearth_kernels.fp8 import fp8_gemv_rows

            got = fp8_gemv_rows(x, ws[0], scales[0], swiglu=swiglu, config=best[0])
        else:
            got = gemv(x, ws[0], swiglu=swiglu, config=best[0], scale=scales[0])
        err = (got.float() - F.linear(xin.float(), w0.float())).abs().max()
        row = {"layer": name, "n": n, "k": k, "weight_mb": nbytes / 1e6, "best_config": list(best[0]),
               "max_abs_diff_vs_cublas": err.item()}
        if args.fp8 and args.mma:
            from hearth_kernels.fp8 import FP8_MMA_CONFIGS, fp8_mma, fp8_mma_fits

            grid = (list(itertools.product((64, 128), (128, 256, 512), (3, 4, 6), (1, 2, 4, 8))) if args.sweep
                    else FP8_MMA_CONFIGS)
            mma = []
            for bn, bk, *rest in grid:
                cfg = (bn, bk, 4 if bn == 64 else 8, *rest) if len(rest) == 2 else (bn, bk, *rest)
                if not fp8_mma_fits(k, cfg):
                    continue
                try:
                    mma.append((time_graph(lambda i, c=cfg: fp8_mma(x, ws[i], scales[i], swiglu=swiglu, out=y,
                                                                     config=c), copies), cfg))
                except Exception as e:  # noqa: BLE001 - a config that does not compile or fit is skipped
                    print(f"  {name} mma {cfg}: {type(e).__name__}: {str(e)[:120]}")
            if mma:
                us, cfg = min(mma)
                results["mma_best"] = us
                row["mma_best_config"] = list(cfg)
                row["mma_all"] = [[u, list(c)] for u, c in sorted(mma)]
                xq, xs = quantize_rows(x, swiglu=swiglu)  # its product is scaled_mm's of the rounded x
                want = scaled_mm(xq, xs, ws[0], scales[0], dt).float()
                row["mma_max_abs_diff_vs_scaled_mm"] = (fp8_mma(x, ws[0], scales[0], swiglu=swiglu, config=cfg)
                                                        .float() - want).abs().max().item()
        for key, us in results.items():
            row[f"{key}_us"] = us
            row[f"{key}_tb_s"] = nbytes / us / 1e6
        rows.append(row)
        print(f"{name:<12} N={n:<6} K={k:<6} cublas {results['cublas']:7.1f} us "
              f"({row['cublas_tb_s']:.2f} TB/s)  triton default {results['triton_default']:7.1f} "
              f"({row['triton_default_tb_s']:.2f})  best {best[1]:7.1f} ({row['triton_best_tb_s']:.2f}) "
              f"{best[0]}  diff {err.item():.2g}"
              + (f"  mma {results['mma_best']:7.1f} ({row['mma_best_tb_s']:.2f}) {row['mma_best_config']}"
                 if "mma_best" in results else ""))
        del ws
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "commit": os.environ.get("HEARTH_COMMIT"),
                       "shape": args.shape, "fp8": args.fp8, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
