"""int8/int4 weight-only linear layers on the GPU: Hearth's Triton GEMV/GEMM vs bf16, the new
kernels beside the first cut (GPU only).

    PYTHONPATH=. python benchmarks/profile_quant_gemv.py [--shape llama-8b] [--json F]
        [--rows 2,16,64,256,1024,2048] [--skip-gemm] [--skip-gemv] [--skip-old]
        [--formats int8,int4-g128] [--layers qkv,o,gate_up,down+swiglu,lm_head]

One plain run (all of it) is meant to fit in ~6 minutes on an H200; it prints the seconds
spent as it goes.

Batch 1 (decode): for each projection (qkv, o, gate_up, down with SwiGLU fused, lm_head) and
format (int8 per-channel, int4 group 128) it times one [1, K] x [K, N] product inside a CUDA
graph, rotating over enough copies of the weight that they cannot stay in L2 (as in a real
step), for every config of ``quant_gemv_configs`` (what the load-time tuner times) and for
the first cut's kernels (``benchmarks/quant_old_gemv.py``, GGUF nibble order) at the configs
that won the first H200 profile, against bf16 cuBLAS and Hearth's bf16 Triton GEMV (best
config). Reports us per call, GB/s of weight bytes read, speed-up over the best bf16 time,
and the best config per shape.

Rows > 1 (prefill, batched decode): for M in ``--rows`` it times, also in CUDA graphs with
rotating weight copies: bf16 cuBLAS, the new fused GEMM (default config and a few others,
SCALE_B among them), the new dequantize + cuBLAS path, and the first cut's fused and
dequantize paths; and says which quantized path wins per M (``DEQUANT_ROWS`` in
hearth_kernels/quant_gemm.py belongs at the crossover).

Every timed result of the new kernels is checked against bf16 F.linear on the dequantized
weight (max abs difference printed and stored).
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
from profile_gemv import shapes_of, time_graph

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the first cut's kernels, for comparison

FORMATS = {"int8": (8, None), "int4-g128": (4, 128)}
#: GGUF's narrow groups (Q4_K/Q4_0/Q4_1 as int4 in 32s, Q6_K as int8 in 16s), by --formats only
NARROW_FORMATS = {"int4-g32": (4, 32), "int8-g16": (8, 16)}
#: the first cut's configs that won somewhere in its H200 profile (GemvConfig tuples)
OLD_GEMV_CONFIGS = ((16, 2, 4, 2, 3), (32, 2, 4, 2, 4), (32, 4, 4, 2, 3), (8, 2, 4, 2, 3), (128, 128, 4, 1, 3))
T0 = time.time()
RESULT: dict = {}
JSON_PATH: str | None = None


def save() -> None:
    """Write what has been measured so far (a run cut short still leaves its JSON)."""
    RESULT["seconds"] = time.time() - T0
    if JSON_PATH:
        with open(JSON_PATH, "w") as f:
            json.dump(RESULT, f, indent=1)


def clock() -> str:
    return f"[{time.time() - T0:5.0f} s]"


def quantize(bits: int, group: int | None, n: int, k: int):
    """(QuantizedWeight, new PreparedQuant, old PreparedQuant) of a random [n, k] weight (std 0.02)."""
    from quant_old_gemv import prepare_int4 as old4, prepare_int8 as old8

    from engine.quant.rtn import quantize_int4, quantize_int8
    from hearth_kernels.quant_gemv import prepare_int4, prepare_int8

    w = 0.02 * torch.randn(n, k, device="cuda")
    qw = quantize_int4(w, group) if bits == 4 else quantize_int8(w, group)
    del w
    args = (qw.qweight, qw.scales, qw.mins, qw.group_size)
    new = (prepare_int4 if bits == 4 else prepare_int8)(*args)
    try:
        old = (old4 if bits == 4 else old8)(*args)
    except Exception:  # noqa: BLE001 - a layout the first cut never took (run with --skip-old)
        old = None
    return qw, new, old


def copies_of(prep, copies: int):
    out = [prep]
    for _ in range(copies - 1):
        out.append(type(prep)(prep.bits, prep.group_size, prep.qweight.clone(), prep.scales.clone(),
                              None if prep.mins is None else prep.mins.clone()))
    return out


def nbytes(prep) -> int:
    return sum(t.numel() * t.element_size() for t in (prep.qweight, prep.scales, prep.mins) if t is not None)


def n_copies(nb: int, total: float = 400e6) -> int:
    return max(2, math.ceil(total / nb))


def bf16_rows(shape: str, layers: set[str]) -> dict[str, dict]:
    """Best bf16 batch-1 time per layer (us): cuBLAS and the Triton GEMV's best config."""
    from hearth_kernels.activation import silu_and_mul
    from hearth_kernels.gemv import default_config, gemv

    from engine.layers.linear_kernels import gemv_configs

    best = {}
    for name, (n, k, swiglu) in shapes_of(shape).items():
        if layers and name not in layers:
            continue
        nb = n * k * 2
        copies = n_copies(nb)
        ws = [(0.02 * torch.randn(n, k, device="cuda")).bfloat16() for _ in range(copies)]
        x = torch.randn(1, 2 * k if swiglu else k, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        act = torch.empty(1, k, device="cuda", dtype=torch.bfloat16)

        def cublas(i):
            xin = silu_and_mul(x, out=act) if swiglu else x
            torch.mm(xin, ws[i].t(), out=y)

        times = {"cublas": time_graph(cublas, copies)}
        for cfg in [default_config(n, k)] + gemv_configs(n, k):
            us = time_graph(lambda i: gemv(x, ws[i], swiglu=swiglu, out=y, config=cfg), copies)
            times["triton"] = min(times.get("triton", us), us)
        best[name] = times
        print(f"{clock()} bf16 {name:<12} N={n:<6} K={k:<6} cublas {times['cublas']:7.1f} us "
              f"({nb / times['cublas'] / 1e3:.0f} GB/s)  triton gemv {times['triton']:7.1f} us "
              f"({nb / times['triton'] / 1e3:.0f} GB/s)", flush=True)
        ws = None
        torch.cuda.empty_cache()
    return best


def time_configs(fn, preps, configs, copies, label):
    """[(us, config)] sorted, for fn(prep, config) over the configs (compile errors skipped)."""
    timed = []
    for cfg in configs:
        try:
            us = time_graph(lambda i: fn(preps[i], cfg), copies)
        except Exception as e:  # noqa: BLE001 - a config that does not compile is reported and skipped
            print(f"  {label} {tuple(cfg)}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            continue
        timed.append((us, tuple(cfg)))
    timed.sort()
    return timed


def gemv_rows(shape: str, bf16: dict[str, dict], formats: list[str], layers: set[str], old: bool,
              rows: list[dict]) -> list[dict]:
    import quant_old_gemv

    from hearth_kernels.activation import silu_and_mul
    from hearth_kernels.quant_gemv import default_quant_config, quant_gemv, quant_gemv_configs

    for fmt in formats:
        bits, group = FORMATS[fmt]
        for name, (n, k, swiglu) in shapes_of(shape).items():
            if layers and name not in layers:
                continue
            qw, prep, prep_old = quantize(bits, group, n, k)
            nb = nbytes(prep)
            copies = n_copies(nb)
            preps = copies_of(prep, copies)
            x = torch.randn(1, 2 * k if swiglu else k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
            configs = quant_gemv_configs(n, k, bits)
            new = time_configs(lambda p, c: quant_gemv(x, p, config=c, swiglu=swiglu, out=y), preps, configs,
                               copies, f"new {fmt} {name}")
            preps = None
            old_t = []
            if old:
                preps_old = copies_of(prep_old, copies)
                old_t = time_configs(lambda p, c: quant_old_gemv.quant_gemv(x, p, config=c, swiglu=swiglu, out=y),
                                     preps_old, OLD_GEMV_CONFIGS, copies, f"old {fmt} {name}")
                preps_old = None
            best_us, best_cfg = new[0]
            default_us = dict((c, u) for u, c in new).get(tuple(default_quant_config(n, k, bits)), math.nan)
            xin = silu_and_mul(x) if swiglu else x
            ref = F.linear(xin, qw.dequantize(torch.bfloat16)).float()
            diff = max((quant_gemv(x, prep, config=c, swiglu=swiglu).float() - ref).abs().max().item()
                       for c in configs)
            bf = min(bf16[name].values()) if name in bf16 else math.nan
            old_best = old_t[0][0] if old_t else math.nan
            row = {"format": fmt, "layer": name, "n": n, "k": k, "weight_mb": nb / 1e6,
                   "best_config": list(best_cfg), "best_us": best_us, "best_gb_s": nb / best_us / 1e3,
                   "default_us": default_us, "old_best_us": old_best,
                   "old_best_config": list(old_t[0][1]) if old_t else None,
                   "bf16_best_us": bf, "speedup_vs_bf16": bf / best_us, "old_speedup_vs_bf16": bf / old_best,
                   "max_abs_diff_vs_bf16_dequant": diff,
                   "all": [[list(c), us] for us, c in new], "old_all": [[list(c), us] for us, c in old_t]}
            rows.append(row)
            save()
            top = "  ".join(f"{c}:{u:.1f}" for u, c in new[:3])
            print(f"{clock()} gemv {fmt:<10} {name:<12} N={n:<6} K={k:<6} new {best_us:7.1f} us "
                  f"({row['best_gb_s']:.0f} GB/s, x{row['speedup_vs_bf16']:.2f} bf16)  old {old_best:7.1f} us "
                  f"(x{row['old_speedup_vs_bf16']:.2f})  bf16 {bf:.1f}  diff {diff:.2g}  top3 {top}", flush=True)
            prep = prep_old = qw = None
            torch.cuda.empty_cache()
    return rows


#: fused-GEMM configs timed beside the default, per M bucket:
#: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SCALE_B, SPLIT_K)
def gemm_candidates(m: int, n: int, k: int, bits: int, group: int) -> list[tuple]:
    from hearth_kernels.quant_gemm import default_gemm_config

    d = tuple(default_gemm_config(m, n, k, bits, group))
    bm, split = d[0], d[6]
    if m <= 64:  # without the split; twice the split; narrower column tiles; SCALE_B
        w = 8 if bm == 64 else 4
        extra = [(bm, 128, 128, w, d[4], False, 1), (bm, 128, 128, w, d[4], False, min(8, 2 * split)),
                 (bm, 64, 128, 4, d[4], False, split), (bm, 128, 128, w, d[4], True, split)]
    else:
        extra = [(128, 128, 64, 8, 3, True, 1), (128, 128, 128, 8, 3, True, 1), (128, 256, 64, 8, 3, True, 1),
                 (64, 128, 128, 8, 3, False, 1)]
    out = [d]
    for c in extra:
        if c not in out:
            out.append(c)
    return out


def gemm_rows(shape: str, ms: list[int], formats: list[str], layers: set[str], old: bool,
              rows: list[dict]) -> list[dict]:
    import quant_old_gemm

    from hearth_kernels.quant_gemm import quant_gemm

    for fmt in formats:
        bits, group = {**FORMATS, **NARROW_FORMATS}[fmt]
        for name, (n, k, _) in shapes_of(shape).items():
            # the head only when --layers names it (int8: an int4/int8 model's untied head)
            wanted = name in layers if layers else name != "lm_head"
            if not wanted:
                continue
            qw, prep, prep_old = quantize(bits, group, n, k)
            w16 = qw.dequantize(torch.bfloat16)
            c16 = n_copies(w16.numel() * 2, 300e6)
            w16s = [w16] + [w16.clone() for _ in range(c16 - 1)]
            cq = n_copies(nbytes(prep), 300e6)
            preps = copies_of(prep, cq)
            preps_old = copies_of(prep_old, cq) if old else None
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
                t = {"bf16": time_graph(lambda i: torch.mm(x, w16s[i].t(), out=out), c16)}
                fused = {}
                for cfg in gemm_candidates(m, n, k, bits, prep.group_size):
                    try:
                        fused[cfg] = time_graph(lambda i: quant_gemm(x, preps[i], out=out, config=cfg,
                                                                     dequant_rows=1 << 30), cq)
                    except Exception as e:  # noqa: BLE001
                        print(f"  gemm {fmt} {name} M={m} {cfg}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                default_cfg = next(iter(fused), None)
                t["fused"] = fused.get(default_cfg, math.nan)
                best_cfg = min(fused, key=fused.get) if fused else None
                t["fused_best"] = fused[best_cfg] if fused else math.nan
                t["dequant"] = time_graph(lambda i: quant_gemm(x, preps[i], out=out, dequant_rows=0), cq)
                if old:
                    t["old_fused"] = time_graph(lambda i: quant_old_gemm.quant_gemm(x, preps_old[i], out=out,
                                                                                   dequant_rows=1 << 30), cq)
                    t["old_dequant"] = time_graph(lambda i: quant_old_gemm.quant_gemm(x, preps_old[i], out=out,
                                                                                     dequant_rows=0), cq)
                ref = F.linear(x, w16).float()
                diff = {"fused": (quant_gemm(x, prep, dequant_rows=1 << 30).float() - ref).abs().max().item(),
                        "dequant": (quant_gemm(x, prep, dequant_rows=0).float() - ref).abs().max().item()}
                if best_cfg is not None:
                    diff["fused_best"] = (quant_gemm(x, prep, config=best_cfg, dequant_rows=1 << 30).float()
                                          - ref).abs().max().item()
                quant_best = min(t["fused_best"], t["dequant"])
                row = {"format": fmt, "layer": name, "m": m, "n": n, "k": k,
                       **{f"{p}_us": v for p, v in t.items()},
                       "fused_default_config": list(default_cfg) if default_cfg else None,
                       "fused_best_config": list(best_cfg) if best_cfg else None,
                       "fused_all": [[list(c), u] for c, u in sorted(fused.items(), key=lambda kv: kv[1])],
                       "best_path": "fused" if t["fused_best"] <= t["dequant"] else "dequant",
                       "best_vs_bf16": quant_best / t["bf16"], "max_abs_diff": diff}
                rows.append(row)
                save()
                olds = (f"  old fused {t['old_fused']:7.1f} dequant {t['old_dequant']:7.1f}" if old else "")
                print(f"{clock()} gemm {fmt:<10} {name:<12} M={m:<5} bf16 {t['bf16']:7.1f} us  new fused "
                      f"{t['fused']:7.1f} (best {t['fused_best']:.1f} {best_cfg})  dequant {t['dequant']:7.1f}"
                      f"{olds}  -> best x{row['best_vs_bf16']:.2f} bf16 time ({row['best_path']})", flush=True)
            w16 = w16s = preps = preps_old = prep = prep_old = qw = None
            torch.cuda.empty_cache()
    return rows


def summary(result: dict) -> None:
    print("\n=== summary ===")
    per_fmt = {}
    for r in result.get("gemv_rows", []):
        per_fmt.setdefault(r["format"], []).append(r)
        print(f"batch 1 {r['format']:<10} {r['layer']:<12} new x{r['speedup_vs_bf16']:.2f} bf16 "
              f"({r['best_us']:.1f} us, {r['best_gb_s']:.0f} GB/s, best {tuple(r['best_config'])}, default "
              f"{r['default_us']:.1f} us)  old x{r['old_speedup_vs_bf16']:.2f}")
    for fmt, rs in per_fmt.items():  # one decode step's linear layers (32 layers + head)
        def total(key):
            return sum(r[key] * (1 if r["layer"] == "lm_head" else 32) for r in rs)
        ref, new, old = total("bf16_best_us"), total("best_us"), total("old_best_us")
        head = {r["layer"]: r for r in rs}.get("lm_head")
        new_bf_head = new - head["best_us"] + head["bf16_best_us"] if head else new
        print(f"{fmt}: linear layers of one decode step: new {new / 1e3:.2f} ms, old {old / 1e3:.2f} ms, bf16 "
              f"{ref / 1e3:.2f} ms -> new x{ref / new:.2f} (head kept bf16, the default: x{ref / new_bf_head:.2f}),"
              f" old x{ref / old:.2f}")
    gem = result.get("gemm_rows", [])
    for r in gem:
        print(f"M={r['m']:<5} {r['format']:<10} {r['layer']:<12} best quant {r['best_path']:<8} "
              f"x{r['best_vs_bf16']:.2f} bf16 time (fused {r['fused_best_us']:.1f} "
              f"{tuple(r['fused_best_config'] or ())},"
              f" dequant {r['dequant_us']:.1f}, bf16 {r['bf16_us']:.1f})")
    for fmt in {r["format"] for r in gem}:
        for m in sorted({r["m"] for r in gem}):
            for r in (r for r in gem if r["format"] == fmt and r["m"] == m and r["layer"] == "lm_head"):
                print(f"{fmt} M={m:<5} lm_head (once a step): bf16 {r['bf16_us']:.0f} us, fused default "
                      f"{r['fused_us']:.0f}, fused best {r['fused_best_us']:.0f}, dequant {r['dequant_us']:.0f}")
            rs = [r for r in gem if r["format"] == fmt and r["m"] == m and r["layer"] != "lm_head"]
            if not rs:
                continue
            bf = sum(r["bf16_us"] for r in rs)
            fused, deq = sum(r["fused_best_us"] for r in rs), sum(r["dequant_us"] for r in rs)
            fdef = sum(r["fused_us"] for r in rs)
            names = ", ".join(r["layer"] for r in rs)
            print(f"{fmt} M={m:<5} per layer ({len(rs)} projections: {names}): bf16 {bf:.0f} us, fused default {fdef:.0f} "
                  f"(x{fdef / bf:.2f}), fused best {fused:.0f} (x{fused / bf:.2f}), "
                  f"dequant {deq:.0f} (x{deq / bf:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-8b")
    ap.add_argument("--json", default=None)
    ap.add_argument("--rows", default="2,16,64,256,1024,2048")
    ap.add_argument("--skip-gemv", action="store_true")
    ap.add_argument("--skip-gemm", action="store_true")
    ap.add_argument("--skip-old", action="store_true", help="leave out the first cut's kernels")
    ap.add_argument("--formats", default=",".join(FORMATS), help="of " + ", ".join({**FORMATS, **NARROW_FORMATS}))
    ap.add_argument("--layers", default="", help="only these (qkv,o,gate_up,down+swiglu,lm_head)")
    args = ap.parse_args()
    formats = args.formats.split(",")
    layers = set(filter(None, args.layers.split(",")))
    global JSON_PATH
    JSON_PATH = args.json
    result = RESULT
    result.update({"card": torch.cuda.get_device_name(), "shape": args.shape})
    if not args.skip_gemv:
        bf16 = bf16_rows(args.shape, layers)
        result["bf16_batch1_us"] = bf16
        result["gemv_rows"] = []
        gemv_rows(args.shape, bf16, formats, layers, not args.skip_old, result["gemv_rows"])
    if not args.skip_gemm:
        result["gemm_rows"] = []
        gemm_rows(args.shape, [int(m) for m in args.rows.split(",")], formats, layers, not args.skip_old,
                  result["gemm_rows"])
    save()
    summary(result)


if __name__ == "__main__":
    main()
