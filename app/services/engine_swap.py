"""The engine host's loading: one engine at a time, and how a load replaces the one loaded.

A load runs on a thread of its own while the loaded engine keeps serving (answers stream,
stats update). It starts with check_model, the cheap pre-flight: it finds the model and
refuses what the load would refuse (bad choices, no tokenizer, a context longer than the
model's, memory it can't have even with the old model gone) while nothing was given up,
and says whether the new model fits beside the old one. Where it doesn't (the same GPU, or
too little RAM), the old one is unloaded first (ModelUnloaded, then ModelLoading again),
after the answers being written on it end. Once the new engine is ready it replaces the
old one, again only after those answers end (at most answer_wait_s; later ones are cut
with an error saying why). A load that fails after the old model was unloaded for it
loads the old one again (``_failed``), and says both in its one LoadFailed. A request sent
while no model serves but one loads waits for it (``_held``), so one sent as the old model
made room is not refused.

Each load carries a LoadTicket made by ``EngineHost.load``: cancelling it (cancel_load,
unload, shutdown) or superseding it (another load asked for) stops the load at its next
check, between weight tensors at the latest.

Everything here runs on the host's thread, except ``_load_in_background`` (the load
thread), which touches none of the host's state and posts its outcome back.
"""

from __future__ import annotations

import logging
import threading
import traceback

from app.services.host_events import (LoadFailed, LoadProgress, LoadSuperseded, ModelLoading, ModelUnloaded,
                                     UnloadWithdrawn)
from app.services.host_loading import (LOAD_CANCELLED, LoadTicket, Released, cut_reason, loaded_footprint,
                                       release_note, release_progress, reload_outcome, reload_progress,
                                       wait_progress)
from engine.api import LOAD_OPTIONS, HearthError, LoadCancelledError, get_choice, model_display_name

log = logging.getLogger("hearth.host")

#: Load options passed to check_model and the engine factory (anything else is ignored).
LOAD_KEYS = LOAD_OPTIONS
ANSWERS_TIMER = "answers-due"
UNLOAD_TIMER = "unload-due"  # an unload(after_answers=True) waiting for the answers running


def _name(options: dict) -> str:
    return model_display_name(options.get("model"))


