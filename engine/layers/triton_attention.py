"""The ``triton`` attention backend: Hearth's paged Triton kernels (``hearth_kernels/``).

Per layer and step: one kernel scatters this step's K/V into the paged cache, then a
decode-only step runs the split-K decode kernel (one query per sequence, GQA groups
sharing K/V tiles) and any step with prefill chunks runs the FlashAttention-2 style
variable-length kernel, which also serves the decode rows mixed into such a step. A step
that is one fresh prompt (no cached prefix, the usual time-to-first-token case) runs
torch's FlashAttention SDPA kernel on the contiguous k/v instead: it measured twice as
fast as the paged kernel at long prompts. With an fp8 cache every path attends to K/V as
stored: the kernels widen the cache's bytes, the SDPA path rounds its k/v through fp8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.layers.attention import AttentionBackend, AttentionMetadata, to_fp8


def _interpreting() -> bool:
    from hearth_kernels._compat import interpreting  # kernels import lazily: Triton loads with them

    return interpreting()


class TritonAttention(AttentionBackend):
    """Paged attention in Triton: fast on CUDA GPUs.

    Runs on CUDA devices. With ``TRITON_INTERPRET=1`` set before Triton is first imported,
    it also runs on the CPU through Triton's interpreter: very slow, meant for tests and
    debugging only.

    The decode kernel's grid needs a static upper bound on context lengths; it reads
    ``meta.max_seq_len_bound`` when the metadata carries one (a CUDA-graph capture bound),
    else ``meta.max_seq_len``. The prefill kernel's tile height comes from the max of
    ``meta.query_lens_cpu``. The decode path reads only device tensors and static sizes,
    so it may be captured in a CUDA graph (``cuda_graphs``); padding rows may use slot -1
    (nothing is written) and any seq_len >= 0 (0 gives zeros).
    """

    name = "triton"
    cuda_graphs = True
    fused_kernels = True
    rotates = True

    @classmethod
    def available(cls, device: torch.device | str | None = None) -> list[str]:
        reasons = []
        try:
            import triton  # noqa: F401
        except ImportError as e:
            reasons.append(f"Triton is not installed or failed to import ({e}); "
                           "install it with `pip install triton` (Linux) or use attention='torch'")
        try:
            dev = torch.device(device) if device is not None else None
        except (RuntimeError, TypeError):
            return reasons + [f"unknown device {device!r}; pass 'cuda', 'cuda:N' or 'cpu'"]
        if _interpreting() and (dev is None or dev.type == "cpu"):
            pass  # Triton's interpreter runs the kernels on CPU tensors (tests, debugging)
        elif dev is not None and dev.type != "cuda":
            reasons.append(f"runs on CUDA GPUs only, not on {dev}: use the torch backend there")
        elif not torch.cuda.is_available():
            reasons.append("no CUDA GPU is visible to PyTorch (CPU-only build, or no driver); "
                           "use attention='torch'")
        return reasons

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale, sliding_window)
        # Imported here so that merely listing backends never imports Triton.
        from hearth_kernels.kv_cache import write_kv_cache
        from hearth_kernels.paged_decode import paged_decode_attention
        from hearth_kernels.paged_prefill import paged_prefill_attention
        from hearth_kernels.rotary import apply_rotary_and_write_kv

        self._write = write_kv_cache
        self._rotate_and_write = apply_rotary_and_write_kv
        self._decode = paged_decode_attention
        self._prefill = paged_prefill_attention

    def _fresh_prefill(self, q, k, v, bucket: int | None = None):
        """One sequence whose whole context is this step (a new prompt, no cached prefix):
        its K/V are the contiguous k/v of this step, so torch's SDPA can run on them
        directly. On an H100 torch picks cuDNN's kernel (d=128, GQA 32/8, bf16, causal):
        586 TFLOP/s at 8,192 tokens against 320 for the paged Triton kernel and 319 for
        SDPA's FlashAttention-2 (benchmarks/results/*-profile-prefill-8k-h100.json).

        cuDNN builds an execution plan for every new shape, 70-90 ms each, which a chat
        with prompts of every length would pay on nearly every turn. So the sequence runs
        padded to a length bucket (``sdpa_bucket``) in one fixed layout, and
        ``warm_fresh_prefill`` builds every bucket's plan at load (on the engine's thread:
        torch keeps cuDNN plans per thread). Causality keeps the real queries away from the
        (zeroed) padding keys; the padding queries' rows are dropped.
        """
        t, h, d = q.shape
        kvh = k.shape[1]
        tp = bucket or (sdpa_bucket(t) if q.is_cuda else t)
        width = h + 2 * kvh
        fused_layout = q.stride(0) == k.stride(0) == v.stride(0) == width * d \
            and k.data_ptr() == q.data_ptr() + h * d * q.element_size() \
            and v.data_ptr() == k.data_ptr() + kvh * d * q.element_size()
        if tp != t or not fused_layout:  # else already as warmed (Llama-style qkv views)
            buf = _new_buffer(q, tp, width, d)
            if tp > t:
                # Masked keys get probability 0, but P @ V still multiplies their values:
                # 0 * NaN from stale memory would poison the real rows. Zero the padding.
                buf[t:].zero_()
            buf[:t, :h] = q
            buf[:t, h:h + kvh] = k
            buf[:t, h + kvh:] = v
            q, k, v = buf[:, :h], buf[:, h:h + kvh], buf[:, h + kvh:]
        return self._sdpa(q, k, v)[:t]

    def _sdpa(self, q, k, v):
        qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        group = self.num_heads // self.num_kv_heads
        try:
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=self.scale,
                                               enable_gqa=group > 1)
        except TypeError:  # torch < 2.5: no enable_gqa
            kt, vt = kt.repeat_interleave(group, dim=1), vt.repeat_interleave(group, dim=1)
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=self.scale)
        return o[0].transpose(0, 1)

    def warm_fresh_prefill(self, max_tokens: int, device: torch.device, dtype: torch.dtype) -> int:
        """Run SDPA once at every bucket up to ``max_tokens`` (builds cuDNN's plans now rather
        than on a user's first prompt of each length); returns the number of buckets."""
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        buckets = sdpa_buckets(max_tokens)
        buf = torch.zeros(buckets[-1], h + 2 * kvh, d, device=device, dtype=dtype)
        for b in buckets:
            part = buf[:b]
            self._sdpa(part[:, :h], part[:, h:h + kvh], part[:, h + kvh:])
        torch.cuda.synchronize(device)
        return len(buckets)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, rope=None) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D]; writes k/v into ``kv_cache``; returns [T, H, D].
        With ``rope`` (positions, cos, sin) q and k are rotated first, by the same kernel."""
        if rope is None:
            self._write(k, v, kv_cache, meta.slot_mapping)
        else:
            positions, cos, sin = rope
            self._rotate_and_write(q, k, v, positions, cos, sin, kv_cache, meta.slot_mapping)
        if meta.decode_only:
            bound = getattr(meta, "max_seq_len_bound", None) or meta.max_seq_len
            return self._decode(q, kv_cache, meta.block_tables, meta.seq_lens, self.scale,
                                sliding_window=self.sliding_window, max_seq_len=bound)
        nd = getattr(meta, "num_decode", 0)
        if nd:
            # A mixed step: the leading single-token rows take the decode kernel (one program
            # per KV head serves its whole query group), the prefill chunks the prefill kernel.
            # In the prefill kernel each decode row would fill a whole query tile per head.
            split = _split(meta, nd)
            out = torch.empty_like(q)
            self._decode(q[:nd], kv_cache, split.decode_tables, split.decode_lens, self.scale,
                         sliding_window=self.sliding_window, max_seq_len=split.decode_max_len,
                         out=out[:nd])
            # Always the paged kernel here, even for one fresh prompt: SDPA's cuDNN kernel
            # builds a plan per new length, which dominated such steps in a throughput run.
            p = split.prefill
            self._prefill(q[nd:], kv_cache, p.block_tables, p.query_start, p.seq_lens, self.scale,
                          max_query_len=max(p.query_lens_cpu), sliding_window=self.sliding_window,
                          out=out[nd:])
            return out
        if q.is_cuda and not meta.captured and meta.num_seqs == 1 \
                and meta.query_lens_cpu[0] == meta.seq_lens_cpu[0] \
                and (self.sliding_window is None or self.sliding_window >= meta.seq_lens_cpu[0]):
            if kv_cache.dtype != q.dtype:  # an fp8 cache: attend to K/V as stored, like every other path
                k, v = to_fp8(k).to(k.dtype), to_fp8(v).to(v.dtype)
            return self._fresh_prefill(q, k, v)
        return self._prefill(q, kv_cache, meta.block_tables, meta.query_start, meta.seq_lens,
                             self.scale, max_query_len=max(meta.query_lens_cpu),
                             sliding_window=self.sliding_window)


def _new_buffer(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """Uninitialised scratch (a seam for tests, which fill it with NaN)."""
    return like.new_empty(shape)


def sdpa_bucket(tokens: int) -> int:
    """The padded length a fresh prompt's SDPA runs at: a multiple of 256 up to 2,048 and
    of 512 beyond (at most 20% extra attention work, usually far less; none at multiples)."""
    step = 256 if tokens <= 2048 else 512
    return -(-tokens // step) * step


def sdpa_buckets(max_tokens: int) -> list[int]:
    top = sdpa_bucket(max_tokens)
    return list(range(256, min(top, 2048) + 1, 256)) + list(range(2560, top + 1, 512))


class _Split:
    """A mixed step's metadata cut into its decode rows and its prefill rows (built once per
    step, shared by all layers)."""

    __slots__ = ("decode_tables", "decode_lens", "decode_max_len", "prefill")

    def __init__(self, meta: AttentionMetadata, nd: int) -> None:
        self.decode_tables = meta.block_tables[:nd]
        self.decode_lens = meta.seq_lens[:nd]
        self.decode_max_len = getattr(meta, "max_seq_len_bound", None) or max(meta.seq_lens_cpu[:nd])
        qs = meta.query_start[nd:] - nd
        # Copies, not views: a view's start may lose the 16-byte alignment Triton specialises on.
        self.prefill = AttentionMetadata(
            slot_mapping=meta.slot_mapping[nd:], block_tables=meta.block_tables[nd:].clone(),
            seq_lens=meta.seq_lens[nd:].clone(), query_start=qs, seq_lens_cpu=meta.seq_lens_cpu[nd:],
            query_lens_cpu=meta.query_lens_cpu[nd:], max_seq_len=max(meta.seq_lens_cpu[nd:]),
            block_size=meta.block_size)


def _split(meta: AttentionMetadata, nd: int) -> _Split:
    split = getattr(meta, "backend_cache", None)
    if not isinstance(split, _Split):
        split = meta.backend_cache = _Split(meta, nd)
    return split
