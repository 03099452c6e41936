"""The dp4a batch-1 GEMV with x quantized once beforehand (``quantize_x_blocks``) against the
kernel quantizing x in every program, per Llama-8B projection, int4 g128 and int8, H200.

    PYTHONPATH=. python benchmarks/profile_dp4a_qx.py [--json F] [--layers gate_up,...]

Per config: the usual kernel; the kernel reading pre-quantized x (the quantizing kernel
outside the timed graph: what fusing it into the kernel before would give); and the two
kernels back to back. Each result is checked bit for bit against the usual kernel's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_gemv import shapes_of, time_graph  # noqa: E402
from profile_quant_dp4a import random_prepared, rotated_copies  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--layers", default="qkv,o,gate_up,down+swiglu")
    ap.add_argument("--bits", default="4,8")
    args = ap.parse_args()
    from hearth_kernels.quant_dp4a import dp4a_launch, quant_gemv_dp4a, quantize_x_blocks
    from hearth_kernels.quant_gemv import _DP4A_CONFIGS, DP4A, GemvConfig

    t0 = time.time()
    torch.manual_seed(0)
    result = {"card": torch.cuda.get_device_name(), "shape": "llama-8b", "rows": []}
    extra = [GemvConfig(bn, r, 4, DP4A, st) for bn, r, st in itertools.product((4, 8), (2, 4), (2, 3))]
    for bits in (int(b) for b in args.bits.split(",")):
        for name, (n, k, swiglu) in shapes_of("llama-8b").items():
            if name not in args.layers.split(","):
                continue
            _, prep = random_prepared(bits, n, k)
            nb, copies, preps = rotated_copies(prep)
            x = torch.randn(1, 2 * k if swiglu else k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
            qx = quantize_x_blocks(x, bits, swiglu)
            quant_us = time_graph(lambda i: quantize_x_blocks(x, bits, swiglu), copies)
            seen, rows = set(), []
            for cfg in list(_DP4A_CONFIGS) + extra:
                launch = (cfg.block_n, cfg.stages, *dp4a_launch(cfg.block_n, cfg.block_k, cfg.warps, k, cfg.split))
                if launch in seen:
                    continue
                seen.add(launch)
                args_ = (cfg.block_n, cfg.block_k, cfg.warps, cfg.stages, cfg.split)
                try:
                    base = quant_gemv_dp4a(x, prep, torch.empty_like(y), None, swiglu, *args_)
                    got = quant_gemv_dp4a(x, prep, torch.empty_like(y), None, swiglu, *args_, qx=qx)
                    same = bool(torch.equal(base, got))
                    us = time_graph(lambda i: quant_gemv_dp4a(x, preps[i], y, None, swiglu, *args_), copies)
                    us_qx = time_graph(lambda i: quant_gemv_dp4a(x, preps[i], y, None, swiglu, *args_, qx=qx), copies)
                    us_both = time_graph(lambda i: quant_gemv_dp4a(x, preps[i], y, None, swiglu, *args_,
                                                                   qx=quantize_x_blocks(x, bits, swiglu)), copies)
                except Exception as e:  # noqa: BLE001 - reported, skipped
                    print(f"  {name} int{bits} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                rows.append({"config": list(cfg), "us": us, "us_prequantized": us_qx, "us_with_quantize": us_both,
                             "bit_exact": same})
            rows.sort(key=lambda r: r["us"])
            best = rows[0]
            best_qx = min(rows, key=lambda r: r["us_prequantized"])
            best_both = min(rows, key=lambda r: r["us_with_quantize"])
            result["rows"].append({"layer": name, "bits": bits, "n": n, "k": k, "weight_mb": nb / 1e6,
                                   "quantize_us": quant_us, "best": best, "best_prequantized": best_qx,
                                   "best_with_quantize": best_both, "all": rows,
                                   "all_bit_exact": all(r["bit_exact"] for r in rows)})
            print(f"[{time.time() - t0:4.0f} s] {name:<12} int{bits} best {best['config']} {best['us']:.1f} us | "
                  f"pre-quantized {best_qx['config']} {best_qx['us_prequantized']:.1f} | with the quantize kernel "
                  f"{best_both['config']} {best_both['us_with_quantize']:.1f} | quantize alone {quant_us:.1f} | "
                  f"bit-exact {result['rows'][-1]['all_bit_exact']}", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=1)
            preps = prep = None
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
