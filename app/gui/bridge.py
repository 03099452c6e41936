"""EngineBridge: the one QObject through which the window talks to the engine.

The engine is owned by an ``app.services.engine_host.EngineHost`` (Qt-free, shared with
the server to come): the bridge only calls it (its methods never wait for the engine) and
subscribes to it. The host pushes each event as it happens, on the engine's thread or its
own; the bridge turns it at once into a signal of a relay QObject, whose connection to the
bridge's own signal Qt queues onto the GUI thread (the bridge lives there, the emitting
thread doesn't). So a token reaches the page one event-loop turn after the engine made it,
with no polling timer in between, and the pages' slots always run on the GUI thread.

Loading: the loaded model keeps serving while another loads, and the new one takes over
once ready and once the answers being written on the old one have finished; a failed or
cancelled load leaves the old one in place. Only where the new model would not fit beside
it (``engine.api.check_model`` says so: the same GPU, or not enough RAM) is the old one
unloaded first, and loaded again if the new one then fails (``app.services.engine_swap``).
"""

from __future__ import annotations

import dataclasses
import logging
import uuid

from app.gui.bridge_signals import BridgeSignals
from app.gui.error_text import gui_error, gui_error_text
from app.services.engine_host import EngineHost
from app.services.host_events import (EngineError, LoadFailed, LoadProgress, LoadSuperseded, ModelLoaded,
                                      ModelLoading, ModelUnloaded, RequestStarted, StatsUpdated,
                                      UnloadWithdrawn)
from app.services.host_loading import LOAD_CANCELLED, SWAP_WAIT_S

from engine.api import (FinishedEvent, ModelInfo, PromptProgressEvent, Request, SamplingParams, TokenEvent,
                        model_display_name, release_memory)

log = logging.getLogger("hearth.gui")

__all__ = ["BridgeSignals", "EngineBridge", "LOAD_CANCELLED", "REQUEST_PREFIX"]

#: The bridge's request ids start with this; it relays only its own requests' events (a
#: host shared with the server runs others too).
REQUEST_PREFIX = "gui-"


