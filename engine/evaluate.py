"""Perplexity of the loaded model on a text, by a sliding window (``Engine.perplexity``).

The method is the standard strided one (Hugging Face's "Perplexity of fixed-length models"
guide): windows of ``window`` tokens start every ``stride`` tokens; each window scores only
the tokens that the previous window did not score (its last ``end - previous end`` tokens;
the first window scores all but its first token). Every token but the first is scored
exactly once, and each one scored after the first window sees at least ``window - stride``
tokens of context; with ``stride == window`` the windows don't overlap and each window's
first token goes unscored, as in that guide. Perplexity = exp(mean negative
log-likelihood of the scored tokens, in nats). A smaller stride costs more compute (each
token is fed about ``window / stride`` times) for more context per scored token.

Each window runs on the engine's thread between two steps (``run_on_engine_thread``),
as a prefill into KV blocks borrowed from the pool and given back at once, so a text of
any length never holds the engine for more than one window.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.errors import InvalidRequestError, ModelOutputError, OutOfMemoryError, not_a_number_message
from engine.events import TokenLogprob

if TYPE_CHECKING:
    from engine.llm_engine import Engine

DEFAULT_WINDOW = 1024
DEFAULT_STRIDE = 512


@dataclass(frozen=True, slots=True)
class PerplexityResult:
    """What ``Engine.perplexity`` measured."""

    perplexity: float  # exp(nll)
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # tokens of the text
    scored: int  # tokens scored: all but the first (stride < window)
    window: int  # tokens per window
    stride: int  # tokens between the starts of two windows
    windows: int  # windows run
    seconds: float  # wall time of the scoring


class PerplexityInterrupted(KeyboardInterrupt):
    """Ctrl-C while ``Engine.perplexity`` scored: ``partial`` is what the windows scored so
    far measured (None before the first one ended), a perplexity of the text's beginning."""

    def __init__(self, partial: PerplexityResult | None):
        super().__init__()
        self.partial = partial


