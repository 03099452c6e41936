"""Scoring a token sequence: the log-probability of each next token, for perplexity.

A score runs one sequence as a prefill (in chunks of at most ``chunk`` tokens, each with
the earlier chunks as its cached prefix, as the engine's chunked prefill does) and keeps
the logits of every position, not only the last. It writes K/V only into the blocks it is
given (the engine lends it free blocks of the KV pool), so the live requests' caches are
untouched; the fallback runner uses a transformers cache of its own, dropped afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

# Rows of logits turned into log-probs at a time: a 128k-vocab float32 row is 0.5 MB, so
# this bounds the scratch at about 128 MB whatever the window.
LOGIT_ROWS = 256


def next_token_logprobs(logits_of: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                        targets: torch.Tensor, top: int = 0) -> torch.Tensor | TopScores:
    """log p(targets[i] | position i) for the first ``len(targets)`` rows of ``hidden``,
    in float32 (log-softmax over the full vocabulary), computed ``LOGIT_ROWS`` rows at a
    time; ``logits_of(rows)`` maps hidden rows to logits. ``top`` > 0: a ``TopScores``
    with each row's rank of its target and its ``top`` most likely tokens as well."""
    out, ranks, values, ids = [], [], [], []
    for s in range(0, targets.shape[0], LOGIT_ROWS):
        e = min(s + LOGIT_ROWS, targets.shape[0])
        logp = torch.log_softmax(logits_of(hidden[s:e]).float(), dim=-1)
        chosen = logp.gather(1, targets[s:e, None].to(logp.device))  # (a layer split's head: another device)
        out.append(chosen.squeeze(1))
        if top:
            ranks.append((logp > chosen).sum(dim=1) + 1)  # 1 + the tokens more likely than it
            v, i = logp.topk(min(top, logp.shape[-1]), dim=-1)
            values.append(v)
            ids.append(i)
    chosen = torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
    if not top:
        return chosen
    if not out:
        return _no_scores(top)
    return TopScores(chosen, torch.cat(ranks), torch.cat(values), torch.cat(ids))


class TopScores(NamedTuple):
    """Scores with the most likely tokens: per scored position, the target's log-prob and
    rank (1: the most likely), and the ``top`` best tokens' log-probs and ids."""

    logprobs: torch.Tensor
    ranks: torch.Tensor
    top_logprobs: torch.Tensor
    top_ids: torch.Tensor

    def cpu(self) -> "TopScores":
        return TopScores(*(t.cpu() for t in self))


def _no_scores(top: int) -> TopScores:
    return TopScores(torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, top),
                     torch.zeros(0, top, dtype=torch.long))


def _joined(parts: list, top: int) -> torch.Tensor | TopScores:
    """A score's chunks as one result on the CPU."""
    if not parts:
        return _no_scores(top) if top else torch.zeros(0)
    if not top:
        return torch.cat(parts).cpu()
    return TopScores(*(torch.cat(column) for column in zip(*parts))).cpu()


class NativeScoreMixin:
    """``score`` for ModelRunner (which provides the model, the KV cache and ``_metadata``)."""

    @torch.inference_mode()
    def score(self, token_ids: Sequence[int], block_table: Sequence[int], chunk: int,
              top: int = 0) -> torch.Tensor | TopScores:
        """Log-probability of each next token of ``token_ids`` (``len - 1`` values, float32
        on the CPU; value i scores token i + 1 after tokens 0..i), computing the sequence
        from position 0 into the KV blocks ``block_table`` (enough for all its tokens),
        ``chunk`` tokens per forward pass; ``top`` > 0: ``TopScores`` (ranks and the most
        likely tokens too)."""
        self._ahead = None  # a decode step launched ahead is not kept across a score
        n = len(token_ids)
        ids = torch.tensor(list(token_ids), dtype=torch.long, device=self.device)
        table = list(block_table)
        out = []
        for s in range(0, n - 1, chunk):
            e = min(s + chunk, n)
            meta = self._metadata([table], [s], [e - s], num_decode=0)  # a prompt read, even one token
            pos = torch.arange(s, e, dtype=torch.long, device=self.device)
            hidden = self.model(ids[s:e], pos, self.kv_caches, meta)
            # Position i predicts token i + 1: the last token of the sequence predicts nothing.
            out.append(next_token_logprobs(self.model.compute_logits, hidden, ids[s + 1:min(e + 1, n)], top))
        return _joined(out, top)


class FallbackScoreMixin:
    """``score`` for the transformers fallback runner (block tables are not used there)."""

    @torch.inference_mode()
    def score(self, token_ids: Sequence[int], block_table: Sequence[int], chunk: int,
              top: int = 0) -> torch.Tensor | TopScores:
        """As ``NativeScoreMixin.score``, with transformers' own model and a
        ``DynamicCache`` of its own (dropped when it returns)."""
        from transformers import DynamicCache

        n = len(token_ids)
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        cache = DynamicCache()
        out = []
        for s in range(0, n - 1, chunk):
            e = min(s + chunk, n)
            pos = torch.arange(s, e, device=self.device)[None]
            logits = self.model(input_ids=ids[:, s:e], position_ids=pos, past_key_values=cache,
                                use_cache=True).logits[0]
            targets = ids[0, s + 1:min(e + 1, n)]
            out.append(next_token_logprobs(lambda rows: rows, logits, targets, top))
        return _joined(out, top)
