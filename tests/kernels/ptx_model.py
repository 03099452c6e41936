"""A model of the few PTX instructions Hearth's inline assembly uses, written from the PTX ISA
(not from the kernels), to check that assembly's bit tricks on the CPU: the GPU build runs
the assembly, the Triton interpreter cannot. Values are 32-bit registers as Python ints;
16-bit float pairs are (low half, high half).

    run(asm, {"$1": word, ...}) -> {"$0": word, ...}

Supported: ``mov.b32``, ``cvt.u32.u16``, ``shr.u32``, ``prmt.b32`` (default mode),
``lop3.b32``, ``sub.rn`` / ``fma.rn`` on ``bf16x2`` and ``f16x2``.
"""

from __future__ import annotations

import re
from fractions import Fraction

import torch

_MASK = 0xFFFFFFFF


def _halves(v: int) -> tuple[int, int]:
    return v & 0xFFFF, (v >> 16) & 0xFFFF


def _to_float(bits: int, ty: str) -> float:
    t = torch.tensor([bits], dtype=torch.int32).to(torch.int16)  # wraps: the bit pattern kept
    return float(t.view(torch.bfloat16 if ty == "bf16" else torch.float16)[0])


def _round(value, ty: str) -> int:
    """Round-to-nearest-even of an exact value (a Fraction or float) to the 16-bit type's bit
    pattern: one rounding, so the value must be exact in float64 (it is for products and sums
    of 16-bit floats of near exponents; the model refuses otherwise rather than round twice)."""
    if Fraction(float(value)) != Fraction(value):
        raise NotImplementedError(f"{value} is not exact in float64: the model would round twice")
    t = torch.tensor([float(value)], dtype=torch.float64)
    out = t.to(torch.bfloat16 if ty == "bf16" else torch.float16)
    return int(out.view(torch.int16)[0]) & 0xFFFF


def _pairwise(fn, ty: str, *regs: int) -> int:
    """``fn`` on each half, computed exactly (Fractions), rounded once (``.rn``)."""
    parts = [_halves(r) for r in regs]
    lo = _round(fn(*(Fraction(_to_float(p[0], ty)) for p in parts)), ty)
    hi = _round(fn(*(Fraction(_to_float(p[1], ty)) for p in parts)), ty)
    return lo | (hi << 16)


def _prmt(a: int, b: int, sel: int) -> int:
    pool = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        nib = (sel >> (4 * i)) & 0xF
        byte = pool[nib & 7]
        if nib & 8:  # replicate the selected byte's sign bit
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


def run(asm: str, inputs: dict[str, int]) -> dict[str, int]:
    regs = {k: v & _MASK for k, v in inputs.items()}

    def val(tok: str) -> int:
        tok = tok.strip()
        return regs[tok] if tok in regs else int(tok, 0) & _MASK

    body = asm.strip().removeprefix("{").removesuffix("}")
    for stmt in filter(None, (s.strip() for s in body.split(";"))):
        if stmt.startswith(".reg"):
            continue
        op, args = stmt.split(None, 1)
        ops = [a.strip() for a in args.split(",")]
        dst, src = ops[0], ops[1:]
        if op in ("mov.b32", "cvt.u32.u16"):
            v = val(src[0]) & (0xFFFF if op == "cvt.u32.u16" else _MASK)
        elif op == "shr.u32":
            v = val(src[0]) >> val(src[1])
        elif op == "prmt.b32":
            v = _prmt(val(src[0]), val(src[1]), val(src[2]))
        elif op == "lop3.b32":
            v = _lop3(val(src[0]), val(src[1]), val(src[2]), val(src[3]))
        elif m := re.fullmatch(r"(sub|fma)\.rn\.(bf16|f16)x2", op):
            kind, ty = m.groups()
            fn = (lambda x, y: x - y) if kind == "sub" else (lambda x, y, z: x * y + z)
            v = _pairwise(fn, ty, *(val(s) for s in src))
        else:
            raise NotImplementedError(op)
        regs[dst] = v & _MASK
    return {k: v for k, v in regs.items() if k.startswith("$")}


def pair(lo: float, hi: float, ty: str) -> int:
    """Two floats as the 16-bit pair register (each rounded to ``ty``)."""
    return _round(lo, ty) | (_round(hi, ty) << 16)


def unpair(v: int, ty: str) -> tuple[float, float]:
    lo, hi = _halves(v)
    return _to_float(lo, ty), _to_float(hi, ty)
