"""Drive the batch-1 dp4a GEMV (hearth_kernels/quant_dp4a.py) for Nsight Compute: where its
cycles stall, per Llama-8B projection, int4 (group 128) and int8 (per channel).

    PYTHONPATH=. ncu --clock-control none --kernel-name regex:_quant_gemv_dp4a \
        --launch-skip 3 --launch-count 1 --section WarpStateStats ... \
        python benchmarks/ncu_quant_dp4a.py --layer gate_up --bits 4 --config 16,2,4,5,2
    PYTHONPATH=. python benchmarks/ncu_quant_dp4a.py --layer qkv --bits 4 \
        --sweep "16,4,4,5,3;12,4,4,5,2" [--json F]

(``benchmarks/gpu_session.sh dp4a-why`` runs both, for the 8B's projections.)

Random codes, scales and mins of the layer's shape (what a quantized checkpoint holds; the
timing doesn't depend on the values); x random bf16. Runs the kernel ``--calls`` times, plain
launches (no CUDA graph: ncu replays one launch), so ``--launch-skip`` passes the warm-up and
compile: that says *why* a kernel takes what it takes (stall reasons, issue slots, bytes in
flight). ``--sweep`` times explicit configs the way profile_quant_dp4a.py does (CUDA graphs,
cold L2), configs outside its sweeps included (rows per program that aren't powers of 2), and
leaves out any whose output the load-time tuner would reject against the dequantized
weight's product in float32 (``gemv_tuning.disagreement``: 5% of its RMS overall, 30% at any
output; the dp4a kernel's rounding of x to 8 bits a block of 32 costs about 1%).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_gemv import shapes_of  # noqa: E402

from hearth_kernels.quant_dp4a import quant_gemv_dp4a  # noqa: E402
from hearth_kernels.quant_gemv import prepare_int4, prepare_int8  # noqa: E402

#: Llama-8B's projections at batch 1: (N, K, SwiGLU on x); down takes its SwiGLU
LAYERS = {("down" if name == "down+swiglu" else name): shape for name, shape in shapes_of("llama-8b").items()}


def make(n: int, k: int, bits: int, group: int, device: str):
    g = k // group
    scales = (torch.rand(n, g, device=device) * 0.01 + 0.001).half()
    if bits == 4:
        q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
        return prepare_int4(q, scales, (-8 * scales.float()).half(), group)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    return prepare_int8(q, scales, None, group)


def weight_mb(prepared) -> float:
    """Megabytes a call streams: codes, scales and mins."""
    return (prepared.qweight.numel() * prepared.qweight.element_size() + prepared.scales.numel() * 2
            + (prepared.mins.numel() * 2 if prepared.mins is not None else 0)) / 1e6


def parse_config(spec: str) -> tuple[list[int], dict]:
    """``block_n,block_k,warps,kind,stages[,split[,qx]]`` -> (the numbers, quant_gemv_dp4a's
    keyword arguments for them)."""
    cfg = [int(v) for v in spec.split(",")]
    block_n, block_k, warps, _kind, stages = cfg[:5]
    return cfg, dict(block_n=block_n, block_k=block_k, warps=warps, stages=stages,
                     split=cfg[5] if len(cfg) > 5 else 1, qx=bool(cfg[6]) if len(cfg) > 6 else False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", default="gate_up", choices=sorted(LAYERS))
    ap.add_argument("--bits", type=int, default=4, choices=(4, 8))
    ap.add_argument("--group", type=int, default=None, help="int4: 128 (default); int8: the row (per channel)")
    ap.add_argument("--config", default="16,2,4,5,2", help="block_n,block_k,warps,kind,stages[,split[,qx]]")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--sweep", default=None,
                    help="time these configs instead ('16,2,4,5,2;24,2,4,5,2;...'): CUDA graph, cold L2, "
                         "with the programs' registers and waves; --json F writes them")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.sweep:
        return sweep(args)
    n, k, swiglu = LAYERS[args.layer]
    group = args.group or (128 if args.bits == 4 else k)
    cfg, kw = parse_config(args.config)
    prepared = make(n, k, args.bits, group, "cuda")
    x = torch.randn(1, 2 * k if swiglu else k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(args.calls):
        quant_gemv_dp4a(x, prepared, out, None, swiglu, **kw)
    torch.cuda.synchronize()
    print(f"{args.layer} int{args.bits} g{group} config {cfg}: {weight_mb(prepared):.1f} MB of weights, "
          f"{args.calls} calls")


def sweep(args) -> None:
    """Time each config of ``--sweep`` for ``--layer``/``--bits`` in a CUDA graph over enough
    weight copies that none stays in L2 (``profile_gemv.time_graph``), each checked against the
    dequantized weight's product; prints us, TB/s of weights, programs and registers a thread."""
    from profile_gemv import time_graph
    from profile_quant_gemv import n_copies

    from hearth_kernels.activation import silu_and_mul
    from hearth_kernels.quant_dp4a import _quant_gemv_dp4a_kernel
    from engine.runner.gemv_tuning import disagreement
    from hearth_kernels.quant_gemm import dequantize_weight

    n, k, swiglu = LAYERS[args.layer]
    group = args.group or (128 if args.bits == 4 else k)
    first = make(n, k, args.bits, group, "cuda")
    mb = weight_mb(first)
    copies = n_copies(int(mb * 1e6))  # past the L2 (50-60 MB) several times over
    weights = [first] + [make(n, k, args.bits, group, "cuda") for _ in range(copies - 1)]
    x = torch.randn(1, 2 * k if swiglu else k, device="cuda", dtype=torch.bfloat16)
    outs = [torch.empty(1, n, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    xe = silu_and_mul(x) if swiglu else x
    ref = (xe.float() @ dequantize_weight(first, torch.float32).T)  # [1, N]
    rms = ref.pow(2).mean().sqrt()
    rows = []
    for spec in args.sweep.split(";"):
        cfg, kw = parse_config(spec)

        def call(i, kw=kw):
            quant_gemv_dp4a(x, weights[i], outs[i], None, swiglu, **kw)

        try:
            call(0)
            torch.cuda.synchronize()
            err = ((outs[0].float() - ref).pow(2).mean().sqrt() / rms).item()
            problem = disagreement(outs[0], ref)  # the load-time tuner's check: 5% RMS, 30% any output
            if problem:  # a broken config (or NaN) must not be timed as if it were the same product
                print(f"{spec}: left out: {problem}", flush=True)
                continue
            us = min(time_graph(call, copies) for _ in range(3))
        except Exception as e:  # a config that doesn't build or launch: say so, go on
            print(f"{spec}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        regs = None
        try:  # the last kernel compiled is this config's (Triton's per-device cache, in insertion order)
            for c in _quant_gemv_dp4a_kernel.device_caches.values():
                for kern in c[0].values():
                    regs = getattr(kern, "n_regs", regs)
        except Exception:  # another Triton: no register count
            pass
        programs = -(-n // kw["block_n"]) * kw["split"]
        row = {"config": cfg, "us": us, "tb_s": mb / us, "programs": programs,
               "programs_per_sm": programs / sms, "regs": regs, "rms_rel_err": err}
        rows.append(row)
        print(f"{args.layer} int{args.bits} {spec:>18}: {us:7.2f} us {row['tb_s']:5.2f} TB/s  "
              f"{programs:5d} programs ({programs / sms:4.1f}/SM) regs {regs} err {err:.1e}", flush=True)
        if args.json:
            save(args, group, n, k, mb, rows)


def save(args, group: int, n: int, k: int, mb: float, rows: list) -> None:
    import json

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "layer": args.layer, "bits": args.bits, "group": group,
                       "n": n, "k": k, "weight_mb": mb, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
