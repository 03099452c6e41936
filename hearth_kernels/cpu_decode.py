"""A whole batch-1 decode step of a Llama-family model in one C call (CPU).

Eager torch spends ~900 small ops per decode step of a 30-layer model (norms, RoPE, the
paged-attention gather, einsum and softmax, the KV write, module calls): 20+ ms per
token on a 2-core CPU, more than streaming a 4-bit model's weights. ``DecodeModel.step``
runs the same step (hearth_kernels/cpu/hq_decode.h) as one ctypes call: the quantized
projections through the int4/int8 block-dot rows of ``hearth_kernels.cpu_quant`` (the same
arithmetic as its ``matmul``: int8 activation blocks), float32 ones through an AVX2 fp32
GEMV, rows of each matmul (and chunks of attention's keys at long contexts) shared over
the C thread pool.

It takes plain tensors (kernels never import engine): per layer its norms' weights (and
per-head q/k norms' where the model has them: Qwen3), its
four projections (each a float32 [N, K] tensor with an optional bias, or a
``cpu_quant.PreparedWeight``), its paged KV cache ([2, num_blocks, block_size, kv_heads,
head_dim], float32 or float8 e4m3: ``KV_DTYPES``); the embedding and head likewise; RoPE's cos/sin tables [positions,
head_dim] (rotate-half form). The C side keeps only pointers: this object holds every
tensor alive, and the caller must not reallocate them (the KV caches included).

Use:
    model = DecodeModel(layers=[DecodeLayer(...), ...], embed=..., head=..., ...)
    logits = model.step(token_id, position, block_table)   # fp32 [1, vocab]
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from hearth_kernels import cpu_quant
from hearth_kernels.cpu_quant import PreparedWeight

_FLOAT32 = cpu_quant.FLOAT32_BITS
#: Attention's keys are split over the threads (flash-decoding) once context x query heads
#: reaches this: below it attention is a few µs, less than waking a helper thread.
SPLIT_MIN = 4096
#: The KV caches the step reads and writes: float32, or float8 e4m3 bytes (written as
#: engine.layers.attention.to_fp8 does: saturated at +-448, to nearest, ties to even).
KV_DTYPES = (torch.float32, torch.float8_e4m3fn)
#: The widest head an e4m3 cache may have (HD_E4M3_MAX_HEAD: the C step's scratch rows).
E4M3_MAX_HEAD = 256


class _Layer(ctypes.Structure):
    """Mirror of ``hd_layer`` in hearth_kernels/cpu/hq_decode.h."""

    _fields_ = [
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("qkv", cpu_quant._WeightDesc),
        ("o", cpu_quant._WeightDesc),
        ("gate_up", cpu_quant._WeightDesc),
        ("down", cpu_quant._WeightDesc),
        ("kv", ctypes.c_void_p),
        ("q_norm", ctypes.c_void_p),
        ("k_norm", ctypes.c_void_p),
    ]


class _Model(ctypes.Structure):
    """Mirror of ``hd_model`` in hearth_kernels/cpu/hq_decode.h."""

    _fields_ = [(name, ctypes.c_int32) for name in (
        "layers", "hidden", "heads", "kv_heads", "head_dim", "inter", "vocab", "block_size",
        "num_blocks", "window", "max_positions", "isa", "split_min", "kv_fp8")] + [
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("final_norm", ctypes.c_void_p),
        ("embed", cpu_quant._WeightDesc),
        ("head", cpu_quant._WeightDesc),
        ("layer", ctypes.c_void_p),
    ]


#: A projection: a float32 [N, K] weight (optional bias [N]) or a prepared quantized one.
Projection = "tuple[torch.Tensor, torch.Tensor | None] | PreparedWeight"


@dataclass
class DecodeLayer:
    """One decoder layer's tensors. ``qkv``: rows [q | k | v]; ``gate_up``: rows
    [gate | up]; ``down`` takes silu(gate) * up. Float projections are (weight, bias)."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: object
    o: object
    gate_up: object
    down: object
    kv_cache: torch.Tensor
    q_norm: torch.Tensor | None = None  # [head_dim]: each head's q RMS-normed before RoPE (Qwen3)
    k_norm: torch.Tensor | None = None  # [head_dim]: likewise each KV head's k


def _f32(t: torch.Tensor, name: str, numel: int | None = None) -> torch.Tensor:
    if t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous float32 CPU tensor, not {t.dtype} on {t.device}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements, expected {numel}")
    return t


