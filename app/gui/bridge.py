"""EngineBridge: the one QObject through which the window talks to the engine.

The engine's client side (``engine.api.Engine``: load, submit, poll, abort, stats,
shutdown) lives on a worker ``QThread``; the UI thread only sends it queued signals and
receives queued signals back, so it never waits on the engine. The engine itself runs
its own loop thread; the worker drains every live request's events every 15 ms (one
signal per text delta) and publishes ``EngineStats`` about four times a second.

A model loads on a thread of its own while the loaded one keeps serving; the new engine
replaces it once ready (a swap), and a failed or cancelled load leaves it in place (see
``_Worker.load`` for the GPU exception). Cancelling a load can't interrupt a tensor copy
in progress, so it is cooperative: the loader's progress callback raises at its next
report, and whatever finishes loading after a cancel is shut down at once instead of
being announced.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import traceback
import uuid

from PySide6.QtCore import QObject, QThread, QTimer, Signal, Slot

from app.gui.error_text import gui_error, gui_error_text

from engine.api import (Engine, FinishedEvent, HearthError, PromptProgressEvent, Request,
                        SamplingParams, TokenEvent, check_model, model_display_name, release_memory)

log = logging.getLogger("hearth.gui")

STATS_INTERVAL_MS = 250
POLL_INTERVAL_MS = 15
LOAD_JOIN_TIMEOUT_S = 25  # on quit, how long a load may take to reach its next progress report

# Load options the bridge passes to Engine.load (anything else in the dict is ignored).
_LOAD_KEYS = ("device", "dtype", "attention", "max_model_len", "kv_cache_memory",
              "kv_cache_dtype", "enforce_eager", "revision")


class LoadCancelled(Exception):
    pass


def _gpu_index(device: str | None) -> int | None:
    """The CUDA device index a device option or ``model_info["device"]`` means (None: CPU).
    ``auto`` means GPU 0 here: it is only asked about while a model is on a GPU."""
    device = (device or "auto").strip()
    if device in ("auto", "cuda"):
        return 0
    if device.startswith("cuda:"):
        try:
            return int(device[5:])
        except ValueError:
            return None
    return None


def _same_gpu(loaded_device: str | None, wanted_device: str | None) -> bool:
    """Whether a load on ``wanted_device`` would compete for the GPU holding the loaded model."""
    loaded = _gpu_index(loaded_device) if (loaded_device or "").startswith("cuda") else None
    return loaded is not None and loaded == _gpu_index(wanted_device)


class BridgeSignals(QObject):
    """The signals the bridge delivers (pages connect to these; test fakes subclass it)."""

    modelLoading = Signal(str)
    loadProgress = Signal(str)
    modelLoaded = Signal(dict)
    loadFailed = Signal(str)
    modelUnloaded = Signal()
    tokenReceived = Signal(str, str)
    requestFinished = Signal(str, object)
    requestStarted = Signal(str, dict)  # request id, {"dropped": n} (history trimmed)
    promptProgress = Signal(str, int, int)  # request id, prompt tokens read, prompt tokens
    statsUpdated = Signal(object)
    engineError = Signal(str)

    SIGNALS = ("modelLoading", "loadProgress", "modelLoaded", "loadFailed", "modelUnloaded",
               "tokenReceived", "requestFinished", "requestStarted", "promptProgress", "statsUpdated",
               "engineError")


class _Worker(BridgeSignals):
    """Lives on the worker thread; every slot here runs there."""

    # From the load thread, queued to the worker thread:
    _loadDone = Signal()  # a result waits in self._result
    _releaseWanted = Signal()  # free the GPU for the model being loaded

    def __init__(self, engine_factory, model_check) -> None:
        super().__init__()
        self._factory = engine_factory
        self._check = model_check
        self.engine: Engine | None = None
        self._handles: dict = {}
        self._poll: QTimer | None = None
        self._stats: QTimer | None = None
        self._load_thread: threading.Thread | None = None
        self._loading: dict | None = None  # the options of the load in flight
        self._next: dict | None = None  # a load asked for while another was in flight
        self._result: tuple | None = None  # (options, engine or None, error or None)
        self._released = threading.Event()
        self._released_name: str | None = None  # unloaded to make room for the load in flight
        self._closing = False
        self._loadDone.connect(self._finish_load)
        self._releaseWanted.connect(self._release_for_load)

    @Slot()
    def start_timers(self) -> None:
        self._poll = QTimer(self)
        self._poll.setInterval(POLL_INTERVAL_MS)
        self._poll.timeout.connect(self._drain)
        self._stats = QTimer(self)
        self._stats.setInterval(STATS_INTERVAL_MS)
        self._stats.timeout.connect(self._publish_stats)

    # -- loading ------------------------------------------------------------------------
    # The model loads on a thread of its own while the loaded engine keeps serving (its
    # answers stream, its stats update); the new engine replaces it only once it is ready,
    # and a load that fails or is cancelled leaves it in place. Every load asked for ends
    # in exactly one modelLoaded or loadFailed.
    #
    # One exception: two models rarely fit on one GPU (the KV cache takes most of what the
    # weights leave), so on the GPU the old model is checked out first — the new one is
    # found and validated, which catches a missing tokenizer or file, an unknown repo —
    # and then unloaded before the weights load (modelUnloaded, then modelLoading again).
    @Slot(dict)
    def load(self, options: dict) -> None:
        # Each load carries its own cancel token (a threading.Event made by the bridge on
        # the UI thread): cancelling, or asking for another load, cancels exactly this one.
        cancel: threading.Event = options["_cancel"]
        if cancel.is_set():
            self.loadFailed.emit("loading cancelled")
            return
        quant = options.get("quantization") or "none"
        if quant != "none":
            self.loadFailed.emit(f"quantization {quant!r} is not available yet; load with 'none'.")
            return
        if self._loading is not None:  # one load at a time: the bridge cancelled that one
            if self._next is not None:
                self.loadFailed.emit("loading cancelled")  # superseded before it started
            self._next = options
            return
        self._start_load(options)

    def _start_load(self, options: dict) -> None:
        self._loading = options
        self._released.clear()
        self._released_name = None
        self.modelLoading.emit(model_display_name(options.get("model")))
        free_first = self.engine is not None and _same_gpu(self.engine.model_info.get("device"),
                                                           options.get("device"))
        self._load_thread = threading.Thread(target=self._load_in_background, args=(options, free_first),
                                             name="hearth-model-load", daemon=True)
        self._load_thread.start()

    def _load_in_background(self, options: dict, free_first: bool) -> None:
        """Runs on the load thread: never touches self.engine or the handles."""
        cancel: threading.Event = options["_cancel"]

        def progress(msg: str) -> None:
            if cancel.is_set():
                raise LoadCancelled()
            self.loadProgress.emit(msg)

        engine = error = None
        try:
            if free_first:
                choices = {k: options[k] for k in ("device", "dtype", "attention", "kv_cache_dtype")
                           if options.get(k) not in (None, "")}
                self._check(options.get("model"), options.get("revision"), progress=progress, **choices)
                self._releaseWanted.emit()
                while not self._released.wait(0.05):
                    if cancel.is_set():
                        raise LoadCancelled()
            kwargs = {k: options[k] for k in _LOAD_KEYS if options.get(k) not in (None, "")}
            engine = self._factory(options.get("model"), progress=progress, **kwargs)
        except LoadCancelled:
            error = "loading cancelled"
        except HearthError as e:
            error = gui_error(e)
        except Exception as e:  # a bug or an unexpected library error: say it, keep the app alive
            log.error("load failed:\n%s", traceback.format_exc())
            error = f"loading failed unexpectedly: {type(e).__name__}: {e}"
        self._result = (options, engine, error)
        self._loadDone.emit()

    @Slot()
    def _release_for_load(self) -> None:
        options = self._loading
        if options is not None and not options["_cancel"].is_set() and self.engine is not None:
            self._released_name = self.engine.model_info.get("name")
            self._unload_quietly()
            self.modelUnloaded.emit()
            self.modelLoading.emit(model_display_name(options.get("model")))
        self._released.set()

    @Slot()
    def _finish_load(self) -> None:
        if self._result is None:  # taken by shutdown()
            return
        (options, engine, error), self._result = self._result, None
        if self._load_thread is not None:
            self._load_thread.join()
        self._load_thread = self._loading = None
        if error is None and options["_cancel"].is_set():  # cancelled in the last stretch
            engine.shutdown()
            engine, error = None, "loading cancelled"
        if error is not None:
            if self._released_name is not None:
                error += (f" ({self._released_name} was unloaded first to make room on the GPU: "
                          "load it again from the Library.)")
            self.loadFailed.emit(error)
        else:
            self._unload_quietly()  # the swap: the old engine goes only now
            self.engine = engine
            self._poll.start()
            self._stats.start()
            self.modelLoaded.emit(dict(engine.model_info, max_model_len=engine.max_model_len))
            self._publish_stats()
        nxt, self._next = self._next, None
        if nxt is not None and not self._closing:
            if nxt["_cancel"].is_set():
                self.loadFailed.emit("loading cancelled")
            else:
                self._start_load(nxt)

    @Slot()
    def unload(self) -> None:
        self._unload_quietly()
        self.modelUnloaded.emit()

    def _unload_quietly(self) -> None:
        if self.engine is None:
            return
        if self._poll is not None:
            self._poll.stop()
            self._stats.stop()
        self._drain()
        engine, self.engine = self.engine, None
        try:
            engine.shutdown()  # frees the weights, KV cache and graphs
        except Exception:  # pragma: no cover - shutdown must not take the app down
            log.exception("engine shutdown failed")
        for rid, handle in list(self._handles.items()):
            for ev in handle.poll():
                self._emit(rid, ev)
        self._handles.clear()

    # -- requests -----------------------------------------------------------------------
    @Slot(str, dict)
    def submit(self, request_id: str, req: dict) -> None:
        if self.engine is None:
            self._fail(request_id, "no model is loaded: load one on the Models page first.")
            return
        params: SamplingParams = req["params"]
        messages = req.get("messages")
        dropped = 0
        try:
            if messages is not None:
                from app.commands.chat import fit_history

                messages, dropped = fit_history(self.engine, messages, req.get("system"),
                                                params.max_tokens)
            handle = self.engine.submit(Request(messages=messages, prompt=req.get("prompt"),
                                                system=req.get("system"), params=params,
                                                request_id=request_id, prompt_progress=True))
        except HearthError as e:
            self._fail(request_id, gui_error(e))
            return
        except Exception as e:
            log.error("submit failed:\n%s", traceback.format_exc())
            self._fail(request_id, f"{type(e).__name__}: {e}")
            return
        self._handles[request_id] = handle
        self.requestStarted.emit(request_id, {"dropped": dropped})

    @Slot(str)
    def abort(self, request_id: str) -> None:
        if self.engine is not None and request_id in self._handles:
            self.engine.abort(request_id)

    def _fail(self, request_id: str, message: str) -> None:
        from engine.api import Timings, Usage

        ev = FinishedEvent(request_id, "error", Usage(0, 0), Timings(0, 0, 0, 0, 0), error=message)
        self.requestFinished.emit(request_id, ev)

    def _emit(self, rid: str, ev) -> None:
        if isinstance(ev, TokenEvent):
            if ev.text:
                self.tokenReceived.emit(rid, ev.text)
        elif isinstance(ev, FinishedEvent):
            self.requestFinished.emit(rid, _for_gui(ev))

    @Slot()
    def _drain(self) -> None:
        for rid, handle in list(self._handles.items()):
            events = handle.poll()
            # Only the latest prompt progress matters (it comes before any text).
            progress = [e for e in events if isinstance(e, PromptProgressEvent)]
            if progress:
                self.promptProgress.emit(rid, progress[-1].done, progress[-1].total)
            # Coalesce this tick's text deltas into one signal: fewer repaints, same text.
            text = "".join(e.text for e in events if isinstance(e, TokenEvent))
            if text:
                self.tokenReceived.emit(rid, text)
            for ev in events:
                if isinstance(ev, FinishedEvent):
                    self.requestFinished.emit(rid, _for_gui(ev))
            if handle.done:
                del self._handles[rid]

    @Slot()
    def _publish_stats(self) -> None:
        if self.engine is None:
            return
        try:
            self.statsUpdated.emit(self.engine.stats())
        except HearthError as e:
            self.engineError.emit(str(e))
        except Exception as e:  # stats must never take the worker down
            log.debug("stats failed: %s", e)

    @Slot()
    def shutdown(self) -> None:
        self._closing = True
        if self._load_thread is not None:
            # The bridge cancelled the load: it stops at its next progress report.
            self._load_thread.join(LOAD_JOIN_TIMEOUT_S)
            if self._result is not None and self._result[1] is not None:
                self._result[1].shutdown()
            self._result = None
        self._unload_quietly()
        # Qt timers may only be stopped and destroyed in the thread they live in: do it
        # here, on the worker thread, rather than when Python collects this object later.
        for timer in (self._poll, self._stats):
            if timer is not None:
                timer.stop()
                timer.setParent(None)
        self._poll = self._stats = None
        # Quit from here, after the engine is down: a quit() from the UI thread could end
        # this thread's event loop before this slot ever ran.
        QThread.currentThread().quit()


def _for_gui(ev: FinishedEvent) -> FinishedEvent:
    """The event with its error worded for the GUI (a dialog field, not a CLI flag)."""
    if not ev.error or not ev.error_options:
        return ev
    return dataclasses.replace(ev, error=gui_error_text(ev.error, ev.error_options))


class EngineBridge(BridgeSignals):
    """UI-thread facade. Signals arrive queued on the UI thread; methods never block."""

    _doLoad = Signal(dict)
    _doUnload = Signal()
    _doSubmit = Signal(str, dict)
    _doAbort = Signal(str)
    _doShutdown = Signal()

    def __init__(self, parent=None, engine_factory=None, model_check=None) -> None:
        super().__init__(parent)
        self._thread = QThread()
        self._thread.setObjectName("hearth-engine-bridge")
        self._worker = _Worker(engine_factory or Engine.load, model_check or check_model)
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
        self.loadFailed.connect(self._on_failed)
        self._info: dict | None = None
        self._loads_pending = 0  # asked for, not yet ended in modelLoaded or loadFailed
        self._load_cancel: threading.Event | None = None
        self._thread.start()

    # -- state --------------------------------------------------------------------------
    @property
    def model_info(self) -> dict | None:
        """The model that answers requests now (None: none). While another loads, this is
        still the old one; after a failed load too."""
        return self._info

    @property
    def is_loading(self) -> bool:
        return self._loads_pending > 0

    def _on_loaded(self, info: dict) -> None:
        self._loads_pending = max(0, self._loads_pending - 1)
        self._info = info

    def _on_failed(self, _msg: str) -> None:
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
        serving until the new one is ready, and stays if the load fails or is cancelled."""
        self._loads_pending += 1
        self.cancel_load()  # a new load replaces any still in flight
        self._load_cancel = threading.Event()
        self._doLoad.emit(dict(options, _cancel=self._load_cancel))

    def cancel_load(self) -> None:
        """Cancel the load in flight (it stops at its next progress report)."""
        if self._load_cancel is not None:
            self._load_cancel.set()

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
