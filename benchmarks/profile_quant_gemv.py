"""int8/int4 weight-only linear layers on the GPU: Hearth's Triton GEMV/GEMM vs bf16 (GPU only).

    PYTHONPATH=. python benchmarks/profile_quant_gemv.py [--shape llama-8b] [--json F]
        [--sweep] [--rows 2,16,64,256,1024,2048] [--skip-gemm] [--skip-gemv]
        [--formats int8,int4-g128] [--layers qkv,o,gate_up,down+swiglu,lm_head]

(The plain run compiles ~10 configs per shape and format and should take a few minutes;
``--sweep`` roughly quadruples that: split it with --formats / --layers / --skip-gemm to stay
inside a 10-minute device command.)

Batch 1 (decode): for each projection of the model (qkv, o, gate_up, down with SwiGLU fused,
lm_head) and each format (int8 per-channel, int4 group 128) it times one [1, K] x [K, N]
product inside a CUDA graph, rotating over enough copies of the weight that they cannot stay
in the 60 MB L2 (as in a real step, where every layer has its own weights), against bf16
cuBLAS (torch.mm) and Hearth's bf16 Triton GEMV (kernels/gemv.py, its best config). Reports
microseconds per call, GB/s of weight bytes read (codes + scales + mins) and the speed-up
over the best bf16 time. ``--sweep`` times every config of ``quant_gemv_configs`` (what the
load-time tuner times) and a grid more (and, for rows > 1, other column tiles and depths);
without it, the listed configs only.

Rows > 1 (prefill, batched decode): for M in ``--rows`` it times the fused quantized GEMM
(default config), the dequantize + cuBLAS path and bf16 cuBLAS, per projection, and says
which quantized path is faster (``DEQUANT_ROWS`` in kernels/quant_gemm.py should sit at the
crossover).

Every timed quantized result is checked against bf16 F.linear on the dequantized weight
(max abs difference printed and stored).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch
import torch.nn.functional as F
from _timing import cuda_ms
from profile_gemv import shapes_of, time_graph

FORMATS = {"int8": (8, None), "int4-g128": (4, 128)}


def quantize(bits: int, group: int | None, n: int, k: int):
    """(QuantizedWeight, PreparedQuant) of a random [n, k] weight (std 0.02, like a model's)."""
    from engine.quant.rtn import quantize_int4, quantize_int8
    from kernels.quant_gemv import prepare_int4, prepare_int8

    w = 0.02 * torch.randn(n, k, device="cuda")
    qw = quantize_int4(w, group) if bits == 4 else quantize_int8(w, group)
    del w
    prep = (prepare_int4 if bits == 4 else prepare_int8)(qw.qweight, qw.scales, qw.mins, qw.group_size)
    return qw, prep


def copies_of(prep, copies: int):
    from kernels.quant_gemv import PreparedQuant

    out = [prep]
    for _ in range(copies - 1):
        out.append(PreparedQuant(prep.bits, prep.group_size, prep.qweight.clone(), prep.scales.clone(),
                                 None if prep.mins is None else prep.mins.clone()))
    return out


def nbytes(prep) -> int:
    return sum(t.numel() * t.element_size() for t in (prep.qweight, prep.scales, prep.mins) if t is not None)


def bf16_rows(shape: str, layers: set[str]) -> dict[str, dict]:
    """Best bf16 batch-1 time per layer (us): min of cuBLAS and the Triton GEMV's best config."""
    from kernels.activation import silu_and_mul
    from kernels.gemv import default_config, gemv

    from engine.layers.linear_kernels import gemv_configs

    best = {}
    for name, (n, k, swiglu) in shapes_of(shape).items():
        if layers and name not in layers:
            continue
        nb = n * k * 2
        copies = max(2, math.ceil(400e6 / nb))
        ws = [(0.02 * torch.randn(n, k, device="cuda")).bfloat16() for _ in range(copies)]
        x = torch.randn(1, 2 * k if swiglu else k, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        act = torch.empty(1, k, device="cuda", dtype=torch.bfloat16)

        def cublas(i):
            xin = silu_and_mul(x, out=act) if swiglu else x
            torch.mm(xin, ws[i].t(), out=y)

        times = {"cublas": time_graph(cublas, copies)}
        for cfg in [default_config(n, k)] + gemv_configs(n, k):
            us = time_graph(lambda i: gemv(x, ws[i], swiglu=swiglu, out=y, config=cfg), copies)
            times["triton"] = min(times.get("triton", us), us)
        best[name] = times
        print(f"bf16 {name:<12} N={n:<6} K={k:<6} cublas {times['cublas']:7.1f} us "
              f"({nb / times['cublas'] / 1e3:.0f} GB/s)  triton gemv {times['triton']:7.1f} us "
              f"({nb / times['triton'] / 1e3:.0f} GB/s)")
        ws = None  # free before the next shape
        torch.cuda.empty_cache()
    return best


def gemv_rows(shape: str, sweep: bool, bf16: dict[str, dict], formats: list[str], layers: set[str]) -> list[dict]:
    from kernels.activation import silu_and_mul
    from kernels.quant_gemv import GemvConfig, quant_gemv, quant_gemv_configs

    rows = []
    for fmt in formats:
        bits, group = FORMATS[fmt]
        for name, (n, k, swiglu) in shapes_of(shape).items():
            if layers and name not in layers:
                continue
            qw, prep = quantize(bits, group, n, k)
            nb = nbytes(prep)
            copies = max(2, math.ceil(400e6 / nb))
            preps = copies_of(prep, copies)
            x = torch.randn(1, 2 * k if swiglu else k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
            configs = quant_gemv_configs(n, k, bits)
            if sweep:
                # ~60 more per shape (each compiles once, ~1 s): keep the run inside 10 minutes
                extra = [GemvConfig(bn, 128, w, 1, st) for bn, w, st in
                         itertools.product((32, 64, 128), (4, 8), (3, 4))]
                extra += [GemvConfig(bn, r, 4, 2, st) for bn, r, st in
                          itertools.product((8, 16, 32, 64), (1, 2, 4), (2, 3, 4)) if r <= bn]
                extra += [GemvConfig(bn, bk, 4, 0, st) for bn, bk, st in
                          itertools.product((4, 8, 16, 32), (512, 1024), (2, 3))]
                configs += [c for c in extra if c not in configs]
            timed = []
            for cfg in configs:
                try:
                    us = time_graph(lambda i: quant_gemv(x, preps[i], config=cfg, swiglu=swiglu, out=y), copies)
                except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                    print(f"  {fmt} {name} {tuple(cfg)}: {type(e).__name__}: {str(e)[:120]}")
                    continue
                timed.append((us, cfg))
            timed.sort()
            best_us, best_cfg = timed[0]
            listed = [t for t in timed if t[1] in quant_gemv_configs(n, k, bits)]
            best_kind = [min((t for t in timed if t[1].kind == kind), default=(math.nan, None)) for kind in range(3)]
            xin = silu_and_mul(x) if swiglu else x
            ref = F.linear(xin, qw.dequantize(torch.bfloat16))
            diff = (quant_gemv(x, prep, config=best_cfg, swiglu=swiglu).float() - ref.float()).abs().max().item()
            bf = min(bf16[name].values()) if name in bf16 else math.nan
            row = {"format": fmt, "layer": name, "n": n, "k": k, "weight_mb": nb / 1e6,
                   "best_config": list(best_cfg), "best_us": best_us, "best_gb_s": nb / best_us / 1e3,
                   "best_listed_us": listed[0][0] if listed else math.nan,
                   "best_kloop_us": best_kind[0][0], "best_mma_us": best_kind[1][0], "best_rows_us": best_kind[2][0],
                   "bf16_best_us": bf, "speedup_vs_bf16": bf / best_us, "max_abs_diff_vs_bf16_dequant": diff,
                   "all": [[list(c), us] for us, c in timed]}
            rows.append(row)
            print(f"{fmt:<10} {name:<12} N={n:<6} K={k:<6} best {best_us:7.1f} us ({row['best_gb_s']:.0f} GB/s) "
                  f"{tuple(best_cfg)}  rows {best_kind[2][0]:.1f} kloop {best_kind[0][0]:.1f} mma {best_kind[1][0]:.1f}  "
                  f"listed {row['best_listed_us']:.1f}"
                  f"  bf16 {bf:.1f} -> x{row['speedup_vs_bf16']:.2f}  diff {diff:.2g}")
            preps = prep = qw = None  # free before the next shape
            torch.cuda.empty_cache()
    return rows


def gemm_rows(shape: str, ms: list[int], sweep: bool, formats: list[str], layers: set[str]) -> list[dict]:
    from kernels.quant_gemm import default_gemm_config, quant_gemm

    rows = []
    for fmt in formats:
        bits, group = FORMATS[fmt]
        for name, (n, k, _) in shapes_of(shape).items():
            if name == "lm_head" or (layers and name not in layers):
                continue
            qw, prep = quantize(bits, group, n, k)
            w16 = qw.dequantize(torch.bfloat16)
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
                t = {"bf16": cuda_ms(lambda: torch.mm(x, w16.t(), out=out)),
                     "fused": cuda_ms(lambda: quant_gemm(x, prep, out=out, dequant_rows=1 << 30)),
                     "dequant": cuda_ms(lambda: quant_gemm(x, prep, out=out, dequant_rows=0))}
                cfg = default_gemm_config(m, n, k, bits, prep.group_size)
                fused_cfgs = {cfg: t["fused"]}
                if sweep:  # other column tiles and depths for this M
                    for bn, st in itertools.product((32, 64, 128), (3, 4)):
                        c = (cfg[0], bn, cfg[2], 4, st)
                        if c not in fused_cfgs:
                            fused_cfgs[c] = cuda_ms(lambda: quant_gemm(x, prep, out=out, config=c,
                                                                       dequant_rows=1 << 30))
                best_cfg = min(fused_cfgs, key=fused_cfgs.get)
                ref = F.linear(x, w16).float()
                diff = {p: (quant_gemm(x, prep, dequant_rows=r).float() - ref).abs().max().item()
                        for p, r in (("fused", 1 << 30), ("dequant", 0))}
                row = {"format": fmt, "layer": name, "m": m, "n": n, "k": k,
                       **{f"{p}_us": 1e3 * v for p, v in t.items()},
                       **{f"{p}_tflops": 2 * m * n * k / v / 1e9 for p, v in t.items()},
                       "fused_vs_bf16": t["fused"] / t["bf16"], "dequant_vs_bf16": t["dequant"] / t["bf16"],
                       "fused_config": list(cfg), "fused_best_config": list(best_cfg),
                       "fused_best_us": 1e3 * fused_cfgs[best_cfg],
                       "max_abs_diff": diff}
                rows.append(row)
                print(f"gemm {fmt:<10} {name:<12} M={m:<5} bf16 {1e3 * t['bf16']:8.1f} us  fused "
                      f"{1e3 * t['fused']:8.1f} (x{row['fused_vs_bf16']:.2f})  dequant {1e3 * t['dequant']:8.1f} "
                      f"(x{row['dequant_vs_bf16']:.2f})  best fused {row['fused_best_us']:.1f} {best_cfg}  "
                      f"diff {diff['fused']:.2g}/{diff['dequant']:.2g}")
            w16 = prep = qw = None  # free before the next shape
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-8b")
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--rows", default="2,16,64,256,1024,2048")
    ap.add_argument("--skip-gemv", action="store_true")
    ap.add_argument("--skip-gemm", action="store_true")
    ap.add_argument("--formats", default=",".join(FORMATS), help="of " + ", ".join(FORMATS))
    ap.add_argument("--layers", default="", help="only these (qkv,o,gate_up,down+swiglu,lm_head)")
    args = ap.parse_args()
    formats = args.formats.split(",")
    layers = set(filter(None, args.layers.split(",")))
    result = {"card": torch.cuda.get_device_name(), "shape": args.shape}
    if not args.skip_gemv:
        bf16 = bf16_rows(args.shape, layers)
        result["bf16_batch1_us"] = bf16
        result["gemv_rows"] = gemv_rows(args.shape, args.sweep, bf16, formats, layers)
        q = {}
        for r in result["gemv_rows"]:
            q.setdefault(r["format"], []).append(r)
        for fmt, rs in q.items():  # one decode step's linear layers (32 layers + head)
            per = {r["layer"]: r for r in rs}
            quant = sum(r["best_us"] * (1 if r["layer"] == "lm_head" else 32) for r in rs)
            ref = sum(r["bf16_best_us"] * (1 if r["layer"] == "lm_head" else 32) for r in rs)
            head = per.get("lm_head")
            bf_head = quant - head["best_us"] + head["bf16_best_us"] if head else quant
            print(f"{fmt}: the linear layers of one decode step {quant / 1e3:.2f} ms vs bf16 {ref / 1e3:.2f} ms "
                  f"(x{ref / quant:.2f}); with the head kept bf16 (the default) x{ref / bf_head:.2f}")
    if not args.skip_gemm:
        result["gemm_rows"] = gemm_rows(args.shape, [int(m) for m in args.rows.split(",")], args.sweep, formats, layers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