class EngineSwaps:
    """The loading half of ``EngineHost`` (a base class: it shares the host's state).

    Uses the host's ``_thread`` (a HostThread), ``_publish``, ``_live`` (requests running
    on the engine), ``_cut_answers``, ``_unload_quietly``, ``_swap`` and ``_settle_held``."""

    def _init_swaps(self, engine_factory, model_check, answer_wait_s: float) -> None:
        self._factory = engine_factory
        self._check = model_check
        self._answer_wait_s = answer_wait_s
        self._load_thread: threading.Thread | None = None
        self._loading: dict | None = None  # the options of the load whose thread runs
        self._ready: tuple | None = None  # (options, engine): loaded, waiting for answers to end
        self._next: dict | None = None  # a load asked for while another was in flight
        self._result: tuple | None = None  # (options, engine or None, error or None)
        self._released = threading.Event()  # the load thread waits on it for the room it asked for
        self._release_wanted = False
        self._unload_wanted = False  # unload once the answers running have ended (unload(after_answers))
        # The model unloaded to make room for a load: loaded again if that load fails (kept
        # through a load superseded meanwhile, so the one that replaced it can fail too).
        self._released_from: Released | None = None
        self._serving_options: dict | None = None  # the options self.engine was loaded with
        self._cut_reason = ""  # what the answers still running are told when a wait runs out
        self._closing = False

    # -- on the host thread --------------------------------------------------------------
    def _load(self, options: dict) -> None:
        if options["_ticket"].is_set():
            self._end_cancelled(options)
            return
        problem = _quantization_problem(options)
        if problem is not None:  # refused before the loaded model is asked to make room
            self._publish(LoadFailed(problem))  # (an unload waiting for answers still waits)
            return
        # A model asked for replaces this one, not no model: an unload waiting for answers
        # (a comparison's) is withdrawn, and its asker told (this load may still wait its
        # turn, or fail its checks: the loaded model then stays).
        self._thread.stop_timer(UNLOAD_TIMER)
        if self._unload_wanted:
            self._unload_wanted = False
            self._publish(UnloadWithdrawn(_name(options)))
        if self._next is not None:  # replaced before it started
            self._end_cancelled(self._next)
        self._next = options
        self._advance()

    def _start_load(self, options: dict) -> None:
        self._loading = options
        self._released.clear()
        self._publish(ModelLoading(_name(options)))
        info = self.engine.model_info if self.engine is not None else None
        loaded = (info.device, loaded_footprint(info)) if info else (None, 0)
        self._load_thread = threading.Thread(target=self._load_in_background, args=(options, *loaded),
                                             name="hearth-model-load", daemon=True)
        self._load_thread.start()

    def _release_for_load(self) -> None:
        self._release_wanted = True
        self._advance()

    def _finish_load(self) -> None:
        if self._result is None:  # taken by shutdown
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
            self._publish(LoadFailed(reload_outcome(*reload_of, released.name if released else _name(options),
                                                    error)))
        elif released is not None and self.engine is None and not self._closing:
            self._publish(LoadProgress(reload_progress(_name(options), error, released.name)))
            self._start_load(dict(released.options, _ticket=options["_ticket"],
                                  _reload_of=(_name(options), error)))
        else:
            self._publish(LoadFailed(error))

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
            elif self._live:
                self._wait_for_answers(options, releasing=True)
            else:
                self._release_wanted = False
                self._stop_waiting()
                info = self.engine.model_info
                self._released_from = Released(info.name, info.device, self._serving_options or {"model": info.ref})
                self._unload_quietly()
                self._publish(ModelUnloaded())
                self._publish(ModelLoading(_name(options)))
                self._released.set()
        if self._ready is not None:
            options, engine = self._ready
            if options["_ticket"].is_set():
                self._ready = None
                self._stop_waiting()
                self._shut(engine)
                self._end_cancelled(options)
            elif self._live:
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
        if self._closing or self._thread.timer_active(ANSWERS_TIMER):
            return
        old = self.engine.model_info.name if self.engine else "the loaded model"
        self._cut_reason = cut_reason(old, _name(options), self._answer_wait_s, releasing)
        self._thread.start_timer(ANSWERS_TIMER, self._answer_wait_s, self._answers_overdue)
        self._publish(LoadProgress(wait_progress(old, _name(options), releasing)))

    def _stop_waiting(self) -> None:
        self._thread.stop_timer(ANSWERS_TIMER)

    def _answers_overdue(self) -> None:
        """The answers a swap or release waited for ran too long: end them with an error
        that says why (the text so far is kept), then go on."""
        self._cut_answers(self._cut_reason)
        self._advance()

    def _end_cancelled(self, options: dict) -> None:
        """End a load that was cancelled or superseded (one given up for it is loaded again
        by the load that superseded it, if that one fails)."""
        reload_of = options.get("_reload_of")
        if options["_ticket"].superseded:
            self._publish(LoadSuperseded(reload_of[0] if reload_of else _name(options)))
            return
        released, self._released_from = self._released_from, None
        if reload_of is not None:
            previous = released.name if released else _name(options)
            self._publish(LoadFailed(reload_outcome(*reload_of, previous, cancelled=True)))
        else:
            self._publish(LoadFailed(LOAD_CANCELLED + release_note(released)))

    @staticmethod
    def _shut(engine) -> None:
        try:
            engine.shutdown()
        except Exception:  # pragma: no cover - shutdown must not take the host down
            log.exception("engine shutdown failed")

    def _unload(self) -> None:
        self._unload_wanted = False
        self._thread.stop_timer(UNLOAD_TIMER)
        self._unload_quietly()
        self._serving_options = None
        self._publish(ModelUnloaded())
        self._advance()  # a load cancelled with this ends too
        self._released_from = None  # asked for no model: a failing load brings none back

    # -- on the load thread ---------------------------------------------------------------
    def _load_in_background(self, options: dict, loaded_device: str | None, loaded_bytes: int) -> None:
        """Runs on the load thread: never touches self.engine or the requests; everything
        it says goes through the host's thread, in order."""
        ticket: LoadTicket = options["_ticket"]

        def progress(msg: str) -> None:
            ticket.raise_if_set()
            self._thread.post(self._publish, LoadProgress(msg))

        engine = error = None
        try:
            kwargs = {k: options[k] for k in LOAD_KEYS if options.get(k) not in (None, "")}
            check = self._check(options.get("model"), progress=progress, loaded_device=loaded_device,
                                loaded_bytes=loaded_bytes, **kwargs)
            if loaded_device is not None and not check.fits_beside:
                ticket.raise_if_set()  # after a cancel (or shutdown) this thread says nothing more
                self._thread.post(self._publish, LoadProgress(release_progress(check)))
                self._thread.post(self._release_for_load)
                while not self._released.wait(0.05):
                    ticket.raise_if_set()
                ticket.raise_if_set()
            engine = self._factory(options.get("model"), progress=progress, should_stop=ticket.is_set, **kwargs)
        except LoadCancelledError:
            error = LOAD_CANCELLED
        except HearthError as e:
            error = self._error_text(e)
        except Exception as e:  # a bug or an unexpected library error: say it, keep the app alive
            log.error("load failed:\n%s", traceback.format_exc())
            error = f"loading failed unexpectedly: {type(e).__name__}: {e}"
        except BaseException as e:  # the thread is going down: still say how the load ended
            error = f"loading stopped unexpectedly ({type(e).__name__})"
            raise
        finally:  # whatever happened, the host hears of it (else every later load would wait)
            if engine is None and error is None:
                error = "loading stopped unexpectedly"
            self._result = (options, engine, error)
            if not self._closing:  # past shutdown the host's thread is gone
                self._thread.post(self._finish_load)
            elif engine is not None:  # loaded as the host shut down: free it (shutdown may run twice)
                self._shut(engine)


def _quantization_problem(options: dict) -> str | None:
    """Why the load's quantization can't be used here (the choices registry's reasons),
    or None."""
    quant = options.get("quantization") or "auto"
    try:
        choice = get_choice("quantization", quant, options.get("device") or "auto")
    except HearthError as e:
        return str(e)
    if choice.available:
        return None
    return f"quantization {choice.name!r} can't be used here: {'; '.join(choice.reasons)}. Load with 'auto' or 'none'."
