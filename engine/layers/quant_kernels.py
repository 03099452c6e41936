"""Kernel objects of the quantized projections (``engine.layers.quant_linear``).

Like a float ``Linear``'s kernels (``engine.layers.linear_kernels``) they are fixed once at
load (``choose_kernels``, then the batch-1 tuner on CUDA), never picked by a flag while
running. A kernel that keeps the weight in a layout of its own makes it in ``bind`` (once,
at load) and holds it.

- ``DequantMatmul``: dequantize the weight (``engine.quant.qweight``'s reference
  arithmetic, in float32) into the activation dtype, then a matmul. Exact and portable,
  the reference every other kernel is tested against; slow, since every call expands the
  whole weight.
- ``TritonQuant`` (CUDA): the dequantize-GEMV of ``hearth_kernels/quant_gemv.py`` for one row
  (with a config the load-time tuner picks by timing, SwiGLU fused for the down
  projection) and the dequantize-GEMM of ``hearth_kernels/quant_gemm.py`` for more rows (prefill,
  batched decode).

- ``Fp8Kernel`` (``--quant fp8``, e4m3 weights): the fp8-weight GEMV of ``hearth_kernels/gemv.py``
  for one row (a config the tuner picks; the activations stay unrounded there), and for
  more rows the activations rounded to e4m3 per token, then ``torch._scaled_mm`` on the fp8
  tensor cores (``hearth_kernels/fp8.py``).
- ``CpuQuant`` (CPU, AVX2): Hearth's C int4/int8 matmul (``hearth_kernels/cpu_quant.py``:
  activations quantized to int8 blocks, integer block dots, memory speed) for any number of
  rows: several rows run its tiles, which give each row the same bits as a call of that row
  alone, so how many rows share a call (a prefix-cache hit leaving fewer prompt rows, other
  requests in the step) doesn't change a greedy or seeded request's tokens. (Until 2026-12-06
  more than 12 rows dequantized the weight for torch's sgemm on the same rounded activations:
  equal up to fp32 summation order, and the next layer's int8 rounding made that order
  visible, 0.04-0.13 nats on the bundled model's first token after a hit. End to end the tiles
  read a 1,000-token prompt of it about as fast: see the README.)

A kernel receives the module's raw input: for a SwiGLU-down projection that is
``[gate | up]``, and the kernel applies ``layer.act`` (or fuses it).
"""

from __future__ import annotations

import os

import torch

from engine.layers.linear_kernels import matmul, silu_and_mul_reference


