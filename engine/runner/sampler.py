"""Batched token sampling: logit bias, penalties, grammar masks, temperature, top-k /
top-p / min-p, logprobs.

Everything is done with batched tensor operations on the logits' device; Python loops
run over rows (and only where a row has its own random generator), never over the vocab.

A row whose logits are not numbers (a NaN, or +inf: weights holding NaN, or float16
overflowing) samples ``NOT_A_NUMBER`` instead of a token, for the engine to end that request
with an error (argmax would quietly pick token 0, or the NaN's index, every step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.runner.grammar import apply_token_bitmask
from engine.runner.io import NOT_A_NUMBER
from engine.sampling_params import SamplingParams




def flag_not_a_number(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``tokens`` (each row's argmax of ``logits``) with ``NOT_A_NUMBER`` where that row's
    logits hold a NaN or +inf: argmax propagates NaN (it picks a NaN's index, a +inf's where
    there is none), so the value it picked says it, and only that value is read. On the
    device, without waiting; the caller keeps ``tokens`` for anything that feeds the model."""
    picked = logits.gather(1, tokens[:, None])[:, 0]
    return torch.where(picked < float("inf"), tokens, NOT_A_NUMBER)


@dataclass(slots=True)
class TokenLogprobs:
    """Log-probabilities for one sampled token, under the raw model distribution
    (log_softmax of the logits before temperature, penalties and filters)."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]]  # the params.logprobs most likely (token_id, logprob)


@dataclass(slots=True)
class SamplerOutput:
    """One sampled token per row, plus logprobs when any row asked for them."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None] | None  # None entries for rows that didn't ask


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded for one request on ``device``, or None without a seed
    (the row then uses the shared default generator)."""
    if seed is None:
        return None
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed))
    return g


def _padded_ids(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    """[len(rows), max_len] long tensor, padded with ``pad`` (an extra, discarded column)."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out.to(device, non_blocking=True)


