"""Quantized embedding and LM head of a tensor-parallel rank (issue 18): the vocabulary rows
``[start, start + rows)`` of a quantized [vocab, hidden] matrix — a GGUF's token embedding,
an untied head quantized on load (int8 beside int4 projections, fp8's), a published
format's head, or ``--quant-head``.

Every layout Hearth keeps has its scales (and mins) per output row, so a rank's rows are
exactly one process's rows: each rank reads the full checkpoint tensor into the canonical
layout as one process would and keeps its rows (the last rank's rows past the vocabulary
are zero). The lookups and the logits meet as the float ones do
(``engine.layers.parallel``): the embedding's partial lookups summed by an all-reduce, the
head's logits gathered.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import nn

from engine.layers.parallel import TPGroup, VocabParallelEmbedding, VocabParallelLMHead
from engine.layers.quant_linear import HEAD_DEQUANT_ROWS, QuantizedLinear, QuantizedTiedHead, QuantizedVocabEmbedding
from engine.layers.weight_loader import WeightShapeError
from engine.quant.sources import QuantSource


class _VocabRows:
    """Loading a rank's vocabulary rows of the full quantized matrix (``vocab`` rows,
    this module's ``out_features`` from ``start``)."""

    vocab_parallel = True
    vocab: int
    start: int

    def _write_shard(self, shard_id: Hashable) -> None:
        parts = self._pending.pop(shard_id)
        rows = max(0, min(self.out_features, self.vocab - self.start))
        dev = self.qweight.device
        if set(parts) == {"weight"}:  # a float matrix, quantized row by row: only this rank's rows
            weight = parts["weight"]
            if tuple(weight.shape) != (self.vocab, self.in_features):
                raise WeightShapeError(tuple(weight.shape), (self.vocab, self.in_features))
            mine = self.source.to_weight({"weight": weight.narrow(0, self.start, rows).to(dev)}, rows,
                                         self.in_features)
        else:  # a stored format (GGUF blocks, a published packing): read whole, as one process does
            full = self.source.to_weight({k: v.to(dev) for k, v in parts.items()}, self.vocab, self.in_features)
            if full.out_features != self.vocab:
                raise WeightShapeError((full.out_features, self.in_features), (self.vocab, self.in_features))
            mine = full.rows(self.start, rows)
        self._copy_rows(mine, 0, rows)
        for t in (self.qweight, self.scales, self.mins):  # the last rank's rows past the vocabulary
            if t is not None:
                t.data[rows:].zero_()


class _GatheredLogits:
    """An LM head's forward on a rank: its rows' logits, gathered from every rank."""

    tp: TPGroup
    vocab: int

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.tp.all_gather_columns(self.kernel(x, self, None))[:, :self.vocab]
        if out is None:
            return logits
        out.copy_(logits)
        return out

    def as_float(self) -> VocabParallelLMHead:
        """The float stand-in (a GPU layout its kernels don't read): the same rows, gathered."""
        dtype = self.dtype or torch.bfloat16
        with torch.device("meta"):
            head = VocabParallelLMHead(self.in_features, self.vocab, self.tp, dtype=dtype)
        head.weight = nn.Parameter(self.quantized_weight().dequantize(dtype), requires_grad=False)
        return head


class QuantizedVocabParallelEmbedding(_VocabRows, QuantizedVocabEmbedding):
    """A quantized ``VocabParallelEmbedding``: ids outside this rank's rows look up zeros;
    the ranks' lookups are summed."""

    def __init__(self, embedding: VocabParallelEmbedding, source: QuantSource) -> None:
        super().__init__(embedding.num_embeddings, embedding.embedding_dim, source, embedding.weight.dtype)
        self.vocab, self.start, self.tp = embedding.vocab, embedding.start, embedding.tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        x = super().forward(local.masked_fill(outside, 0))
        return self.tp.all_reduce(x.masked_fill(outside.unsqueeze(-1), 0))


class QuantizedVocabParallelHead(_VocabRows, _GatheredLogits, QuantizedLinear):
    """An untied LM head's rows of this rank, quantized."""

    tied = False
    dequant_rows = HEAD_DEQUANT_ROWS

    def __init__(self, head: VocabParallelLMHead, source: QuantSource) -> None:
        QuantizedLinear.__init__(self, head.in_features, head.out_features, source, dtype=head.weight.dtype)
        self.vocab, self.tp = head.vocab, head.tp
        self.start = head.tp.rank * head.out_features


class QuantizedVocabParallelTiedHead(_GatheredLogits, QuantizedTiedHead):
    """A tied LM head over a quantized vocab-parallel embedding: the same rows."""

    vocab_parallel = True
    tied = True

    def __init__(self, embedding: QuantizedVocabParallelEmbedding) -> None:
        super().__init__(embedding)
        self.vocab, self.tp = embedding.vocab, embedding.tp
