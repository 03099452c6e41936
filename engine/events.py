"""Messages the engine sends to its clients (CLI, GUI, server)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union


@dataclass(slots=True, frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True, frozen=True)
class TokenEvent:
    """New output: a text delta (may be empty while a character or stop string is pending)."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(slots=True, frozen=True)
class PromptProgressEvent:
    """How much of the prompt the model has read, before the first token.

    Sent only to requests that ask for it (``Request.prompt_progress``): once when the
    request is first scheduled, then after every prompt chunk (chunked prefill reads a
    long prompt ``max_num_batched_tokens`` at a time). ``done`` counts prompt tokens
    served from the prefix cache as read; the last one has ``done == total``.
    """

    request_id: str
    done: int
    total: int


@dataclass(slots=True, frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0


@dataclass(slots=True, frozen=True)
class Timings:
    queue_ms: float  # submit -> first scheduled
    ttft_ms: float  # submit -> first token
    itl_ms: float  # mean inter-token latency after the first token
    decode_tok_s: float  # output tokens after the first / time since the first
    total_ms: float


@dataclass(slots=True, frozen=True)
class FinishedEvent:
    """Last event of a request. reason: stop | length | abort | error."""

    request_id: str
    reason: str
    usage: Usage
    timings: Timings
    error: str | None = None
    stop: str | int | None = None  # the stop string or token id that ended it
    implementation: str = "native"  # or "transformers-fallback": which path produced it
    # The Engine.load keywords whose flags ``error`` names (see HearthError.options).
    error_options: tuple[str, ...] = ()


EngineEvent = Union[TokenEvent, PromptProgressEvent, FinishedEvent]


@dataclass(slots=True, frozen=True)
class StepInfo:
    """One engine step that ran the model, as ``Engine.add_step_listener`` hears it."""

    # time.perf_counter() when the step's sampled ids reached the host (its device work is done)
    finished_at: float
    first_tokens: int  # requests that got their first output token in this step
    later_tokens: int  # requests that got a later output token
    kv_slots_allocated: int  # KV slots in the blocks held by running requests, after the step
    kv_slots_used: int  # of those, the slots that hold a token's K/V


@dataclass(slots=True, frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    block_size: int
    prefix_cache_hit_rate: float
    generation_tok_s: float  # output tokens/s over the last few seconds
    prompt_tok_s: float
    num_preemptions: int
    requests_finished: int
    memory: dict[str, Any] = field(default_factory=dict)