def window_plan(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows over ``num_tokens`` tokens: ``(begin, end, first_scored)`` each, where
    the window feeds tokens ``begin:end`` and scores tokens ``first_scored:end`` (each
    after all the window's tokens before it)."""
    plan = []
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        plan.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return plan


def perplexity(engine: Engine, text: str | list[int], *, window: int | None = None,
               stride: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """``Engine.perplexity``: see the module's docstring. ``progress(scored, total)`` is
    called after each window."""
    ids = _token_ids(engine, text)
    window, stride = _window_and_stride(engine, window, stride)
    plan = window_plan(len(ids), window, stride)
    t0 = time.perf_counter()
    nll_sum = 0.0
    scored = 0
    windows = 0

    def result() -> PerplexityResult:
        nll = nll_sum / scored
        return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=len(ids), scored=scored,
                                window=window, stride=stride, windows=windows,
                                seconds=time.perf_counter() - t0)

    try:
        for begin, end, first in plan:
            logprobs = engine.run_on_engine_thread(lambda b=begin, e=end: _score(engine, ids[b:e]))
            # logprobs[i] scores token begin + 1 + i; keep the tokens first..end-1.
            kept = logprobs[first - begin - 1:].double()
            nll_sum -= float(kept.sum())
            scored += kept.numel()
            windows += 1
            if progress is not None:
                progress(scored, len(ids) - 1)
    except KeyboardInterrupt:
        raise PerplexityInterrupted(result() if scored else None) from None
    return result()


def _token_ids(engine: Engine, text: str | list[int]) -> list[int]:
    if isinstance(text, str):
        ids = engine.tokenizer.encode(text)  # refuses text that isn't valid Unicode
    else:
        ids = [int(t) for t in text]
        vocab = engine.model_info.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is outside the model's vocabulary (0..{vocab - 1})")
    if len(ids) < 2:
        raise InvalidRequestError(
            f"the text is {len(ids)} token{'s' if len(ids) != 1 else ''} long: perplexity needs at least 2 "
            "(one to predict from, one to score); give a longer text.")
    return ids


def _window_and_stride(engine: Engine, window: int | None, stride: int | None) -> tuple[int, int]:
    limit = engine.max_model_len
    pool = engine.block_manager.num_blocks * engine.block_manager.block_size
    if window is None:
        window = min(DEFAULT_WINDOW, limit, pool)
    if window < 2:
        raise InvalidRequestError(f"the window is {window} tokens: it needs at least 2.")
    if window > limit:
        raise InvalidRequestError(f"the window ({window} tokens) is longer than the model's context as loaded "
                                  f"({limit} tokens): use a window of at most {limit}, or load with a longer "
                                  "context (--max-model-len).", options=("max_model_len",))
    if window > pool:
        raise InvalidRequestError(f"the window ({window} tokens) doesn't fit the KV cache ({pool} tokens): use "
                                  "a smaller window, or load with more KV-cache memory (--kv-cache-memory).",
                                  options=("kv_cache_memory",))
    if stride is None:
        stride = max(1, min(DEFAULT_STRIDE, window // 2))
    if not 1 <= stride <= window:
        raise InvalidRequestError(f"the stride is {stride} tokens: it must be between 1 and the window "
                                  f"({window}).")
    return window, stride


def prompt_logprobs(engine: Engine, ids: list[int], top: int = 0) -> list[TokenLogprob]:
    """Each token of ``ids`` after the first (``len - 1`` ``TokenLogprob``s) scored after
    the tokens before it, with its rank and the ``top`` most likely tokens there, under the
    model's raw distribution (as the sampler reports an answer's logprobs): completions'
    ``echo`` with ``logprobs``. One prefill of ``ids`` into KV blocks borrowed from the
    pool, on the engine thread between two steps (not kept in the prefix cache)."""
    ids = [int(t) for t in ids]
    vocab = engine.model_info.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidRequestError(f"token id {bad} is outside the model's vocabulary (0..{vocab - 1})")
    if len(ids) > engine.max_model_len:
        raise InvalidRequestError(f"the prompt has {len(ids)} tokens but the model's context holds "
                                  f"{engine.max_model_len}: shorten it.")
    if len(ids) < 2:
        return []
    scores = engine.run_on_engine_thread(lambda: _score(engine, ids, max(top, 1)))
    out = []
    for k in range(len(ids) - 1):
        best = tuple(zip(scores.top_ids[k, :top].tolist(), scores.top_logprobs[k, :top].tolist()))
        out.append(TokenLogprob(ids[k + 1], float(scores.logprobs[k]), int(scores.ranks[k]), best))
    return out


def _score(engine: Engine, ids: list[int], top: int = 0):
    """On the engine thread: borrow free KV blocks for ``ids``, score them (``top`` > 0:
    with ranks and the most likely tokens), give the blocks back (their content is not
    registered in the prefix cache)."""
    import torch

    from engine.core.sequence import Sequence

    bm = engine.block_manager
    scratch = Sequence("hearth-perplexity", ids)
    if not bm.allocate_slots(scratch, len(ids)):
        raise InvalidRequestError(
            f"the KV cache has no room for a {len(ids)}-token window now ({bm.num_free_blocks} of "
            f"{bm.num_blocks} blocks free, the rest serving requests): try again when they finish, or use a "
            "smaller window.")
    try:
        chunk = engine.config.scheduler.max_num_batched_tokens
        scores = engine.runner.score(ids, scratch.block_table, chunk, top) if top else \
            engine.runner.score(ids, scratch.block_table, chunk)
        logprobs = scores.logprobs if top else scores
        if not bool(torch.isfinite(logprobs).all()):  # (a NaN would come out as perplexity nan)
            info = engine.model_info
            raise ModelOutputError(not_a_number_message(info.dtype, info.quantization,
                                                        f"scoring a {len(ids)}-token window"))
        return scores
    except torch.OutOfMemoryError:
        raise OutOfMemoryError(f"out of memory scoring a {len(ids)}-token window: use a smaller window "
                               "(--window), or load with a smaller KV cache (--kv-cache-memory) to leave room.",
                               options=("kv_cache_memory",)) from None
    finally:
        bm.free(scratch)
