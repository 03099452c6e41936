"""Decode attention alone at a throughput-run batch: bandwidth of each kernel config (GPU only).

    PYTHONPATH=. python benchmarks/profile_decode_attention.py [--batch 512] [--kv-dtype fp8] [--json F]

One layer of the 8B shape (32 q heads, 8 kv heads, d 128, bf16), ``--batch`` sequences
with contexts uniform in [128, 1600] (a throughput run mid-way) whose 16-token blocks are
scattered at random over the pool, as after a while of serving. Times Hearth's decode
kernel at its default (block_n, warps, stages) and over a grid of them, and reports TB/s
of K/V read; as a ceiling, torch's sum over the same number of cache bytes. With
``--kv-dtype fp8`` the cache is e4m3 (the dots in fp16). Each config runs with and without
the block numbers loaded a tile ahead (``paged_decode``'s ``TABLE_AHEAD``;
``HEARTH_DECODE_TABLE_AHEAD=0``) and, over an fp8 cache, with and without V read as pairs
(``V_PAIRS``; ``HEARTH_DECODE_V_PAIRS=0``): the rows' ``variant`` names which (``plain``, the
default's, first; ``pairs``, ``ahead``, ``ahead+pairs``); the reference is plain at the
default config. (Before 2026-12-06 an fp8 sweep compared fp16 dots against bf16 ones,
``hearth_kernels._checks.FP8_WIDEN``; fp16 won.) ``--quick`` sweeps fewer configs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
from _timing import cuda_ms


def main() -> None:
    import hearth_kernels.paged_decode as pd

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--kv-dtype", default="bf16", choices=("bf16", "fp8"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="block_n 64/128, 4/8 warps, 2-4 stages only")
    args = ap.parse_args()
    torch.manual_seed(0)
    b, h, kvh, d, bs = args.batch, 32, 8, 128, 16
    lens = torch.randint(128, 1601, (b,))
    blocks = (lens + bs - 1) // bs
    total_blocks = int(blocks.sum())
    perm = torch.randperm(total_blocks).int()
    width = -(-int(blocks.max()) // 16) * 16
    tables = torch.zeros(b, width, dtype=torch.int32)
    at = 0
    for i, n in enumerate(blocks.tolist()):
        tables[i, :n] = perm[at:at + n]
        at += n
    dev = "cuda"
    cache = torch.randn(2, total_blocks, bs, kvh, d, device=dev, dtype=torch.bfloat16)
    if args.kv_dtype == "fp8":
        cache = cache.to(torch.float8_e4m3fn)
    q = torch.randn(b, h, d, device=dev, dtype=torch.bfloat16)
    tables, seq_lens = tables.to(dev), lens.int().to(dev)
    kv_bytes = int(lens.sum()) * 2 * kvh * d * cache.element_size()
    bound = 2064

    def run():
        return pd.paged_decode_attention(q, cache, tables, seq_lens, d ** -0.5, max_seq_len=bound)

    knobs = ("HEARTH_DECODE_TABLE_AHEAD", "HEARTH_DECODE_V_PAIRS")
    saved = {k: os.environ.pop(k) for k in knobs if k in os.environ}  # the sweep sets them itself
    os.environ.update({k: "0" for k in knobs})
    ref = run().float()  # both switches off, the default config
    rows = []
    default = pd._config(d, torch.bfloat16, cache.dtype)
    flat = cache.view(torch.bfloat16).view(-1)[: kv_bytes // 2]
    ceiling_ms = cuda_ms(lambda: flat.sum(dtype=torch.float32))
    print(f"batch {b}, {kv_bytes / 1e9:.1f} GB of K/V; torch sum over as many bytes: "
          f"{ceiling_ms:.2f} ms = {kv_bytes / ceiling_ms / 1e9:.2f} TB/s")
    real_config = pd._config
    space = ((64, 128, 256), (2, 4, 8), (2, 3, 4)) if args.kv_dtype == "fp8" else ((32, 64, 128), (2, 4, 8), (2, 3, 4))
    if args.quick:
        space = ((64, 128), (4, 8), (2, 3, 4))
    grid = [default] + [c for c in itertools.product(*space) if c != default]
    variants = ("plain", "pairs", "ahead", "ahead+pairs") if args.kv_dtype == "fp8" else ("plain", "ahead")
    try:
        _sweep(variants, grid, pd, run, ref, kv_bytes, real_config, rows, cache)
    except KeyboardInterrupt:  # a time limit's SIGINT: report and keep what was timed
        print(f"  interrupted after {len(rows)} configs")
    finally:
        for k in knobs:
            os.environ.pop(k, None)
        os.environ.update(saved)
    if not rows:
        return
    best = min(rows, key=lambda r: r["ms"])
    for r in [rows[0]] + sorted(rows[1:], key=lambda r: r["ms"])[:6]:
        print(f"  {r['variant']} block_n {r['block_n']:>3} warps {r['warps']} stages "
              f"{r['stages']}: {r['ms']:.3f} ms {r['tb_s']:.2f} TB/s  diff {r['max_abs_diff_vs_default']:.1e}"
              f"{'  (default)' if r is rows[0] else ''}{'  (best)' if r is best else ''}")
    for variant in variants:  # each variant's best config
        mine = [r for r in rows if r["variant"] == variant]
        if mine:
            r = min(mine, key=lambda r: r["ms"])
            print(f"  best {variant}: ({r['block_n']}, {r['warps']}, {r['stages']}) {r['ms']:.3f} ms {r['tb_s']:.2f} TB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "batch": b, "kv_dtype": args.kv_dtype,
                       "kv_bytes": kv_bytes,
                       "ceiling_sum_ms": ceiling_ms, "rows": rows}, f, indent=1)


def _sweep(variants, grid, pd, run, ref, kv_bytes, real_config, rows, cache) -> None:
    """Time ``run`` at every variant and config (configs first), appending rows."""
    for cfg, variant in itertools.product(grid, variants):
        pd._config = lambda *_a, cfg=cfg: cfg
        os.environ["HEARTH_DECODE_TABLE_AHEAD"] = "1" if "ahead" in variant else "0"
        os.environ["HEARTH_DECODE_V_PAIRS"] = "1" if "pairs" in variant else "0"
        try:
            ms = cuda_ms(run)
            err = (run().float() - ref).abs().max().item()
            pairs = pd._v_pairs(torch.bfloat16, cache)
        except Exception as e:  # noqa: BLE001 - a config that does not compile or fit is skipped
            print(f"  {variant} {cfg}: {type(e).__name__}")
            continue
        finally:
            pd._config = real_config
        rows.append({"block_n": cfg[0], "warps": cfg[1], "stages": cfg[2], "variant": variant, "v_pairs": pairs,
                     "ms": ms, "tb_s": kv_bytes / ms / 1e9, "max_abs_diff_vs_default": err})
        print(f"    {variant} {cfg}: {ms:.3f} ms {kv_bytes / ms / 1e9:.2f} TB/s", flush=True)


if __name__ == "__main__":
    main()
