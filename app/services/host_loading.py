"""The pieces of the engine host's model loading: the load ticket (cancel or supersede
one load), the memory a loaded model would give back, and the sentences the host says
about a load (pages show them as they are)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from engine.api import LoadCancelledError, ModelCheck, ModelInfo, format_bytes

#: ``LoadFailed``'s message when the user cancelled the load (Cancel loading, Unload);
#: pages word it as a cancel, not a failure. Anything after it is a note.
LOAD_CANCELLED = "loading cancelled"
#: How long a swap, or an unload to make room, waits for the answers being written on the
#: old model before cutting them (with an error saying why).
SWAP_WAIT_S = 120
#: On quit, how long a cancelled load may take to stop (it checks between weight tensors;
#: a download or conversion in progress can't stop and is left to end with the process).
LOAD_JOIN_TIMEOUT_S = 5


class LoadTicket:
    """One load's cancel token, made by ``EngineHost.load`` on the caller's thread and
    checked by the load thread (``is_set``, also ``Engine.load``'s ``should_stop``) and
    the host's thread.

    ``superseded``: cancelled because another load was asked for (not a failure to show)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.superseded = False

    def cancel(self, superseded: bool = False) -> None:
        if not self._event.is_set():
            self.superseded = superseded  # written before the event, read after it
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def raise_if_set(self) -> None:
        if self._event.is_set():
            raise LoadCancelledError(LOAD_CANCELLED)


def loaded_footprint(info: ModelInfo | None) -> int:
    """Bytes a loaded model holds on its device (weights, KV cache, CUDA graphs): what
    unloading it gives back."""
    if not info:
        return 0
    return info.weight_bytes + info.kv_cache_bytes + (info.cuda_graph_bytes or 0)


def _place(device: str) -> str:
    return "on the GPU" if device.startswith("cuda") else "in RAM"


def release_progress(check: ModelCheck) -> str:
    """What the status bar says while the loaded model is unloaded to make room."""
    if check.device.startswith("cuda"):
        return f"unloading the loaded model first: {check.name} needs the GPU to itself"
    return (f"unloading the loaded model first to make room: {check.name} takes about "
            f"{format_bytes(check.need_bytes)} with its KV cache, and {format_bytes(check.free_bytes)} of RAM "
            "is free now")


@dataclass(frozen=True, slots=True)
class Released:
    """The model unloaded to make room for a load: if that load fails, it is loaded again
    with the options it was loaded with."""

    name: str
    device: str
    options: dict  # as given to the host's load, without the ticket


def user_options(options: dict) -> dict:
    """A load's options as the user gave them (the host's own keys, ``_ticket`` and the
    like, left out): loading them again gives the same model."""
    return {k: v for k, v in options.items() if not k.startswith("_")}


def release_note(released: Released | None) -> str:
    """Added to a cancelled load's message when the model loaded before was unloaded for it."""
    if released is None:
        return ""
    return (f" ({released.name} was unloaded first to make room {_place(released.device)}: "
            "load it again from the Library.)")


def reload_progress(asked: str, why: str, previous: str) -> str:
    """What the status bar says while the model unloaded for a failed load comes back."""
    return f"Loading {asked} failed: {_sentence(why)} Loading {previous} again…"


def reload_outcome(asked: str, why: str, previous: str, error: str | None = None,
                   cancelled: bool = False) -> str:
    """``LoadFailed``'s message for a load that failed after the loaded model was unloaded
    for it, once that model was loaded again (or that failed too, or was cancelled). It
    names the load that failed, so pages show it as it is (``load_failure_text``)."""
    head = f"Loading {asked} failed: {_sentence(why)}"
    if cancelled:
        return f"{head} Loading {previous} again was cancelled: load a model from the Library."
    if error is None:
        return f"{head} {previous} was loaded again."
    return f"{head} Loading {previous} again failed too: {_sentence(error)} Load a model from the Library."


def load_failure_text(message: str) -> str:
    """What pages say for a ``LoadFailed`` message that is not a cancel: "Loading failed: "
    and the reason, or the message itself where it already names the load that failed."""
    return message if message.startswith("Loading ") else f"Loading failed: {message}"


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?", "…")) else text + "."


def wait_progress(old: str, new: str, releasing: bool) -> str:
    """What the status bar says while a swap or release waits for answers to finish."""
    if releasing:
        return f"waiting for the answer being written to finish, then unloading {old} to make room for {new}"
    return f"{new} is ready: switching once the answer being written on {old} is finished"


def cut_reason(old: str, new: str, wait_s: float, releasing: bool) -> str:
    """The error an answer ends with when a swap or release stopped waiting for it."""
    waited = f"{wait_s / 60:g} minutes" if wait_s >= 60 else f"{wait_s:g} s"
    why = f"{old} was unloaded to make room for {new}" if releasing else f"{new} took over from {old}"
    return (f"this answer was cut off after {waited} because {why}; the text so far is kept. "
            "Regenerate it to get a whole answer.")
