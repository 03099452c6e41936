"""Does a batch-1 GEMV run faster when its weight is in L2, and does ``L2Prefetch`` put it
there? Per Llama-8B projection (q/k/v, o) and weight format (int4 g128, int8, bf16), on
the GPU, each time a CUDA graph of 8 calls over 8 weight copies (``profile_gemv.time_graph``):

- cold: each call reads its own copy (none in L2);
- hot: every call reads copy 0 (in L2 after the first);
- spaced: before each call a ~``--spacer-us`` kernel that reads nothing (a spin), as the
  step's norms and attention are, then the call on its own copy;
- prefetched: the same, with the copy's prefetch forked to a side stream before the spin
  (what engine/runner/l2_prefetch.py does).

    PYTHONPATH=. python benchmarks/l2_prefetch_probe.py [--json F] [--spacer-us 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_gemv import time_graph  # noqa: E402

COPIES = 8
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096)}


def spin_cycles(us: float) -> int:
    """Cycles of torch.cuda._sleep that take about ``us`` microseconds (measured)."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(100_000)
    a.record()
    torch.cuda._sleep(1_000_000)
    b.record()
    torch.cuda.synchronize()
    per_us = 1_000_000 / (1e3 * a.elapsed_time(b))
    return int(us * per_us)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--spacer-us", type=float, default=8.0)
    args = ap.parse_args()

    from engine.quant.rtn import quantize_int4, quantize_int8
    from hearth_kernels.gemv import gemv
    from hearth_kernels.l2_prefetch import L2Prefetch, byte_ranges, l2_bytes
    from hearth_kernels.quant_gemv import prepare_int4, prepare_int8, quant_gemv

    torch.manual_seed(0)
    dev = torch.device("cuda")
    cycles = spin_cycles(args.spacer_us)
    side = torch.cuda.Stream()
    out = {"card": torch.cuda.get_device_name(), "l2_bytes": l2_bytes(0), "spacer_us": args.spacer_us, "rows": []}
    for layer, (n, k) in SHAPES.items():
        for fmt in ("int4", "int8", "bf16"):
            weights, tensors = [], []
            for _ in range(COPIES):
                w = (0.02 * torch.randn(n, k, device=dev)).to(torch.bfloat16)
                if fmt == "int4":
                    q = quantize_int4(w, 128)
                    p = prepare_int4(q.qweight, q.scales, q.mins, 128)
                    weights.append(p)
                    tensors.append([p.qweight, p.scales, p.mins])
                elif fmt == "int8":
                    q = quantize_int8(w)
                    p = prepare_int8(q.qweight, q.scales, None, k)
                    weights.append(p)
                    tensors.append([p.qweight, p.scales])
                else:
                    weights.append(w)
                    tensors.append([w])
            x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
            y = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
            pfs = [L2Prefetch(byte_ranges(t), dev) for t in tensors]
            mb = sum(t.numel() * t.element_size() for t in tensors[0]) / 1e6

            def call(i):
                if fmt == "bf16":
                    gemv(x, weights[i], None, out=y)
                else:
                    quant_gemv(x, weights[i], out=y)

            def spaced(i):
                torch.cuda._sleep(cycles)
                call(i)

            def prefetched(i):
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    pfs[i]()
                torch.cuda._sleep(cycles)
                call(i)
                torch.cuda.current_stream().wait_stream(side)

            def prefetched_late_join(i):  # joined only after the last copy
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    pfs[i]()
                torch.cuda._sleep(cycles)
                call(i)
                if i == COPIES - 1:
                    torch.cuda.current_stream().wait_stream(side)

            spin = time_graph(lambda i: torch.cuda._sleep(cycles), COPIES)
            row = {"layer": layer, "format": fmt, "n": n, "k": k, "mb": round(mb, 2),
                   "cold_us": time_graph(call, COPIES), "hot_us": time_graph(lambda i: call(0), COPIES),
                   "spin_us": spin, "spaced_us": time_graph(spaced, COPIES),
                   "prefetched_us": time_graph(prefetched, COPIES),
                   "prefetched_late_join_us": time_graph(prefetched_late_join, COPIES)}
            out["rows"].append(row)
            print(f"{layer:4} {fmt:5} {mb:6.1f} MB  cold {row['cold_us']:6.2f}  hot {row['hot_us']:6.2f}  "
                  f"spin {spin:5.2f}  spin+cold {row['spaced_us']:6.2f}  spin+prefetched {row['prefetched_us']:6.2f}"
                  f"  (late join {row['prefetched_late_join_us']:6.2f}) us", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
