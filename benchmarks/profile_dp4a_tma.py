"""The TMA K-loop int4 dp4a GEMV (``quant_dp4a.quant_gemv_dp4a_tma``) swept over rows per
program x K step x stages x warps, against the x-stationary dp4a configs the load-time tuner
lists, per Llama-8B projection (int4, groups of 128), on a Hopper GPU:

    PYTHONPATH=. python benchmarks/profile_dp4a_tma.py OUT.json [LAYER ...] [--l2] [--int8]

LAYERs: gate_up, down, qkv, o, gate_up/2, gate_up/4, down/2 (a half or a quarter of the rows:
fits an H100's L2). ``--int8``: int8 per channel (K steps of half the inputs). Each
time is one call in a CUDA graph rotating over weight copies that don't fit L2
(``profile_gemv.time_graph``); ``--l2`` times one copy back to back instead, so the weights
stay in L2 and memory outruns the kernels (as an H200's HBM does more than an H100's): the
kernels' own speed (bf16 is timed from HBM either way). TMA rows: (us with x quantized beforehand, us with the quantizing kernel
in the graph, [rows, K step, stages, warps], max error against ``dp4a_reference`` / max|y|).
(The 2026-12-06 H100 JSON came from this script's first form, with the kernel before it had a
bias, masks for K tails and the first tile requested before the PDL wait.)"""
import itertools
import json
import math
import os
import sys
import time
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_gemv import shapes_of, time_graph  # noqa: E402
from profile_quant_dp4a import random_prepared, rotated_copies  # noqa: E402
from hearth_kernels.quant_dp4a import dp4a_reference, quant_gemv_dp4a_tma, quantize_x_blocks  # noqa: E402
from hearth_kernels.quant_gemv import DP4A, quant_gemv, quant_gemv_configs  # noqa: E402


def gemv_tma(x, prep, out, bn, bk, st, wp, qx=None):
    """One TMA GEMV; with ``qx`` (``quantize_x_blocks``' output) x's quantizing kernel is left out."""
    return quant_gemv_dp4a_tma(x, prep, out, None, False, bn, bk, wp, st, qx=qx)

T0 = time.time()
out_path = sys.argv[1]
L2 = "--l2" in sys.argv  # one weight copy, timed back to back: it stays in L2 (SM-side speed)
BITS = 8 if "--int8" in sys.argv else 4
LAYERS = [a for a in sys.argv[2:] if not a.startswith("--")] or ["gate_up", "down", "qkv", "o"]
torch.manual_seed(0)
res = {"card": torch.cuda.get_device_name(), "l2_resident": L2, "bits": BITS, "rows": []}
shapes = shapes_of("llama-8b")
shapes["down"] = (shapes["down+swiglu"][0], shapes["down+swiglu"][1], False)
shapes["gate_up/2"] = (shapes["gate_up"][0] // 2, shapes["gate_up"][1], False)
shapes["gate_up/4"] = (shapes["gate_up"][0] // 4, shapes["gate_up"][1], False)
shapes["down/2"] = (shapes["down"][0] // 2, shapes["down"][1], False)
for name in LAYERS:
    n, k, _ = shapes[name]
    qw, prep = random_prepared(BITS, n, k)
    nb, copies, preps = rotated_copies(prep)
    if L2:
        preps = [prep] * 8; copies = 8
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    exact = dp4a_reference(x, prep)
    y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    wbf = qw.dequantize(torch.bfloat16)
    bfc = max(2, math.ceil(400e6 / (n * k * 2)))
    wbfs = [wbf] + [wbf.clone() for _ in range(bfc - 1)]
    bf_us = time_graph(lambda i: torch.mm(x, wbfs[i].t(), out=y), bfc)
    wbfs = wbf = None
    base = []
    for cfg in quant_gemv_configs(n, k, BITS, prep.group_size):
        if cfg.kind != DP4A:
            continue
        try:
            us = time_graph(lambda i, c=cfg: quant_gemv(x, preps[i], config=c, out=y), copies)
        except Exception as e:  # noqa: BLE001
            print(name, cfg, type(e).__name__, str(e)[:120]); continue
        base.append((us, list(cfg)))
    base.sort()
    qx = quantize_x_blocks(x, BITS)
    tma = []
    for bn, bk, st, wp in itertools.product((16, 32, 64, 128), (512, 1024, 2048), (2, 3, 4, 6, 8), (4, 8)):
        bk = bk * 4 // BITS  # int8: 256-1024 inputs a step (the same bytes)
        if (bn * bk * BITS // 8 * st > 200_000 or (bn == 128 and wp == 4) or (bn <= 32 and wp == 8) or bk > k
                or (bn == 128 and bk * BITS == 8192)):
            continue
        try:
            out = gemv_tma(x, prep, torch.empty(1, n, device="cuda", dtype=torch.float32), bn, bk, st, wp, qx=qx)
            err = ((out.double() - exact).abs().max() / exact.abs().max()).item()
            us = time_graph(lambda i: gemv_tma(x, preps[i], y, bn, bk, st, wp, qx=qx), copies)
            us_q = time_graph(lambda i: gemv_tma(x, preps[i], y, bn, bk, st, wp), copies)
        except Exception as e:  # noqa: BLE001
            print(name, bn, bk, st, wp, type(e).__name__, str(e)[:160]); continue
        tma.append((us, us_q, [bn, bk, st, wp], err))
    tma.sort()
    row = {"layer": name, "n": n, "k": k, "weight_mb": nb / 1e6, "bf16_us": bf_us, "dp4a_best": base[:3],
           "tma_best": tma[:5], "tma_all": tma, "tma_max_err": max(t[3] for t in tma)}
    res["rows"].append(row)
    print(f"[{time.time()-T0:4.0f}s] {name}: bf16 {bf_us:.1f} us | dp4a best {base[0][0]:.1f} {base[0][1]} "
          f"({nb/base[0][0]/1e3:.0f} GB/s) | tma best {tma[0][0]:.1f} (+qx {tma[0][1]:.1f}) {tma[0][2]} "
          f"({nb/tma[0][0]/1e3:.0f} GB/s) err {row['tma_max_err']:.2g}", flush=True)
    json.dump(res, open(out_path, "w"), indent=1)
    preps = prep = qw = None
    torch.cuda.empty_cache()
