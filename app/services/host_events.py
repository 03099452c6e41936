"""What the engine host tells its subscribers (``EngineHost.subscribe``).

Besides these, subscribers hear every request's engine events as they are produced:
``TokenEvent``, ``PromptProgressEvent`` and last exactly one ``FinishedEvent`` (from
``engine.api``; each carries its ``request_id``), after the request's ``RequestStarted``.

Every load asked for ends in exactly one of ``ModelLoaded``, ``LoadFailed`` (its message is
``LOAD_CANCELLED`` when it was cancelled) or ``LoadSuperseded`` (a newer load replaced it:
not a failure). A load that failed after the loaded model was unloaded for it brings that
model back: its ``LoadFailed`` says so, and a ``ModelLoaded`` with ``reloaded`` True
follows (it ends no load asked for).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from engine.api import EngineEvent, EngineStats, FinishedEvent, ModelInfo, Timings, Usage


@dataclass(frozen=True, slots=True)
class ModelLoading:
    """A load started (again, after the loaded model was unloaded to make room for it)."""

    name: str  # the display name of the model loading


@dataclass(frozen=True, slots=True)
class LoadProgress:
    message: str  # a stage of the load, or what a swap waits for


@dataclass(frozen=True, slots=True)
class ModelLoaded:
    """A model now answers requests. ``info``: its ``ModelInfo`` (``max_model_len`` the
    engine's); ``reloaded``: a model brought back after a failed load (it ends no load
    asked for)."""

    info: ModelInfo
    reloaded: bool = False


@dataclass(frozen=True, slots=True)
class LoadFailed:
    message: str  # worded by the host's error_text; LOAD_CANCELLED (+ a note) for a cancel


@dataclass(frozen=True, slots=True)
class LoadSuperseded:
    name: str  # the display name of the load another one replaced


@dataclass(frozen=True, slots=True)
class ModelUnloaded:
    """No model answers any more (unloaded, or unloaded to make room for the next)."""


@dataclass(frozen=True, slots=True)
class UnloadWithdrawn:
    """An ``unload(after_answers=True)`` still waiting for answers was given up: a load was
    asked for meanwhile (``name``, its display name), and a model asked for replaces the
    loaded one rather than leaving none. No ModelUnloaded follows for that unload."""

    name: str


@dataclass(frozen=True, slots=True)
class RequestStarted:
    """A request was taken by a model (before any of its engine events). ``dropped``:
    how many old messages ``fit_context`` left out of what the model sees."""

    request_id: str
    model: str
    dropped: int


@dataclass(frozen=True, slots=True)
class StatsUpdated:
    stats: EngineStats  # a few times a second while a model is loaded


@dataclass(frozen=True, slots=True)
class EngineError:
    message: str  # the engine can't report its state (its loop died, ...)


HostEvent = Union[ModelLoading, LoadProgress, ModelLoaded, LoadFailed, LoadSuperseded, ModelUnloaded,
                  UnloadWithdrawn, RequestStarted, StatsUpdated, EngineError, EngineEvent]


def ended(request_id: str, reason: str, error: str | None = None) -> FinishedEvent:
    """The FinishedEvent of a request that never reached an engine (or was cut by a swap)."""
    return FinishedEvent(request_id, reason, Usage(0, 0), Timings(0, 0, 0, 0, 0), error=error)
