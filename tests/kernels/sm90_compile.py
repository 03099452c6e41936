"""Compile Hearth's kernels for an H100 (sm_90) without a GPU and report their resources.

Run as ``python -m tests.kernels.sm90_compile`` (TRITON_INTERPRET must be unset: the
interpreter replaces kernels with Python). Prints one JSON line per kernel: shared memory,
registers and spill bytes (from the ptxas bundled with Triton), and whether the loops were
software-pipelined (cp.async) and the attention dots use Hopper's wgmma. The interpreter
accepts code the compiler rejects (loop-carried types, early returns), so this is the CPU
check that the GPU build still compiles.

Pointers and strides are marked 16-divisible, as Triton's launcher specialises them for
real shapes; without that no load vectorises and nothing is pipelined.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


NVDISASM = os.path.join(os.path.dirname(PTXAS), "nvdisasm")


def build(fn, types: dict[str, str], consts: dict, num_warps: int, num_stages: int, cc: int = 90,
          divisible: tuple[str, ...] = (), source=ASTSource):
    """The sm_90 (or sm_``cc``) build of ``fn`` (Triton's compiled kernel; ``.asm["ptx"]`` its PTX).
    ``divisible``: integer arguments besides the strides that the launcher would see as
    multiples of 16 (it specialises on that), e.g. a K of 4,096 or 14,336."""
    # a constexpr left out takes its default (as a launch that doesn't pass it), not a runtime i32
    consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **consts}
    sig = {name: types.get(name, "i32") for name in fn.arg_names}
    sig.update({name: "constexpr" for name in consts})
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if sig[name].startswith("*") or (name.startswith("stride_") and name not in ("stride_tb",))
               or name in divisible}
    src = source(fn=fn, signature=sig, attrs=aligned,
                 constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    target = TARGET if cc == 90 else GPUTarget("cuda", cc, 32)
    return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def _ptxas(ptx: str, out: str, cc: int = 90) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        return subprocess.run([PTXAS, "--gpu-name", "sm_90a" if cc == 90 else f"sm_{cc}", "-v", f.name, "-o", out],
                              capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)


def compiled_rows(script: str, timeout: int) -> list[dict]:
    """For the slow sm_90 build tests: run ``script`` (Python printing one JSON object a line)
    in a subprocess without TRITON_INTERPRET, from the repository root, and return the
    objects; skips the test where Triton 3.6 and its bundled ptxas are missing (see
    test_compile_sm90.py)."""
    import pytest

    if not os.path.isfile(PTXAS) or not triton.__version__.startswith("3.6."):
        pytest.skip("needs Triton 3.6 with its bundled ptxas (see test_compile_sm90.py)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


def loop_instructions(kernel) -> dict:
    """The SASS of the kernel's longest loop (the main K loop of a matmul): instructions a
    thread issues per iteration, by opcode. For a kernel that issue slots bound, fewer is
    faster; not a timing."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        cubin = f.name
    try:
        _ptxas(kernel.asm["ptx"], cubin)
        sass = subprocess.run([NVDISASM, "-c", cubin], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(cubin)
    code, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        ins = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if ins:
            addr = int(ins.group(1), 16)
            labels.update((p, addr) for p in pending)
            pending = []
            code.append((addr, ins.group(2).strip()))
    loops = [(labels[m.group(1)], addr) for addr, ins in code
             if (m := re.search(r"BRA\s+`\((\.L_x_\d+)\)", ins)) and labels.get(m.group(1), addr) < addr]
    first, last = max(loops, key=lambda ab: ab[1] - ab[0]) if loops else (0, -1)
    ops: dict[str, int] = {}
    for addr, ins in code:
        if first <= addr <= last:
            op = re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0]
            ops[op] = ops.get(op, 0) + 1
    return {"instructions": sum(ops.values()), "by_opcode": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}


def compile_kernel(fn, types: dict[str, str], consts: dict, num_warps: int, num_stages: int, cc: int = 90,
                   divisible: tuple[str, ...] = (), source=ASTSource) -> dict:
    kernel = build(fn, types, consts, num_warps, num_stages, cc, divisible, source)
    ptx = kernel.asm["ptx"]
    log = _ptxas(ptx, os.devnull, cc)
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return {"shared": kernel.metadata.shared, "registers": int(regs.group(1)) if regs else -1,
            "spill_bytes": int(spills.group(1)) if spills else -1,
            "pipelined": "cp.async" in ptx, "wgmma": "wgmma" in ptx,
            "ldmatrix": "ldmatrix" in ptx,  # a register operand of a dot rebuilt through shared memory
            # shared-memory loads of single bytes (an 8-bit dot operand gathered element by element)
            "byte_shared_loads": len(re.findall(r"ld\.shared\.[bsu]8\b", ptx)),
            "asm_pairs": asm_pairs(kernel.asm["ttgir"])}


def asm_pairs(ttgir: str) -> bool | None:
    """Whether every two-element inline assembly (``packed_element = 2``) gets neighbouring
    elements of the last axis, the even one first: its result layout's first register basis
    is a step of 1 along that axis. Triton leaves the grouping unspecified; Hearth's pair
    decodes depend on it. None when there is no such assembly."""
    layouts = dict(re.findall(r"^(#\w+) = (.*)$", ttgir, flags=re.M))
    found = None
    for line in ttgir.splitlines():
        if "elementwise_inline_asm" not in line or "packed_element = 2" not in line:
            continue
        enc = re.search(r"-> tensor<([0-9x]+)x\w+, (.+?)>(?: loc|$)", line)
        if enc is None:
            return False
        rank = enc.group(1).count("x") + 1
        text = layouts.get(enc.group(2), enc.group(2))  # an alias (#linear3), or the layout written out
        dot = re.search(r"kWidth = (\d+)", text)
        basis = re.search(r"register = \[\[([0-9, ]+)\]", text)
        if dot:  # a dot's first operand: runs of kWidth neighbours along K, its last axis
            ok = "opIdx = 0" in text and int(dot.group(1)) % 2 == 0
        else:
            ok = basis is not None and [int(v) for v in basis.group(1).split(",")] == [0] * (rank - 1) + [1]
        found = ok if found is None else found and ok
    return found


def main() -> None:
    import torch

    from hearth_kernels import activation, kv_cache, paged_decode, paged_prefill, rmsnorm, rotary

    # Llama-3-8B: 32 q heads, 8 kv heads, d=128, bf16, block 16; hidden 4096.
    bf, d, bs = "*bf16", 128, 16
    n, warps, stages = paged_decode._config(d, torch.bfloat16)
    cases = {
        "decode": (paged_decode._decode_split_kernel,
                   {"q_ptr": bf, "cache_ptr": bf, "tables_ptr": "*i32", "seq_lens_ptr": "*i32",
                    "out_ptr": bf, "part_out_ptr": "*fp32", "part_ml_ptr": "*fp32", "qk_scale": "fp32"},
                   dict(GROUP=4, G_PAD=16, HEAD_DIM=d, D_PAD=d, BLOCK_SIZE=bs, BLOCK_N=n, HAS_WINDOW=True,
                        SPLIT=True, DOT_PRECISION="tf32", AS_FP16=False,
                        TABLE_AHEAD=int(paged_decode._table_ahead(0))), warps, stages),
        "decode_merge": (paged_decode._decode_merge_kernel,
                         {"part_out_ptr": "*fp32", "part_ml_ptr": "*fp32", "seq_lens_ptr": "*i32",
                          "out_ptr": bf},
                         dict(HEAD_DIM=d, D_PAD=d, BLOCK_N=n, NP_PAD=64, CHUNK=16, HAS_WINDOW=True), 4, 1),
    }
    m, n, warps, stages = paged_prefill._config(d, torch.bfloat16)
    cases["prefill"] = (
        paged_prefill._prefill_kernel,
        {"q_ptr": bf, "cache_ptr": bf, "tables_ptr": "*i32", "query_start_ptr": "*i32",
         "seq_lens_ptr": "*i32", "out_ptr": bf, "qk_scale": "fp32"},
        dict(GROUP=4, BLOCK_Q=m // 4, BLOCK_M=m, BLOCK_N=n, HEAD_DIM=d, D_PAD=d, BLOCK_SIZE=bs,
             HAS_WINDOW=True, DOT_PRECISION="tf32", AS_FP16=False), warps, stages)
    cases["write_kv"] = (kv_cache._write_kv_kernel,
                         {"k_ptr": bf, "v_ptr": bf, "cache_ptr": bf, "slot_ptr": "*i64"},
                         dict(NUM_HEADS=8, BLOCK_SIZE=bs, HEAD_DIM=d, H_PAD=8, D_PAD=d, FP8=False), 4, 1)
    # An fp8 (e4m3) KV cache with bf16 activations: the write saturates and narrows, the
    # attention kernels widen each tile after loading it.
    f8 = "*fp8e4nv"
    for name in ("decode", "prefill"):
        fn, types, consts, w, st = cases[name]
        if name == "decode":  # as launched: V as pairs (one conversion each on a GPU) where that is the default
            pairs = 2 if paged_decode.V_PAIRS_DEFAULT else 0
            ahead = paged_decode._table_ahead(pairs)
            n8, w, st = paged_decode._config(d, torch.bfloat16, torch.float8_e4m3fn, bool(pairs) and ahead)
            consts = {**consts, "BLOCK_N": n8, "V_PAIRS": pairs, "TABLE_AHEAD": int(ahead)}
        cases[f"{name}_fp8"] = (fn, {**types, "cache_ptr": f8}, {**consts, "AS_FP16": True}, w, st)
    # both of the decode kernel's switches off (HEARTH_DECODE_V_PAIRS=0 HEARTH_DECODE_TABLE_AHEAD=0), its config then
    fn, types, consts, w, st = cases["decode_fp8"]
    n8, w, st = paged_decode._config(d, torch.bfloat16, torch.float8_e4m3fn)
    cases["decode_fp8_plain"] = (fn, types, {**consts, "BLOCK_N": n8, "V_PAIRS": 0, "TABLE_AHEAD": 0}, w, st)
    cases["write_kv_fp8"] = (kv_cache._write_kv_kernel,
                             {"k_ptr": bf, "v_ptr": bf, "cache_ptr": f8, "slot_ptr": "*i64"},
                             dict(NUM_HEADS=8, BLOCK_SIZE=bs, HEAD_DIM=d, H_PAD=8, D_PAD=d, FP8=True), 4, 1)
    cases["fused_add_rms_norm"] = (rmsnorm._rms_norm_kernel,
                                   {"x_ptr": bf, "res_ptr": bf, "w_ptr": bf, "out_ptr": bf, "res_out_ptr": bf,
                                    "eps": "fp32"}, dict(N=4096, BLOCK_N=4096, HAS_RESIDUAL=True), 16, 1)
    cases["rotary"] = (rotary._rotary_kernel,
                       {"q_ptr": bf, "k_ptr": bf, "pos_ptr": "*i64", "cos_ptr": bf, "sin_ptr": bf},
                       dict(NUM_Q_HEADS=32, NUM_K_HEADS=8, HALF=64, QH_PAD=32, KH_PAD=8, HALF_PAD=64), 8, 1)
    for name, cache in (("rotary_write_kv", bf), ("rotary_write_kv_fp8", f8)):
        cases[name] = (rotary._rotary_write_kv_kernel,
                       {"q_ptr": bf, "k_ptr": bf, "v_ptr": bf, "pos_ptr": "*i64", "cos_ptr": bf, "sin_ptr": bf,
                        "cache_ptr": cache, "slot_ptr": "*i64"},
                       dict(NUM_Q_HEADS=32, NUM_K_HEADS=8, HALF=64, BLOCK_SIZE=bs, QH_PAD=32, KH_PAD=8, HALF_PAD=64,
                            FP8=cache == f8), 8, 1)
    cases["silu_and_mul"] = (activation._silu_and_mul_kernel, {"x_ptr": bf, "out_ptr": bf},
                             dict(BLOCK=1024), 4, 1)
    from hearth_kernels import fp8

    for rows, cfg in ((1, fp8.FP8_MMA_CONFIGS[0]), (64, fp8.FP8_MMA_CONFIGS[2])):  # batch-1 tile; 64 rows, 128 weight rows
        bn, bk, warps, stages, split = cfg
        cases[f"fp8_mma_{rows}"] = (fp8._fp8_mma_kernel,
                                    {"xq_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32",
                                     "b_ptr": bf, "y_ptr": bf, "ws_ptr": "*fp32", "cnt_ptr": "*i32"},
                                    dict(HAS_BIAS=False, DOT_FP32=False, BLOCK_N=bn, BLOCK_K=bk,
                                         BLOCK_M=16 if rows == 1 else 64, SPLIT_K=split, STAGES=stages,
                                         FENCE=1 if split > 1 else 0), warps, stages)
    cases["norm_quantize_rows"] = (fp8._norm_quantize_rows_kernel,
                                   {"x_ptr": bf, "res_ptr": bf, "w_ptr": bf, "q_ptr": "*fp8e4nv", "s_ptr": "*fp32",
                                    "res_out_ptr": bf, "eps": "fp32"},
                                   dict(N=4096, BLOCK=4096, HAS_RESIDUAL=True), 16, 1)
    only = set(sys.argv[1:])
    for name, (fn, types, consts, warps, stages) in cases.items():
        if only and name not in only:
            continue
        print(json.dumps({"kernel": name, **compile_kernel(fn, types, consts, warps, stages)}), flush=True)


def mma_loops() -> None:
    """The weight-stationary int4/int8 kernel's K loop at the 8B shape's 64-row tiles, int4
    with its scales loaded in the step and a step ahead (``python -m tests.kernels.sm90_compile
    mma-loops``; one JSON line per kernel)."""
    from hearth_kernels import quant_mma as qm

    types = {"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": "*fp16", "m_ptr": "*fp16",
             "b_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
    int8 = dict(types, q_ptr="*i8")
    # (what, bits, group, config): gate_up's 64-row tile 4 in flight (default_mma_config at 64 rows
    # since 2026-12-05; the 128-row tile it had before), qkv/o's 64-row one split 4, and the int8
    # per-channel head on the 128-row tile
    cases = [("gate_up", 4, 128, qm.MmaConfig(64, 128, 4, 4, 1, True)),
             ("gate_up 128", 4, 128, qm.MmaConfig(128, 128, 8, 3, 1, True)),
             ("qkv", 4, 128, qm.MmaConfig(64, 128, 4, 3, 4, True)),
             ("int8 head", 8, 4096, qm.MmaConfig(128, 128, 8, 3, 1))]
    for what, bits, group, cfg in cases:
        for ahead in (False, True) if bits == 4 else (False,):
            consts = dict(GROUP=group, BITS=bits, HAS_MIN=bits == 4, HAS_BIAS=False, SWIGLU=False,
                          OFFSET=128 if bits == 4 else 0, DOT_FP32=False, BLOCK_N=cfg.block_n,
                          BLOCK_K=cfg.block_k, BLOCK_M=64, PER_ROW=group == 4096, SPLIT_K=cfg.split_k,
                          STAGES=cfg.stages, ONE_ROW=False, SCALE_W=bool(cfg.scale_w), AHEAD=ahead,
                          DECODE32=bits == 4 and bool(cfg.scale_w), FENCE=1 if cfg.split_k > 1 else 0)
            fn, t = qm._quant_mma_kernel, types if bits == 4 else int8
            row = {"tile": what, "bits": bits, "rows": 64, "config": list(cfg._replace(ahead=ahead)),
                   "weights_per_thread_step": cfg.block_n * 128 // (32 * cfg.warps),
                   **compile_kernel(fn, t, consts, cfg.warps, cfg.stages),
                   **loop_instructions(build(fn, t, consts, cfg.warps, cfg.stages))}
            print(json.dumps(row), flush=True)


def gluon() -> None:
    """The Gluon int4 kernel (``hearth_kernels/quant_mma_gluon.py``) at 16 and 64 rows, with and
    without a K split (``python -m tests.kernels.sm90_compile gluon``; one JSON line each): its
    resources and K loop. Its layout conversion asserts it is free, so a build at all says so."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from hearth_kernels import quant_mma_gluon as qg

    fn = qg._gluon_int4_mma_kernel
    types = {"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": "*fp16", "m_ptr": "*fp16", "b_ptr": "*bf16",
             "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
    for rows, split in ((16, 1), (16, 4), (64, 1), (64, 4)):
        stages = qg.default_gluon_config(rows, 4096, 4096).stages
        consts = dict(GROUP=128, BLOCK_M=rows, STAGES=stages, EXACT=True, SPLIT=split, HAS_BIAS=split > 1,
                      FENCE=1 if split > 1 else 0)
        print(json.dumps({"rows": rows, "split": split, "stages": stages,
                          **compile_kernel(fn, types, consts, 4, stages, source=GluonASTSource),
                          **loop_instructions(build(fn, types, consts, 4, stages, source=GluonASTSource))}),
              flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["mma-loops"]:
        mma_loops()
    elif sys.argv[1:] == ["gluon"]:
        gluon()
    else:
        main()