class EngineBridge(BridgeSignals):
    """UI-thread facade. Signals arrive queued on the UI thread; methods never block
    (``shutdown`` excepted).

    ``host``: the EngineHost to adapt (one is made, and shut down with the bridge, when
    none is given: then ``engine_factory``, ``model_check`` and ``answer_wait_s`` go to it;
    ``answer_wait_s`` is how long a swap, or an unload to make room, waits for the answers
    being written on the old model before cutting them with an error)."""

    def __init__(self, parent=None, engine_factory=None, model_check=None,
                 answer_wait_s: float = SWAP_WAIT_S, host: EngineHost | None = None) -> None:
        super().__init__(parent)
        self._owns_host = host is None
        self._host = host or EngineHost(engine_factory, model_check, answer_wait_s, error_text=gui_error)
        # Emitted on the host's threads; each of its signals is connected to the bridge's
        # own, which Qt queues to the GUI thread the bridge lives on.
        self._relay = BridgeSignals(self)
        for name in self.SIGNALS:
            getattr(self._relay, name).connect(getattr(self, name))
        self.modelLoaded.connect(self._on_loaded)
        self.modelUnloaded.connect(self._on_unloaded)
        self.loadFailed.connect(self._on_load_ended)
        self.loadSuperseded.connect(self._on_load_ended)
        self._info: ModelInfo | None = None
        self._loads_pending = 0  # asked for, not yet ended (loaded, failed or superseded)
        self._loading_name: str | None = None
        self._closed = False
        self._unsubscribe = self._host.subscribe(self._relay_event)

    @property
    def host(self) -> EngineHost:
        """The engine host this bridge adapts (shareable with other front ends)."""
        return self._host

    # -- the host's threads -----------------------------------------------------------------
    def _relay_event(self, ev) -> None:
        """Runs on the engine's thread or the host's: one queued signal per event."""
        relay = self._relay
        if isinstance(ev, TokenEvent):
            if ev.text and ev.request_id.startswith(REQUEST_PREFIX):
                relay.tokenReceived.emit(ev.request_id, ev.text)
        elif isinstance(ev, FinishedEvent):
            if ev.request_id.startswith(REQUEST_PREFIX):
                relay.requestFinished.emit(ev.request_id, _for_gui(ev))
        elif isinstance(ev, PromptProgressEvent):
            if ev.request_id.startswith(REQUEST_PREFIX):
                relay.promptProgress.emit(ev.request_id, ev.done, ev.total)
        elif isinstance(ev, RequestStarted):
            if ev.request_id.startswith(REQUEST_PREFIX):
                relay.requestStarted.emit(ev.request_id, {"model": ev.model, "dropped": ev.dropped})
        elif isinstance(ev, StatsUpdated):
            relay.statsUpdated.emit(ev.stats)
        elif isinstance(ev, LoadProgress):
            relay.loadProgress.emit(ev.message)
        elif isinstance(ev, ModelLoading):
            relay.modelLoading.emit(ev.name)
        elif isinstance(ev, ModelLoaded):
            relay.modelLoaded.emit(ev.info, ev.reloaded)
        elif isinstance(ev, LoadFailed):
            relay.loadFailed.emit(ev.message)
        elif isinstance(ev, LoadSuperseded):
            relay.loadSuperseded.emit(ev.name)
        elif isinstance(ev, ModelUnloaded):
            relay.modelUnloaded.emit()
        elif isinstance(ev, UnloadWithdrawn):
            relay.unloadWithdrawn.emit(ev.name)
        elif isinstance(ev, EngineError):
            relay.engineError.emit(ev.message)

    # -- state (GUI thread) -----------------------------------------------------------------
    @property
    def model_info(self) -> ModelInfo | None:
        """The model that answers requests now (None: none). While another loads, this is
        still the old one; after a failed load too."""
        return self._info

    @property
    def is_loading(self) -> bool:
        return self._loads_pending > 0

    @property
    def loading_name(self) -> str | None:
        """The display name of the model asked for last, while it loads (else None)."""
        return self._loading_name if self.is_loading else None

    def _on_loaded(self, info: ModelInfo, reloaded: bool = False) -> None:
        if not reloaded:  # a model back after a failed load ends no load asked for
            self._loads_pending = max(0, self._loads_pending - 1)
        self._info = info

    def _on_load_ended(self, _msg: str) -> None:
        self._loads_pending = max(0, self._loads_pending - 1)

    def _on_unloaded(self) -> None:
        self._info = None
        # The engine freed its tensors; collect what is left in reference cycles here, on
        # the GUI thread (the only one where collecting is safe), and trim the heap.
        release_memory(collect=True)

    # -- commands ---------------------------------------------------------------------------
    def load(self, options: dict) -> None:
        """Load a model (options: model, device, dtype, attention, max_model_len,
        kv_cache_memory, kv_cache_dtype, quantization, enforce_eager). The loaded model keeps
        serving until the new one is ready, and stays if the load fails or is cancelled (one
        unloaded to make room is loaded again if the load fails); a load still in flight is
        superseded (``loadSuperseded``, not a failure)."""
        self._loads_pending += 1
        self._loading_name = model_display_name(options.get("model"))
        self._host.load(options)

    def cancel_load(self) -> None:
        """Cancel the load in flight: it stops at its next check (between weight tensors at
        the latest) and ends in ``loadFailed(LOAD_CANCELLED)``."""
        self._host.cancel_load()

    def unload(self, after_answers: bool = False) -> None:
        """Unload the model (and cancel a load in flight: nothing stays loaded);
        ``after_answers``: once the answers being written have ended, instead of ending
        them (``modelUnloaded`` says when)."""
        self._host.unload(after_answers)

    def keep_loaded(self, options: dict) -> None:
        """Take back an ``unload(after_answers=True)`` still waiting; if the model went
        meanwhile, load it again with ``options``."""
        self._host.keep_loaded(options)

    def submit(self, *, messages: list[dict] | None = None, prompt: str | None = None,
               system: str | None = None, params: SamplingParams | None = None) -> str:
        """Queue a request; returns its id at once. Events arrive as requestStarted,
        promptProgress, tokenReceived and requestFinished (an error, e.g. no model loaded,
        is a FinishedEvent too). A conversation longer than the context loses its oldest
        turns (``Request.fit_context``); requestStarted's ``dropped`` says how many."""
        rid = f"{REQUEST_PREFIX}{uuid.uuid4().hex[:12]}"
        self._host.submit(Request(messages=messages, prompt=prompt, system=system,
                                  params=params or SamplingParams(), request_id=rid, prompt_progress=True,
                                  fit_context=messages is not None))
        return rid

    def abort(self, request_id: str) -> None:
        self._host.abort(request_id)

    def shutdown(self, timeout_ms: int = 30000) -> None:
        """Stop listening, and stop the engine host if the bridge made it (call once, when
        the window closes); the last events (requests ended by it) still arrive."""
        if self._closed:
            return
        self._closed = True
        if self._owns_host:
            if not self._host.shutdown(timeout_ms / 1000):
                log.warning("the engine host did not stop within %d ms", timeout_ms)
        self._unsubscribe()


def _for_gui(ev: FinishedEvent) -> FinishedEvent:
    """The event with its error worded for the GUI (a dialog field, not a CLI flag)."""
    if not ev.error or not ev.error_options:
        return ev
    return dataclasses.replace(ev, error=gui_error_text(ev.error, ev.error_options))