class QuantKernel:
    """Computes ``x @ W.T (+ bias)`` for a quantized module ``layer``; ``name`` is what
    ``ModelInfo.batch1_matmul`` reports."""

    name = "?"

    def bind(self, layer) -> "QuantKernel":
        """The kernel ready to run ``layer`` (a repacked copy of its weight, if it needs one)."""
        return self

    def __call__(self, x: torch.Tensor, layer, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def fuses_norm(self, layer, norm) -> bool:
        """Whether ``normed`` runs ``norm`` and this projection of one row in one kernel."""
        return False

    def normed(self, x: torch.Tensor, layer, residual: torch.Tensor | None, norm):
        """``(layer(norm(x + residual)), x + residual)`` in one kernel (when ``fuses_norm``)."""
        raise NotImplementedError

    def with_norm_first(self) -> "QuantKernel | None":
        """This kernel running the norm kernel first where it would take the norm in (a
        candidate the GEMV tuner times beside it); None where there is no such choice."""
        return None

    def fuses_norm_rows(self, layer, norm) -> bool:
        """Whether ``normed_rows`` takes ``norm`` into this projection's pass over its input
        for more than one row."""
        return False

    def normed_rows(self, x: torch.Tensor, layer, residual: torch.Tensor | None, norm):
        """``(layer(norm(x + residual)), x + residual)`` for several rows (when ``fuses_norm_rows``)."""
        raise NotImplementedError

    def scratch_bytes(self, layer, rows: int, itemsize: int) -> int:
        """Temporary memory a call over ``rows`` rows allocates beyond its output (a decode
        graph's pool must hold it: ``engine.runner.memory.graph_reserve_bytes``)."""
        return 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


def int4_layout(qweight: torch.Tensor) -> str:
    """``"gguf"`` (the canonical order) or ``"pairs"`` (the Triton kernels', after a bind)."""
    return getattr(qweight, "int4_layout", "gguf")


def permuted(x: torch.Tensor, layer) -> torch.Tensor:
    """``x`` with its columns in the stored (act-order) order of ``layer``'s weight."""
    return x if layer.perm is None else x.index_select(-1, layer.perm)


def gated(x: torch.Tensor, layer) -> torch.Tensor:
    """The projection's input: SwiGLU applied for a down projection over ``[gate | up]``."""
    return layer.act(x) if layer.act is not None else x


class DequantMatmul(QuantKernel):
    """Dequantize, then torch's matmul: the reference, on every device."""

    name = "dequantize+matmul"

    def __call__(self, x, layer, out=None):
        w = layer.quantized_weight().dequantize(x.dtype)
        return matmul(permuted(gated(x, layer), layer), w, layer.bias, out)


class DequantizedOnce(QuantKernel):
    """The weight dequantized once, when bound, then torch's matmul: a GPU layer in a form
    the Triton kernels don't read (groups that neither are a multiple of 32 inputs nor
    int8's 16) that wasn't swapped for a float projection at load
    (``QuantizedLinear.choose_kernels`` swaps every one without an act-order permutation).
    Its float copy sits beside the codes: more memory than either alone."""

    name = "dequantized at load+matmul"

    def bind(self, layer) -> "DequantizedOnce":
        bound = DequantizedOnce()
        bound.weight = layer.quantized_weight().dequantize(_float_dtype(layer))
        return bound

    def __call__(self, x, layer, out=None):
        return matmul(permuted(gated(x, layer), layer), self.weight.to(x.dtype), layer.bias, out)


def _float_dtype(layer) -> torch.dtype:
    return getattr(layer, "dtype", None) or torch.bfloat16


def triton_reads(layer) -> bool:
    """Whether the GPU kernels take ``layer``'s layout: groups of a multiple of 32 inputs,
    or int8 in groups of 16 (GGUF Q6_K's sub-blocks)."""
    # (16: hearth_kernels.quant_gemv.SUB_GROUP, not imported: that imports Triton)
    return layer.group_size % 32 == 0 or (layer.bits == 8 and layer.group_size == 16)


class TritonQuant(QuantKernel):
    """The Triton dequantize-GEMV (``config``) for one row, the dequantize-GEMM for more."""

    def __init__(self, config=None, norm_first: bool = False) -> None:
        self.config = config
        self.prepared = None
        # norm_first: the norm kernel, then this GEMV, even where its kernel could take the
        # norm in (the tuner times both: a wide layer's many programs repeating the norm
        # may cost more than the norm's launch)
        self.norm_first = norm_first
        self.name = ("triton quant gemv" if config is None else _config_name(config)) + (
            " norm first" if norm_first else "")

    def bind(self, layer) -> "TritonQuant":
        from hearth_kernels.quant_gemv import PreparedQuant, prepare_int4, prepare_int8

        bound = TritonQuant(self.config, self.norm_first)
        if layer.bits == 8:
            bound.prepared = prepare_int8(layer.qweight, layer.scales, layer.mins, layer.group_size)
        elif int4_layout(layer.qweight) == "pairs":  # repacked by an earlier bind (the tuner's)
            bound.prepared = PreparedQuant(4, layer.group_size, layer.qweight.data, layer.scales.contiguous(),
                                           layer.mins.contiguous())
        else:
            from hearth_kernels.quant_gemv import forget_paired

            bound.prepared = prepare_int4(layer.qweight, layer.scales, layer.mins, layer.group_size)
            # One copy of the codes on the GPU: the module keeps the kernels' pair order
            # from now on (``quantized_weight`` turns it back into the canonical order).
            forget_paired(layer.qweight)
            layer.qweight.data = bound.prepared.qweight
            layer.qweight.int4_layout = "pairs"
        from hearth_kernels.quant_gemm import quant_gemm
        from hearth_kernels.quant_gemv import quant_gemv
        from hearth_kernels.counters import make_counters

        make_counters(layer.qweight.device)  # split-K launches get captured in CUDA graphs later
        bound._gemv, bound._gemm = quant_gemv, quant_gemm
        return bound

    def __call__(self, x, layer, out=None):
        if x.shape[0] == 1 and layer.perm is None:
            return self._gemv(x, self.prepared, config=self.config, swiglu=layer.act is not None, out=out,
                              bias=layer.bias)
        if layer.gated and layer.perm is None and layer.act is not silu_and_mul_reference:
            # the fused plan's SwiGLU (the Triton kernel's rounding), inside the GEMM's x pass where it has one
            return self._gemm(x, self.prepared, bias=layer.bias, out=out, swiglu=True,
                              dequant_rows=layer.dequant_rows)
        return self._gemm(permuted(gated(x, layer), layer), self.prepared, bias=layer.bias, out=out,
                          dequant_rows=layer.dequant_rows)

    def scratch_bytes(self, layer, rows: int, itemsize: int) -> int:
        """The dequantize path's [N, K] weight in the activation dtype where ``rows`` rows take
        it (``hearth_kernels/quant_gemm.gemm_path``; fewer rows never do where ``rows`` doesn't)."""
        from hearth_kernels.quant_gemm import gemm_path

        if self.prepared is None or rows < 2 or gemm_path(rows, self.prepared, dequant_rows=layer.dequant_rows) != "dequant":
            return 0
        return self.prepared.out_features * self.prepared.in_features * itemsize

    def fuses_norm(self, layer, norm) -> bool:
        """A dp4a config taking the norm in (``norm_fusable``: the row in one program, or x
        quantized beforehand), not ``norm_first``, no act-order permutation, and the fused
        plan's norm (the Triton one: the reference plan keeps torch's)."""
        from engine.layers.norm import TritonRMSNorm
        from hearth_kernels.quant_gemv import norm_fusable

        return (not self.norm_first and isinstance(norm, TritonRMSNorm) and layer.perm is None
                and self.prepared is not None and norm_fusable(self.prepared, self.config))

    def with_norm_first(self) -> "TritonQuant | None":
        """This config with the norm kernel first, where its GEMV would repeat the norm in
        each program's prologue (``norm_in_prologue``); None for any other."""
        from hearth_kernels.quant_gemv import norm_in_prologue

        if self.norm_first or self.config is None or not norm_in_prologue(self.config):
            return None
        return TritonQuant(self.config, norm_first=True)

    def normed(self, x, layer, residual, norm):
        from hearth_kernels.quant_gemv import quant_gemv_normed

        return quant_gemv_normed(x, self.prepared, norm.weight, norm.eps, residual=residual, config=self.config,
                                 bias=layer.bias)


class Fp8Kernel(QuantKernel):
    """An e4m3 layer: for one row on a GPU the row-scaled GEMV of ``config`` (a 3-tuple:
    ``hearth_kernels/gemv.py``'s K-loop kernel; a 4-tuple: ``hearth_kernels/fp8.fp8_gemv_rows``,
    x-stationary) or, a 5-tuple, ``hearth_kernels/fp8.fp8_mma`` (the activations rounded to
    e4m3 per token like the prompt path's, then the tensor cores) or, a ``gemv.TmaConfig``,
    ``hearth_kernels/gemv.gemv_tma`` (the K loop fed by TMA), else the activations
    rounded to e4m3 per token and ``torch._scaled_mm`` (on the CPU the same arithmetic in
    float32: there only to write checkpoints and to test, see
    ``engine.choices.WRITABLE_ANYWHERE``)."""

    def __init__(self, config: tuple[int, ...] | None = None, act_first: bool = False) -> None:
        self.config = config
        # act_first (a SwiGLU-down layer's GEMV configs): silu(gate) * up by the layer's act
        # into a [1, I] row once, then the GEMV without SwiGLU, where the fused GEMV computes
        # it again in every program (512 programs of 8 rows each take all 14,336 inputs of
        # the 8B's down); the tuner times both
        self.act_first = act_first
        self.out_dtype_ok: dict[torch.dtype, bool] = {}  # whether _scaled_mm writes that dtype here
        from hearth_kernels.gemv import TmaConfig

        if config is None:  # one row on a GPU: the K-loop GEMV's default config
            self.name = "fp8 scaled_mm (gemv for one row)"
        elif isinstance(config, TmaConfig):
            self.name = "fp8 gemv tma %dx%d/%dw s%d" % tuple(config)
        elif len(config) == 4:
            self.name = "fp8 gemv x-stationary %dx%d/%dw s%d" % tuple(config)
        elif len(config) == 5:
            self.name = "fp8 mma %dx%d/%dw s%d split%d" % tuple(config)
        else:
            self.name = "fp8 gemv %dx%d/%dw" % tuple(config)
        if act_first:
            if config is None or len(config) == 5:  # the mma path's rounding pass computes it once already
                raise ValueError("act_first takes a GEMV config (3- or 4-tuple)")
            self.name += " act first"

    def bind(self, layer) -> "Fp8Kernel":
        if self.config is not None and len(self.config) == 5 and layer.qweight.device.type == "cuda":
            from hearth_kernels.counters import make_counters

            make_counters(layer.qweight.device)  # its split-K launches get captured in CUDA graphs later
        return self

    def __call__(self, x, layer, out=None):
        from hearth_kernels.fp8 import quantize_rows, quantize_rows_reference

        if x.shape[0] == 1 and layer.qweight.device.type == "cuda":
            return self.one_row(x, layer, out)
        # A down projection's SwiGLU is computed inside the rounding pass (same arithmetic as layer.act).
        quantize = quantize_rows if x.device.type == "cuda" else quantize_rows_reference
        xq, xs = quantize(x, swiglu=layer.act is not None)
        return self._scaled(xq, xs, x.dtype, layer, out)

    def one_row(self, x, layer, out=None):
        """The batch-1 product on the GPU (Triton's interpreter in the CPU tests)."""
        w, s = layer.qweight, layer.scales
        swiglu = layer.act is not None
        if self.act_first and swiglu:
            x, swiglu = layer.act(x), False
        from hearth_kernels.gemv import TmaConfig

        if isinstance(self.config, TmaConfig):
            from hearth_kernels.gemv import gemv_tma

            return gemv_tma(x, w, layer.bias, swiglu=swiglu, out=out, config=self.config, scale=s)
        if self.config is not None and len(self.config) == 5:
            from hearth_kernels.fp8 import fp8_mma

            return fp8_mma(x, w, s, layer.bias, swiglu=swiglu, out=out, config=self.config)
        if self.config is not None and len(self.config) == 4:
            from hearth_kernels.fp8 import fp8_gemv_rows

            return fp8_gemv_rows(x, w, s, layer.bias, swiglu=swiglu, out=out, config=self.config)
        from hearth_kernels.gemv import gemv

        return gemv(x, w, layer.bias, swiglu=swiglu, out=out, config=self.config, scale=s)

    def scratch_bytes(self, layer, rows: int, itemsize: int) -> int:
        """act_first's [1, I] row (batch 1's: held for any ``rows``, since the pool serves every
        batch size's graph)."""
        return layer.in_features * itemsize if self.act_first and layer.act is not None else 0

    def _scaled(self, xq, xs, dtype, layer, out=None):
        """The e4m3 product of the rounded rows ``xq`` (scales ``xs``), in ``dtype``."""
        from hearth_kernels.fp8 import scaled_mm

        w, s = layer.qweight, layer.scales
        if self.out_dtype_ok.get(dtype, True):
            try:
                y = scaled_mm(xq, xs, w, s, dtype, layer.bias)
            except RuntimeError:  # a torch whose row-wise fp8 GEMM writes only bf16 (checked once, at warm-up)
                self.out_dtype_ok[dtype] = False
        if not self.out_dtype_ok.get(dtype, True):
            y = scaled_mm(xq, xs, w, s, torch.bfloat16, layer.bias).to(dtype)
        return y if out is None else out.copy_(y)

    def fuses_norm_rows(self, layer, norm) -> bool:
        """Several rows on a GPU after the fused plan's RMSNorm: the norm writes e4m3 rows and
        their scales itself (``hearth_kernels/fp8.norm_quantize_rows``), the same bits as the
        norm kernel then ``quantize_rows``, one kernel and one pass over the rows instead of two
        (on an H100, 8B offline throughput 10,601 against 10,524 tok/s with the two kernels:
        benchmarks/results/2026-12-05-i17-fp8-norm-8b-throughput-*-h100-2927d5f.json)."""
        from engine.layers.norm import TritonRMSNorm

        return (isinstance(norm, TritonRMSNorm) and layer.act is None and layer.qweight.device.type == "cuda"
                and layer.in_features <= 16384)

    def normed_rows(self, x, layer, residual, norm):
        from hearth_kernels.fp8 import norm_quantize_rows

        xq, xs, s = norm_quantize_rows(x, norm.weight, norm.eps, residual)
        return self._scaled(xq, xs, x.dtype, layer), s


class CpuQuant(QuantKernel):
    """Hearth's C kernel, for every number of rows (see the module docstring)."""

    name = "hearth cpu int-dot"

    def __init__(self) -> None:
        self.prepared = None

    def bind(self, layer) -> "CpuQuant":
        from hearth_kernels import cpu_quant

        bound = CpuQuant()
        prepare = cpu_quant.prepare_int4 if layer.bits == 4 else cpu_quant.prepare_int8
        bias = None if layer.bias is None else layer.bias.float()
        bound.prepared = prepare(layer.qweight, layer.scales, layer.mins, layer.group_size, bias=bias)
        bound._matmul = cpu_quant.matmul
        return bound

    def __call__(self, x, layer, out=None):
        x = permuted(gated(x, layer), layer)
        if x.dtype != torch.float32:
            y = self._matmul(x.float(), self.prepared)
            return y.to(x.dtype) if out is None else out.copy_(y)
        return self._matmul(x, self.prepared, out)


def cpu_kernel_unusable() -> str | None:
    """Why the C kernel doesn't run quantized layers at full speed on this machine (it can't
    be built, or the CPU has no AVX2); None: it does."""
    from hearth_kernels import cpu_quant

    problem = cpu_quant.available()
    if problem is None and cpu_quant.isa() != "avx2":
        problem = "this CPU has no AVX2 (the portable C path is slower than torch's float matmul)"
    return problem


def cpu_kernel_problem(layer) -> str | None:
    """Why the C kernel can't run ``layer`` here (None: it can, at full speed)."""
    from hearth_kernels import cpu_quant

    return cpu_kernel_unusable() or cpu_quant.supports(layer.bits, layer.group_size, layer.in_features)


def kernel_for(layer) -> QuantKernel:
    """The kernel ``layer`` runs on its device before any timing: the fastest one that
    runs there (Triton on a CUDA GPU, the C kernel on an AVX2 CPU, else the reference).
    ``HEARTH_QUANT_KERNEL=reference`` forces the reference: exact float activations (the
    CPU kernel rounds them to int8 blocks, as llama.cpp does), to measure what that costs."""
    if os.environ.get("HEARTH_QUANT_KERNEL") == "reference":
        return DequantMatmul()
    if layer.fmt == "e4m3":
        return Fp8Kernel()
    if layer.qweight.device.type == "cuda":
        return TritonQuant() if triton_reads(layer) else DequantizedOnce()
    if layer.qweight.device.type == "cpu" and cpu_kernel_problem(layer) is None:
        return CpuQuant()
    return DequantMatmul()


def kernel_candidates(layer) -> list[QuantKernel]:
    """The batch-1 kernels worth timing for ``layer``, the one it runs first first."""
    if layer.fmt == "e4m3" and layer.qweight.device.type == "cuda":
        from engine.layers.linear_kernels import fp8_gemv_configs

        configs = fp8_gemv_configs(layer.out_features, layer.in_features)
        # a SwiGLU-down layer: each GEMV config also with the activation computed once first
        twins = [Fp8Kernel(c, act_first=True) for c in configs if len(c) < 5] if layer.act is not None else []
        return [Fp8Kernel(c) for c in configs] + twins
    if layer.qweight.device.type != "cuda" or not triton_reads(layer) or layer.fmt != "int":
        return [layer.kernel]
    from hearth_kernels.quant_gemv import quant_gemv_configs

    return [TritonQuant(c) for c in quant_gemv_configs(layer.out_features, layer.in_features, layer.bits,
                                                        layer.group_size)]


def _config_name(config) -> str:
    """A GEMV config as ``ModelInfo.batch1_matmul`` shows it (rows x step / warps, kind,
    stages, and the K split when there is one)."""
    from hearth_kernels.quant_gemv import GemvConfig

    c = GemvConfig(*config)
    name = "triton quant gemv %dx%d/%dw k%d s%d" % c[:5]
    return name + (f" split{c.split}" if c.split > 1 else "") + (" qx" if c.qx else "")
