"""Tensor-parallel projections and embeddings (issue 18, ``--split tensor``): each rank
holds a slice of every matrix and the ranks meet in collectives.

Megatron-LM's layout (Shoeybi et al., 2019): q/k/v and gate/up are split by output rows
(whole heads, whole MLP columns per rank: no communication), ``o_proj`` and ``down_proj``
by input columns (each rank's partial product summed by one all-reduce after attention and
one after the MLP), the embedding and the LM head by vocabulary rows (the embedding's
lookups summed by an all-reduce, the logits gathered). KV heads split with the query
heads; where there are fewer KV heads than ranks, each is replicated on the ranks whose
query heads read it.

Each module loads its own slice of the full checkpoint tensors (loaders that narrow the
tensor before copying), so a rank never holds more than its share. ``TPGroup`` is the
one place that calls ``torch.distributed``; modules keep a reference to it, never to
another module.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.embedding import VocabEmbedding
from engine.layers.linear import Linear, MergedLinear, QKVLinear, SwiGLUDownLinear
from engine.layers.weight_loader import WeightShapeError, set_weight_loader


class TPGroup:
    """Rank ``rank`` of ``world`` in process group ``pg`` (a ``torch.distributed``
    ``ProcessGroup`` object, gloo or NCCL, used directly: a process may hold several
    groups, one per tensor-parallel load; None only at world size 1, where every
    collective is the identity)."""

    def __init__(self, rank: int, world: int, pg=None, *, sizing: bool = False) -> None:
        """``sizing``: a group for building a rank's model on the meta device only, to
        count what it holds (no process group; its collectives can't run)."""
        if world > 1 and pg is None and not sizing:
            raise ValueError("a tensor-parallel group of several ranks needs its process group")
        self.rank, self.world, self.pg = rank, world, pg
        self._local = False

    @property
    def collective(self) -> bool:
        """Whether the ranks meet in collectives: several ranks, or one rank given a real
        group (``HEARTH_TP_ONE_RANK_GROUP``: the collectives and their graphs checked on one
        device); the steps are then kept in lock-step (agreed KV blocks and graph buckets,
        strict warm-ups and captures)."""
        return self.pg is not None

    @contextmanager
    def local(self):
        """Within it the projections skip their collectives and give this rank's partial
        results: for work each rank does on its own, in its own order (timing kernels)."""
        self._local = True
        try:
            yield
        finally:
            self._local = False

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks, in place."""
        if self.pg is not None and not self._local:
            self.pg.allreduce([x]).wait()
        return x

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` [rows, cols] side by side: [rows, world * cols]."""
        if self.pg is None or self._local:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self.pg.allgather([parts], [x.contiguous()]).wait()
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` on every rank, in place."""
        if self.pg is not None:
            opts = torch.distributed.BroadcastOptions()
            opts.rootRank = 0
            self.pg.broadcast([x], opts).wait()
        return x

    def agree_min(self, values: list[int], device: torch.device) -> list[int]:
        """The smallest of each value over the ranks (what every rank can do: KV blocks,
        whether its graphs captured)."""
        if self.pg is None:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64, device=device)
        opts = torch.distributed.AllreduceOptions()
        opts.reduceOp = torch.distributed.ReduceOp.MIN
        self.pg.allreduce([t], opts).wait()
        return t.tolist()


def split_even(total: int, world: int, what: str, fits: str | None = None) -> int:
    """``total / world``, refusing a split that doesn't divide (named in the message, with
    ``fits``: the rank counts the whole model takes, else those dividing ``total``)."""
    if total % world:
        from engine.errors import InvalidRequestError

        raise InvalidRequestError(f"tensor parallel over {world} ranks needs {what} divisible by {world}, and "
                                  f"the model has {total}: use {fits or _divisors(total)} ranks, or --split layer.",
                                  options=("devices", "split"))
    return total // world


def _divisors(n: int) -> str:
    return " or ".join(str(d) for d in range(1, min(n, 8) + 1) if n % d == 0)


def kv_heads_of_rank(num_kv_heads: int, rank: int, world: int, fits: str | None = None) -> tuple[int, int]:
    """(first KV head, how many) rank ``rank`` holds: an even share, or, with fewer KV
    heads than ranks, the one KV head its query heads read (replicated)."""
    if num_kv_heads >= world:
        per = split_even(num_kv_heads, world, "the KV heads", fits)
        return rank * per, per
    if world % num_kv_heads:  # each KV head is copied to world / kv ranks
        from engine.errors import InvalidRequestError

        kv_fits = [w for w in range(1, 9) if (w <= num_kv_heads and num_kv_heads % w == 0) or w % num_kv_heads == 0]
        raise InvalidRequestError(f"tensor parallel over {world} ranks of a model with {num_kv_heads} KV heads: "
                                  f"the ranks must divide the KV heads or be a multiple of them; use "
                                  f"{fits or ' or '.join(map(str, kv_fits))} ranks, or --split layer.",
                                  options=("devices", "split"))
    return rank * num_kv_heads // world, 1


# -- loaders: a slice of the full checkpoint tensor into this rank's parameter ----------------
def _sliced_rows_loader(param: nn.Parameter, tensor: torch.Tensor, shard_id: Hashable, *,
                        offsets: dict, sources: dict) -> None:
    """Rows ``sources[shard]`` of ``tensor`` into rows ``offsets[shard]`` of ``param``."""
    start, size = offsets[shard_id]
    src, rows = sources[shard_id]
    if tensor.shape[0] < src + rows or tensor.shape[1:] != param.shape[1:]:
        raise WeightShapeError(tuple(tensor.shape), (src + rows, *param.shape[1:]))
    param.data.narrow(0, start, size).copy_(tensor.narrow(0, src, rows))


def _columns_loader(param: nn.Parameter, tensor: torch.Tensor, shard_id: Hashable = None, *,
                    start: int) -> None:
    """Columns ``[start, start + param's columns)`` of a weight; a bias (1-D) whole."""
    if param.dim() == 1:
        if tensor.shape != param.shape:
            raise WeightShapeError(tuple(tensor.shape), tuple(param.shape))
        param.data.copy_(tensor)
        return
    cols = param.shape[1]
    if tensor.shape[0] != param.shape[0] or tensor.shape[1] < start + cols:
        raise WeightShapeError(tuple(tensor.shape), (param.shape[0], start + cols))
    param.data.copy_(tensor.narrow(1, start, cols))


def _vocab_rows_loader(param: nn.Parameter, tensor: torch.Tensor, shard_id: Hashable = None, *,
                       start: int, vocab: int) -> None:
    """Vocabulary rows ``[start, start + rows)`` (fewer on the last rank; the rest zero)."""
    if tensor.shape != (vocab, param.shape[1]):
        raise WeightShapeError(tuple(tensor.shape), (vocab, param.shape[1]))
    rows = max(0, min(param.shape[0], vocab - start))
    param.data.zero_()
    param.data.narrow(0, 0, rows).copy_(tensor.narrow(0, start, rows))


def slice_rows(module: MergedLinear, sources: dict[Hashable, tuple[int, int]]) -> MergedLinear:
    """Make a fused projection built with this rank's sizes load rows ``sources[shard]``
    (first row, rows) of each full checkpoint tensor."""
    loader = partial(_sliced_rows_loader, offsets=dict(module.shard_offsets), sources=dict(sources))
    for param in module.parameters(recurse=False):
        set_weight_loader(param, loader)
    module.tp_sources = dict(sources)  # (a quantized twin narrows its float tensors the same way)
    return module


# -- modules ----------------------------------------------------------------------------------
class _RowParallel:
    """What the row-parallel projections share: this rank's input columns from ``start``
    loaded, the partial products summed over the ranks, then the bias."""

    def _row_parallel(self, tp: TPGroup, start: int) -> None:
        self.tp = tp
        loader = partial(_columns_loader, start=start)
        for param in self.parameters(recurse=False):
            set_weight_loader(param, loader)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        y = self.tp.all_reduce(self.kernel(x, self.weight, None, None))
        return y if self.bias is None else y + self.bias


class RowParallelLinear(_RowParallel, Linear):
    """``o_proj`` over this rank's columns ``[start, start + in_features)``."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, start: int, bias: bool = False, *,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, dtype=dtype)
        self._row_parallel(tp, start)


class RowParallelSwiGLUDown(_RowParallel, SwiGLUDownLinear):
    """``down_proj`` over this rank's ``[gate | up]`` columns."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, start: int, bias: bool = False, *,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, dtype=dtype)
        self._row_parallel(tp, start)


class VocabParallelEmbedding(VocabEmbedding):
    """Vocabulary rows ``[start, start + rows)``; ids outside them look up zeros, and the
    ranks' lookups are summed (a quantized one: ``engine.layers.quant_parallel``)."""

    vocab_parallel = True

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TPGroup, *,
                 dtype: torch.dtype | None = None) -> None:
        per = -(-num_embeddings // tp.world)
        super().__init__(per, embedding_dim, dtype=dtype)
        self.vocab = num_embeddings
        self.start = tp.rank * per
        self.tp = tp
        set_weight_loader(self.weight, partial(_vocab_rows_loader, start=self.start, vocab=num_embeddings))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x = x.masked_fill(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(x)


class VocabParallelLMHead(Linear):
    """The LM head's vocabulary rows of this rank; the logits gathered from every rank
    (a quantized one: ``engine.layers.quant_parallel``)."""

    vocab_parallel = True

    def __init__(self, hidden_size: int, vocab_size: int, tp: TPGroup, *, dtype: torch.dtype | None = None,
                 weight: nn.Parameter | None = None) -> None:
        per = -(-vocab_size // tp.world)
        super().__init__(hidden_size, per, False, dtype=dtype)
        self.vocab, self.tp = vocab_size, tp
        self.tied = weight is not None
        if weight is not None:  # tied: the (sharded) embedding's matrix
            self.weight = weight
        else:
            set_weight_loader(self.weight, partial(_vocab_rows_loader, start=tp.rank * per, vocab=vocab_size))

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.tp.all_gather_columns(self.kernel(x, self.weight, None, None))[:, :self.vocab]
        if out is None:
            return logits
        out.copy_(logits)
        return out


def sharded_qkv(hidden: int, heads: int, kv_heads: int, head_dim: int, rank: int, kv_first: int,
                bias: bool, dtype) -> QKVLinear:
    """q/k/v with this rank's ``heads`` query heads (rank's block) and ``kv_heads`` KV heads
    from ``kv_first``."""
    qkv = QKVLinear(hidden, heads, kv_heads, head_dim, bias, dtype=dtype)
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
    return slice_rows(qkv, {"q": (rank * q_rows, q_rows), "k": (kv_first * head_dim, kv_rows),
                            "v": (kv_first * head_dim, kv_rows)})


def sharded_gate_up(hidden: int, intermediate: int, rank: int, bias: bool, dtype,
                    names: Sequence[str] = ("gate_proj", "up_proj")) -> MergedLinear:
    """gate and up, rows ``[rank * intermediate, (rank + 1) * intermediate)`` of each."""
    m = MergedLinear(hidden, [intermediate, intermediate], names, bias, dtype=dtype)
    return slice_rows(m, {0: (rank * intermediate, intermediate), 1: (rank * intermediate, intermediate)})
