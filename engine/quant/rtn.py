"""Round-to-nearest quantizers into the canonical layout (``engine.quant.qweight``).

- ``quantize_int8``: per-output-channel (or per group), symmetric: ``scale = absmax / 127``.
- ``quantize_int4``: per group of ``group_size`` inputs, asymmetric with an integer zero
  point ``z`` (0..15): ``scale = (max - min) / 15``, ``q = clamp(round(w / scale) + z)``,
  stored as ``min = -z * scale``. The integer zero point is what AWQ, GPTQ and
  compressed-tensors store, so a model Hearth quantized can be written in their layouts
  without loss (``zero_points`` recovers it).

Both work in float32 from the rounded float16 scale, so the codes are the nearest ones
for the scale actually stored.

- ``quantize_fp8``: per output channel, float8 e4m3: ``scale = absmax / 448`` (float32, so
  the row's largest weight lands on e4m3's largest finite value), ``q = e4m3(w / scale)``
  (round to nearest even, torch's cast).
"""

from __future__ import annotations

import torch

from engine.quant.qweight import QuantizedWeight, check_shape, pack_int4

SCALE_DTYPE = torch.float16
# The least float16 scale: an all-zero group still gets a usable (non-zero) one.
_TINY = 2.0 ** -24


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    problem = check_shape(8, group_size, n, k)
    if problem:
        raise ValueError(problem)
    return w.float().reshape(n, k // group_size, group_size)


#: Rows quantized at a time: the float temporaries stay near this many elements (a few
#: times 16 MB), however large the matrix (an 8B model's head is 525M weights).
CHUNK_ELEMENTS = 1 << 22


def _chunked(quantize):
    """Apply a row-wise quantizer to row chunks of ``w`` and join the results."""
    def run(w: torch.Tensor, *args, **kwargs) -> QuantizedWeight:
        rows = max(1, CHUNK_ELEMENTS // max(1, w.shape[1]))
        if w.shape[0] <= rows:
            return quantize(w, *args, **kwargs)
        parts = [quantize(w[i:i + rows], *args, **kwargs) for i in range(0, w.shape[0], rows)]
        cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
        first = parts[0]
        return QuantizedWeight(first.bits, first.group_size, cat([p.qweight for p in parts]),
                               cat([p.scales for p in parts]), cat([p.mins for p in parts]), fmt=first.fmt)
    run.__doc__ = quantize.__doc__
    return run


@_chunked
def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
    """Symmetric int8 of ``w`` [N, K]; ``group_size`` None (per output channel) or a divisor of K."""
    g = w.shape[1] if group_size is None else group_size
    x = _groups(w, g)
    scale = (x.abs().amax(dim=-1) / 127.0).to(SCALE_DTYPE).clamp_min(_TINY)
    q = torch.round(x / scale.float().unsqueeze(-1)).clamp_(-128, 127).to(torch.int8)
    return QuantizedWeight(8, g, q.reshape(w.shape), scale)


@_chunked
def quantize_int4(w: torch.Tensor, group_size: int = 128) -> QuantizedWeight:
    """Asymmetric int4 of ``w`` [N, K] in groups of ``group_size`` inputs (integer zero points)."""
    n, k = w.shape
    problem = check_shape(4, group_size, n, k)
    if problem:
        raise ValueError(problem)
    x = w.float().reshape(n, k // group_size, group_size)
    lo = x.amin(dim=-1).clamp(max=0.0)
    hi = x.amax(dim=-1).clamp(min=0.0)
    scale = ((hi - lo) / 15.0).to(SCALE_DTYPE).clamp_min(_TINY)
    s = scale.float()
    zero = torch.round(-lo / s).clamp_(0, 15)
    q = (torch.round(x / s.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp_(0, 15)
    mins = (-zero * s).to(SCALE_DTYPE)
    return QuantizedWeight(4, group_size, pack_int4(q.reshape(n, k)), scale, mins)


#: e4m3's largest finite value (448).
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


@_chunked
def quantize_fp8(w: torch.Tensor) -> QuantizedWeight:
    """float8 e4m3 of ``w`` [N, K] with one float32 scale per output row."""
    x = w.float()
    # times the float32 reciprocal (as hearth_kernels/fp8.py): the same bits on CPU and CUDA
    scale = (x.abs().amax(dim=1, keepdim=True) * (1.0 / FP8_MAX)).clamp_min(2.0 ** -126)
    q = (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return QuantizedWeight(8, w.shape[1], q, scale, fmt="e4m3")


def zero_points(qw: QuantizedWeight) -> torch.Tensor:
    """The integer zero points [N, K // G] behind ``qw.mins`` (``min = -z * scale``);
    raises ValueError when a min is not such a multiple (a GGUF Q4_1 weight)."""
    if qw.mins is None:
        return torch.zeros_like(qw.scales, dtype=torch.int32) + (0 if qw.bits == 8 else 8)
    z = torch.round(-qw.mins.float() / qw.scales.float())
    if not torch.equal((-z * qw.scales.float()).to(qw.mins.dtype), qw.mins):
        raise ValueError("this weight's offsets are not integer zero points (a GGUF Q4_1 weight?)")
    return z.to(torch.int32)
