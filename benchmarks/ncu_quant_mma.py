"""Drive the weight-stationary int4/int8 kernel (hearth_kernels/quant_mma.py) for Nsight Compute:
where a batched-decode projection's cycles go (stall reasons, shared-memory and tensor-pipe
use, occupancy), per Llama-8B projection and row count.

    PYTHONPATH=. ncu --clock-control none --kernel-name regex:_quant_mma_kernel \
        --launch-skip 3 --launch-count 1 --section WarpStateStats ... \
        python benchmarks/ncu_quant_mma.py --layer gate_up --rows 64 [--config 64,128,4,4,1,1,1]

(``benchmarks/gpu_session.sh mma-why`` runs it for the 8B's projections at 64 rows.)

Random codes, scales and mins of the layer's shape (int4 in groups of 128, or int8 per
channel with ``--bits 8``); x random bf16 (``down`` takes its SwiGLU in the Triton kernel, as the
batch-1 GEMV path runs it; batched decode runs ``silu_and_mul`` first, and ``--gluon`` takes x
after it). Plain launches, no CUDA graph (ncu replays one launch): ``--launch-skip``
passes the compile and warm-up. Without ``--config``, ``default_mma_config``'s choice.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ncu_quant_dp4a import LAYERS, make, weight_mb  # noqa: E402

from hearth_kernels.quant_mma import MmaConfig, default_mma_config, quant_mma  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", default="gate_up", choices=sorted(LAYERS))
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--bits", type=int, default=4, choices=(4, 8))
    ap.add_argument("--config", default=None, help="block_n,block_k,warps,stages,split_k,scale_w,ahead")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--gluon", action="store_true", help="the Gluon kernel (hearth_kernels/quant_mma_gluon.py; "
                    "int4; config: stages,split)")
    args = ap.parse_args()
    n, k, swiglu = LAYERS[args.layer]
    group = 128 if args.bits == 4 else k
    prepared = make(n, k, args.bits, group, "cuda")
    if args.gluon:
        if args.bits != 4:
            ap.error("--gluon runs int4 only")
        from hearth_kernels.quant_mma_gluon import GluonConfig, default_gluon_config, quant_gluon
        cfg = (GluonConfig(*(int(s) for s in args.config.split(","))) if args.config
               else default_gluon_config(args.rows, n, k))
        x = torch.randn(args.rows, k, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(args.rows, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(args.calls):
            quant_gluon(x, prepared, out, config=cfg)
        torch.cuda.synchronize()
        print(f"{args.layer} gluon int4 rows {args.rows} config {list(cfg)}")
        return
    if args.config:
        v = [int(s) for s in args.config.split(",")]
        cfg = MmaConfig(*v[:5], *(bool(b) for b in v[5:]))
    else:
        cfg = default_mma_config(args.rows, n, k, args.bits, group)
    x = torch.randn(args.rows, 2 * k if swiglu else k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(args.rows, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(args.calls):
        quant_mma(x, prepared, config=tuple(cfg), swiglu=swiglu, out=out)
    torch.cuda.synchronize()
    print(f"{args.layer} int{args.bits} g{group} rows {args.rows} config {list(cfg)}: "
          f"{weight_mb(prepared):.1f} MB of weights, {args.calls} calls")


if __name__ == "__main__":
    main()
