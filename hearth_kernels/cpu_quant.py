"""Hearth's CPU int4/int8 weight-only matmul (C, AVX2 + FMA + F16C with a portable scalar
path), fast at batch 1: ``out = x @ W.T`` for ``W`` in Hearth's canonical quantized layout
(engine/quant/qweight.py; this module takes the plain tensors, it never imports engine).

How it computes: each call quantizes the activation rows once to int8 in blocks of 32
(per block ``d = max|x| / 127``, ``code = round(x / d)``), then does exact integer block
dot products with the weight codes and one fp32 scale per block; mins multiply the
blocks' dequantized sums. The result is ``W . x_hat`` (``x_hat`` the dequantized
activations) up to fp32 rounding, so its error against ``W . x`` is at most
``|W| . |x - x_hat|`` <= ``|W| . (d / 2)`` per block. That is llama.cpp's Q8 activation
scheme; it is what makes the kernel memory-bound instead of compute-bound on AVX2.

The C source (hearth_kernels/cpu/) is compiled with the system C compiler on first use into
``$HEARTH_CACHE_DIR/hearth_kernels`` (else the user cache folder), keyed by a hash of the source,
flags and compiler, written atomically so concurrent processes don't clash, and loaded
with ctypes (which releases the GIL during a call). Without a compiler, ``available()``
returns the reason and the caller falls back to a torch dequantize-matmul. A library
built ahead of time (``build_prebuilt``, which packaging/bundle.sh ships in the bundle,
where no compiler may be) is loaded instead of compiling when it was built from these
exact sources and flags (its name carries their hash; any other is ignored).

Use:
    if available() is None:
        w = prepare_int4(qweight, scales, mins, group_size)     # once, at load; keep ``w``
        y = matmul(x, w)                                        # x fp32 [M, K] -> [M, N]
Batch 1 (decode) is what this is for: one token's 96 MB of SmolLM2 weights (int4 G=32
layers + int8 head) take about 9 ms of one core here, against about 41 ms for torch's
float32 F.linear and 23 ms for its packed int4/int8 ops. Several rows (prefill, batched
decode) run tiles of 2 weight rows x up to 4 activation rows, each weight block unpacked
once per tile, about as fast end to end as dequantizing for torch's sgemm (a 1,000-row
prompt of SmolLM2: 3.37-3.79 s to the first token against 3.71-4.36 that way, 2026-12-06,
shared 2-core EPYC; per projection on one thread sgemm is up to 1.5x faster at 64-1,000
rows), and each row gets the same bits as a call of that row alone (same per-block
arithmetic, same order): how many rows share a call (a prefix-cache hit, a busier batch)
can't change a greedy or seeded request's tokens. ``dequantize`` and ``round_activations`` remain for tests and tools.
The decode hot path can skip ``matmul``'s checks with ``PreparedWeight.bind``.
Act-order weights (``perm``): pass ``x[..., perm]``.

The scalar path (CPUs without AVX2, ARM) is correct but about 8x slower than the AVX2
one, slower than torch's float32 matmul: pick it only by timing (``isa()`` says which).

Threads: ``threads`` (default torch.get_num_threads()) workers share out row chunks
dynamically; the caller is one of them. Idle helpers spin ``set_spin_us`` (default 100
µs, yielding the core) then sleep. On a machine busy with other work a helper may be
preempted mid-chunk and the call waits for it: measure 1 against 2 threads end to end.

Environment: ``HEARTH_CPU_QUANT_ISA=scalar`` forces the portable path (tests, CI);
``HEARTH_CPU_SPIN_US`` (default 100) is how long idle worker threads spin before sleeping.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

_SOURCE_DIR = Path(__file__).with_name("cpu")
#: Where ``_build`` looks for a library built ahead of time (``build_prebuilt``).
_PREBUILT_DIR = _SOURCE_DIR
_MAIN_SOURCE = "hq_quant.c"
_FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-pthread", "-fno-math-errno")
_BLOCK = 32
FLOAT32_BITS = 32  # hq_weight.bits of an fp32 matrix (HD_FLOAT32 in hq_decode.h)
_ISA_CODES = {"scalar": 1, "avx2": 2}
_ISA_NAMES = {1: "scalar", 2: "avx2"}
_ERRORS = {1: "this CPU lacks AVX2/FMA/F16C", 2: "out of memory", 3: "bad weight descriptor"}

_lock = threading.Lock()
#: HEARTH_CPU_QUANT_ISA read once, at import (0 = the best this CPU runs).
_default_isa = _ISA_CODES.get(os.environ.get("HEARTH_CPU_QUANT_ISA", ""), 0)
_lib: ctypes.CDLL | None = None
_problem: str | None = None
_loaded = False


class _WeightDesc(ctypes.Structure):
    """Mirror of ``hq_weight`` in hearth_kernels/cpu/hq_common.h."""

    _fields_ = [
        ("bits", ctypes.c_int32),
        ("n", ctypes.c_int32),
        ("k", ctypes.c_int32),
        ("kp", ctypes.c_int32),
        ("group", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
        ("q", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("mins", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
    ]


def _cache_dir() -> Path:
    override = os.environ.get("HEARTH_CACHE_DIR")
    if override:
        base = Path(override).expanduser()
    else:
        import platformdirs

        base = Path(platformdirs.user_cache_dir("hearth"))
    return base / "hearth_kernels"


def _forget_old_cache() -> None:
    """Delete the libraries earlier versions compiled into ``<cache>/kernels`` (this package
    was called ``kernels`` until the rename to ``hearth_kernels``): only their ``hq_quant-*``
    files, and the folder if nothing else is left in it. Quietly does nothing it can't do."""
    old = _cache_dir().parent / "kernels"
    try:
        for f in [*old.glob("hq_quant-*.so"), *old.glob(".hq_quant-*.so")]:
            f.unlink(missing_ok=True)
        if old.is_dir() and not any(old.iterdir()):
            old.rmdir()
    except OSError:
        pass


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _source_digest():
    """A hash of the flags and the C sources (the compiler is added by ``_build``)."""
    digest = hashlib.sha256(" ".join(_FLAGS).encode() + b"\0")
    for src in sorted(_SOURCE_DIR.glob("*.[ch]")):
        digest.update(src.name.encode() + b"\0" + src.read_bytes())
    return digest


