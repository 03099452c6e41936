"""The engine bridge's worker: lives on the bridge's QThread and owns the ``Engine``.

It submits, polls and aborts requests (draining every live request's events every 15 ms,
one signal per text delta), publishes ``EngineStats`` about four times a second, and
loads models on a thread of its own while the loaded one keeps serving (see the loading
section of ``EngineWorker``). ``app.gui.bridge.EngineBridge`` is the UI thread's side.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import traceback

from PySide6.QtCore import QThread, QTimer, Signal, Slot

from app.gui.bridge_loading import (LOAD_CANCELLED, LOAD_JOIN_TIMEOUT_S, LoadTicket, Released, cut_reason,
                                    loaded_footprint, release_note, release_progress, reload_outcome, reload_progress,
                                    user_options, wait_progress)
from app.gui.bridge_signals import BridgeSignals
from app.gui.error_text import gui_error, gui_error_text
from app.services.chat_context import fit_history

from engine.api import (LOAD_OPTIONS, Engine, FinishedEvent, HearthError, LoadCancelledError, PromptProgressEvent,
                        Request, SamplingParams, Timings, TokenEvent, Usage, model_display_name)

log = logging.getLogger("hearth.gui")

STATS_INTERVAL_MS = 250
POLL_INTERVAL_MS = 15
NO_MODEL = "no model is loaded: load one on the Models page first."

# Load options the worker passes to check_model and Engine.load (anything else is ignored).
_LOAD_KEYS = LOAD_OPTIONS


#: Workers whose load thread quit gave up on (kept alive until the process ends).
_ABANDONED: list = []


def _name(options: dict) -> str:
    return model_display_name(options.get("model"))


class EngineWorker(BridgeSignals):
    """Lives on the worker thread; every slot here runs there."""

    # From the load thread, queued to the worker thread:
    _loadDone = Signal()  # a result waits in self._result
    _releaseWanted = Signal()  # unload the loaded model to make room for the one loading

    def __init__(self, engine_factory, model_check, answer_wait_s: float) -> None:
        super().__init__()
        self._factory = engine_factory
        self._check = model_check
        self._answer_wait_ms = int(answer_wait_s * 1000)
        self.engine: Engine | None = None
        self._handles: dict = {}
        self._poll: QTimer | None = None
        self._stats: QTimer | None = None
        self._answers_due: QTimer | None = None  # how long a swap or release waits for answers
        self._cut_reason = ""  # what the answers still running then are told
        self._load_thread: threading.Thread | None = None
        self._loading: dict | None = None  # the options of the load whose thread runs
        self._ready: tuple | None = None  # (options, engine): loaded, waiting for answers to end
        self._next: dict | None = None  # a load asked for while another was in flight
        self._result: tuple | None = None  # (options, engine or None, error or None)
        self._released = threading.Event()  # the load thread waits on it for the room it asked for
        self._release_wanted = False
        # The model unloaded to make room for a load: loaded again if that load fails (kept
        # through a load superseded meanwhile, so the one that replaced it can fail too).
        self._released_from: Released | None = None
        self._serving_options: dict | None = None  # the options self.engine was loaded with
        self._held: list[tuple[str, dict]] = []  # submitted while no model served and one loaded
        self._closing = False
        self._loadDone.connect(self._finish_load)
        self._releaseWanted.connect(self._release_for_load)

    @Slot()
    def start_timers(self) -> None:
        self._poll = QTimer(self)
        self._poll.setInterval(POLL_INTERVAL_MS)
        self._poll.timeout.connect(self._poll_tick)
        self._stats = QTimer(self)
        self._stats.setInterval(STATS_INTERVAL_MS)
        self._stats.timeout.connect(self._publish_stats)
        self._answers_due = QTimer(self)
        self._answers_due.setSingleShot(True)
        self._answers_due.setInterval(self._answer_wait_ms)
        self._answers_due.timeout.connect(self._answers_overdue)

    # -- loading ------------------------------------------------------------------------
    # A load runs on a thread of its own while the loaded engine keeps serving (answers
    # stream, stats update). It starts with check_model, the cheap pre-flight: it finds
    # the model and refuses what the load would refuse (bad choices, no tokenizer, a
    # context longer than the model's, memory it can't have even with the old model gone)
    # while nothing was given up, and says whether the new model fits beside the old one.
    # Where it doesn't (the same GPU, or too little RAM), the old one is unloaded first
    # (modelUnloaded, then modelLoading again), after the answers being written on it end.
    # Once the new engine is ready it replaces the old one, again only after those answers
    # end (at most answer_wait_s; later ones are cut with an error saying why). A load that
    # fails after the old model was unloaded for it loads the old one again (_failed), and
    # says both in its one loadFailed. A request sent while no model serves but one loads
    # waits for it (_held), so one sent as the old model made room is not refused.
    #
    # Each load carries a LoadTicket made by the bridge on the UI thread: cancelling it
    # (Cancel loading, Unload, quit) or superseding it (another load asked for) stops the
    # load at its next check, between weight tensors at the latest.
    @Slot(dict)
    def load(self, options: dict) -> None:
        if options["_ticket"].is_set():
            self._end_cancelled(options)
            return
        quant = options.get("quantization") or "none"
        if quant != "none":
            self.loadFailed.emit(f"quantization {quant!r} is not available yet; load with 'none'.")
            return
        if self._next is not None:  # replaced before it started
            self._end_cancelled(self._next)
        self._next = options
        self._advance()

    def _start_load(self, options: dict) -> None:
        self._loading = options
        self._released.clear()
        self.modelLoading.emit(_name(options))
        info = self.engine.model_info if self.engine is not None else None
        loaded = (info.device, loaded_footprint(info)) if info else (None, 0)
        self._load_thread = threading.Thread(target=self._load_in_background, args=(options, *loaded),
                                             name="hearth-model-load", daemon=True)
        self._load_thread.start()

    def _load_in_background(self, options: dict, loaded_device: str | None, loaded_bytes: int) -> None:
        """Runs on the load thread: never touches self.engine or the handles."""
        ticket: LoadTicket = options["_ticket"]

        def progress(msg: str) -> None:
            ticket.raise_if_set()
            self.loadProgress.emit(msg)

        engine = error = None
        try:
            kwargs = {k: options[k] for k in _LOAD_KEYS if options.get(k) not in (None, "")}
            check = self._check(options.get("model"), progress=progress, loaded_device=loaded_device,
                                loaded_bytes=loaded_bytes, **kwargs)
            if loaded_device is not None and not check.fits_beside:
                ticket.raise_if_set()  # after a cancel (or quit) this thread emits nothing more
                self.loadProgress.emit(release_progress(check))
                self._releaseWanted.emit()
                while not self._released.wait(0.05):
                    ticket.raise_if_set()
                ticket.raise_if_set()
            engine = self._factory(options.get("model"), progress=progress, should_stop=ticket.is_set, **kwargs)
        except LoadCancelledError:
            error = LOAD_CANCELLED
        except HearthError as e:
            error = gui_error(e)
        except Exception as e:  # a bug or an unexpected library error: say it, keep the app alive
            log.error("load failed:\n%s", traceback.format_exc())
            error = f"loading failed unexpectedly: {type(e).__name__}: {e}"
        except BaseException as e:  # the thread is going down: still say how the load ended
            error = f"loading stopped unexpectedly ({type(e).__name__})"
            raise
        finally:  # whatever happened, the worker hears of it (else every later load would wait)
            if engine is None and error is None:
                error = "loading stopped unexpectedly"
            self._result = (options, engine, error)
            if not self._closing:  # past quit the worker's thread (and maybe the app) is gone
                self._loadDone.emit()
            elif engine is not None:  # loaded as the app quit: free it (Engine.shutdown may run twice)
                self._shut(engine)

    @Slot()
    def _release_for_load(self) -> None:
        self._release_wanted = True
        self._advance()

    @Slot()
    def _finish_load(self) -> None:
        if self._result is None:  # taken by shutdown()
            return
        (options, engine, error), self._result = self._result, None
        if self._load_thread is not None:
            self._load_thread.join()
        self._load_thread = self._loading = None
        self._release_wanted = False
        self._stop_waiting()
        if options["_ticket"].is_set():  # cancelled or superseded, maybe in the last stretch
            if engine is not None:
                self._shut(engine)
            self._end_cancelled(options)
        elif error is not None:
            self._failed(options, error)
        else:
            self._ready = (options, engine)
        self._advance()

    def _failed(self, options: dict, error: str) -> None:
        """A load failed. Where the model that served was unloaded for it (or for a load it
        superseded), that model is loaded again, under the same ticket (a cancel or a newer
        load stops it too); the failure is told once that has ended (``_swap``)."""
        released, reload_of = self._released_from, options.get("_reload_of")
        if reload_of is not None:  # bringing the old model back failed too
            self._released_from = None
            self.loadFailed.emit(reload_outcome(*reload_of, released.name if released else _name(options), error))
        elif released is not None and self.engine is None and not self._closing:
            self.loadProgress.emit(reload_progress(_name(options), error, released.name))
            self._start_load(dict(released.options, _ticket=options["_ticket"],
                                  _reload_of=(_name(options), error)))
        else:
            self.loadFailed.emit(error)

    def _advance(self) -> None:
        """Take every step the loading state allows now: release the old model or swap in
        the new one once no answer is being written on the old one, drop a ready engine
        whose load was cancelled, start the next load."""
        if self._release_wanted:
            options = self._loading
            if options is None or options["_ticket"].is_set() or self.engine is None:
                self._release_wanted = False
                self._stop_waiting()
                self._released.set()
            elif self._handles:
                self._wait_for_answers(options, releasing=True)
            else:
                self._release_wanted = False
                self._stop_waiting()
                info = self.engine.model_info
                self._released_from = Released(info.name, info.device, self._serving_options or {"model": info.ref})
                self._unload_quietly()
                self.modelUnloaded.emit()
                self.modelLoading.emit(_name(options))
                self._released.set()
        if self._ready is not None:
            options, engine = self._ready
            if options["_ticket"].is_set():
                self._ready = None
                self._stop_waiting()
                self._shut(engine)
                self._end_cancelled(options)
            elif self._handles:
                self._wait_for_answers(options, releasing=False)
            else:
                self._ready = None
                self._stop_waiting()
                self._swap(engine, options)
        if self._loading is None and self._ready is None and self._next is not None and not self._closing:
            options, self._next = self._next, None
            if options["_ticket"].is_set():
                self._end_cancelled(options)
            else:
                self._start_load(options)
        self._settle_held()

    def _load_in_flight(self) -> bool:
        """Whether a load is under way (running, ready and waiting, or asked for next)."""
        return self._loading is not None or self._ready is not None or self._next is not None

    def _wait_for_answers(self, options: dict, releasing: bool) -> None:
        if self._answers_due is None or self._answers_due.isActive():
            return
        old = self.engine.model_info.name if self.engine else "the loaded model"
        self._cut_reason = cut_reason(old, _name(options), self._answer_wait_ms / 1000, releasing)
        self._answers_due.start()
        self.loadProgress.emit(wait_progress(old, _name(options), releasing))

    def _stop_waiting(self) -> None:
        if self._answers_due is not None:
            self._answers_due.stop()

    @Slot()
    def _answers_overdue(self) -> None:
        """The answers a swap or release waited for ran too long: end them with an error
        that says why (the text so far is kept), then go on."""
        for rid, handle in list(self._handles.items()):
            if not self._drain_one(rid, handle):
                if self.engine is not None:
                    self.engine.abort(rid)
                self._fail(rid, self._cut_reason)
        self._handles.clear()
        self._advance()

    def _swap(self, engine, options: dict) -> None:
        self._unload_quietly()  # the old engine goes only now, with no answer running on it
        self.engine = engine
        self._serving_options, self._released_from = user_options(options), None
        self._poll.start()
        self._stats.start()
        info = dataclasses.replace(engine.model_info, max_model_len=engine.max_model_len)
        reload_of = options.get("_reload_of")
        if reload_of is not None:  # the failed load's one outcome first, then its model is back
            self.loadFailed.emit(reload_outcome(*reload_of, info.name))
        self.modelLoaded.emit(info, reload_of is not None)
        self._settle_held()
        self._publish_stats()

    def _end_cancelled(self, options: dict) -> None:
        """End a load that was cancelled or superseded (one given up for it is loaded again
        by the load that superseded it, if that one fails)."""
        reload_of = options.get("_reload_of")
        if options["_ticket"].superseded:
            self.loadSuperseded.emit(reload_of[0] if reload_of else _name(options))
            return
        released, self._released_from = self._released_from, None
        if reload_of is not None:
            previous = released.name if released else _name(options)
            self.loadFailed.emit(reload_outcome(*reload_of, previous, cancelled=True))
        else:
            self.loadFailed.emit(LOAD_CANCELLED + release_note(released))

    @staticmethod
    def _shut(engine) -> None:
        try:
            engine.shutdown()
        except Exception:  # pragma: no cover - shutdown must not take the app down
            log.exception("engine shutdown failed")

    @Slot()
    def unload(self) -> None:
        self._unload_quietly()
        self._serving_options = None
        self.modelUnloaded.emit()
        self._advance()  # a load the bridge cancelled with this ends too
        self._released_from = None  # asked for no model: a failing load brings none back

    def _unload_quietly(self) -> None:
        if self.engine is None:
            return
        if self._poll is not None:
            self._poll.stop()
            self._stats.stop()
        self._drain()
        engine, self.engine = self.engine, None
        self._shut(engine)  # frees the weights, KV cache and graphs
        for rid, handle in list(self._handles.items()):
            for ev in handle.poll():
                self._emit(rid, ev)
        self._handles.clear()

    # -- requests -----------------------------------------------------------------------
    @Slot(str, dict)
    def submit(self, request_id: str, req: dict) -> None:
        if self.engine is None:
            if self._load_in_flight():
                # Sent as the old model made room for a new one (or before any was ready):
                # the model being loaded answers it (_settle_held).
                self._held.append((request_id, req))
            else:
                self._fail(request_id, NO_MODEL)
            return
        params: SamplingParams = req["params"]
        messages = req.get("messages")
        dropped = 0
        try:
            if messages is not None:
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
        self.requestStarted.emit(request_id, {"model": self.engine.model_info.name, "dropped": dropped})

    def _settle_held(self) -> None:
        """Submit the requests held for the model being loaded once one serves; end them
        with an error once no load is left that could serve them."""
        if not self._held or (self.engine is None and self._load_in_flight()):
            return
        held, self._held = self._held, []
        for rid, req in held:
            if self.engine is not None:
                self.submit(rid, req)
            else:
                self._fail(rid, NO_MODEL)

    @Slot(str)
    def abort(self, request_id: str) -> None:
        if self.engine is not None and request_id in self._handles:
            self.engine.abort(request_id)
        elif any(rid == request_id for rid, _ in self._held):
            self._held = [(rid, req) for rid, req in self._held if rid != request_id]
            self.requestFinished.emit(request_id, _ended(request_id, "abort"))

    def _fail(self, request_id: str, message: str) -> None:
        self.requestFinished.emit(request_id, _ended(request_id, "error", message))


    def _emit(self, rid: str, ev) -> None:
        if isinstance(ev, TokenEvent):
            if ev.text:
                self.tokenReceived.emit(rid, ev.text)
        elif isinstance(ev, FinishedEvent):
            self.requestFinished.emit(rid, _for_gui(ev))

    @Slot()
    def _poll_tick(self) -> None:
        self._drain()
        if self._ready is not None or self._release_wanted:
            self._advance()  # a swap or release waiting for answers may go now

    def _drain(self) -> None:
        for rid, handle in list(self._handles.items()):
            if self._drain_one(rid, handle):
                del self._handles[rid]

    def _drain_one(self, rid: str, handle) -> bool:
        """Emit the events that arrived for one request; returns whether it finished."""
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
        return handle.done

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
        self._stop_waiting()
        if self._load_thread is not None:
            # The bridge cancelled the load: it stops at its next check (the next weight
            # tensor at the latest). One that can't (a download, a conversion) is left to
            # end with the process rather than keep the window from closing.
            self._load_thread.join(LOAD_JOIN_TIMEOUT_S)
            if self._load_thread.is_alive():
                log.warning("a model load did not stop within %d s; quitting without it", LOAD_JOIN_TIMEOUT_S)
                # It still holds this object: never let it be the one to delete it.
                _ABANDONED.append(self)
            elif self._result is not None and self._result[1] is not None:
                self._shut(self._result[1])
            self._result = None
        if self._ready is not None:
            self._shut(self._ready[1])
            self._ready = None
        self._unload_quietly()
        for rid, _ in self._held:  # every request ends with one FinishedEvent
            self.requestFinished.emit(rid, _ended(rid, "abort", "the app is closing"))
        self._held.clear()
        # Qt timers may only be stopped and destroyed in the thread they live in: do it
        # here, on the worker thread, rather than when Python collects this object later.
        for timer in (self._poll, self._stats, self._answers_due):
            if timer is not None:
                timer.stop()
                timer.setParent(None)
        self._poll = self._stats = self._answers_due = None
        # Quit from here, after the engine is down: a quit() from the UI thread could end
        # this thread's event loop before this slot ever ran.
        QThread.currentThread().quit()


def _ended(request_id: str, reason: str, error: str | None = None) -> FinishedEvent:
    """The FinishedEvent of a request that never reached an engine."""
    return FinishedEvent(request_id, reason, Usage(0, 0), Timings(0, 0, 0, 0, 0), error=error)


def _for_gui(ev: FinishedEvent) -> FinishedEvent:
    """The event with its error worded for the GUI (a dialog field, not a CLI flag)."""
    if not ev.error or not ev.error_options:
        return ev
    return dataclasses.replace(ev, error=gui_error_text(ev.error, ev.error_options))
