"""EngineBridge: the one QObject through which the window talks to the engine.

The engine's client side (``engine.api.Engine``: load, submit, poll, abort, stats,
shutdown) lives on a worker ``QThread`` (``app.gui.bridge_worker``); the UI thread only
sends it queued signals and receives queued signals back, so it never waits on the
engine. The engine itself runs its own loop thread.

Loading: the loaded model keeps serving while another loads, and the new one takes over
once ready and once the answers being written on the old one have finished; a failed or
cancelled load leaves the old one in place. Only where the new model would not fit beside
it (``engine.api.check_model`` says so: the same GPU, or not enough RAM) is the old one
unloaded first, and loaded again if the new one then fails.
"""

from __future__ import annotations

import logging
import uuid

from PySide6.QtCore import QThread, Signal

from app.gui.bridge_loading import LOAD_CANCELLED, SWAP_WAIT_S, LoadTicket
from app.gui.bridge_signals import BridgeSignals
from app.gui.bridge_worker import EngineWorker

from engine.api import Engine, ModelInfo, SamplingParams, check_model, model_display_name, release_memory

log = logging.getLogger("hearth.gui")

__all__ = ["BridgeSignals", "EngineBridge", "LOAD_CANCELLED"]


class EngineBridge(BridgeSignals):
    """UI-thread facade. Signals arrive queued on the UI thread; methods never block.

    ``answer_wait_s``: how long a swap (or an unload to make room) waits for the answers
    being written on the old model before cutting them with an error."""

    _doLoad = Signal(dict)
    _doUnload = Signal()
    _doSubmit = Signal(str, dict)
    _doAbort = Signal(str)
    _doShutdown = Signal()

    def __init__(self, parent=None, engine_factory=None, model_check=None,
                 answer_wait_s: float = SWAP_WAIT_S) -> None:
        super().__init__(parent)
        self._thread = QThread()
        self._thread.setObjectName("hearth-engine-bridge")
        self._worker = EngineWorker(engine_factory or Engine.load, model_check or check_model, answer_wait_s)
        self._worker.moveToThread(self._thread)
        self._thread.started.connect(self._worker.start_timers)
        for name in self.SIGNALS:
            getattr(self._worker, name).connect(getattr(self, name))
        self._doLoad.connect(self._worker.load)
        self._doUnload.connect(self._worker.unload)
        self._doSubmit.connect(self._worker.submit)
        self._doAbort.connect(self._worker.abort)
        self._doShutdown.connect(self._worker.shutdown)
        self.modelLoaded.connect(self._on_loaded)
        self.modelUnloaded.connect(self._on_unloaded)
        self.loadFailed.connect(self._on_load_ended)
        self.loadSuperseded.connect(self._on_load_ended)
        self._info: ModelInfo | None = None
        self._loads_pending = 0  # asked for, not yet ended (loaded, failed or superseded)
        self._ticket: LoadTicket | None = None
        self._loading_name: str | None = None
        self._thread.start()

    # -- state --------------------------------------------------------------------------
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

    # -- commands -----------------------------------------------------------------------
    def load(self, options: dict) -> None:
        """Load a model (options: model, device, dtype, attention, max_model_len,
        kv_cache_memory, kv_cache_dtype, quantization, enforce_eager). The loaded model keeps
        serving until the new one is ready, and stays if the load fails or is cancelled (one
        unloaded to make room is loaded again if the load fails); a load still in flight is
        superseded (``loadSuperseded``, not a failure)."""
        self._loads_pending += 1
        if self._ticket is not None:
            self._ticket.cancel(superseded=True)
        self._ticket = LoadTicket()
        self._loading_name = model_display_name(options.get("model"))
        self._doLoad.emit(dict(options, _ticket=self._ticket))

    def cancel_load(self) -> None:
        """Cancel the load in flight: it stops at its next check (between weight tensors at
        the latest) and ends in ``loadFailed(LOAD_CANCELLED)``."""
        if self._ticket is not None:
            self._ticket.cancel()  # the worker polls for it (its load thread, or while a swap waits)

    def unload(self) -> None:
        """Unload the model (and cancel a load in flight: nothing stays loaded)."""
        self.cancel_load()
        self._doUnload.emit()

    def submit(self, *, messages: list[dict] | None = None, prompt: str | None = None,
               system: str | None = None, params: SamplingParams | None = None) -> str:
        """Queue a request; returns its id at once. Events arrive as tokenReceived /
        requestFinished (an error, e.g. no model loaded, is a FinishedEvent too)."""
        rid = f"gui-{uuid.uuid4().hex[:12]}"
        self._doSubmit.emit(rid, {"messages": messages, "prompt": prompt, "system": system,
                                  "params": params or SamplingParams()})
        return rid

    def abort(self, request_id: str) -> None:
        self._doAbort.emit(request_id)

    def shutdown(self, timeout_ms: int = 30000) -> None:
        """Stop the engine and the worker thread (call once, when the window closes)."""
        if not self._thread.isRunning():
            return
        self.cancel_load()
        self._doShutdown.emit()  # the worker shuts the engine down, then quits its thread
        if not self._thread.wait(timeout_ms):
            log.warning("the engine worker did not stop within %d ms", timeout_ms)
            self._thread.quit()
            self._thread.wait(timeout_ms)
