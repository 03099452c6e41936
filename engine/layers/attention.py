"""Paged attention: per-step metadata, the backend registry and the ``torch`` reference.

The KV cache of one layer is a tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(K then V), in the model's dtype or float8 e4m3 (``kv_cache_dtype="fp8"``: stored
unscaled, saturating at +-448). Token ``t`` of a sequence lives in block
``block_table[t // block_size]`` at offset ``t % block_size``; the runner precomputes each
new token's flat slot ``block * block_size + offset`` (the slot mapping).

Backends are listed by name (``_REGISTRY``) and import lazily; each exposes
``available() -> list[str]`` of reasons it cannot run here (empty when usable), so the CLI
and the GUI can explain.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448: fp8 caches saturate there

#: On the CPU the ``torch`` backend reads a prompt's queries in tiles of this many at fixed
#: positions (tile ``j``: positions ``16j .. 16j+15``), each against the keys up to its end
#: rounded up to PROMPT_TILE_KEYS (zeros past the sequence's end, masked), a partial tile's
#: other rows copies of its nearest real ones (dropped after). A tile's shape then depends
#: only on its position, so a token's attention gets the same bits however its prompt was
#: split into chunks (a step's budget, a prefix-cache hit of any length, other requests in
#: the step). torch's CPU SDPA is not shape-invariant: a query's result changes with its
#: chunk's length (chunks of about 192-399 queries block their rows otherwise) and with the
#: number of keys, masked ones included, and a quantized model's next layer (int8 activation
#: blocks) magnifies the last bit into other tokens. Measured on this project's CPU: random
#: chunkings agree bit for bit (tests/engine/test_attention_tiles.py); tiles of 16 waste
#: least on the one-token chunks of a cache hit. A GPU reads a chunk in one call.
PROMPT_TILE = 16
#: ... and each tile's keys rounded up to a multiple of this many (zeros, masked): tiles of
#: the same key length then go in one batched call (the same bits as one call each; about
#: half the time of one SDPA call per chunk at 256-token chunks, measured).
PROMPT_TILE_KEYS = 128


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float8 e4m3, saturating at +-448 (as the Triton KV write does)."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


@dataclass(slots=True)
class AttentionMetadata:
    """Everything attention needs for one step, built once by the runner per forward.

    Tokens of all sequences are flattened: sequence ``i`` owns query rows
    ``query_start[i]:query_start[i+1]`` and, after this step's write, has ``seq_lens[i]``
    tokens of context in the cache (its new tokens are the last ``query_lens[i]`` of them).
    """

    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32 (device)
    query_start: torch.Tensor  # [B + 1] int32 (device)
    seq_lens_cpu: list[int]
    query_lens_cpu: list[int]
    max_seq_len: int
    block_size: int
    # Static upper bound on seq_lens for CUDA-graph capture (decode grids must not depend on
    # the step); None outside graphs.
    max_seq_len_bound: int | None = None
    # The runner puts decode sequences (one token at or past the prompt) first in a mixed
    # step: the first ``num_decode`` sequences have one query each, so a backend may send them
    # to its decode kernel and only the rest to the prefill kernel (a prompt's single-token
    # chunk is among the rest: ModelRunner._forward_rows).
    num_decode: int = 0
    # Per-step scratch a backend may fill once and reuse in every layer (e.g. the triton
    # backend's split of a mixed step); the runner builds a new metadata each step.
    backend_cache: object = None
    # Built for a CUDA-graph capture: the host-side fields describe the captured shape, not
    # a step's contents, so a backend must take a path that reads only device tensors and
    # static sizes (the triton backend's paged kernels, never its fresh-prompt SDPA).
    captured: bool = False

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens_cpu)


class AttentionBackend:
    """Interface: write this step's K/V into the paged cache, then attend."""

    name = "?"
    # May its decode path, and its prefill path for metadata marked ``captured``, be
    # captured in a CUDA graph (depends only on tensor contents and static shapes)? The
    # torch reference slices by the step's max length: no.
    cuda_graphs = False
    # Also route norms, RoPE and SiLU-and-mul through the Triton kernels with this backend
    # (read once, by the load's kernel plan: engine.layers.kernel_plan).
    fused_kernels = False
    # KV block sizes must be a multiple of this (flash-attn's pages: 256 tokens).
    required_block_multiple = 1
    # May ``forward`` be given ``rope`` = (positions, cos, sin)? Then the kernel that writes
    # this step's k and v into the cache rotates q and k first (in place), one kernel for the
    # two (hearth_kernels/rotary.apply_rotary_and_write_kv): the caller skips its RoPE.
    rotates = False

    @classmethod
    def available(cls, device: torch.device | str | None = None) -> list[str]:
        """Reasons this backend can't be used (empty list: usable)."""
        return []

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, rope=None) -> torch.Tensor:
        raise NotImplementedError


