"""The batched int4 weight-stationary matmul in Gluon (Triton's explicit-layout dialect,
``triton.experimental.gluon``): ``quant_mma``'s fast path on Hopper (sm_90) for bf16 x of 1 to 64
rows and int4 weights in groups of a multiple of 128.

Why Gluon. ``hearth_kernels/quant_mma.py`` decodes each K step's int4 words in their own layout;
Triton places layouts itself, and the wgmma's register operand holds each word's eight codes in
four threads, so its sm_90 build reaches the operand only through shared memory: it stores the
decoded [64, 128] bf16 tile, waits at 9 barriers and reads the tile back every step (435
instructions a thread a step at 64 rows; ``python -m tests.kernels.sm90_compile mma-loops``). Here
the layouts are written out: each thread loads (from shared memory, 16 bytes at a time) the words
of the two weight rows its fragment holds, and takes from each word the one byte whose two codes
its fragment needs (inputs 8w + 2t and 8w + 2t + 1, t = lane % 4), decoded in place by inline
assembly (``_PAIR32``): a PRMT moves the byte to bits 16-23, two LOP3s make float32 ``128 + q``
(the mantissa step of 128.0 is bit 16), two FFMAs with the scale and ``min - 128 scale``, one CVT
to the bf16 pair: ``q s + m`` exact in float32 and rounded once, the same values as ``quant_mma``'s
in-register dequantization (``scale_w``), so the two agree bit for bit without a K split. The
pairs are joined into the [64, 128] operand by a layout conversion the compiler checks is free
(``assert_trivial``). Codes and x stream through a cp.async ring of ``stages`` steps; each step's
wgmma runs while the next step decodes (its operand kept alive to the wait after the next
wgmma); scales and mins are loaded a step ahead. sm_90 build: 342 instructions a thread a step,
2 barriers, no shared-memory stores.

On an H100 80GB HBM3 (8B shape, cold L2, against ``quant_mma``'s default in the same call,
``benchmarks/results/2026-12-06-i14-gluon-int4-mma-*-h100-*.json``): gate_up 59.7 against 64.9 us
at 64 rows, 43.8 against 49.1 at 16; in bf16x2 arithmetic (``exact=False``, timing only) 53.1
and 36.5. Batch-64 decode of the 8B shape with it on gate_up (that int4 model's head is int8): 10,786 tok/s against
10,572 without (``HEARTH_QUANT_MMA_GLUON=0``) and bf16's 9,355, one machine
(``2026-12-06-i14-bench-8b-bs64-*-h100-6b3adb9.json``); with it on the down projection too (split
along K, since 3ff8824) 10,991 against 10,680 on gate_up alone, bf16 9,340 (``fits``).

Split K as ``quant_mma``: each program of a tile writes its fp32 partial to a workspace, fences
(every thread, GPU scope: see ``fits``) and bumps the tile's counter (``hearth_kernels/counters.py``);
the last to arrive sums them in split order (the same bits every run), adds the bias, writes y
and resets the counter.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

from hearth_kernels._compat import interpreting
from hearth_kernels.counters import counters
from hearth_kernels.split_fence import launch_fence

#: the Triton release whose Gluon API (experimental, changing between releases) this is written
#: and tested against: with another, quant_mma keeps its Triton kernel
GLUON_TRITON = "3.6."

try:
    import triton

    if not triton.__version__.startswith(GLUON_TRITON):
        raise ImportError(f"Gluon kernel written for Triton {GLUON_TRITON}x, this is {triton.__version__}")
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import async_copy, warpgroup_mma, warpgroup_mma_wait
except Exception:  # noqa: BLE001 - any import or version problem means no Gluon path
    gluon = None


class GluonConfig(NamedTuple):
    """``stages`` K steps in flight, ``split`` programs per 64 weight rows along K."""

    stages: int
    split: int


if gluon is not None:
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
    def _fence_gpu():
        """``fence.acq_rel.gpu`` once in each of the program's 128 threads (inline assembly over a
        tensor of one element a thread)."""
        one = gl.full([128], 0, gl.int32, layout=gl.BlockedLayout([1], [32], [4], [0]))
        gl.inline_asm_elementwise("fence.acq_rel.gpu; mov.b32 $0, $1;", "=r,r", [one], dtype=gl.int32,
                                  is_pure=False, pack=1)

    # K_STEPS not specialised: at 1 (a short row or a deep split) the prologue's ``s < K_STEPS``
    # would be a Python bool, which a copy's mask can't take
    @gluon.jit(do_not_specialize=["K_STEPS"])
    def _gluon_int4_mma_kernel(x_ptr, q_ptr, s_ptr, m_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K_STEPS, stride_xm,
                               stride_qn, stride_sn, stride_ym, GROUP: gl.constexpr, BLOCK_M: gl.constexpr,
                               STAGES: gl.constexpr, EXACT: gl.constexpr, SPLIT: gl.constexpr, HAS_BIAS: gl.constexpr,
                               FENCE: gl.constexpr = 0):
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
        for s in gl.static_range(STAGES - 1):  # steps past this program's last are not read
            async_copy.async_copy_global_to_shared(ws.index(s), wptr + s * 16, mask=s < K_STEPS)
            async_copy.async_copy_global_to_shared(xs.index(s), xptr + s * 128, mask=xmask & (s < K_STEPS))
            async_copy.commit_group()
        byte = gl.arange(0, 4, layout=LB)
        sel = gl.expand_dims(gl.expand_dims(byte + (byte + 4) * 256, 0), 0)
        sel32 = gl.expand_dims(gl.expand_dims(byte * 256, 0), 0)
        rn_s = pid * BLOCK_N + gl.arange(0, BLOCK_N, layout=LN)
        s_rows = s_ptr + rn_s.to(gl.int64) * stride_sn
        m_rows = m_ptr + rn_s.to(gl.int64) * stride_sn
        g_last = ((step0 + K_STEPS) * 128 - 1) // GROUP  # this program's last group
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
            # each thread's partial performed at GPU scope before the tile's count goes up (without
            # fences an H100 summed a partial not yet visible: see ``fits``); FENCE: split_fence.fence_mode
            if FENCE & 1:
                _fence_gpu()
            gl.thread_barrier()
            done = gl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel", scope="gpu")
            if done == SPLIT - 1:
                if FENCE & 2:
                    _fence_gpu()
                tot = gl.load(ws_tile + inner, cache_modifier=".cg")
                for j in gl.static_range(1, SPLIT):
                    tot += gl.load(ws_tile + j * (BLOCK_N * BLOCK_M) + inner, cache_modifier=".cg")
                if HAS_BIAS:
                    tot += gl.load(b_ptr + rn_o, mask=rn_o < N, other=0.0).to(gl.float32)[:, None]
                gl.store(y_ptrs, tot.to(gl.bfloat16), mask=y_mask)
                gl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed", scope="gpu")
        else:
            if HAS_BIAS:
                acc += gl.load(b_ptr + rn_o, mask=rn_o < N, other=0.0).to(gl.float32)[:, None]
            gl.store(y_ptrs, acc.to(gl.bfloat16), mask=y_mask)


def default_gluon_config(rows: int, n: int, k: int) -> GluonConfig:
    """Stages and K split from the shape: 3 steps in flight from 33 rows (the x tiles fill
    shared memory: three programs an SM fit), else 4; K split until there are about 256
    programs and it divides the steps (the 8B's gate_up none, q/k/v, o and down 4)."""
    stages = 3 if rows > 32 else 4
    tiles, steps = n // 64, k // 128
    split = 1
    while tiles * split * 2 <= 512 and split < 8 and steps % (2 * split) == 0 and tiles * split < 256:
        split *= 2
    return GluonConfig(stages, split)


def enabled() -> bool:
    """``HEARTH_QUANT_MMA_GLUON=0`` keeps every call on the Triton kernel (the A/B switch)."""
    return os.environ.get("HEARTH_QUANT_MMA_GLUON", "1") != "0"


def split_enabled() -> bool:
    """Down-shaped layers take the Gluon kernel with a K split too (``fits``), unless
    ``HEARTH_QUANT_MMA_GLUON_SPLIT=0`` (the A/B switch)."""
    return os.environ.get("HEARTH_QUANT_MMA_GLUON_SPLIT", "1") != "0"


@functools.cache
def _sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


def takes(prepared, rows: int, bias_dtype: torch.dtype | None = None) -> bool:
    """The shape rules of ``fits`` (any machine): 1 to 64 rows, int4 in groups of a multiple of 128
    smaller than the row, with mins, K a multiple of 128, N of 64, a bf16 bias or none, and a layer
    whose default needs no K split or a down-shaped one (unless ``HEARTH_QUANT_MMA_GLUON_SPLIT=0``)."""
    n, k = prepared.out_features, prepared.in_features
    return (1 <= rows <= 64 and prepared.bits == 4 and prepared.mins is not None and prepared.group_size % 128 == 0
            and prepared.group_size < k and k % 128 == 0 and n % 64 == 0
            and bias_dtype in (None, torch.bfloat16)
            and (default_gluon_config(rows, n, k).split == 1 or (split_enabled() and k >= 3 * n)))


def fits(x: torch.Tensor, prepared, bias: torch.Tensor | None = None) -> bool:
    """Whether ``quant_mma`` hands this call to ``quant_gluon``: Gluon importable (Triton
    ``GLUON_TRITON``), not the interpreter, an sm_90 GPU, bf16 x of 1 to 64 rows whose rows start
    16-byte aligned (cp.async copies 16 bytes), int4 in groups of a multiple of 128 smaller than
    the row (per-channel weights keep the Triton kernel's unrounded path) with mins, K a multiple
    of 128, N of 64, a bf16 bias or none, and a layer whose default needs no K split (the 8B's
    gate_up) or a down-shaped one (K at least 3N, split; ``HEARTH_QUANT_MMA_GLUON_SPLIT=0`` keeps
    those on the Triton kernel): on an H100 the 8B down ran 33.4 us with 4 steps in flight and 34.8
    with the 3 it takes at 64 rows, against the Triton kernel's 40.4, and batch-64 decode went from
    10,680 to 10,991 tok/s with it (bf16 9,340, one machine:
    ``2026-12-06-i14-split-fence-bench-8b-bs64-*-h100-3ff8824.json``). q/k/v and o keep the Triton
    kernel (20.0 / 15.5 against 18.4 / 15.4 us at 64 rows, split, before the Triton kernel's splits
    fenced too).

    Split partials meet only after a GPU-scope fence in every thread (``split_fence.fence_mode``): without
    it, at 030aea2 the 8B gate_up at 64 rows, split 2, gave different bits on each of three calls on
    two H100s (the harness counted 638 and 828 outputs wrong by ~1e19; the JSON keeps ``repeatable:
    false`` and the error); with fences every split timed was exact and repeatable
    (``benchmarks/results/2026-12-06-i14-gluon-split-*-h100-030aea2.json``). At f0e08b0 the same
    case gave no race without them (``2026-12-06-i14-split-fence-gluon-gate_up-*-h100-f0e08b0.json``):
    the writers' fence stays, as in CUDA's documented pattern, and the Triton kernels' split-K
    (``quant_mma._write_tile``, the dp4a GEMV's) fence the same way since 2026-12-06."""
    return (gluon is not None and enabled() and x.is_cuda and not interpreting() and x.dtype == torch.bfloat16
            and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0
            and takes(prepared, x.shape[0], None if bias is None else bias.dtype)
            and _sm90(x.device.index if x.device.index is not None else torch.cuda.current_device()))


def quant_gluon(x: torch.Tensor, prepared, out: torch.Tensor, bias: torch.Tensor | None = None,
                config: GluonConfig | None = None, exact: bool = True) -> torch.Tensor:
    """``x @ W.T (+ bias)`` into ``out`` [M, N] for a call ``fits`` takes (x contiguous along K; a
    per-channel weight or any K split works too, for tests and timing).
    ``exact=False`` decodes in bf16x2 arithmetic instead (the scale and min rounded to bf16
    first: for timing only). No host sync; capturable in a CUDA graph once a split config has
    run outside capture (the counters are made then)."""
    n, k, rows = prepared.out_features, prepared.in_features, x.shape[0]
    cfg = config or default_gluon_config(rows, n, k)
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    q = prepared.qweight.view(torch.int32)
    steps, tiles = k // 128, n // 64
    split = max(1, min(cfg.split, steps))
    while steps % split:
        split -= 1
    if split > 1:
        ws = torch.empty(tiles * split * 64 * block_m, dtype=torch.float32, device=x.device)
        cnt = counters(x.device, tiles)
    else:
        ws = cnt = prepared.scales
    _gluon_int4_mma_kernel[(tiles, split)](
        x, q, prepared.scales, prepared.mins, bias if bias is not None else prepared.scales, out, ws, cnt, rows, n,
        steps // split, x.stride(0), q.stride(0), prepared.scales.stride(0), out.stride(0),
        GROUP=prepared.group_size, BLOCK_M=block_m, STAGES=cfg.stages, EXACT=exact, SPLIT=split,
        HAS_BIAS=bias is not None, FENCE=launch_fence(split), num_warps=4)
    return out
