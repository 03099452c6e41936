"""The dp4a batch-1 GEMV (hearth_kernels/quant_dp4a.py) against the float quantized GEMVs and bf16,
per Llama-8B projection, int4 (group 128) and int8 (per channel), on the GPU.

    PYTHONPATH=. python benchmarks/profile_quant_dp4a.py [--json F] [--layers qkv,o,...]
        [--bits 4,8] [--sweep small|full|wide|split] [--warm-only I/N]

For each projection: bf16 cuBLAS; every config ``quant_gemv_configs`` lists (what the
load-time tuner times), the best of each kind; and a sweep of dp4a configs (rows per
program x rows per step x warps x stages). Every time is one call inside a CUDA graph
rotating over enough weight copies that none stays in L2 (``profile_gemv.time_graph``).
Each dp4a result is checked against ``dp4a_reference`` (float64 of the same integer math:
max relative error) and every kernel against bf16 F.linear on the dequantized weight (max
abs difference, relative to the output's RMS).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_gemv import shapes_of, time_graph  # noqa: E402

T0 = time.time()
KIND_NAMES = ["kloop", "mma", "rows", "swap", "swapw", "dp4a", "dp4a_tma"]  # GemvConfig.kind


def random_prepared(bits: int, n: int, k: int):
    """(the quantized weight, its prepared form) of a random [n, k] weight on the GPU: int4 in
    groups of 128, or int8 per channel."""
    from engine.quant.rtn import quantize_int4, quantize_int8
    from hearth_kernels.quant_gemv import prepare_int4, prepare_int8

    if bits == 4:
        qw = quantize_int4(0.02 * torch.randn(n, k, device="cuda"), 128)
        return qw, prepare_int4(qw.qweight, qw.scales, qw.mins, 128)
    qw = quantize_int8(0.02 * torch.randn(n, k, device="cuda"))
    return qw, prepare_int8(qw.qweight, qw.scales, qw.mins, qw.group_size)


def rotated_copies(prep):
    """(its bytes, how many copies, the copies: ``prep`` first): enough that a graph timing
    one call per copy reads every weight from HBM, none left in L2."""
    nb = sum(t.numel() * t.element_size() for t in (prep.qweight, prep.scales, prep.mins) if t is not None)
    copies = max(2, math.ceil(400e6 / nb))
    return nb, copies, [prep] + [type(prep)(prep.bits, prep.group_size, *(None if t is None else t.clone()
                                                                          for t in prep[2:]))
                                 for _ in range(copies - 1)]


def sweep(k: int, full: str):
    from hearth_kernels.quant_dp4a import dp4a_launch
    from hearth_kernels.quant_gemv import DP4A, GemvConfig

    if full == "wide":
        rows, steps, warps, stages = (2, 4, 8, 16, 32), (2, 4, 128), (1, 2, 4, 8), (1, 2, 3)
    elif full == "full":
        rows, steps, warps, stages = (8, 16, 32, 64, 128), (1, 2, 4, 8), (1, 2, 4, 8, 16), (2, 3, 4)
    elif full == "split":  # K split among programs (for the long rows of down, and the narrow layers)
        rows, steps, warps, stages = (8, 16, 32), (2, 4), (4, 8), (2,)
    else:
        rows, steps, warps, stages = (16, 32, 64), (2, 4), (1, 2, 4, 8), (3,)
    splits = (1, 2, 4, 8) if full == "split" else (1,)
    seen, out = set(), []
    for bn, r, w, st, sp in itertools.product(rows, steps, warps, stages, splits):
        r = min(r, bn)  # 128: all the program's rows in one step
        if full == "wide" and (st > 1) == (r == bn):  # one step: nothing to pipeline; else 2-3 in flight
            continue
        launch = (bn, *dp4a_launch(bn, r, w, k, sp), st)
        if launch in seen:
            continue
        seen.add(launch)
        out.append(GemvConfig(bn, r, launch[3], DP4A, st, launch[4]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--layers", default="qkv,o,gate_up,down+swiglu,lm_head")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--sweep", default="small", choices=("small", "full", "wide", "split"))
    ap.add_argument("--warm-only", default=None, help="I/N: compile the I-th of N shares of the configs, time nothing")
    args = ap.parse_args()
    share = tuple(map(int, args.warm_only.split("/"))) if args.warm_only else None

    from hearth_kernels.activation import silu_and_mul
    from hearth_kernels.quant_dp4a import dp4a_reference
    from hearth_kernels.quant_gemv import DP4A, DP4A_TMA, GemvConfig, quant_gemv, quant_gemv_configs

    torch.manual_seed(0)
    result = {"card": torch.cuda.get_device_name(), "shape": "llama-8b", "rows": []}

    def save():
        result["seconds"] = time.time() - T0
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    for bits in (int(b) for b in args.bits.split(",")):
        shapes = shapes_of("llama-8b")
        shapes["down"] = (shapes["down+swiglu"][0], shapes["down+swiglu"][1], False)  # x given, no SwiGLU
        for name, (n, k, swiglu) in shapes.items():
            if name not in args.layers.split(","):
                continue
            qw, prep = random_prepared(bits, n, k)
            if share is not None:  # compile only
                x = torch.randn(1, 2 * k if swiglu else k, device="cuda", dtype=torch.bfloat16)
                configs = quant_gemv_configs(n, k, bits, prep.group_size)
                configs += [c for c in sweep(k, args.sweep) if c not in configs]
                for cfg in configs[share[0]::share[1]]:
                    try:
                        quant_gemv(x, prep, config=cfg, swiglu=swiglu)
                    except Exception:  # noqa: BLE001 - the timed run reports it
                        pass
                torch.cuda.synchronize()
                continue
            nb, copies, preps = rotated_copies(prep)
            wbf = qw.dequantize(torch.bfloat16)
            bf_copies = max(2, math.ceil(400e6 / (n * k * 2)))
            wbfs = [wbf] + [wbf.clone() for _ in range(bf_copies - 1)]
            x = torch.randn(1, 2 * k if swiglu else k, device="cuda", dtype=torch.bfloat16)
            xin = silu_and_mul(x) if swiglu else x
            ref = F.linear(xin, wbf).float()
            ref_rms = ref.pow(2).mean().sqrt().item()
            exact = dp4a_reference(x, prep, swiglu=swiglu)
            y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
            act = torch.empty(1, k, device="cuda", dtype=torch.bfloat16)
            bf_us = time_graph(lambda i: torch.mm(silu_and_mul(x, out=act) if swiglu else x, wbfs[i].t(), out=y),
                               bf_copies)
            timed = []  # (us, kind, config, err vs bf16 / rms, err vs exact / |exact|max)
            tuner = quant_gemv_configs(n, k, bits, prep.group_size)
            configs = tuner + [c for c in sweep(k, args.sweep) if c not in tuner]
            for cfg in configs:
                try:
                    us = time_graph(lambda i, c=cfg: quant_gemv(x, preps[i], config=c, swiglu=swiglu, out=y), copies)
                    out = quant_gemv(x, prep, config=cfg, swiglu=swiglu).double()
                except Exception as e:  # noqa: BLE001 - reported, skipped
                    print(f"  {name} int{bits} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                err = (out - ref.double()).abs().max().item() / ref_rms
                err_exact = (((out - exact).abs().max() / exact.abs().max()).item() if cfg.kind in (DP4A, DP4A_TMA)
                             else None)
                timed.append((us, KIND_NAMES[cfg.kind], list(cfg), err, err_exact, cfg in tuner))
            timed.sort(key=lambda t: t[0])
            best = {}
            for t in timed:
                best.setdefault(t[1], t[:3])
            best_tuned = next(t for t in timed if t[5])
            best_float = next(t for t in timed if not t[1].startswith("dp4a"))
            row = {"layer": name, "bits": bits, "n": n, "k": k, "weight_mb": nb / 1e6, "bf16_us": bf_us,
                   "best": timed[0][:3], "best_tuner_list": best_tuned[:3], "best_float": best_float[:3],
                   "best_by_kind": best, "dp4a_vs_float": best_float[0] / best["dp4a"][0] if "dp4a" in best else None,
                   "max_err_vs_bf16_over_rms": max(t[3] for t in timed),
                   "max_dp4a_err_vs_exact": max((t[4] for t in timed if t[4] is not None), default=None),
                   "all": [list(t) for t in timed]}
            if args.sweep in ("wide", "split"):  # fixed cost vs bandwidth: the best config on fewer rows
                cfg = GemvConfig(*timed[0][2])
                row["best_at_fewer_rows"] = {}
                for div in (8, 4, 2, 1):
                    m = n // div
                    part = [type(p)(bits, p.group_size, *(None if t is None else t[:m] for t in p[2:]))
                            for p in preps]
                    ym = torch.empty(1, m, device="cuda", dtype=torch.bfloat16)
                    row["best_at_fewer_rows"][m] = time_graph(
                        lambda i, c=cfg: quant_gemv(x, part[i], config=c, swiglu=swiglu, out=ym), copies)
                row["empty_kernel_us"] = time_graph(lambda i: y.zero_(), copies)
                print(f"  fewer rows {row['best_at_fewer_rows']}, empty kernel {row['empty_kernel_us']:.1f} us",
                      flush=True)
            result["rows"].append(row)
            save()
            print(f"[{time.time() - T0:5.0f} s] {name:<12} int{bits} bf16 {bf_us:6.1f} us | best {timed[0][1]} "
                  f"{timed[0][2]} {timed[0][0]:.1f} us (x{bf_us / timed[0][0]:.2f}, {nb / timed[0][0] / 1e3:.0f} GB/s)"
                  f" | float {best_float[0]:.1f} | tuner-list best {best_tuned[1]} {best_tuned[0]:.1f} | dp4a err "
                  f"{row['max_dp4a_err_vs_exact']:.2g} | vs bf16 {row['max_err_vs_bf16_over_rms']:.2g}", flush=True)
            preps = wbfs = wbf = prep = qw = None
            torch.cuda.empty_cache()
    save()


if __name__ == "__main__":
    main()
