"""The token embedding: row ``id`` of a ``[vocab, hidden]`` matrix per input token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VocabEmbedding(nn.Module):
    """``weight[input_ids]``. Unlike ``nn.Embedding`` it draws no initial values: it is
    built on the meta device and filled from the checkpoint (and building an
    ``nn.Embedding`` imports torch's compiler stack, seconds on a first load)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=dtype), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"