def _desc(proj, name: str, n: int, k: int, keep: list) -> cpu_quant._WeightDesc:
    """The C descriptor of a projection (or embedding) of n outputs over k inputs."""
    if isinstance(proj, PreparedWeight):
        if (proj.out_features, proj.in_features) != (n, k):
            raise ValueError(f"{name} is {proj.out_features}x{proj.in_features}, expected {n}x{k}")
        keep.append(proj)
        d = cpu_quant._WeightDesc()
        ctypes.memmove(ctypes.addressof(d), proj._addr, ctypes.sizeof(d))
        return d
    weight, bias = proj if isinstance(proj, tuple) else (proj, None)
    weight = _f32(weight, f"{name} weight", n * k)
    if bias is not None:
        bias = _f32(bias, f"{name} bias", n)
    keep.extend((weight, bias))
    return cpu_quant._WeightDesc(_FLOAT32, n, k, k, k, 0, weight.data_ptr(), None, None,
                                 bias.data_ptr() if bias is not None else None)


def available() -> str | None:
    """None when the C decode step can run here, else why not (no compiler, a failed build)."""
    return cpu_quant.available()


class DecodeModel:
    """A Llama-family model's batch-1 decode step in C (see the module docstring).

    Sizes: ``heads``/``kv_heads`` of ``head_dim``; ``inter`` the MLP's width; ``window``
    a sliding window (None: full causal attention); ``scale`` attention's softmax scale.
    """

    def __init__(self, *, layers: list[DecodeLayer], embed, head, final_norm: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, hidden: int, heads: int, kv_heads: int, head_dim: int,
                 inter: int, vocab: int, eps: float, scale: float, window: int | None = None,
                 isa: str | None = None) -> None:
        lib = cpu_quant._library()
        if not hasattr(lib, "_hd_ready"):
            lib.hd_decode_step.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                           ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
            lib.hd_decode_step.restype = ctypes.c_int
            lib.hd_decode_rows.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                           ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                           ctypes.c_int]
            lib.hd_decode_rows.restype = ctypes.c_int
            lib._hd_ready = True
        if heads % kv_heads or head_dim % 2:
            raise ValueError(f"{heads} heads over {kv_heads} KV heads of {head_dim}: not a GQA shape")
        keep: list = []
        qkv_rows = (heads + 2 * kv_heads) * head_dim
        shape = None
        kv_dtype = layers[0].kv_cache.dtype if layers else torch.float32
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"the KV cache must be float32 or float8_e4m3fn, not {kv_dtype}")
        if kv_dtype == torch.float8_e4m3fn and head_dim > E4M3_MAX_HEAD:
            raise ValueError(f"an e4m3 KV cache takes heads of up to {E4M3_MAX_HEAD}, not {head_dim}")
        arr = (_Layer * len(layers))()
        for i, lt in enumerate(layers):
            kv = lt.kv_cache
            if kv.dtype != kv_dtype or not kv.is_cpu or not kv.is_contiguous() or kv.dim() != 5 \
                    or tuple(kv.shape[3:]) != (kv_heads, head_dim) or kv.shape[0] != 2:
                raise ValueError(f"layer {i}'s KV cache must be {str(kv_dtype).removeprefix('torch.')} "
                                 f"[2, blocks, block, {kv_heads}, {head_dim}] like layer 0's")
            if shape is not None and tuple(kv.shape) != shape:
                raise ValueError("every layer's KV cache must have the same shape")
            shape = tuple(kv.shape)
            keep.append(kv)
            arr[i] = _Layer(_f32(lt.input_norm, "input norm", hidden).data_ptr(),
                            _f32(lt.post_norm, "post-attention norm", hidden).data_ptr(),
                            _desc(lt.qkv, f"layer {i} qkv", qkv_rows, hidden, keep),
                            _desc(lt.o, f"layer {i} o", hidden, heads * head_dim, keep),
                            _desc(lt.gate_up, f"layer {i} gate_up", 2 * inter, hidden, keep),
                            _desc(lt.down, f"layer {i} down", hidden, inter, keep),
                            kv.data_ptr(),
                            *(None if t is None else _f32(t, f"layer {i} q/k norm", head_dim).data_ptr()
                              for t in (lt.q_norm, lt.k_norm)))
            keep.extend((lt.input_norm, lt.post_norm, lt.q_norm, lt.k_norm))
        if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != head_dim:
            raise ValueError(f"cos/sin must be [positions, {head_dim}]")
        for t in (cos, sin, final_norm):
            keep.append(_f32(t, "cos/sin/final norm"))
        if final_norm.numel() != hidden:
            raise ValueError(f"the final norm has {final_norm.numel()} elements, expected {hidden}")
        self._model = _Model(len(layers), hidden, heads, kv_heads, head_dim, inter, vocab, shape[2], shape[1],
                             window or 0, cos.shape[0], cpu_quant._isa_code(isa), SPLIT_MIN,
                             int(kv_dtype == torch.float8_e4m3fn), eps, scale,
                             cos.data_ptr(), sin.data_ptr(), final_norm.data_ptr(),
                             _desc(embed, "embedding", vocab, hidden, keep),
                             _desc(head, "head", vocab, hidden, keep), ctypes.addressof(arr))
        self._layers = arr
        self._keep = keep
        self._addr = ctypes.addressof(self._model)
        self._step = lib.hd_decode_step
        self._rows = lib.hd_decode_rows
        self.vocab = vocab
        self.block_size = shape[2]
        self.max_positions = cos.shape[0]
        self._table = (ctypes.c_int32 * 64)()

    def configure(self, *, isa: str | None = None, split_min: int | None = None) -> None:
        """Change the code path (``isa``: "avx2" or "scalar"; None leaves it) or the size
        from which attention splits its keys over threads (tests exercise both paths)."""
        if isa is not None:
            self._model.isa = cpu_quant._isa_code(isa)
        if split_min is not None:
            self._model.split_min = split_min

    def step(self, token: int, position: int, block_table: list[int], *, threads: int | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits fp32 [1, vocab] for ``token`` at ``position`` of the sequence whose KV
        blocks are ``block_table`` (its K/V for this position is written into the caches),
        into ``out`` when given (contiguous fp32, vocab elements: a fresh 200 KB buffer
        per step costs page faults). ``threads`` defaults to torch.get_num_threads()."""
        n = len(block_table)
        if n > len(self._table):
            self._table = (ctypes.c_int32 * max(n, 2 * len(self._table)))()
        table = self._table
        table[:n] = block_table
        logits = torch.empty(1, self.vocab, dtype=torch.float32) if out is None else out
        if logits.dtype != torch.float32 or not logits.is_contiguous() or logits.numel() != self.vocab:
            raise ValueError(f"out must be a contiguous float32 tensor of {self.vocab} elements")
        nthreads = torch.get_num_threads() if threads is None else threads
        rc = self._step(self._addr, token, position, table, n, logits.data_ptr(), nthreads)
        if rc:
            raise RuntimeError(f"the C decode step failed ({_failure(rc)}): token {token}, "
                               f"position {position}, {n} blocks of {self.block_size}")
        return logits

    def step_rows(self, tokens: list[int], positions: list[int], block_tables: list[list[int]], *,
                  threads: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits fp32 [n, vocab] of n sequences' decode steps in one call (``step`` of each,
        the same bits, with every weight read once for all of them): row i is
        ``tokens[i]`` at ``positions[i]`` of the sequence whose blocks are
        ``block_tables[i]``; the sequences must differ. Into ``out`` (the first n rows of a
        contiguous fp32 [rows, vocab] tensor) when given."""
        n = len(tokens)
        if not (n == len(positions) == len(block_tables)) or n == 0:
            raise ValueError("one token, position and block table per row, at least one row")
        stride = max(len(t) for t in block_tables)
        tables = torch.full((n, stride), -1, dtype=torch.int32)
        for i, t in enumerate(block_tables):
            tables[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
        ints = torch.tensor([list(tokens), list(positions), [len(t) for t in block_tables]], dtype=torch.int32)
        logits = torch.empty(n, self.vocab, dtype=torch.float32) if out is None else out
        if (logits.dtype != torch.float32 or not logits.is_contiguous() or logits.dim() != 2
                or logits.shape[1] != self.vocab or logits.shape[0] < n):
            raise ValueError(f"out must be a contiguous float32 tensor [>= {n}, {self.vocab}]")
        nthreads = torch.get_num_threads() if threads is None else threads
        rc = self._rows(self._addr, n, ints[0].data_ptr(), ints[1].data_ptr(), tables.data_ptr(), stride,
                        ints[2].data_ptr(), logits.data_ptr(), nthreads)
        if rc:
            raise RuntimeError(f"the C decode step failed ({_failure(rc)}) on {n} rows: tokens "
                               f"{list(tokens)}, positions {list(positions)}, blocks of {self.block_size}")
        return logits[:n]


def _failure(rc: int) -> str:
    """What a C decode step's nonzero return code means (3: its own range check)."""
    return "a token, position or block out of range" if rc == 3 else str(cpu_quant._ERRORS.get(rc, rc))


def e4m3_codes(x: torch.Tensor) -> torch.Tensor:
    """The C step's e4m3 codes (uint8) of float32 ``x``, as it writes them into the cache."""
    lib = cpu_quant._library()
    x = _f32(x.contiguous(), "x")
    out = torch.empty(x.shape, dtype=torch.uint8)
    lib.hd_e4m3_encode_n(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_int(x.numel()))
    return out


def e4m3_values(codes: torch.Tensor) -> torch.Tensor:
    """The float32 values the C step reads for e4m3 ``codes`` (uint8)."""
    lib = cpu_quant._library()
    if codes.dtype != torch.uint8 or not codes.is_cpu:
        raise ValueError(f"codes must be a uint8 CPU tensor, not {codes.dtype} on {codes.device}")
    codes = codes.contiguous()
    out = torch.empty(codes.shape, dtype=torch.float32)
    lib.hd_e4m3_decode_n(ctypes.c_void_p(codes.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_int(codes.numel()))
    return out