class Sampler:
    """Picks the next token of every row of a batch of logits.

    Per row, in order: logit bias, repetition penalty (prompt + output tokens), presence
    and frequency penalties (output tokens), the grammar's mask (``allowed``: refused
    tokens go to -inf); greedy rows (temperature 0) then take the argmax.
    Other rows: temperature, top-k, top-p, min-p, then a draw by the exponential race
    (argmax of probs / Exp(1) noise), where the noise comes from the row's own generator
    so a seeded request samples the same tokens whatever else is in the batch.
    """

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        allowed: tuple[torch.Tensor, Sequence[int]] | None = None,
    ) -> SamplerOutput:
        """``allowed``: (an int32 host bitmask, the rows it is for), one bitmask row per
        listed row (``engine.runner.grammar``); None when no row is constrained."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be [n, vocab], got shape {tuple(logits.shape)}")
        n, vocab = logits.shape
        if not (len(params) == len(prompt_ids) == len(output_ids) == len(generators) == n):
            raise ValueError(
                f"got {n} logit rows but {len(params)} params, {len(prompt_ids)} prompts, "
                f"{len(output_ids)} outputs and {len(generators)} generators"
            )
        device = logits.device
        if allowed is None and all(p.greedy and p.logprobs is None and p.repetition_penalty == 1.0
                                   and not p.presence_penalty and not p.frequency_penalty
                                   and not p.logit_bias for p in params):
            # The common benchmark / deterministic case: one argmax, one copy to the host.
            return SamplerOutput(token_ids=flag_not_a_number(logits, logits.argmax(dim=-1)).tolist(),
                                 logprobs=None)
        # float32 copy: penalties and filters edit it in place, the caller's tensor stays.
        x = logits.to(torch.float32, copy=True)

        want_lp = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = torch.log_softmax(x[want_lp], dim=-1) if want_lp else None

        self._apply_logit_bias(x, params)
        self._apply_repetition_penalty(x, params, prompt_ids, output_ids)
        self._apply_presence_frequency(x, params, output_ids)
        if allowed is not None:
            apply_token_bitmask(x, allowed[0], allowed[1])

        tokens = torch.empty(n, dtype=torch.long, device=device)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if greedy:
            g_idx = torch.tensor(greedy, device=device)
            tokens[g_idx] = x[g_idx].argmax(dim=-1)
        if sampled:
            s_idx = torch.tensor(sampled, device=device)
            sp = [params[i] for i in sampled]
            probs = self._filtered_probs(x[s_idx], sp)
            noise = self._exponential_noise(len(sampled), vocab, [generators[i] for i in sampled], device)
            tokens[s_idx] = (probs / noise).argmax(dim=-1)

        # The raw logits say whether the model's numbers broke (a NaN or +inf; -inf may be
        # a masked token); the picked token's value alone can't: penalties and filters came between.
        token_list = torch.where(logits.amax(dim=-1) < float("inf"), tokens, NOT_A_NUMBER).tolist()
        if raw_logprobs is None:
            return SamplerOutput(token_ids=token_list, logprobs=None)
        return SamplerOutput(
            token_ids=token_list,
            logprobs=self._logprobs(raw_logprobs, want_lp, tokens, params, n),
        )

    # ------------------------------------------------------------------ penalties

    @staticmethod
    def _apply_logit_bias(x, params) -> None:
        rows, ids, values = [], [], []
        for i, p in enumerate(params):
            for token, bias in p.logit_bias:
                if token < x.shape[1]:  # the engine checked the ids against the vocabulary
                    rows.append(i)
                    ids.append(token)
                    values.append(bias)
        if rows:
            device = x.device
            x.index_put_((torch.tensor(rows, device=device), torch.tensor(ids, device=device)),
                         torch.tensor(values, dtype=x.dtype, device=device), accumulate=True)

    @staticmethod
    def _apply_repetition_penalty(x, params, prompt_ids, output_ids) -> None:
        rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        if not rows:
            return
        device = x.device
        vocab = x.shape[1]
        ids = _padded_ids([list(prompt_ids[i]) + list(output_ids[i]) for i in rows], vocab, device)
        seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, True)
        seen = seen[:, :vocab]
        pen = torch.tensor([params[i].repetition_penalty for i in rows], device=device)[:, None]
        r_idx = torch.tensor(rows, device=device)
        sub = x[r_idx]
        penalised = torch.where(sub > 0, sub / pen, sub * pen)
        x[r_idx] = torch.where(seen, penalised, sub)

    @staticmethod
    def _apply_presence_frequency(x, params, output_ids) -> None:
        rows = [
            i for i, p in enumerate(params)
            if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        ]
        if not rows:
            return
        device = x.device
        vocab = x.shape[1]
        ids = _padded_ids([output_ids[i] for i in rows], vocab, device)
        counts = torch.zeros(len(rows), vocab + 1, dtype=torch.float32, device=device)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
        counts = counts[:, :vocab]
        presence = torch.tensor([params[i].presence_penalty for i in rows], device=device)[:, None]
        frequency = torch.tensor([params[i].frequency_penalty for i in rows], device=device)[:, None]
        r_idx = torch.tensor(rows, device=device)
        x[r_idx] = x[r_idx] - (presence * (counts > 0) + frequency * counts)

    # ------------------------------------------------------------------ filters

    @staticmethod
    def _filtered_probs(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """Probabilities after temperature, top-k, top-p and min-p (filtered ones are 0).

        Rows are not renormalised after min-p: the exponential race only compares
        ratios within a row, so the scale does not matter.
        """
        m, vocab = x.shape
        device = x.device
        temp = torch.tensor([p.temperature for p in params], device=device)[:, None]
        # An extreme repetition_penalty (1e-300 divides a positive logit by 0 in float32) or
        # temperature can push a logit to +inf, and the softmax of a row with +inf is NaN
        # (every draw then token 0): the largest float keeps it the likeliest instead.
        x = (x / temp).clamp(max=torch.finfo(x.dtype).max)
        neg_inf = torch.tensor(float("-inf"), device=device)

        use_k = any(0 < p.top_k < vocab for p in params)
        use_p = any(p.top_p < 1.0 for p in params)
        if use_k or use_p:
            # One descending sort serves both filters; results are scattered back.
            vals, order = x.sort(dim=-1, descending=True)
            if use_k:
                k = torch.tensor(
                    [p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device
                )
                # Keep every token at least as large as the k-th largest (ties kept).
                kth = vals.gather(1, (k - 1)[:, None])
                vals = torch.where(vals < kth, neg_inf, vals)
            if use_p:
                top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
                sorted_probs = torch.softmax(vals, dim=-1)
                # Mass strictly before each token: a token is kept while the set before it
                # has not reached top_p, giving the smallest set with mass >= top_p. The
                # first token has 0 before it and is always kept (a top_p that rounds to 0 in
                # float32, 1e-300, would keep none: a row of -inf, NaN probabilities).
                before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
                keep = before < top_p
                keep[:, 0] = True
                vals = torch.where(keep, vals, neg_inf)
            x = torch.empty_like(x).scatter_(1, order, vals)

        probs = torch.softmax(x, dim=-1)
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
            # Ratios to the max are unchanged by the renormalisation after the filters.
            threshold = min_p * probs.max(dim=-1, keepdim=True).values
            probs = torch.where(probs < threshold, torch.zeros_like(probs), probs)
        return probs

    @staticmethod
    def _exponential_noise(
        m: int,
        vocab: int,
        generators: Sequence[torch.Generator | None],
        device: torch.device,
    ) -> torch.Tensor:
        noise = torch.empty(m, vocab, device=device)
        shared = [j for j, g in enumerate(generators) if g is None]
        if shared:
            # Unseeded rows share the default generator: one batched draw.
            draw = torch.empty(len(shared), vocab, device=device).exponential_()
            noise[torch.tensor(shared, device=device)] = draw
        for j, g in enumerate(generators):
            if g is not None:
                # Each seeded row draws exactly `vocab` numbers from its own generator per
                # step, so its stream does not depend on the rest of the batch.
                noise[j].exponential_(generator=g)
        # exponential_ can in principle return 0; keep the division finite.
        return noise.clamp_(min=torch.finfo(torch.float32).tiny)

    # ------------------------------------------------------------------ logprobs

    @staticmethod
    def _logprobs(
        raw: torch.Tensor,
        rows: list[int],
        tokens: torch.Tensor,
        params: Sequence[SamplingParams],
        n: int,
    ) -> list[TokenLogprobs | None]:
        device = raw.device
        chosen = tokens[torch.tensor(rows, device=device)][:, None]
        chosen_lp = raw.gather(1, chosen)
        ranks = (raw > chosen_lp).sum(dim=-1) + 1
        n_top = max(params[i].logprobs or 0 for i in rows)
        if n_top > 0:
            top_vals, top_ids = raw.topk(n_top, dim=-1)
            top_vals_l, top_ids_l = top_vals.tolist(), top_ids.tolist()
        chosen_l, chosen_lp_l, ranks_l = chosen[:, 0].tolist(), chosen_lp[:, 0].tolist(), ranks.tolist()

        out: list[TokenLogprobs | None] = [None] * n
        for j, i in enumerate(rows):
            k = params[i].logprobs or 0
            top = list(zip(top_ids_l[j][:k], top_vals_l[j][:k])) if k else []
            out[i] = TokenLogprobs(
                token_id=chosen_l[j], logprob=chosen_lp_l[j], rank=ranks_l[j], top=top
            )
        return out
