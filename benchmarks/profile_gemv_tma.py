"""The TMA-fed fp8 GEMV (``hearth_kernels/gemv.gemv_tma``, ``TmaConfig``) swept over rows per
program x K step x warps x stages, against the fp8 batch-1 candidates the load-time tuner times
besides it (``linear_kernels.fp8_gemv_configs``: the K-loop GEMV and the x-stationary one), per
Llama-8B projection, e4m3 weights with a scale per row, on a Hopper GPU:

    PYTHONPATH=. python benchmarks/profile_gemv_tma.py OUT.json [LAYER ...] [--l2]

LAYERs: qkv, o, gate_up, down (SwiGLU fused), gate_up/4, down/2 (a quarter or half of the
rows: fits an H100's 50 MB L2). Each time is one call in a CUDA graph rotating over weight
copies that don't fit L2 (``profile_gemv.time_graph``); ``--l2`` times one copy back to back,
so the weights stay in L2 and memory outruns the kernels (as an H200's HBM does more than an
H100's): the kernels' own speed. Rows: the tuner's candidates' best three and the TMA grid's
(us, config), and each TMA config's max error against float64 / max|y|."""
import itertools
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_gemv import shapes_of, time_graph  # noqa: E402
from engine.layers.linear_kernels import fp8_gemv_configs  # noqa: E402
from engine.quant.rtn import quantize_fp8  # noqa: E402
from hearth_kernels.fp8 import fp8_gemv_rows  # noqa: E402
from hearth_kernels.gemv import TmaConfig, gemv, gemv_tma, tma_problem  # noqa: E402

T0 = time.time()
out_path = sys.argv[1]
L2 = "--l2" in sys.argv
LAYERS = [a for a in sys.argv[2:] if not a.startswith("--")] or ["gate_up", "down", "qkv", "o"]
torch.manual_seed(0)
shapes = shapes_of("llama-8b")
shapes["down"] = shapes.pop("down+swiglu")
shapes["gate_up/4"] = (shapes["gate_up"][0] // 4, shapes["gate_up"][1], False)
shapes["down/2"] = (shapes["down"][0] // 2, shapes["down"][1], True)
res = {"card": torch.cuda.get_device_name(), "commit": os.environ.get("HEARTH_COMMIT"), "l2_resident": L2,
       "rows": []}
GRID = [TmaConfig(*c) for c in itertools.product((8, 16, 32, 64), (512, 1024), (4, 8), (2, 3, 4, 6, 8))
        if not (c[0] == 64 and c[2] == 4)]
for name in LAYERS:
    n, k, swiglu = shapes[name]
    nbytes = n * k
    copies = 8 if L2 else max(2, math.ceil(400e6 / nbytes))
    q0 = quantize_fp8(0.02 * torch.randn(n, k, device="cuda"))
    qws = [q0] * copies if L2 else [q0] + [quantize_fp8(0.02 * torch.randn(n, k, device="cuda"))
                                            for _ in range(copies - 1)]
    ws, scales = [q.qweight for q in qws], [q.scales for q in qws]
    x = torch.randn(1, 2 * k if swiglu else k, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    xin = x.double()
    if swiglu:
        xin = torch.nn.functional.silu(xin[:, :k]) * xin[:, k:]
    want = xin @ (ws[0].double() * scales[0].double().view(-1, 1)).t()
    base = []
    for cfg in fp8_gemv_configs(n, k):
        if isinstance(cfg, TmaConfig) or len(cfg) not in (3, 4):  # the TMA kind below; the tensor-core kernel
            continue
        run = ((lambda i, c=cfg: fp8_gemv_rows(x, ws[i], scales[i], swiglu=swiglu, out=y, config=c)) if len(cfg) == 4
               else (lambda i, c=cfg: gemv(x, ws[i], swiglu=swiglu, out=y, config=c, scale=scales[i])))
        try:
            base.append((time_graph(run, copies), list(cfg)))
        except Exception as e:  # noqa: BLE001
            print(name, cfg, type(e).__name__, str(e)[:120])
    base.sort()
    tma = []
    for cfg in GRID:
        cfg = cfg._replace(block_k=min(cfg.block_k, 1 << (k - 1).bit_length()))
        if tma_problem(k, 1, cfg) or list(cfg) in [t[1] for t in tma]:
            continue
        try:
            got = gemv_tma(x, ws[0], swiglu=swiglu, config=cfg, scale=scales[0]).double()
            err = ((got - want).abs().max() / want.abs().max()).item()
            us = time_graph(lambda i, c=cfg: gemv_tma(x, ws[i], swiglu=swiglu, out=y, config=c, scale=scales[i]),
                            copies)
        except Exception as e:  # noqa: BLE001
            print(name, cfg, type(e).__name__, str(e)[:160])
            continue
        tma.append((us, list(cfg), err))
    tma.sort()
    listed = [t for t in tma if tuple(t[1]) in {tuple(c) for c in fp8_gemv_configs(n, k) if isinstance(c, TmaConfig)}]
    row = {"layer": name, "n": n, "k": k, "weight_mb": nbytes / 1e6, "candidates_best": base[:3],
           "tma_best": tma[:5], "tma_listed": listed, "tma_all": tma, "tma_max_err": max(t[2] for t in tma)}
    res["rows"].append(row)
    print(f"[{time.time() - T0:4.0f}s] {name}: tuner's others best {base[0][0]:.1f} us {base[0][1]} "
          f"({nbytes / base[0][0] / 1e3:.0f} GB/s) | tma best {tma[0][0]:.1f} {tma[0][1]} "
          f"({nbytes / tma[0][0] / 1e3:.0f} GB/s) | listed tma best "
          f"{listed[0][0] if listed else float('nan'):.1f} | err {row['tma_max_err']:.2g}", flush=True)
    json.dump(res, open(out_path, "w"), indent=1)
    qws = ws = scales = q0 = None
    torch.cuda.empty_cache()
