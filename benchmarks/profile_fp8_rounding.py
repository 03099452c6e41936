"""Time the fp8 activation rounding (``hearth_kernels/fp8.quantize_rows``) at a decode batch's rows:
one read of each row into registers vs two reads in blocks, 20 launches captured in a CUDA
graph (GPU only).

    PYTHONPATH=. python benchmarks/profile_fp8_rounding.py [--rows 274] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton

from hearth_kernels import fp8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=274)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from profile_gemv import time_graph

    out = []
    for k, swiglu in ((4096, False), (14336, True)):
        x = torch.randn(args.rows, 2 * k if swiglu else k, device="cuda", dtype=torch.bfloat16)
        q = torch.empty(args.rows, k, device="cuda", dtype=torch.float8_e4m3fn)
        s = torch.empty(args.rows, 1, device="cuda", dtype=torch.float32)
        for block, warps in ((4096, 8), (triton.next_power_of_2(k), 8), (triton.next_power_of_2(k), 16),
                             (triton.next_power_of_2(k), 32)):
            def run(_i):
                fp8._quantize_rows_kernel[(args.rows,)](x, q, s, k, x.stride(0), q.stride(0), SWIGLU=swiglu,
                                                        BLOCK=block, num_warps=warps)
            us = time_graph(run, 20)  # in a CUDA graph, as a decode step runs it
            row = {"k": k, "swiglu": swiglu, "block": block, "warps": warps, "us": us,
                   "read_tb_s": x.numel() * 2 / us / 1e6}
            out.append(row)
            print(f"K={k:<6} swiglu={swiglu!s:<5} block={block:<6} warps={warps:<3} {us:7.1f} us "
                  f"({row['read_tb_s']:.2f} TB/s of x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "commit": os.environ.get("HEARTH_COMMIT"),
                       "rows": args.rows, "runs": out}, f, indent=1)


if __name__ == "__main__":
    main()
