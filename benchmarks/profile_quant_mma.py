"""The weight-stationary int4/int8 kernel (hearth_kernels/quant_mma.py) against the other
quantized kernels and bf16, per Llama-8B projection, on the GPU (about 3 minutes on an H200).

    PYTHONPATH=. python benchmarks/profile_quant_mma.py [--json F] [--rows 1,2,8,16,32,64]
        [--layers qkv,o,gate_up,down+swiglu,lm_head] [--bits 4|8] [--group G]

``--bits 8`` quantizes per output channel (``--group 0``, int8's default) or in groups of G.
Kinds: ``swap``/``swapw`` the weight-stationary kernel (``scale_w``), ``+a`` with its scales
loaded a step ahead (``ahead``), ``fused`` ``quant_gemm``'s kernel.

Rows = 1: every config ``quant_gemv_configs`` lists (what the load-time tuner times: the
CUDA-core kernels, the first tensor-core kernel and the weight-stationary SWAP configs),
the best of each kind, against bf16 cuBLAS. Rows > 1: bf16 cuBLAS, ``quant_gemm``'s fused
kernel (default config), and ``quant_mma`` at each of ``mma_configs``. Every time is one
call inside a CUDA graph rotating over enough weight copies that none stays in L2
(``profile_gemv.time_graph``); every kernel's result is checked against bf16 F.linear on
the dequantized weight (max abs difference stored).
"""

from __future__ import annotations

import argparse
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


def clock() -> str:
    return f"[{time.time() - T0:5.0f} s]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--rows", default="1,2,8,16,32,64")
    ap.add_argument("--layers", default="qkv,o,gate_up,down+swiglu,lm_head")
    ap.add_argument("--group", type=int, default=None, help="inputs per scale (int4: 128; int8: 0, per channel)")
    ap.add_argument("--bits", type=int, default=4, choices=(4, 8))
    ap.add_argument("--extra", default="", help="more quant_mma configs to time at rows > 1: "
                    "'BN,BK,WARPS,STAGES,SPLIT,SCALE_W[,AHEAD];...'")
    args = ap.parse_args()

    from engine.quant.rtn import quantize_int4, quantize_int8
    from hearth_kernels.activation import silu_and_mul
    from hearth_kernels.quant_gemm import quant_gemm
    from hearth_kernels.quant_gemv import prepare_int4, prepare_int8, quant_gemv, quant_gemv_configs
    from hearth_kernels.quant_mma import MmaConfig, default_mma_config, mma_configs, quant_mma

    torch.manual_seed(0)
    bits = args.bits
    group_arg = args.group if args.group is not None else (128 if bits == 4 else 0)
    result = {"card": torch.cuda.get_device_name(), "shape": "llama-8b", "bits": bits, "group": group_arg,
              "env": {k: v for k, v in os.environ.items() if k.startswith("HEARTH_")}, "rows": []}
    layers = args.layers.split(",")
    row_counts = [int(r) for r in args.rows.split(",")]

    def save():
        result["seconds"] = time.time() - T0
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    for name, (n, k, swiglu) in shapes_of("llama-8b").items():
        if name not in layers:
            continue
        group = group_arg or k
        w = 0.02 * torch.randn(n, k, device="cuda")
        qw = quantize_int4(w, group) if bits == 4 else quantize_int8(w, group)
        prep = (prepare_int4 if bits == 4 else prepare_int8)(qw.qweight, qw.scales, qw.mins, qw.group_size)
        parts = [t for t in (prep.qweight, prep.scales, prep.mins) if t is not None]
        nb = sum(t.numel() * t.element_size() for t in parts)
        copies = max(2, math.ceil(400e6 / nb))
        preps = [prep] + [type(prep)(bits, prep.group_size, prep.qweight.clone(), prep.scales.clone(),
                                     None if prep.mins is None else prep.mins.clone()) for _ in range(copies - 1)]
        wbf = qw.dequantize(torch.bfloat16)
        bf_copies = max(2, math.ceil(400e6 / (n * k * 2)))
        wbfs = [wbf] + [wbf.clone() for _ in range(bf_copies - 1)]
        for m in row_counts:
            x = torch.randn(m, 2 * k if swiglu else k, device="cuda", dtype=torch.bfloat16)
            xin = silu_and_mul(x) if swiglu else x
            ref = F.linear(xin, wbf).float()
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            act = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)

            def bf16(i):
                torch.mm(silu_and_mul(x, out=act) if swiglu else x, wbfs[i].t(), out=y)

            bf_us = time_graph(bf16, bf_copies)
            timed = []  # (us, label, config, max abs diff)

            def add(label, cfg, fn):
                try:
                    us = time_graph(lambda i: fn(preps[i]), copies)
                    diff = (fn(prep).float() - ref).abs().max().item()
                except Exception as e:  # noqa: BLE001 - reported, skipped
                    print(f"  {name} m={m} {label} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    return
                timed.append((us, label, list(cfg) if cfg is not None else None, diff))

            if m == 1:
                for cfg in quant_gemv_configs(n, k, bits, group):
                    add(["kloop", "mma", "rows", "swap", "swapw"][cfg.kind], cfg,
                        lambda p, c=cfg: quant_gemv(x, p, config=c, swiglu=swiglu, out=y))
            else:
                add("fused", None, lambda p: quant_gemm(xin, p, out=y, swap_rows=0, dequant_rows=1 << 30))
                if m > 64:  # where the dequantize path is the rival too
                    add("dequant", None, lambda p: quant_gemm(xin, p, out=y, dequant_rows=0))
                extra = [MmaConfig(*(int(v) for v in c.split(","))) for c in args.extra.split(";") if c]
                extra = [c._replace(scale_w=bool(c.scale_w), ahead=bool(c.ahead)) for c in extra]
                for cfg in mma_configs(m, n, k, bits, group) + extra:
                    add(("swapw" if cfg.scale_w else "swap") + ("+a" if cfg.ahead else ""), cfg,
                        lambda p, c=cfg: quant_mma(xin, p, config=c, out=y))
            timed.sort(key=lambda t: t[0])
            best_by_kind = {}
            for us, label, cfg, diff in timed:
                best_by_kind.setdefault(label, (us, cfg))
            default = list(default_mma_config(m, n, k, bits, group))
            default_us = next((us for us, label, cfg, _ in timed if label not in ("fused", "dequant") and cfg == default), None)
            row = {"layer": name, "n": n, "k": k, "m": m, "weight_mb": nb / 1e6, "bf16_us": bf_us,
                   "best": timed[0][:3] if timed else None, "best_by_kind": best_by_kind,
                   "swap_default": default, "swap_default_us": default_us,
                   "max_abs_diff": max((t[3] for t in timed), default=None),
                   "all": [list(t) for t in timed]}
            result["rows"].append(row)
            save()
            kinds = "  ".join(f"{lab} {us:.1f}" for lab, (us, _) in best_by_kind.items())
            best = timed[0] if timed else (math.nan, "-", None, math.nan)
            print(f"{clock()} {name:<12} m={m:<3} bf16 {bf_us:7.1f} us | best {best[1]} {best[2]} {best[0]:.1f} us "
                  f"(x{bf_us / best[0]:.2f}, {nb / best[0] / 1e3:.0f} GB/s) | {kinds} | swap default "
                  f"{default_us if default_us is None else round(default_us, 1)} | diff {row['max_abs_diff']:.2g}",
                  flush=True)
        preps = wbfs = wbf = prep = qw = None
        torch.cuda.empty_cache()
    save()


if __name__ == "__main__":
    main()
