"""The ``flash-attn`` attention backend: Tri Dao's FlashAttention-2 package, when installed.

Decode runs ``flash_attn_with_kvcache`` over the paged cache (``block_table``); steps
with prefill chunks run ``flash_attn_varlen_func`` with the same block table (paged
variable-length attention, flash-attn >= 2.6). Its causal mask is aligned bottom-right
when a chunk has fewer queries than keys, which is exactly "new tokens attend to the
cached prefix and causally among themselves". A sliding window W (keys p-W < k <= p)
is ``window_size=(W - 1, 0)``. The K/V write stays Hearth's own Triton kernel.

flash-attn's paged cache needs pages of a multiple of 256 tokens, so the loader uses
256-token KV blocks with this backend. It runs in bf16/fp16 only (no fp32).

Not verified on hardware yet: neither the development machines nor the lent GPU have
the package, so this backend is only exercised where ``flash_attn`` imports
(tests/engine/test_flash_attn_backend.py skips otherwise). CUDA graphs stay off for it
until that check has run.
"""

from __future__ import annotations

import torch

from engine.layers.attention import AttentionBackend, AttentionMetadata

PAGE_MULTIPLE = 256  # flash-attn's paged KV cache: page_block_size % 256 == 0
MIN_VERSION = (2, 6)  # block_table support in flash_attn_varlen_func


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


class FlashAttnBackend(AttentionBackend):
    name = "flash-attn"
    cuda_graphs = False  # until verified on a GPU with the package (see module docstring)
    fused_kernels = True
    required_block_multiple = PAGE_MULTIPLE

    @classmethod
    def available(cls, device: torch.device | str | None = None) -> list[str]:
        reasons = []
        try:
            import flash_attn
        except ImportError as e:
            return [f"the flash-attn package is not installed ({e}); install it with "
                    "`pip install flash-attn --no-build-isolation` on a CUDA machine, or use triton"]
        version = getattr(flash_attn, "__version__", "0")
        if _version_tuple(version) < MIN_VERSION:
            reasons.append(f"flash-attn {version} is too old: paged prefill needs >= "
                           f"{'.'.join(map(str, MIN_VERSION))} (pip install -U flash-attn)")
        try:
            dev = torch.device(device) if device is not None else torch.device("cuda")
        except (RuntimeError, TypeError):
            return reasons + [f"unknown device {device!r}"]
        if dev.type != "cuda" or not torch.cuda.is_available():
            reasons.append(f"flash-attn runs on NVIDIA GPUs only, not on {dev}")
        elif torch.cuda.get_device_capability(dev)[0] < 8:
            reasons.append("flash-attn 2 needs an Ampere or newer GPU (compute capability 8.0+)")
        return reasons

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale, sliding_window)
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        from hearth_kernels.kv_cache import write_kv_cache

        self._decode = flash_attn_with_kvcache
        self._varlen = flash_attn_varlen_func
        self._write = write_kv_cache
        self._window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if kv_cache.shape[2] % PAGE_MULTIPLE:
            raise ValueError(f"flash-attn needs KV blocks of a multiple of {PAGE_MULTIPLE} tokens, "
                             f"got {kv_cache.shape[2]}; load with block_size={PAGE_MULTIPLE}")
        self._write(k, v, kv_cache, meta.slot_mapping)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        if meta.decode_only:
            out = self._decode(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.seq_lens,
                               block_table=meta.block_tables, softmax_scale=self.scale,
                               causal=True, window_size=self._window)
            return out.squeeze(1)
        zero = torch.zeros(1, dtype=torch.int32, device=q.device)
        cu_k = torch.cat([zero, meta.seq_lens.cumsum(0, dtype=torch.int32)])
        return self._varlen(q, k_cache, v_cache, cu_seqlens_q=meta.query_start, cu_seqlens_k=cu_k,
                            max_seqlen_q=max(meta.query_lens_cpu), max_seqlen_k=meta.max_seq_len,
                            softmax_scale=self.scale, causal=True, window_size=self._window,
                            block_table=meta.block_tables)