def padded_table_width(num_blocks: int) -> int:
    """Block-table columns for tables of up to ``num_blocks`` blocks: rounded up to 16, so
    the kernels' specialisation on the table's row stride is the same in every step, eager
    or graph (no recompiles while serving)."""
    return -(-num_blocks // 16) * 16


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter this step's keys and values into their cache slots."""
    _, num_blocks, block_size, h, d = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, h, d)
    if kv_cache.dtype == torch.float8_e4m3fn:
        # Copy the bytes: index_copy_ has no float8 kernel on every device.
        flat = flat.view(torch.uint8)
        flat[0].index_copy_(0, slot_mapping, to_fp8(k).view(torch.uint8))
        flat[1].index_copy_(0, slot_mapping, to_fp8(v).view(torch.uint8))
        return
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


class TorchAttention(AttentionBackend):
    """Reference backend in plain torch: correct anywhere, CPU included; not fast.

    Decode rows (the leading ``meta.num_decode``; every row of an all-single-token step on a
    GPU) are batched (gather every sequence's blocks, mask past its length); prompt chunks
    loop over sequences and call SDPA with an explicit mask, on the CPU in fixed-position
    tiles (PROMPT_TILE: the same bits however a prompt is chunked).
    """

    name = "torch"

    def forward(self, q, k, v, kv_cache, meta):
        write_kv(k, v, kv_cache, meta.slot_mapping)
        # The leading decode rows together; a single-token prompt chunk (a cache hit's last
        # token) reads as a prompt on the CPU, with the bits it gets cold (PROMPT_TILE).
        tiled = q.device.type == "cpu"
        nd = meta.num_decode if tiled else meta.num_seqs if meta.decode_only else meta.num_decode
        if nd == meta.num_seqs:
            return self._decode(q, kv_cache, meta)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(q[:nd], kv_cache, meta, nd)
        start = nd
        for i, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            if i < nd:
                continue
            nblocks = -(-slen // meta.block_size)
            blocks = meta.block_tables[i, :nblocks].long()
            keys = kv_cache[0, blocks].reshape(-1, self.num_kv_heads, self.head_dim)[:slen]
            vals = kv_cache[1, blocks].reshape(-1, self.num_kv_heads, self.head_dim)[:slen]
            qs = q[start:start + qlen]
            if tiled:
                out[start:start + qlen] = self._prompt_tiles(qs, keys, vals, slen - qlen)
            else:
                qpos = torch.arange(slen - qlen, slen, device=q.device)
                out[start:start + qlen] = self._attend(qs, keys, vals, self._mask(qpos, slen))
            start += qlen
        return out

    def _mask(self, qpos: torch.Tensor, klen: int) -> torch.Tensor:
        """Which of ``klen`` keys each query (at positions ``qpos``, any shape) sees."""
        kpos = torch.arange(klen, device=qpos.device)
        mask = kpos <= qpos[..., None]
        if self.sliding_window is not None:
            mask &= kpos > qpos[..., None] - self.sliding_window
        return mask

    def _prompt_tiles(self, qs, keys, vals, first: int) -> torch.Tensor:
        """Queries at positions ``first ..`` against ``keys``/``vals`` (every position up to
        the last query's), in PROMPT_TILE tiles at fixed positions, each against the keys up
        to its end rounded up to PROMPT_TILE_KEYS (see PROMPT_TILE): the tiles of one key
        length go in one batched call."""
        end = first + len(qs)
        t0 = first // PROMPT_TILE * PROMPT_TILE
        t_end = -(-end // PROMPT_TILE) * PROMPT_TILE
        k_end = -(-t_end // PROMPT_TILE_KEYS) * PROMPT_TILE_KEYS
        if k_end > end:  # keys past the sequence: zeros (masked)
            pad = keys.new_zeros(k_end - end, *keys.shape[1:])
            keys, vals = torch.cat((keys, pad)), torch.cat((vals, pad))
        keys, vals = self._heads(keys, q_dtype=qs.dtype), self._heads(vals, q_dtype=qs.dtype)
        out = torch.empty_like(qs)
        tiles = torch.arange(t0, t_end, device=qs.device).view(-1, PROMPT_TILE)  # [tiles, PROMPT_TILE] positions
        klens = -(-(tiles[:, -1] + 1) // PROMPT_TILE_KEYS) * PROMPT_TILE_KEYS
        for klen in klens.unique().tolist():
            pos = tiles[klens == klen]
            real = (pos >= first) & (pos < end)
            pos_in = pos.clamp(first, end - 1)  # a partial tile's other rows: copies of its nearest real ones
            q_t = qs[pos_in - first].permute(0, 2, 1, 3)  # [tiles, H, PROMPT_TILE, D]
            size = (len(pos), -1, -1, -1)
            o = F.scaled_dot_product_attention(
                q_t, keys[:, :klen].expand(size), vals[:, :klen].expand(size),
                attn_mask=self._mask(pos_in, klen)[:, None], scale=self.scale)
            out[pos[real] - first] = o.permute(0, 2, 1, 3)[real]
        return out

    def _heads(self, x: torch.Tensor, q_dtype: torch.dtype) -> torch.Tensor:
        """[L, Hkv, D] keys or values -> [H, L, D] in the queries' dtype (GQA: each KV head
        repeated for its query group; an fp8 cache widened)."""
        x = x.to(q_dtype)
        group = self.num_heads // self.num_kv_heads
        if group > 1:
            x = x.repeat_interleave(group, dim=1)
        return x.transpose(0, 1)

    def _attend(self, q, keys, vals, mask):
        # [n, H, D] x [L, Hkv, D] -> [n, H, D]
        o = F.scaled_dot_product_attention(q.transpose(0, 1), self._heads(keys, q.dtype), self._heads(vals, q.dtype),
                                           attn_mask=mask, scale=self.scale)
        return o.transpose(0, 1)

    def _decode(self, q, kv_cache, meta, b: int | None = None):
        """One query each for the step's first ``b`` sequences (default: all), batched."""
        b = meta.num_seqs if b is None else b
        nblocks = -(-max(meta.seq_lens_cpu[:b]) // meta.block_size)
        tables = meta.block_tables[:b, :nblocks].long()
        length = nblocks * meta.block_size
        keys = kv_cache[0, tables].reshape(b, length, self.num_kv_heads, self.head_dim)
        vals = kv_cache[1, tables].reshape(b, length, self.num_kv_heads, self.head_dim)
        kpos = torch.arange(length, device=q.device)
        qpos = (meta.seq_lens[:b].long() - 1)[:, None]
        mask = kpos[None, :] <= qpos  # also hides the unused tail of the last block
        if self.sliding_window is not None:
            mask &= kpos[None, :] > qpos - self.sliding_window
        group = self.num_heads // self.num_kv_heads
        qg = q.view(b, self.num_kv_heads, group, self.head_dim).float()
        scores = torch.einsum("bhgd,blhd->bhgl", qg, keys.float()) * self.scale
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        probs = scores.softmax(dim=-1)
        out = torch.einsum("bhgl,blhd->bhgd", probs, vals.float())
        return out.reshape(b, self.num_heads, self.head_dim).to(q.dtype)


# name -> "module:Class"; imported only when asked for.
_REGISTRY: dict[str, str] = {
    "torch": "engine.layers.attention:TorchAttention",
    "triton": "engine.layers.triton_attention:TritonAttention",
    "flash-attn": "engine.layers.flash_attention:FlashAttnBackend",
}


def backend_names() -> list[str]:
    return list(_REGISTRY)


def get_backend(name: str) -> type[AttentionBackend]:
    from engine.errors import InvalidRequestError

    if name not in _REGISTRY:
        raise InvalidRequestError(
            f"unknown attention backend {name!r}; choose one of: {', '.join(_REGISTRY)}"
        )
    module, _, cls = _REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def backend_reasons(name: str, device=None) -> list[str]:
    """Why ``name`` can't be used on ``device`` (import failures included)."""
    try:
        return get_backend(name).available(device)
    except ImportError as e:  # an optional dependency is missing
        return [f"cannot import: {e}"]
