"""User-facing errors.

Every error Hearth raises for bad input says what went wrong and what to do about it.
They subclass ``ValueError`` (bad input) or ``RuntimeError`` (the environment failed us)
so callers that only know the builtins still catch them.
"""

from __future__ import annotations


class HearthError(Exception):
    """Base class: the message is meant to be shown to a user as is."""


class InvalidRequestError(HearthError, ValueError):
    """A request or a sampling parameter is not acceptable."""


class ModelLoadError(HearthError, RuntimeError):
    """A model could not be found, read or built. Nothing half-loaded is kept."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is readable but Hearth cannot run it natively or via fallback."""


class OutOfMemoryError(HearthError, RuntimeError):
    """Not enough device memory for the weights or the KV cache."""


class EngineDeadError(HearthError, RuntimeError):
    """The engine was shut down or its loop died; no more requests are accepted."""
