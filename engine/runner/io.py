"""What crosses between the engine and a runner: plain data, no scheduler objects.

The engine builds one ``RunnerInput`` per step from the scheduler's decision and gets one
``RunnerOutput`` back, so a runner could live in another process. What a runner needs
for a request's whole life (its sampling parameters, seed, prompt length) crosses once,
as a ``NewRequest`` in the first step that schedules it; every step then carries only the
rows to run. The runner keys whatever it keeps per request (RNGs, the fallback's caches,
a launched-ahead step) by request id, and drops it when a step lists the id as finished
(everything) or preempted (what depends on the request's KV cache).

In-process the lists are handed over by reference (``StepRow.block_table`` and
``StepRow.context`` are the scheduler's own lists): the runner only reads them, during
the ``execute`` call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.sampling_params import SamplingParams

#: The "token" of a row whose logits hold a NaN or +inf (never a vocabulary id): the sampler
#: gives it, the scheduler doesn't append it, the engine ends that request with an error.
NOT_A_NUMBER = -1

if TYPE_CHECKING:
    from engine.runner.sampler import TokenLogprobs


@dataclass(slots=True)
class NewRequest:
    """A request the runner has not seen yet: sent once, with its first scheduled step."""

    request_id: str
    params: SamplingParams  # sampling, seed, max_tokens (the pipelined decode's limit)
    prompt_len: int  # how many of its tokens are prompt (the penalties tell them apart)


@dataclass(slots=True)
class StepRow:
    """One request's share of a step: feed ``token_ids`` at positions ``start``,
    ``start + 1``, ... with K/V in the blocks of ``block_table``."""

    request_id: str
    token_ids: list[int]  # the tokens to compute this step (a prompt chunk, or 1 to decode)
    start: int  # position of token_ids[0]: how many of the request's tokens have K/V already
    block_table: list[int]  # the request's KV blocks, in order (it may hold a lookahead block)
    sample: bool  # this row reaches the request's last token: sample the next one
    # Prompt + output token ids so far, only on sampled rows of requests whose penalties
    # need them (``needs_token_context``); None otherwise, so plain steps copy no lists.
    context: list[int] | None = None


@dataclass(slots=True)
class RunnerInput:
    """One step for the runner: rows in the scheduler's order (running requests first)."""

    rows: Sequence[StepRow]
    new_requests: Sequence[NewRequest] = ()  # announced this step (before any row uses them)
    finished: Sequence[str] = ()  # requests that ended: drop all the runner keeps for them
    preempted: Sequence[str] = ()  # their KV cache was freed: drop what depends on it
    num_waiting: int = 0  # requests left waiting (a hint for the pipelined decode)


@dataclass(slots=True)
class RunnerOutput:
    """A step's sampled tokens, one per row with ``sample=True``, in row order."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None] | None  # per sampled row, when any asked for them


def needs_token_context(params: SamplingParams) -> bool:
    """Whether sampling this request reads its token history (the repetition, presence
    and frequency penalties): only such requests' rows carry ``StepRow.context``."""
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)


def launch_ahead_ok(params: SamplingParams) -> bool:
    """Greedy with nothing that needs the host between steps (penalties, logprobs) or
    between the logits and the argmax (logit_bias): such requests' decode steps can be
    launched ahead. A grammar's mask may (``engine.runner.execute``: the step launched ahead
    keeps its logits, masked when the host has the mask)."""
    return (params.greedy and params.logprobs is None and not needs_token_context(params)
            and not params.logit_bias)
