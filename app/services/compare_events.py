"""Events of a running comparison, one small frozen dataclass per kind, delivered to
``run_comparison``'s ``on_event`` on the thread that runs it (a GUI's worker thread: hand
them on to the GUI thread, e.g. through a queued signal).

The order for each configuration ``i``: ``ConfigStarted(i)``; ``ConfigProgress(i, ...)``
while it loads, warms up and scores perplexity; for each prompt ``p``, ``TokenDelta(i, p,
...)`` as the answer streams, then ``PromptFinished(i, p)``; last ``ConfigFinished(i)``
with its result. A configuration that a cancel reached before it started gets only its
``ConfigFinished`` (status "cancelled"). The run ends with one ``RunFinished``.

Side by side (``ComparePlan.side_by_side``): first one ``SideBySidePlanned`` (which
configurations load together); the configurations of a group start (load) one after
another, then answer each prompt at the same time, so their ``TokenDelta``s interleave
(each keeps its configuration's index); their ``ConfigFinished`` come when the whole group
is done and unloaded. One that turns out not to fit beside the others when it loads (out
of memory) says so in a ``ConfigProgress`` and starts again, alone, after its group.

The objects an event carries are never changed by the runner once the event is sent, so
they may be handed to another thread as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from app.services.compare_plan import CompareConfig
from app.services.compare_results import ComparisonResult, ConfigResult, PromptResult


@dataclass(frozen=True, slots=True)
class SideBySidePlanned:
    """How a side-by-side comparison runs, decided before anything loads: ``groups`` of
    configuration indexes in the order they run (two or more: loaded together, every
    prompt answered by all of them at once; one: alone). ``notes``: why configurations
    that could have shared a group don't, in words."""

    groups: tuple[tuple[int, ...], ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ConfigStarted:
    """Configuration ``index`` (of ``total``) starts: its load begins."""

    index: int
    config: CompareConfig
    total: int


@dataclass(frozen=True, slots=True)
class ConfigProgress:
    """What configuration ``index`` is doing, in words. ``stage``: "load" (the engine's own
    load messages: resolving, converting, calibrating, weights ...), "warmup", "prompt"
    (before each prompt), "perplexity" (``done`` / ``total`` tokens scored), "unload"."""

    index: int
    stage: str
    message: str
    done: int | None = None
    total: int | None = None


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """New text of configuration ``index``'s answer to prompt ``prompt_index`` (may be
    empty while a character is pending; a model without a tokenizer streams only ids)."""

    index: int
    prompt_index: int
    text: str
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class PromptFinished:
    """Configuration ``index`` finished prompt ``prompt_index`` (or it failed: see
    ``result.error``). ``result.agreement`` is set when a reference had already run."""

    index: int
    prompt_index: int
    result: PromptResult


@dataclass(frozen=True, slots=True)
class ConfigFinished:
    """Configuration ``index`` is done (ran, failed or cancelled), its engine shut down
    and its memory given back: ``result`` is final."""

    index: int
    result: ConfigResult


@dataclass(frozen=True, slots=True)
class RunFinished:
    """The comparison is over; ``result`` has every configuration (the same object
    ``run_comparison`` returns). ``cancelled``: a cancel stopped it."""

    result: ComparisonResult
    cancelled: bool


CompareEvent = Union[SideBySidePlanned, ConfigStarted, ConfigProgress, TokenDelta, PromptFinished, ConfigFinished,
                     RunFinished]
