"""A request's token state as the scheduler and block manager see it (no tensors)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_counter = itertools.count()


@dataclass(slots=True, eq=False)
class Sequence:
    """One request's tokens and cache bookkeeping.

    ``token_ids`` holds prompt + generated tokens. ``num_computed_tokens`` counts the
    leading tokens whose K/V are in the paged cache (or, for prefix-cache hits, shared
    from other requests). ``block_table`` lists the KV block ids that hold them, in order.
    ``params`` is opaque to the core (the sampling parameters travel with the sequence so
    the runner can read them); the core reads only ``max_tokens`` limits via the engine.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: Any = None
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (last admission)
    block_table: list[int] = field(default_factory=list)
    # Chained content hashes of the leading full blocks already registered in the prefix
    # cache (block_hashes[i] covers token_ids[: (i + 1) * block_size]).
    block_hashes: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_preemptions: int = 0
    arrival: int = field(default_factory=lambda: next(_counter))
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