def prebuilt_name() -> str:
    """The file name a library built ahead of time from these sources and flags has (its
    folder is ``_PREBUILT_DIR``, beside the sources)."""
    return f"hq_quant-prebuilt-{_source_digest().hexdigest()[:16]}.so"


def build_prebuilt(folder: Path) -> Path:
    """Compile the library (or take the cached one) and copy it into ``folder`` under
    ``prebuilt_name()``, for a package with no compiler at run time (the PyInstaller
    bundle puts it beside the sources). Returns its path; raises RuntimeError or OSError
    with the reason when it cannot be built here."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / prebuilt_name()
    shutil.copyfile(_compile(), target)
    return target


def _compile() -> Path:
    """Compile (once per source/flags/compiler) into the cache; the library's path.
    Raises OSError or RuntimeError with a readable reason."""
    if sys.platform == "win32":
        raise RuntimeError("the CPU quantized kernel is not built on Windows yet")
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (install gcc or clang, or set CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest = _source_digest()
    for part in (cc, version):
        digest.update(part.encode() + b"\0")
    folder = _cache_dir()
    target = folder / f"hq_quant-{digest.hexdigest()[:16]}.so"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".hq_quant-", suffix=".so", dir=folder)
        os.close(fd)
        try:
            cmd = [cc, *_FLAGS, str(_SOURCE_DIR / _MAIN_SOURCE), "-o", tmp, "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                said = done.stderr.strip()[-800:] or "it said nothing"
                raise RuntimeError(f"compiling the CPU quantized kernel with {cc} failed (exit {done.returncode}): "
                                   f"{said}")
            os.replace(tmp, target)  # atomic: another process sees the old name or the whole file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def _build() -> ctypes.CDLL:
    """Load the prebuilt library if one matches the sources, else compile (``_compile``);
    raises OSError or RuntimeError with a readable reason."""
    _forget_old_cache()
    prebuilt = _PREBUILT_DIR / prebuilt_name()
    target = prebuilt if prebuilt.is_file() else _compile()
    lib = ctypes.CDLL(str(target))
    p, i32 = ctypes.c_void_p, ctypes.c_int
    lib.hq_best_isa.argtypes, lib.hq_best_isa.restype = [], i32
    lib.hq_matmul.argtypes, lib.hq_matmul.restype = [p, p, p, ctypes.c_int64], i32
    lib.hd_f32_matmul.argtypes, lib.hd_f32_matmul.restype = [p, p, p, ctypes.c_int64], i32
    lib.hq_dequantize.argtypes, lib.hq_dequantize.restype = [p, p, i32, i32], i32
    lib.hq_set_spin_us.argtypes, lib.hq_set_spin_us.restype = [ctypes.c_longlong], None
    lib.hq_quantize_acts.argtypes, lib.hq_quantize_acts.restype = [p, i32, i32, i32, i32, i32, p, p, p, p], i32
    return lib


def _library() -> ctypes.CDLL:
    global _lib, _problem, _loaded
    if not _loaded:
        with _lock:
            if not _loaded:
                try:
                    _lib = _build()
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    _problem = str(exc) or type(exc).__name__
                _loaded = True
    if _lib is None:
        raise RuntimeError(f"the CPU quantized kernel is unavailable: {_problem}")
    return _lib


def available() -> str | None:
    """None when the kernel is usable here, else why not (no compiler, a failed build).
    The first call compiles the kernel (a second or two) unless it is cached."""
    try:
        _library()
    except RuntimeError:
        return _problem
    return None


def isa() -> str:
    """The path ``matmul`` takes by default: "avx2" or "scalar" (``HEARTH_CPU_QUANT_ISA``
    overrides it)."""
    if _default_isa:
        return _ISA_NAMES[_default_isa]
    return _ISA_NAMES[_library().hq_best_isa()]


def set_spin_us(microseconds: int) -> None:
    """How long idle worker threads spin, waiting for the next call, before they sleep
    (default 100 µs, or ``HEARTH_CPU_SPIN_US``). Spinning lets a decode step's matmuls
    start without a wake-up; the spinners yield their core to any other runnable thread
    (torch's own), and 0 makes them sleep at once."""
    _library().hq_set_spin_us(int(microseconds))


def supports(bits: int, group_size: int, in_features: int) -> str | None:
    """Why ``prepare_int4``/``prepare_int8`` would refuse this shape (None: it takes it):
    groups of a multiple of 32 inputs, per-channel int8, or int8 in groups of 16 (GGUF
    Q6_K) over a multiple of 32 inputs; mins or not, alike."""
    if bits not in (4, 8):
        return f"{bits}-bit weights are not supported (4 or 8)"
    if group_size <= 0 or in_features % group_size:
        return f"group size {group_size} does not divide the {in_features} input features"
    g16 = bits == 8 and group_size == 16 and in_features % _BLOCK == 0
    if group_size % _BLOCK and not g16 and not (bits == 8 and group_size == in_features):
        return (f"the CPU kernel needs groups of a multiple of {_BLOCK} inputs (or per-channel int8, or int8 "
                f"in groups of 16), not {group_size}")
    return None


class PreparedWeight:
    """A quantized weight ready for ``matmul``: holds its tensors alive (the C side keeps
    only pointers) and their descriptor. Make one per layer at load time and keep it."""

    __slots__ = ("bits", "group_size", "out_features", "in_features", "_tensors", "_desc", "_addr")

    def __init__(self, bits: int, group_size: int, n: int, k: int, kp: int, group_p: int,
                 qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                 bias: torch.Tensor | None):
        self.bits, self.group_size, self.out_features, self.in_features = bits, group_size, n, k
        if bias is not None:
            if bias.numel() != n:
                raise ValueError(f"bias has {bias.numel()} elements, expected {n}")
            bias = bias.detach().cpu().to(torch.float32).contiguous().view(n)
        self._tensors = (qweight, scales, mins, bias)
        self._desc = _WeightDesc(bits, n, k, kp, group_p, 0, *(t.data_ptr() if t is not None else None
                                                                for t in self._tensors))
        self._addr = ctypes.addressof(self._desc)

    def bind(self, x: torch.Tensor, out: torch.Tensor, *, threads: int | None = None,
             isa: str | None = None) -> Callable[[], int]:
        """A zero-argument callable computing ``matmul(x, self, out)`` on these exact
        buffers (e.g. a decode step's static activation and output), skipping the checks
        and argument packing: ~2 µs a call here against ~8 µs for ``matmul``. It returns 0,
        or a non-zero error code (only on a broken descriptor). It holds x and out alive;
        writing new values into x (``x.copy_(...)``) between calls is how it is used."""
        lib = _library()
        k, n = self.in_features, self.out_features
        if x.dtype is not torch.float32 or not x.is_cpu or x.shape[-1] != k or not x.is_contiguous():
            raise ValueError(f"x must be a contiguous float32 CPU tensor [..., {k}]")
        rows = x.numel() // k
        if out.dtype is not torch.float32 or not out.is_cpu or out.numel() != rows * n or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 CPU tensor of {rows}x{n} elements")
        nthreads = torch.get_num_threads() if threads is None else threads
        call = functools.partial(lib.hd_f32_matmul if self.bits == FLOAT32_BITS else lib.hq_matmul,
                                 self._addr, x.data_ptr(), out.data_ptr(),
                                 rows | (min(nthreads, 255) << 32) | (_isa_code(isa) << 40))
        call.keep_alive = (self, x, out)
        return call

    def nbytes(self) -> int:
        """Bytes of weight data one matmul streams (codes, scales, mins)."""
        return sum(t.numel() * t.element_size() for t in self._tensors[:3] if t is not None)


def _fp16(t: torch.Tensor, name: str, shape: tuple[int, int]) -> torch.Tensor:
    if t.dtype != torch.float16:
        raise ValueError(f"{name} must be float16 (Hearth's canonical layout), not {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    return t.detach().cpu().contiguous()


def prepare_int4(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None) -> PreparedWeight:
    """int4 codes packed GGUF-style, uint8 [N, K/2]; fp16 scales and mins [N, K/G]
    (w = code * scale + min); optional bias [N] (kept as fp32). G must be a multiple of 32
    dividing K. No copy when the tensors are contiguous CPU tensors already."""
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"int4 qweight must be uint8 [N, K/2], got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    problem = supports(4, group_size, k)
    if problem:
        raise ValueError(problem)
    ng = k // group_size
    s = _fp16(scales, "scales", (n, ng))
    m = _fp16(mins, "mins", (n, ng))
    return PreparedWeight(4, group_size, n, k, k, group_size, qweight.detach().cpu().contiguous(), s, m, bias)


def prepare_int8(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                 group_size: int, bias: torch.Tensor | None = None) -> PreparedWeight:
    """int8 signed codes [N, K]; fp16 scales [N, K/G] and optional fp16 mins
    (w = code * scale (+ min)). G a multiple of 32 dividing K (GGUF Q8_0: 32), 16 (GGUF
    Q6_K), or G = K (per-channel; rows are zero-padded to a multiple of 32 in a
    copy when K is not).
    Optional bias [N] (kept as fp32)."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"int8 qweight must be int8 [N, K], got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape
    problem = supports(8, group_size, k)
    if problem:
        raise ValueError(problem)
    ng = k // group_size
    s = _fp16(scales, "scales", (n, ng))
    m = _fp16(mins, "mins", (n, ng)) if mins is not None else None
    q = qweight.detach().cpu().contiguous()
    kp, group_p = k, group_size
    if k % _BLOCK:  # per-channel with K not a multiple of 32: pad rows with zero codes
        kp = group_p = -(-k // _BLOCK) * _BLOCK
        q = torch.nn.functional.pad(q, (0, kp - k))
    return PreparedWeight(8, group_size, n, k, kp, group_p, q, s, m, bias)


def prepare_f32(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PreparedWeight:
    """An fp32 weight [N, K] (no copy when it is a contiguous float32 CPU tensor) for
    ``matmul``: each output element computed exactly as the C decode step's GEMV computes
    it, whatever the number of rows (torch's CPU matmul gives a row other bits for 1, 2-3
    and 4+ rows). The float LM head of a CPU load runs this way, so a request's logits don't
    depend on what shares its step."""
    if weight.dtype != torch.float32 or weight.dim() != 2:
        raise ValueError(f"an fp32 weight must be float32 [N, K], got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    return PreparedWeight(FLOAT32_BITS, k, n, k, k, k, weight.detach().cpu().contiguous(), None, None, bias)


def _isa_code(name: str | None) -> int:
    if name is None:
        return _default_isa
    if name not in _ISA_CODES:
        raise ValueError(f"unknown ISA {name!r}: use 'avx2' or 'scalar'")
    return _ISA_CODES[name]


def _check_rc(rc: int) -> None:
    if rc:
        raise RuntimeError(f"the CPU quantized kernel failed: {_ERRORS.get(rc, rc)}")


def matmul(x: torch.Tensor, w: PreparedWeight, out: torch.Tensor | None = None, *,
           threads: int | None = None, isa: str | None = None) -> torch.Tensor:
    """``x @ W.T`` (+ the bias given to prepare): x fp32 [..., K] on the CPU -> fp32
    [..., N], into ``out`` when given (fp32, contiguous, [..., N]; saves an allocation,
    about 2 µs). ``threads`` defaults to torch.get_num_threads(); ``isa`` "scalar"
    forces the portable path. Meant for a few rows (decode); each call costs about 5 µs
    of Python and ctypes on top of the C work, so the checks here are kept minimal."""
    lib = _lib if _lib is not None else _library()
    k = w.in_features
    if x.dtype is not torch.float32 or not x.is_cpu or x.shape[-1] != k:
        raise ValueError(f"x must be float32 [..., {k}] on the CPU, got {x.dtype} {tuple(x.shape)} on {x.device}")
    if not x.is_contiguous():
        x = x.contiguous()
    rows = x.numel() // k
    n = w.out_features
    if out is None:
        out = torch.empty((rows, n) if x.dim() == 2 else (*x.shape[:-1], n), dtype=torch.float32)
    elif out.dtype is not torch.float32 or not out.is_cpu or out.numel() != rows * n or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 CPU tensor of {rows}x{n} elements")
    nthreads = torch.get_num_threads() if threads is None else threads
    code = _default_isa if isa is None else _isa_code(isa)
    fn = lib.hd_f32_matmul if w.bits == FLOAT32_BITS else lib.hq_matmul
    rc = fn(w._addr, x.data_ptr(), out.data_ptr(), rows | (min(nthreads, 255) << 32) | (code << 40))
    if rc:
        _check_rc(rc)
    return out


def dequantize(w: PreparedWeight, out: torch.Tensor | None = None, *, threads: int | None = None,
               isa: str | None = None) -> torch.Tensor:
    """W as fp32 [N, K] (threaded C), into ``out`` when given (fp32, contiguous, N*K
    elements: reuse one buffer across layers). For prefill: dequantize once per chunk of
    rows and use torch's matmul (sgemm), much faster than ``matmul`` beyond ~8 rows."""
    lib = _library()
    size = w.out_features * w.in_features
    if out is None:
        out = torch.empty((w.out_features, w.in_features), dtype=torch.float32)
    elif out.dtype is not torch.float32 or not out.is_cpu or out.numel() != size or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 CPU tensor of {w.out_features}x{w.in_features} elements")
    nthreads = torch.get_num_threads() if threads is None else threads
    _check_rc(lib.hq_dequantize(w._addr, out.data_ptr(), nthreads, _isa_code(isa)))
    return out


def round_activations(x: torch.Tensor, *, isa: str | None = None) -> torch.Tensor:
    """x fp32 [M, K] -> ``x_hat`` fp32 [M, K]: the int8 blocks ``matmul`` rounds x to,
    dequantized (``code * d``), so that a dequantize + float matmul of many rows gives
    each row the product ``matmul`` gives it alone, up to fp32 summation order."""
    m, k = x.shape
    q, d, _ = quantize_activations(x, k, isa=isa)
    return q.to(torch.float32).view(m, -1, _BLOCK).mul_(d.unsqueeze(-1)).view(m, -1)[:, :k]


def quantize_activations(x: torch.Tensor, group_size: int, *,
                         isa: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The activation quantization ``matmul`` applies, exposed for tests: x fp32 [M, K] ->
    (codes int8 [M, Kp], block scales fp32 [M, Kp/32], group sums fp32 [M, Kp/G]), Kp = K
    rounded up to 32 (group_size is then Kp if it was K)."""
    lib = _library()
    x = x.to(torch.float32).contiguous()
    m, k = x.shape
    kp = -(-k // _BLOCK) * _BLOCK
    g = kp if group_size == k else group_size
    q = torch.empty((m, kp), dtype=torch.int8)
    d = torch.empty((m, kp // _BLOCK), dtype=torch.float32)
    isum = torch.empty((m, kp // _BLOCK), dtype=torch.int32)
    gs = torch.empty((m, kp // g), dtype=torch.float32)
    _check_rc(lib.hq_quantize_acts(x.data_ptr(), m, k, kp, g, _isa_code(isa), q.data_ptr(), d.data_ptr(),
                                   gs.data_ptr(), isum.data_ptr()))
    return q, d, gs
