"""Prototype: the batched int4 weight-stationary matmul written in Gluon (Triton's explicit-layout
dialect, ``triton.experimental.gluon``), to time against ``hearth_kernels/quant_mma.py`` on the GPU.

    PYTHONPATH=. python benchmarks/gluon_int4_mma.py [--rows 16,32,64] [--layers gate_up] [--json F]

Why. The Triton kernel decodes each K step's int4 words in their own layout and reaches the wgmma's
register operand only through shared memory: its sm_90 build stores the decoded [64, 128] bf16 tile,
waits at 9 barriers and reads it back with ldmatrix every step (435 instructions a thread a step at
64 rows; ``python -m tests.kernels.sm90_compile mma-loops``). Triton places layouts itself and can't
be told that a word's eight codes belong to four threads. In Gluon the layouts are ours: each thread
loads (from shared memory, 16 bytes at a time) the words of the two weight rows its wgmma fragment
holds, and takes from each the one byte its fragment needs: the codes of inputs 2t and 2t + 1 of
every 8 (t = lane % 4), decoded straight into the fragment's bf16 pair by inline assembly
(``_PAIR32``: PRMT the byte into place, two LOP3s to float32 ``128 + q``, two FFMAs with the scale
and ``min - 128 scale``, one CVT to the bf16 pair: ``q s + m`` exact in float32, rounded once, as the
Triton kernel's in-register dequantization; ``_PAIR`` does it in bf16x2 arithmetic, the scale and
min rounded to bf16 first). The pairs are joined into the [64, 128] operand by a layout conversion
the compiler checks is free (``assert_trivial``). Codes and x stream through a cp.async ring of
``STAGES`` steps; each step's wgmma runs asynchronously while the next step decodes (its operand
kept alive until the wait that follows the next wgmma). sm_90 build: 345 instructions a thread a
step (289 in bf16x2), 2 barriers, no shared-memory stores.

Scope of the prototype: int4 in groups of a multiple of 128 (one scale and min a row a step), bf16
x of at most 64 rows, N a multiple of 64, no bias, no SwiGLU in the x load, no split K (the narrow
layers get too few programs: timed for information). Not used by the engine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import async_copy, warpgroup_mma, warpgroup_mma_wait

#: one fragment pair in bf16x2 arithmetic: $1 the word, $2 the PRMT selector (byte b of the word
#: to byte 0, byte b of word >> 4 to byte 2), $3 / $4 the row's scale / min as bf16 pairs
_PAIR = gl.constexpr(
    "{ .reg .b32 t, u, c, one; shr.u32 u, $1, 4; prmt.b32 t, $1, u, $2; "
    "lop3.b32 t, t, 0x000F000F, 0x43004300, 0xEA; mov.b32 c, 0xC300C300; mov.b32 one, 0x3F803F80; "
    "fma.rn.bf16x2 t, t, one, c; fma.rn.bf16x2 $0, t, $3, $4; }")
#: exact: $2 moves byte b of the word to byte 2; its nibbles become float32 128 + q (the mantissa
#: step of 128.0 is bit 16), FMA with $3 = scale and $4 = min - 128 scale (float32), one rounding
_PAIR32 = gl.constexpr(
    "{ .reg .b32 t, c0, c1; .reg .f32 f0, f1; prmt.b32 t, $1, $1, $2; "
    "lop3.b32 c0, t, 0x000F0000, 0x43000000, 0xEA; shr.u32 t, t, 4; "
    "lop3.b32 c1, t, 0x000F0000, 0x43000000, 0xEA; "
    "fma.rn.f32 f0, c0, $3, $4; fma.rn.f32 f1, c1, $3, $4; cvt.rn.bf16x2.f32 $0, f1, f0; }")


@gluon.jit
def _gluon_int4_mma_kernel(x_ptr, q_ptr, s_ptr, m_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K_STEPS, stride_xm, stride_qn,
                           stride_sn, stride_ym, GROUP: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                           EXACT: gl.constexpr, SPLIT: gl.constexpr):
    # program (tile, j) takes K steps j * K_STEPS.. of its 64 weight rows; with SPLIT > 1 the
    # partial tiles meet in ws_ptr and the last to arrive (cnt_ptr, left zeroed) sums them in
    # split order and writes y (as quant_mma's _write_tile)
    BLOCK_N: gl.constexpr = 64
    # [64 rows, 16 words, 4 bytes]: lane bits 0-1 the byte (t), 2-4 the row in 8 (g); registers the
    # words and row + 8; warps rows + 16, + 32: wgmma's register fragment, a byte per K pair
    L3: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[0, 1, 0], [0, 2, 0], [0, 4, 0], [0, 8, 0], [8, 0, 0]],
        lane_bases=[[0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[[16, 0, 0], [32, 0, 0]], block_bases=[], shape=[64, 16, 4])
    LW: gl.constexpr = gl.SliceLayout(2, L3)  # the words, each held by the four lanes of its row
    LN: gl.constexpr = gl.SliceLayout(1, LW)
    LB: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(0, L3))
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16])
    DOT_A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    CPW: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [4, 1], [1, 0])  # copies of 16 bytes
    CPX: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    WSL: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    XSL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, 128], gl.bfloat16)
    ws = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, 16], WSL)
    xs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_M, 128], XSL)
    pid = gl.program_id(0)
    rn_c = pid * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, CPW))
    wptr = q_ptr + rn_c[:, None].to(gl.int64) * stride_qn + gl.arange(0, 16, layout=gl.SliceLayout(0, CPW))[None, :]
    rm_c = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, CPX))
    xptr = x_ptr + rm_c[:, None] * stride_xm + gl.arange(0, 128, layout=gl.SliceLayout(0, CPX))[None, :]
    step0 = gl.program_id(1) * K_STEPS
    wptr = wptr + step0 * 16
    xptr = xptr + step0 * 128
    xmask = (rm_c < M)[:, None]
    for s in gl.static_range(STAGES - 1):
        async_copy.async_copy_global_to_shared(ws.index(s), wptr + s * 16)
        async_copy.async_copy_global_to_shared(xs.index(s), xptr + s * 128, mask=xmask)
        async_copy.commit_group()
    byte = gl.arange(0, 4, layout=LB)
    sel = gl.expand_dims(gl.expand_dims(byte + (byte + 4) * 256, 0), 0)
    sel32 = gl.expand_dims(gl.expand_dims(byte * 256, 0), 0)
    rn_s = pid * BLOCK_N + gl.arange(0, BLOCK_N, layout=LN)
    s_rows = s_ptr + rn_s.to(gl.int64) * stride_sn
    m_rows = m_ptr + rn_s.to(gl.int64) * stride_sn
    g_last = (step0 + K_STEPS) * 128 // GROUP - 1
    s_cur = gl.load(s_rows + (step0 * 128) // GROUP)
    m_cur = gl.load(m_rows + (step0 * 128) // GROUP)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=MMA)
    a_prev = gl.zeros([BLOCK_N, 128], gl.bfloat16, layout=DOT_A)
    for i in range(K_STEPS):
        slot = i % STAGES
        async_copy.wait_group(STAGES - 2)
        gl.thread_barrier()  # every thread's copies of step i landed
        w = ws.index(slot).load(LW)
        s_raw = s_cur
        m_raw = m_cur
        # the next step's scale and min, a step ahead (the last step's clamped to its own group)
        g_next = gl.minimum(((step0 + i + 1) * 128) // GROUP, g_last)
        s_cur = gl.load(s_rows + g_next)
        m_cur = gl.load(m_rows + g_next)
        if EXACT:
            sf = s_raw.to(gl.float32)
            off = m_raw.to(gl.float32) - 128.0 * sf
            wb, selb = gl.broadcast(w[:, :, None], sel32)
            wb, s2b = gl.broadcast(wb, sf[:, None, None])
            wb, m2b = gl.broadcast(wb, off[:, None, None])
            pairs = gl.inline_asm_elementwise(_PAIR32, "=r,r,r,f,f", [wb, selb, s2b, m2b], dtype=gl.int32,
                                              is_pure=True, pack=1)
        else:
            sv = s_raw.to(gl.bfloat16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
            mv = m_raw.to(gl.bfloat16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
            wb, selb = gl.broadcast(w[:, :, None], sel)
            wb, s2b = gl.broadcast(wb, (sv | (sv << 16))[:, None, None])
            wb, m2b = gl.broadcast(wb, (mv | (mv << 16))[:, None, None])
            pairs = gl.inline_asm_elementwise(_PAIR, "=r,r,r,r,r", [wb, selb, s2b, m2b], dtype=gl.int32,
                                              is_pure=True, pack=1)
        lo = pairs.to(gl.int16).to(gl.bfloat16, bitcast=True)  # input 8w + 2t
        hi = (pairs >> 16).to(gl.int16).to(gl.bfloat16, bitcast=True)  # input 8w + 2t + 1
        a = gl.convert_layout(gl.reshape(gl.join(lo, hi), [BLOCK_N, 128]), DOT_A, assert_trivial=True)
        acc = warpgroup_mma(a, xs.index(slot).permute((1, 0)), acc, is_async=True)
        # at most this step's wgmma in flight: the last one's operand and ring slot are free
        acc, a_prev = warpgroup_mma_wait(num_outstanding=1, deps=[acc, a_prev])
        a_prev = a
        nxt = i + STAGES - 1
        ok = nxt < K_STEPS
        nslot = nxt % STAGES
        async_copy.async_copy_global_to_shared(ws.index(nslot), wptr + nxt * 16, mask=ok)
        async_copy.async_copy_global_to_shared(xs.index(nslot), xptr + nxt * 128, mask=xmask & ok)
        async_copy.commit_group()
    acc, a_prev = warpgroup_mma_wait(num_outstanding=0, deps=[acc, a_prev])
    async_copy.wait_group(0)
    rn_l = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    rn_o = pid * BLOCK_N + rn_l
    rm_o = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
    y_ptrs = y_ptr + rm_o[None, :] * stride_ym + rn_o[:, None]
    y_mask = (rm_o < M)[None, :] & (rn_o < N)[:, None]
    if SPLIT > 1:
        inner = rn_l[:, None] * BLOCK_M + rm_o[None, :]
        ws_tile = ws_ptr + pid.to(gl.int64) * (SPLIT * BLOCK_N * BLOCK_M)
        gl.store(ws_tile + gl.program_id(1) * (BLOCK_N * BLOCK_M) + inner, acc, cache_modifier=".cg")
        gl.thread_barrier()
        done = gl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT - 1:
            tot = gl.load(ws_tile + inner, cache_modifier=".cg")
            for j in gl.static_range(1, SPLIT):
                tot += gl.load(ws_tile + j * (BLOCK_N * BLOCK_M) + inner, cache_modifier=".cg")
            gl.store(y_ptrs, tot.to(gl.bfloat16), mask=y_mask)
            gl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed", scope="gpu")
    else:
        gl.store(y_ptrs, acc.to(gl.bfloat16), mask=y_mask)


def gluon_int4_mma(x: torch.Tensor, prepared, out: torch.Tensor, stages: int = 4, exact: bool = True,
                   split: int = 1) -> torch.Tensor:
    """``x @ W.T`` for bf16 x [M <= 64, K] and an int4 ``PreparedQuant`` in groups of a multiple of 128;
    ``split`` programs per 64 weight rows along K (a divisor of K / 128)."""
    from hearth_kernels.counters import counters

    n, k, rows = prepared.out_features, prepared.in_features, x.shape[0]
    assert prepared.bits == 4 and prepared.group_size % 128 == 0 and k % 128 == 0 and n % 64 == 0 and rows <= 64
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    q = prepared.qweight.view(torch.int32)
    steps, tiles = k // 128, n // 64
    assert steps % split == 0
    if split > 1:
        ws = torch.empty(tiles * split * 64 * block_m, dtype=torch.float32, device=x.device)
        cnt = counters(x.device, tiles)
    else:
        ws = cnt = prepared.scales
    _gluon_int4_mma_kernel[(tiles, split)](
        x, q, prepared.scales, prepared.mins, out, ws, cnt, rows, n, steps // split, x.stride(0), q.stride(0),
        prepared.scales.stride(0), out.stride(0), GROUP=prepared.group_size, BLOCK_M=block_m, STAGES=stages,
        EXACT=exact, SPLIT=split, num_warps=4)
    return out


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
            tri = quant_mma(x, prep, out=y).double()
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
                                                 "repeatable": repeatable}
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
