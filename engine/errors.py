"""User-facing errors.

Every error Hearth raises for bad input says what went wrong and what to do about it.
They subclass ``ValueError`` (bad input) or ``RuntimeError`` (the environment failed us)
so callers that only know the builtins still catch them.
"""

from __future__ import annotations

from collections.abc import Callable


class HearthError(Exception):
    """Base class: the message is meant to be shown to a user as is.

    Advice about a load setting names it by its command-line flag, in parentheses
    ("load with a shorter context (--max-model-len)"; the flag is ``option_flag`` of the
    ``Engine.load`` keyword). ``options`` lists the keywords named that way, so a front
    end without flags (the desktop app) can name its own field instead.
    """

    def __init__(self, *args, options: tuple[str, ...] = ()) -> None:
        super().__init__(*args)
        self.options = tuple(options)


def option_flag(keyword: str) -> str:
    """The command-line flag of an ``Engine.load`` keyword: max_model_len -> --max-model-len."""
    return "--" + keyword.replace("_", "-")


class InvalidRequestError(HearthError, ValueError):
    """A request or a sampling parameter is not acceptable."""


class ModelLoadError(HearthError, RuntimeError):
    """A model could not be found, read or built. Nothing half-loaded is kept."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is readable but Hearth cannot run it natively or via fallback."""


class OutOfMemoryError(HearthError, RuntimeError):
    """Not enough device memory for the weights or the KV cache."""


class ModelOutputError(HearthError, RuntimeError):
    """The model's output was not a number (NaN or infinity): its weights hold such values, or
    its numbers overflowed its dtype (``not_a_number_message`` says which to suspect)."""


def not_a_number_message(dtype: str, quantization: str, where: str) -> str:
    """What to tell a user whose model gave NaN or infinity ``where`` ("for its first
    token", "scoring the text"), for a model of weights ``dtype`` and ``quantization``."""
    if dtype == "float16":
        why = ("its numbers overflowed float16 (some models' activations don't fit it): load it "
               "in bfloat16 where the device has it, or in float32 (--dtype)")
    else:
        how = "" if quantization in ("none", "bf16", "fp16") else f", or {quantization} broke it"
        why = ("its weights may hold NaN or infinite values (a damaged or badly converted "
               f"checkpoint){how}: check the file, or load it with another quantization (--quantization)")
    return f"the model's output was not a number (NaN or infinity) {where}: {why}."


class EngineDeadError(HearthError, RuntimeError):
    """The engine was shut down or its loop died; no more requests are accepted."""


class LoadCancelledError(HearthError):
    """A load was stopped by its caller (``Engine.load``'s ``should_stop``); nothing
    half-loaded is kept."""


def stop_check(should_stop: Callable[[], bool] | None,
               message: str = "loading cancelled") -> Callable[[], None]:
    """A function that raises ``LoadCancelledError(message)`` once ``should_stop()`` is true
    (a load's, a conversion's or a quantization's cancel, asked between its steps)."""
    def check() -> None:
        if should_stop is not None and should_stop():
            raise LoadCancelledError(message)
    return check
