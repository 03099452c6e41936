"""EngineHost: the one owner of the loaded engine, shared by every front end (the desktop
app's bridge now, the OpenAI-compatible server next). Qt-free.

It loads, unloads and swaps models (one engine at a time; see ``app.services.engine_swap``
for how a load replaces the loaded model) and pushes what happens to its subscribers as
it happens: load progress and outcomes, each request's engine events, stats. Nothing is
polled: a request's events are pushed by the engine itself (``Engine.submit(on_event=…)``)
and handed on at once, on the engine's thread.

Threads. The public methods may be called from any thread and never wait for the engine
(``shutdown`` excepted): they post work to the host's own thread (``HostThread``), where
every change of state happens in order. Subscribers are called on the engine's loop
thread (a request's TokenEvent, PromptProgressEvent and FinishedEvent) or on the host's
thread (everything else, and a request's events when the host itself ends it); calls to
subscribers never overlap, and one request's events arrive in order, after its
``RequestStarted``, ending with exactly one FinishedEvent. A subscriber must be quick
(hand the event on: a queued Qt signal, ``loop.call_soon_threadsafe``) and must not wait
for the host; one that raises is logged and unsubscribed, and the host, the engine and
the other subscribers go on.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import traceback
import weakref
from functools import partial
from typing import Callable

from app.services.engine_swap import UNLOAD_TIMER, EngineSwaps
from app.services.host_events import (EngineError, LoadFailed, ModelLoaded, RequestStarted, StatsUpdated,
                                      ended)
from app.services.host_loading import LOAD_JOIN_TIMEOUT_S, SWAP_WAIT_S, LoadTicket, reload_outcome, user_options
from app.services.host_thread import HostThread
from app.services.ids import unique_hex
from engine.api import Engine, FinishedEvent, HearthError, InvalidRequestError, Request, check_model

log = logging.getLogger("hearth.host")

NO_MODEL = "no model is loaded: load one on the Models page first."
#: How often stats go out while a model is loaded (the Performance page's rate).
STATS_INTERVAL_S = 0.25
STATS_TIMER = "stats"

#: Hosts whose load thread shutdown gave up on (kept alive until the process ends).
_ABANDONED: list = []


class _Live:
    """A request running on the engine. Its events wait in ``pending`` until the host has
    told its ``RequestStarted`` (the engine may produce them before ``submit`` returns);
    ``ended``: its one FinishedEvent went out (from the engine, or from the host cutting it)."""

    __slots__ = ("request_id", "lock", "pending", "ended")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.lock = threading.Lock()
        self.pending: list | None = []
        self.ended = False


class EngineHost(EngineSwaps):
    """Owns the loaded engine; see the module docstring for threads and events.

    ``engine_factory(model, progress=…, should_stop=…, **load_options)`` loads an engine
    (``Engine.load``); ``model_check`` is ``engine.api.check_model``'s pre-flight;
    ``answer_wait_s``: how long a swap (or an unload to make room) waits for the answers
    being written on the old model before cutting them with an error; ``error_text``
    words an engine error for the front end (the desktop app names its dialog's fields)."""

    def __init__(self, engine_factory=None, model_check=None, answer_wait_s: float = SWAP_WAIT_S,
                 error_text: Callable[[HearthError], str] = str,
                 stats_interval_s: float = STATS_INTERVAL_S) -> None:
        self._error_text = error_text
        self._stats_interval_s = stats_interval_s
        self._init_swaps(engine_factory or Engine.load, model_check or check_model, answer_wait_s)
        self._lock = threading.Lock()  # subscribers, the current ticket, shut-down
        self._publishing = threading.RLock()  # calls to subscribers never overlap
        self._subscribers: tuple[Callable, ...] = ()
        self._ticket: LoadTicket | None = None
        self._shut_down = False
        # Host-thread state:
        self.engine = None  # the engine that answers requests now
        self._said_dead = None  # the engine whose death an EngineError said
        self._info = None  # its ModelLoaded info (read from any thread)
        self._live: dict[str, _Live] = {}  # requests running on it
        self._held: list[Request] = []  # submitted while no model served and one loaded
        self._thread = HostThread("hearth-engine-host")

    # -- any thread ------------------------------------------------------------------------
    def subscribe(self, callback: Callable[[object], None]) -> Callable[[], None]:
        """Call ``callback(event)`` with every event from now on (``host_events``, and every
        request's engine events); returns the function that unsubscribes it."""
        with self._lock:
            self._subscribers = (*self._subscribers, callback)
        return partial(self._unsubscribe, callback)

    def _unsubscribe(self, callback) -> None:
        with self._lock:
            self._subscribers = tuple(s for s in self._subscribers if s is not callback)

    @property
    def model_info(self):
        """The ModelLoaded info of the model that answers requests now (None: none). While
        another loads, this is still the old one; after a failed load too."""
        return self._info

    def load(self, options: dict) -> None:
        """Load a model (options: model and ``Engine.load``'s keywords, see ``LOAD_KEYS``;
        quantization). The loaded model keeps serving until the new one is ready, and stays
        if the load fails or is cancelled (one unloaded to make room is loaded again if the
        load fails); a load still in flight is superseded (``LoadSuperseded``)."""
        with self._lock:
            if self._shut_down:
                return
            if self._ticket is not None:
                self._ticket.cancel(superseded=True)
            self._ticket = ticket = LoadTicket()
        self._thread.post(self._load, dict(options, _ticket=ticket))

    def cancel_load(self) -> None:
        """Cancel the load in flight: it stops at its next check (between weight tensors at
        the latest) and ends in ``LoadFailed(LOAD_CANCELLED)``."""
        with self._lock:
            ticket = self._ticket
        if ticket is not None:
            ticket.cancel()  # the load thread checks it; so does the host's thread, now:
            self._thread.post(self._advance)  # a loaded engine waiting for answers goes

    def unload(self, after_answers: bool = False) -> None:
        """Unload the model (and cancel a load in flight: nothing stays loaded).
        ``after_answers``: once the answers running now have ended (a comparison taking the
        chat's model away), instead of ending them; ModelUnloaded says when. A load asked for
        meanwhile withdraws it (UnloadWithdrawn instead; one refused at once doesn't)."""
        self.cancel_load()
        self._thread.post(self._unload_after_answers if after_answers else self._unload)

    def keep_loaded(self, options: dict) -> None:
        """Take back an ``unload(after_answers=True)`` still waiting for answers; if the model
        went meanwhile, load it again with ``options``."""
        self._thread.post(self._keep_loaded, options)

    def _keep_loaded(self, options: dict) -> None:
        if self._unload_wanted:
            self._stop_unload_wait()
        elif self.engine is None and not self._load_in_flight():
            self.load(options)

    def _unload_after_answers(self) -> None:
        if self.engine is not None and self._live:
            # _request_ended unloads once the last one ends; new requests are refused meanwhile
            # (_submit), and answers still running after answer_wait_s are cut (_unload_overdue)
            self._unload_wanted = True
            self._thread.start_timer(UNLOAD_TIMER, self._answer_wait_s, self._unload_overdue)
        else:
            self._unload()

    def _unload_overdue(self) -> None:
        if self._unload_wanted:
            self._cut_answers(f"the model was unloaded for a comparison; this answer ran {self._answer_wait_s:g} s "
                              "past the request (its text so far is kept)")
            self._unload()

    def _stop_unload_wait(self) -> None:
        self._unload_wanted = False
        self._thread.stop_timer(UNLOAD_TIMER)

    def submit(self, request: Request) -> str:
        """Queue ``request`` for the model that serves (or the one loading, if none does);
        returns its id at once (``request.request_id``, or a new one). Its events go to the
        subscribers: ``RequestStarted``, then the engine's; a request that fails before it
        reaches the engine (no model, a prompt too long) ends with a FinishedEvent too."""
        if request.request_id is None:
            request = dataclasses.replace(request, request_id=f"host-{unique_hex(16)}")
        elif self._in_use(request.request_id):
            # Its events would be taken for the live request's (and end it for subscribers).
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use: give each "
                                      "request its own id, or none (one is made).")
        with self._lock:
            closed = self._shut_down
        if closed:
            self._publish(ended(request.request_id, "abort", "the app is closing"))
        else:
            self._thread.post(self._submit, request)
        return request.request_id

    def _in_use(self, request_id: str) -> bool:
        """A request with this id is running or held (read from any thread: a copy of each)."""
        return request_id in dict(self._live) or any(r.request_id == request_id for r in list(self._held))

    def abort(self, request_id: str) -> None:
        """End a request (reason "abort"; a no-op for one that has ended)."""
        self._thread.post(self._abort, request_id)

    def shutdown(self, timeout_s: float = 30.0) -> bool:
        """Cancel a load in flight, end every request, shut the engine down and stop the
        host's thread; returns whether that thread stopped within ``timeout_s``."""
        with self._lock:
            if self._shut_down:
                return self._thread.join(0)
            self._shut_down = True
        self.cancel_load()
        self._thread.post(self._shutdown)
        self._thread.stop()
        if not self._thread.join(timeout_s):
            log.warning("the engine host did not stop within %g s", timeout_s)
            return False
        return True

    def _publish(self, event) -> None:
        with self._publishing:
            for callback in self._subscribers:
                try:
                    callback(event)
                except Exception:
                    log.error("an engine host subscriber failed; it is unsubscribed:\n%s", traceback.format_exc())
                    self._unsubscribe(callback)

    # -- the engine's thread ---------------------------------------------------------------
    def _on_request_event(self, live: _Live, ev) -> None:
        """A request's event, pushed by the engine as it is produced: handed on at once."""
        with live.lock:
            if live.ended:  # cut by a swap, or ended by the host: its FinishedEvent is out
                return
            finished = isinstance(ev, FinishedEvent)
            live.ended = finished
            if live.pending is not None:
                live.pending.append(ev)
            else:
                self._publish(ev)
        if finished:
            self._thread.post(self._request_ended, live)

    # -- the host's thread -----------------------------------------------------------------
    def _submit(self, request: Request) -> None:
        rid = request.request_id
        if self._unload_wanted:  # (else answers could keep the unload waiting for good)
            self._fail(rid, "the model is being unloaded for a comparison: send this again when it is loaded "
                            "again (the comparison's end), or load a model.")
            return
        if self.engine is None:
            if self._load_in_flight():
                # Sent as the old model made room for a new one (or before any was ready):
                # the model being loaded answers it (_settle_held).
                self._held.append(request)
            else:
                self._fail(rid, NO_MODEL)
            return
        live = _Live(rid)
        try:
            handle = self.engine.submit(request, on_event=partial(self._on_request_event, live))
        except HearthError as e:
            self._fail(rid, self._error_text(e))
            return
        except Exception as e:
            log.error("submit failed:\n%s", traceback.format_exc())
            self._fail(rid, f"{type(e).__name__}: {e}")
            return
        self._live[rid] = live
        with live.lock:  # its events wait for this, then flow straight from the engine
            self._publish(RequestStarted(rid, self.engine.model_info.name, handle.dropped_messages))
            pending, live.pending = live.pending, None
            for ev in pending:
                self._publish(ev)

    def _request_ended(self, live: _Live) -> None:
        if self._live.get(live.request_id) is live:
            del self._live[live.request_id]
            if self._ready is not None or self._release_wanted:
                self._advance()  # a swap or release waiting for answers may go now
            if self._unload_wanted and not self._live:
                self._unload()

    def _abort(self, request_id: str) -> None:
        if self.engine is not None and request_id in self._live:
            self.engine.abort(request_id)
        elif any(r.request_id == request_id for r in self._held):
            self._held = [r for r in self._held if r.request_id != request_id]
            self._publish(ended(request_id, "abort"))

    def _fail(self, request_id: str, message: str) -> None:
        self._publish(ended(request_id, "error", message))

    def _cut_answers(self, reason: str) -> None:
        """End every request still running with an error saying why (the engine's own end
        of it, which follows, is not passed on)."""
        for rid, live in list(self._live.items()):
            with live.lock:
                if live.ended:
                    continue
                live.ended = True
                self._publish(ended(rid, "error", reason))
            if self.engine is not None:
                self.engine.abort(rid)
        self._live.clear()

    def _settle_held(self) -> None:
        """Submit the requests held for the model being loaded once one serves; end them
        with an error once no load is left that could serve them."""
        if not self._held or (self.engine is None and self._load_in_flight()):
            return
        held, self._held = self._held, []
        for request in held:
            if self.engine is not None:
                self._submit(request)
            else:
                self._fail(request.request_id, NO_MODEL)

    def _swap(self, engine, options: dict) -> None:
        self._unload_quietly()  # the old engine goes only now, with no answer running on it
        self.engine = engine
        self._serving_options, self._released_from = user_options(options), None
        self._thread.start_timer(STATS_TIMER, self._stats_interval_s, self._publish_stats, repeat=True)
        info = dataclasses.replace(engine.model_info, max_model_len=engine.max_model_len)
        reload_of = options.get("_reload_of")
        if reload_of is not None:  # the failed load's one outcome first, then its model is back
            self._publish(LoadFailed(reload_outcome(*reload_of, info.name)))
        self._info = info
        self._publish(ModelLoaded(info, reloaded=reload_of is not None))
        self._settle_held()
        self._publish_stats()

    def _unload_quietly(self) -> None:
        if self.engine is None:
            return
        self._thread.stop_timer(STATS_TIMER)
        engine, self.engine, self._info = self.engine, None, None
        # Frees the weights, KV cache and graphs; the requests still running end with
        # "abort" (their FinishedEvents are pushed from here, on this thread).
        self._shut(engine)
        self._live.clear()

    def _publish_stats(self) -> None:
        if self.engine is None:
            return
        dead = getattr(self.engine, "dead", None)
        if dead and (self._said_dead is None or self._said_dead() is not self.engine):  # (once: stats go on)
            # It can answer no more (a tensor-parallel rank ended): the window says why at once,
            # not only the next message's error.
            self._said_dead = weakref.ref(self.engine)  # (not keeping it alive after a reload)
            self._publish(EngineError(dead))
        try:
            stats = self.engine.stats()
        except HearthError as e:
            self._publish(EngineError(str(e)))
            return
        except Exception as e:  # stats must never take the host down
            log.debug("stats failed: %s", e)
            return
        self._publish(StatsUpdated(stats))

    def _shutdown(self) -> None:
        self._closing = True
        self._stop_waiting()
        if self._load_thread is not None:
            # The load was cancelled: it stops at its next check (the next weight tensor at
            # the latest). One that can't (a download, a conversion) is left to end with the
            # process rather than keep the app from closing.
            self._load_thread.join(LOAD_JOIN_TIMEOUT_S)
            if self._load_thread.is_alive():
                log.warning("a model load did not stop within %d s; quitting without it", LOAD_JOIN_TIMEOUT_S)
                _ABANDONED.append(self)  # it still holds this object
            elif self._result is not None and self._result[1] is not None:
                self._shut(self._result[1])
            self._result = None
        if self._ready is not None:
            self._shut(self._ready[1])
            self._ready = None
        self._unload_quietly()
        for request in self._held:  # every request ends with one FinishedEvent
            self._publish(ended(request.request_id, "abort", "the app is closing"))
        self._held.clear()
        self._thread.stop_timer(STATS_TIMER)
