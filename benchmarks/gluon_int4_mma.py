"""The Gluon int4 kernel (``hearth_kernels/quant_mma_gluon.py``) against ``quant_mma``'s Triton kernel
and bf16 cuBLAS per Llama-8B projection, on an sm_90 GPU.

    PYTHONPATH=. python benchmarks/gluon_int4_mma.py [--rows 16,32,64] [--layers gate_up,...] [--stages 3,4]
        [--splits 1,2,4] [--numerics exact,bf16x2] [--triton-configs 8] [--json F]

Every time is one call inside a CUDA graph over enough weight copies that none stays in L2
(``profile_gemv.time_graph``). Each Gluon config is checked first: its output poisoned with NaN
before each of three calls (a tile left unwritten shows), the three compared bit for bit (a
racing K split shows), against the float64 product of the dequantized weight, and against the
Triton kernel's (``same_as_triton``: the share of bit-identical outputs; 1.0 expected without a
split in exact numerics). ``default_gluon_config``'s choice is marked. The down projection is
timed on x after its SwiGLU (the batched path runs ``silu_and_mul`` first).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from hearth_kernels.quant_mma_gluon import GluonConfig, default_gluon_config, quant_gluon


def gluon_int4_mma(x, prepared, out, stages=4, exact=True, split=1):
    return quant_gluon(x, prepared, out, config=GluonConfig(stages, split), exact=exact)


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from profile_gemv import shapes_of, time_graph

    from engine.quant.rtn import quantize_int4
    from hearth_kernels.quant_gemv import prepare_int4
    from hearth_kernels.quant_mma import default_mma_config, mma_configs, quant_mma

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="16,32,64")
    ap.add_argument("--layers", default="gate_up,qkv,o,down+swiglu")
    ap.add_argument("--stages", default="3,4")
    ap.add_argument("--splits", default="1,2,4", help="K splits timed (those that divide the steps)")
    ap.add_argument("--numerics", default="exact,bf16x2")
    ap.add_argument("--triton-configs", type=int, default=8, help="how many of mma_configs' first configs to time")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.time()
    torch.manual_seed(0)
    result = {"card": torch.cuda.get_device_name(), "shape": "llama-8b", "commit": os.environ.get("HEARTH_COMMIT"),
              "rows": []}
    print(result["card"], flush=True)
    for name, (n, k, _swiglu) in shapes_of("llama-8b").items():
        if name not in args.layers.split(","):
            continue
        w = 0.02 * torch.randn(n, k, device="cuda")
        qw = quantize_int4(w, 128)
        prep = prepare_int4(qw.qweight, qw.scales, qw.mins, 128)
        nb = sum(t.numel() * t.element_size() for t in (prep.qweight, prep.scales, prep.mins))
        copies = max(2, math.ceil(400e6 / nb))
        preps = [prep] + [type(prep)(4, 128, prep.qweight.clone(), prep.scales.clone(), prep.mins.clone())
                          for _ in range(copies - 1)]
        wbf = qw.dequantize(torch.bfloat16)
        bf_copies = max(2, math.ceil(400e6 / (n * k * 2)))
        wbfs = [wbf] + [wbf.clone() for _ in range(bf_copies - 1)]
        wref = qw.dequantize(torch.float32).double()
        for m in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)  # down: x after its SwiGLU
            ref = (x.double() @ wref.T)
            scale = ref.abs().max().item()
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            row = {"layer": name, "n": n, "k": k, "m": m, "weight_mb": nb / 1e6}
            row["bf16_us"] = time_graph(lambda i: torch.mm(x, wbfs[i].t(), out=y), bf_copies)
            tri = quant_mma(x, prep, config=default_mma_config(m, n, k, 4, 128), out=y).double()  # Triton
            row["triton_err"] = ((tri - ref).abs().max() / scale).item()
            cfg = default_mma_config(m, n, k, 4, 128)
            row["triton_default"] = [list(cfg), time_graph(lambda i: quant_mma(x, preps[i], config=cfg, out=y), copies)]
            best = min((time_graph(lambda i, c=c: quant_mma(x, preps[i], config=c, out=y), copies), list(c))
                       for c in mma_configs(m, n, k, 4, 128)[:args.triton_configs])
            row["triton_best"] = [best[1], best[0]]
            row["gluon"] = {}
            for exact in [v == "exact" for v in args.numerics.split(",")]:
                for st in [int(s) for s in args.stages.split(",")]:
                    for sp in [int(s) for s in args.splits.split(",")]:
                        if (k // 128) % sp or (sp > 1 and n // 64 * sp > 1024):
                            continue
                        key = f"{'exact' if exact else 'bf16x2'}-s{st}-k{sp}"
                        try:
                            runs = []
                            for _ in range(3):  # y poisoned first: an output left unwritten is NaN
                                y.fill_(float("nan"))
                                runs.append(gluon_int4_mma(x, prep, y, st, exact, sp).double().clone())
                            got = runs[0]
                            unwritten = int(got.isnan().sum().item())
                            repeatable = all(torch.equal(r, got) for r in runs[1:])
                            err = ((got - ref).abs().nan_to_num(float("inf")).max() / scale).item()
                            same = (got == tri).float().mean().item()
                            if unwritten or not repeatable or err > 0.05:
                                bad = ((got - ref).abs().nan_to_num(float("inf")) > 0.05 * scale).nonzero()
                                print(f"  {name} m={m} {exact=} stages {st} split {sp}: {unwritten} unwritten, "
                                      f"repeatable {repeatable}, err {err:.2e}, {len(bad)} bad, first at "
                                      f"{bad[:4].tolist()}", flush=True)
                            us = time_graph(lambda i, st=st, ex=exact, sp=sp: gluon_int4_mma(x, preps[i], y, st, ex, sp),
                                            copies)
                            row["gluon"][key] = {"us": us, "err": err, "same_as_triton": same, "unwritten": unwritten,
                                                 "repeatable": repeatable,
                                                 "default": exact and GluonConfig(st, sp) == default_gluon_config(m, n, k)}
                        except Exception as e:  # noqa: BLE001 - reported
                            row["gluon"][key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            result["rows"].append(row)
            ok = {kk: v for kk, v in row["gluon"].items() if "us" in v}
            bestg = min(ok, key=lambda kk: ok[kk]["us"]) if ok else None
            g = (f"best {bestg} {ok[bestg]['us']:.1f} (err {ok[bestg]['err']:.1e}, same {ok[bestg]['same_as_triton']:.3f})"
                 if bestg else "") + "".join(f" | {kk} {v['error'][:150]}" for kk, v in row["gluon"].items()
                                             if "error" in v)
            print(f"[{time.time() - t0:4.0f} s] {name:<12} m={m:<3} bf16 {row['bf16_us']:6.1f} | triton default "
                  f"{row['triton_default'][1]:6.1f} best {row['triton_best'][1]:6.1f} (err {row['triton_err']:.1e}) | "
                  f"gluon {g}", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=1)
        preps = wbfs = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
