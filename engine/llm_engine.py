"""``Engine``: one loaded model serving requests from any thread (the class behind
``engine.api``; import it from there).

``submit`` is thread-safe and returns a ``RequestHandle`` whose events stream as the
engine's own loop thread (schedule -> run -> update) produces them.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import replace
from typing import Callable

from engine.config import EngineConfig, config_from_options
from engine.core.block_manager import BlockManager
from engine.core.scheduler import Scheduler
from engine.core.sequence import Sequence
from engine.errors import (EngineDeadError, HearthError, InvalidRequestError, LoadCancelledError, ModelLoadError,
                           not_a_number_message)
from engine.events import EngineEvent, EngineStats, StepInfo
from engine.model_info import ModelInfo
from engine.output import RequestState
from engine.requests import Completion, EventCallback, Request, RequestHandle
from engine.runner.io import NOT_A_NUMBER, NewRequest, RunnerInput, StepRow, needs_token_context
from engine.sampling_params import SamplingParams
from engine.prompt_ids import check_request_text, prompt_ids

log = logging.getLogger("hearth.engine")


class Engine:
    """Loads one model and serves requests from any thread. Use ``Engine.load(...)`` or
    ``Engine.from_config(config)``; ``model_info`` (a ``ModelInfo``) says what loaded."""

    model_info: ModelInfo

    def __init__(self, config: EngineConfig, *, progress=None, should_stop=None) -> None:
        from engine.loader.engine_loader import load_model, release_runner  # torch-heavy: import on use

        self.config = config
        loaded = load_model(config, progress=progress, should_stop=should_stop)
        try:
            self._start(config, loaded, progress, should_stop)
        except BaseException:  # a cancel or failure past load_model: free the model now
            release_runner(loaded.runner)
            raise

    def _start(self, config: EngineConfig, loaded, progress, should_stop) -> None:
        from engine.runner.grammar import token_vocabulary

        self.model_info = loaded.info
        self.tokenizer = loaded.tokenizer
        self.runner = loaded.runner
        self.runner.token_vocabulary = token_vocabulary(loaded.tokenizer, loaded.info.vocab_size)
        self.max_model_len = loaded.max_model_len
        self.config = config = loaded.config  # as it ran: a backend may need its own KV block size
        self.block_manager = BlockManager(loaded.num_blocks, config.cache.block_size,
                                          enable_prefix_caching=loaded.prefix_caching)
        # Pipelined decode (CUDA graphs) launches each step before the host sees the last
        # one's tokens: it needs one slot of lookahead per decoding sequence.
        pipelined = self.runner.graphs is not None
        self.scheduler = Scheduler(self.block_manager, config.scheduler.max_num_seqs,
                                   config.scheduler.max_num_batched_tokens,
                                   lookahead_slots=1 if pipelined else 0,
                                   # holding prompts back only pays where a mixed step costs the
                                   # decode graphs (and the step launched ahead)
                                   admit_ratio=config.scheduler.admit_ratio if pipelined else 0.0,
                                   max_hold_steps=config.scheduler.max_hold_steps)
        self._cv = threading.Condition()
        self._inbox: list[RequestState] = []
        self._aborts: list[str] = []
        self._jobs: list[tuple[Callable[[], object], Future]] = []  # run_on_engine_thread's calls
        self._states: dict[str, RequestState] = {}
        self._stop = False
        self._dead: str | None = None
        self._ids = itertools.count()
        self._gen_window: deque[tuple[float, int, int]] = deque()
        self._num_preemptions = 0
        self._num_finished = 0
        self._runner_done: list[str] = []  # finished requests the runner still keeps state for
        self._context_ids: set[str] = set()  # requests whose rows carry their tokens (penalties)
        # Replaced whole (under _cv), never changed in place: the loop reads it without a lock.
        self._step_listeners: tuple[Callable[[StepInfo], None], ...] = ()
        # Per-length attention work (cuDNN SDPA plans) is prepared on the engine thread,
        # which runs every step: torch keeps those plans per thread. Load returns after it.
        self._warm_tokens = self.runner.attention_warmup_tokens(
            min(config.scheduler.max_num_batched_tokens, self.max_model_len))
        self._ready = threading.Event()
        self._warmed = 0
        self._warm_error: BaseException | None = None  # set by the engine thread before _ready
        self._should_stop = should_stop  # the warm-up asks it too
        if self._warm_tokens:
            msg = f"preparing prompt attention for lengths up to {self._warm_tokens} tokens"
            progress(msg) if progress else log.info(msg)
        if should_stop is not None and should_stop():
            raise LoadCancelledError("loading cancelled")
        self._thread = threading.Thread(target=self._loop, name="hearth-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._warm_error is not None:  # the thread has ended: the caller frees the runner
            self._thread.join()
            raise _warm_up_failure(self._warm_error)
        if self._warm_tokens:
            self.model_info = replace(self.model_info, prompt_attention_lengths=self._warmed)

    @classmethod
    def from_config(cls, config: EngineConfig, *, progress=None, should_stop=None) -> "Engine":
        """Load the model ``config`` describes (``load_config`` builds and validates one).
        ``progress(message)`` hears each stage; ``should_stop()`` is asked between the
        stages and before each weight tensor, and True stops the load with
        ``LoadCancelledError``, freeing what it had taken."""
        return cls(config, progress=progress, should_stop=should_stop)

    @classmethod
    def load(cls, model: str | None = None, *, progress=None, should_stop=None, **options) -> "Engine":
        """Load ``model`` with the load options ``options`` (``load_config``'s keywords:
        device, dtype, attention, max_model_len, kv_cache_memory, kv_cache_dtype,
        quantization, ...; ``engine.api.LOAD_OPTIONS`` lists them). An option it doesn't
        know raises InvalidRequestError naming it. ``progress`` and ``should_stop`` as for
        ``from_config``."""
        return cls.from_config(config_from_options(model, **options), progress=progress,
                               should_stop=should_stop)

    # -- client side (any thread) ------------------------------------------------------
    def submit(self, request: Request | str, params: SamplingParams | None = None, *,
               on_event: Callable[[EngineEvent], None] | None = None) -> RequestHandle:
        """Validate and enqueue; raises InvalidRequestError for bad input (text that is
        not valid Unicode, such as undecodable bytes from a terminal, included).

        ``on_event``: push the request's events to this callback as the engine produces
        them, instead of queueing them on the handle (then iterating the handle, ``poll``
        and ``result`` raise RuntimeError). It is called on the engine's loop thread (the
        last, FinishedEvent, may come from the thread calling ``shutdown``), so it must be
        quick and must not wait for the engine; one that raises is logged and called no
        more, and its request is aborted (see ``EventCallback``).

        Every handle returned ends with exactly one FinishedEvent, whatever happens to the
        engine meanwhile: a request still running when ``shutdown`` starts ends with reason
        "abort" (error "engine shut down"), one caught by the engine loop dying with
        "error". Once ``shutdown`` has started or the loop has died, ``submit`` returns no
        handle: it raises EngineDeadError (a HearthError), even for a call that began
        before and was still tokenizing its prompt.
        """
        if isinstance(request, str):
            request = Request(prompt=request, params=params or SamplingParams())
        self._check_alive()  # fail fast, before tokenizing
        check_request_text(request)
        self._check_params(request.params)
        ids, dropped = prompt_ids(request, self.tokenizer, self.max_model_len, self.model_info.vocab_size,
                                  self.block_manager.num_blocks * self.block_manager.block_size)
        rid = request.request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        seq = Sequence(rid, ids, params=request.params)
        events = None if on_event is None else EventCallback(rid, on_event, self.abort)
        state = RequestState.create(seq, request.params, self.tokenizer, self.max_model_len,
                                    self.model_info.implementation,
                                    report_progress=request.prompt_progress, events=events)
        with self._cv:
            # Checked again under the lock that shutdown and the dying loop take before
            # they end every registered request: a request registered here is one they
            # will see, and none is registered after they looked.
            self._check_alive()
            if rid in self._states:
                raise InvalidRequestError(f"request id {rid!r} is already in use")
            self._states[rid] = state
            self._inbox.append(state)
            self._cv.notify()
        return RequestHandle(rid, state.events, self, dropped_messages=dropped)

    def _check_params(self, params: SamplingParams) -> None:
        from engine.runner.grammar import check_request

        check_request(params, self.model_info.vocab_size, self.runner.token_vocabulary)

    @property
    def dead(self) -> str | None:
        """Why the engine can answer no more (its loop died, or a tensor-parallel rank
        ended), or None while it can (and after a plain ``shutdown``)."""
        return self._dead

    def _check_alive(self) -> None:
        if self._dead or self._stop:
            raise EngineDeadError(self._dead or "the engine is shut down; load the model again.")

    def run_on_engine_thread(self, fn: Callable[[], object]) -> object:
        """Call ``fn()`` on the engine's loop thread between two steps, and return what it
        returns (or raise what it raised). While it runs no step does, so it may use the
        runner and the KV pool (engine/evaluate.py scores text this way); keep each call
        short, as requests wait meanwhile. Raises EngineDeadError if the engine is shut
        down (or its loop dies) before ``fn`` ran."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("run_on_engine_thread called from the engine thread (it would wait forever)")
        future: Future = Future()
        with self._cv:
            self._check_alive()
            self._jobs.append((fn, future))
            self._cv.notify()
        return future.result()

    def _fail_jobs(self) -> None:
        """End the waiting ``run_on_engine_thread`` calls (under ``_cv``, once the engine
        has stopped or died): their ``fn`` will never run."""
        jobs, self._jobs = self._jobs, []
        for _fn, future in jobs:
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineDeadError(
                    self._dead or "the engine is shut down; load the model again."))

    def perplexity(self, text: str | list[int], *, window: int | None = None, stride: int | None = None,
                   progress: Callable[[int, int], None] | None = None):
        """Perplexity of the loaded model on ``text`` (a string, tokenized as a prompt is,
        or token ids), by a sliding window of ``window`` tokens advancing ``stride`` tokens
        (defaults: ``engine.evaluate.DEFAULT_WINDOW`` / ``DEFAULT_STRIDE``, the window
        capped at the context). Returns a ``PerplexityResult``; raises InvalidRequestError
        for a text under 2 tokens or a window that doesn't fit. Requests submitted
        meanwhile are served between the windows. See ``engine/evaluate.py``."""
        from engine.evaluate import perplexity

        return perplexity(self, text, window=window, stride=stride, progress=progress)

    def generate(self, prompts: list[str | Request], params: SamplingParams | None = None) -> list[Completion]:
        """Submit all at once (continuous batching) and wait for every result, in order."""
        handles = [self.submit(p, params) for p in prompts]
        return [h.result() for h in handles]

    def abort(self, request_id: str) -> None:
        """End ``request_id`` with reason "abort" (its handle gets the FinishedEvent).
        A no-op for an unknown or finished request, and after shutdown (which ends every
        unfinished request itself)."""
        with self._cv:
            if self._stop or self._dead:
                return
            self._aborts.append(request_id)
            self._cv.notify()

    def stats(self) -> EngineStats:
        """A snapshot of the engine's load; after ``shutdown`` (or the loop's death)
        nothing is running or waiting."""
        bm = self.block_manager
        with self._cv:  # the inbox is swapped by the loop thread
            inbox = len(self._inbox)
            stopped = self._stop or self._dead
        if stopped:
            return self._stopped_stats()
        now = time.perf_counter()
        window = [w for w in list(self._gen_window) if now - w[0] <= 5.0]
        span = max(now - window[0][0], 1e-3) if window else 1.0
        mem = self.runner_memory()
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting + inbox,
            kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_free=bm.num_free_blocks,
            block_size=bm.block_size,
            prefix_cache_hit_rate=bm.prefix_cache_hit_rate,
            generation_tok_s=sum(w[1] for w in window) / span if window else 0.0,
            prompt_tok_s=sum(w[2] for w in window) / span if window else 0.0,
            num_preemptions=self._num_preemptions,
            requests_finished=self._num_finished,
            memory=mem,
        )

    def _stopped_stats(self) -> EngineStats:
        # The scheduler was emptied when the engine stopped (or its loop died); if the loop
        # thread hung, it still holds sequences whose requests have ended: report none.
        bm = self.block_manager
        return EngineStats(
            num_running=0, num_waiting=0, kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_used_blocks, kv_blocks_free=bm.num_free_blocks,
            block_size=bm.block_size, prefix_cache_hit_rate=bm.prefix_cache_hit_rate,
            generation_tok_s=0.0, prompt_tok_s=0.0, num_preemptions=self._num_preemptions,
            requests_finished=self._num_finished, memory=self.runner_memory(),
        )

    def add_step_listener(self, listener: Callable[[StepInfo], None]) -> None:
        """Call ``listener(StepInfo)`` after every step that runs the model (how ``hearth
        bench`` times batch decode and samples KV-cache use), until ``remove_step_listener``.

        It is called on the engine's loop thread, right after the step's sampled ids reached
        the host and before their events go out, so it must be quick and must not wait for
        the engine. A listener that raises is logged and removed; the engine goes on. With
        no listener the step pays nothing but one emptiness check."""
        with self._cv:
            self._step_listeners = (*self._step_listeners, listener)

    def remove_step_listener(self, listener: Callable[[StepInfo], None]) -> None:
        """Stop calling ``listener`` (one registration of it; a no-op if it has none)."""
        with self._cv:
            listeners = list(self._step_listeners)
            if listener in listeners:
                listeners.remove(listener)
                self._step_listeners = tuple(listeners)

    def runner_memory(self) -> dict:
        from engine.metrics import memory_snapshot

        return memory_snapshot(self)

    def shutdown(self) -> None:
        """Stop the engine thread, end unfinished requests (reason "abort", error "engine
        shut down": each handle gets its one FinishedEvent) and free the model's weights,
        KV cache and CUDA graphs. The engine can't be used afterwards: ``submit`` raises
        EngineDeadError (also for a call racing this one), ``abort`` and a second
        ``shutdown`` do nothing, ``stats`` shows nothing running or waiting."""
        with self._cv:
            self._stop = True  # from here on submit raises and nothing new is registered
            self._cv.notify()
        self._thread.join(timeout=30)
        stopped = not self._thread.is_alive()
        with self._cv:
            states = list(self._states.values())
            self._states.clear()
            self._inbox.clear()
            self._aborts.clear()
            self._fail_jobs()
            runner, self.runner = self.runner, None
        for state in states:
            # RequestState.finish sends its event only once: a loop thread that did not
            # stop may finish the same request; the handle still gets exactly one.
            if state.finish("abort", error="engine shut down") is not None:
                self._num_finished += 1
        if stopped:  # the loop is gone: its scheduler is ours to empty (frees the KV blocks)
            self._clear_scheduler()
        if runner is None:
            return  # shut down before
        if not stopped:
            log.warning("the engine thread did not stop within 30 s; its model stays in memory")
            return
        from engine.loader.engine_loader import release_runner, return_freed_memory

        # Free the tensors themselves: the runner may still be referenced from elsewhere.
        release_runner(runner)
        return_freed_memory()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # -- engine thread -----------------------------------------------------------------
    def _loop(self) -> None:
        try:
            try:
                if self._warm_tokens:
                    self._warmed = self.runner.warm_attention(self._warm_tokens, should_stop=self._should_stop)
            except BaseException as e:  # recorded before _ready: the load raises it, never serves
                self._warm_error = e
                return
            finally:
                self._ready.set()
            while True:
                with self._cv:
                    while not (self._stop or self._inbox or self._aborts or self._jobs
                               or self.scheduler.has_work()):
                        self._cv.wait()
                    if self._stop:
                        return
                    new, self._inbox = self._inbox, []
                    aborts, self._aborts = self._aborts, []
                    jobs, self._jobs = self._jobs, []
                for fn, future in jobs:  # between steps: the runner is ours alone
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn())
                        except BaseException as e:  # the caller's to handle; the loop goes on
                            future.set_exception(e)
                for state in new:
                    self.scheduler.add(state.seq)
                for rid in aborts:
                    state = self._states.get(rid)
                    if state is not None and not state.finished:
                        self._finish(state, "abort")
                if self.scheduler.has_work():
                    self.step()
                if self._runner_done and not self.scheduler.has_work():
                    self._release_runner_state()  # no step will carry them: the engine idles
        except BaseException as e:  # the loop must never die silently
            if isinstance(e, EngineDeadError):  # worded for a user (a rank that ended): one line, as a step's
                log.error("model step failed: %s", e, exc_info=log.isEnabledFor(logging.INFO))
            else:
                log.exception("engine loop died")
            with self._cv:  # with submit's lock: no request registers after this snapshot
                self._dead = (str(e) if isinstance(e, EngineDeadError)
                              else f"the engine stopped after an internal error: {e}. Reload the model.")
                states = list(self._states.values())
                self._states.clear()
                self._inbox.clear()
                self._aborts.clear()
                self._fail_jobs()
            for state in states:
                if state.finish("error", error=self._dead) is not None:
                    self._num_finished += 1
            self._clear_scheduler()

    def _clear_scheduler(self) -> None:
        """Take every sequence out of the scheduler, freeing its KV blocks, once the loop
        thread has stopped (their requests have ended already)."""
        sched = self.scheduler
        try:
            for seq in list(sched.running) + list(sched.waiting):
                sched.finish(seq.request_id, "abort")
        except Exception:  # a scheduler broken by the loop's own failure: drop its queues
            log.exception("could not empty the scheduler")
            sched.running.clear()
            sched.waiting.clear()

    def step(self) -> None:
        """One iteration: schedule -> run -> update -> emit."""
        out = self.scheduler.schedule()
        for seq in out.finished:
            self._finish(self._states[seq.request_id], seq.finish_reason or "length", already=True)
        self._num_preemptions += len(out.preempted)
        if not out.scheduled:
            if out.preempted:  # (rare: the KV cache is full) their blocks are gone
                self.runner.execute(RunnerInput([], preempted=[s.request_id for s in out.preempted]))
            return
        now = time.perf_counter()
        reading: list[RequestState] = []  # prompt chunks this step, for progress events
        # The runner's input, built in the same pass: the tokens to feed are a slice, the
        # block table and the penalties' token context the sequence's own lists.
        rows: list[StepRow] = []
        new: list[NewRequest] = []
        context = self._context_ids
        states = self._states
        for sc in out.scheduled:
            seq = sc.seq
            rid = seq.request_id
            st = states[rid]
            first = st.t_scheduled is None
            if first:
                st.t_scheduled = now
                new.append(NewRequest(rid, seq.params, len(seq.prompt_token_ids)))
                if needs_token_context(seq.params):
                    context.add(rid)
            if st.report_progress and seq.num_output_tokens == 0:
                reading.append(st)
                if first:  # a long prompt's first chunk takes a while: say it started
                    st.on_prompt_progress()
            start = seq.num_computed_tokens
            rows.append(StepRow(rid, seq.token_ids[start:start + sc.num_new_tokens], start,
                                seq.block_table, sc.sample,
                                seq.token_ids if context and sc.sample and rid in context else None))
        done = self._runner_done or ()
        if done:
            self._runner_done = []
        inp = RunnerInput(rows, new, done,
                          [s.request_id for s in out.preempted] if out.preempted else (),
                          out.num_waiting)
        try:
            res = self.runner.execute(inp)
        except EngineDeadError:
            raise  # the runner can't run again (a tensor-parallel rank ended): the engine dies with it
        except Exception as e:
            msg, options = _describe_failure(e)
            if isinstance(e, HearthError):  # worded for a user: one line (the traceback with -v)
                log.error("model step failed: %s", msg, exc_info=log.isEnabledFor(logging.INFO))
            else:
                log.exception("model step failed")
            for sc in out.scheduled:
                self._finish(self._states[sc.seq.request_id], "error", error=msg,
                             error_options=options)
            return
        if self._step_listeners:
            self._update_observed(out, res.token_ids)
        else:
            self.scheduler.update(out, res.token_ids)
        for st in reading:  # before the first token's event, which the last chunk samples
            st.on_prompt_progress()
        now = time.perf_counter()
        sampled = [sc.seq for sc in out.scheduled if sc.sample]
        decodes = sum(1 for sc in out.scheduled if sc.sample and sc.seq.num_output_tokens > 1)
        prompt_tokens = out.num_batched_tokens - decodes
        self._gen_window.append((now, len(sampled), prompt_tokens))
        while self._gen_window and now - self._gen_window[0][0] > 10:
            self._gen_window.popleft()
        lps = res.logprobs or [None] * len(sampled)
        for seq, token, lp in zip(sampled, res.token_ids, lps):
            st = self._states[seq.request_id]
            if token == NOT_A_NUMBER:  # the model's numbers broke for it: end it, say why
                self._finish(st, "error", error=self._not_a_number(seq.num_output_tokens + 1),
                             error_options=("dtype", "quantization"))
                continue
            done = st.on_token(token, lp if seq.params.logprobs is not None else None, now)
            if done is not None:
                self._finish(st, done[0], stop=done[1])

    def _not_a_number(self, at: int) -> str:
        """The error for a request whose logits held a NaN or +inf at its output token ``at``
        (1 = the first)."""
        info = self.model_info
        where = "for its first token" if at <= 1 else f"at its output token {at}, so the answer stopped there"
        return not_a_number_message(info.dtype, info.quantization, where)

    def _update_observed(self, out, token_ids: list[int]) -> None:
        """``scheduler.update`` for a step that listeners watch: what they hear is counted
        around it (first tokens before it, KV-cache use after it)."""
        finished_at = time.perf_counter()
        first = sum(1 for sc in out.scheduled if sc.sample and sc.seq.num_output_tokens == 0)
        broken = token_ids.count(NOT_A_NUMBER)  # (no token: the request ends with an error)
        if broken:
            sampled = iter(token_ids)
            first -= sum(1 for sc in out.scheduled if sc.sample and next(sampled) == NOT_A_NUMBER
                         and sc.seq.num_output_tokens == 0)
        self.scheduler.update(out, token_ids)
        blocks = used = 0
        for seq in self.scheduler.running:
            blocks += len(seq.block_table)
            used += seq.num_computed_tokens
        info = StepInfo(finished_at, first, len(token_ids) - broken - first,
                        blocks * self.block_manager.block_size, used)
        for listener in self._step_listeners:
            try:
                listener(info)
            except Exception:
                log.exception("a step listener failed; it is no longer called")
                self.remove_step_listener(listener)

    def _release_runner_state(self) -> None:
        """Hand the runner the finished requests now, in a step with no rows (the engine
        is idle: the fallback's per-request caches must not wait for the next request)."""
        done, self._runner_done = self._runner_done, []
        runner = self.runner
        if runner is not None:
            runner.execute(RunnerInput([], finished=done))

    def _finish(self, state: RequestState, reason: str, stop=None, error=None, already=False,
                error_options: tuple[str, ...] = ()) -> None:
        if not already:
            self.scheduler.finish(state.seq.request_id, reason)
        if state.t_scheduled is not None:  # the runner has seen it: the next step drops it there
            self._runner_done.append(state.seq.request_id)
            self._context_ids.discard(state.seq.request_id)
        if state.finish(reason, stop=stop, error=error, error_options=error_options) is not None:
            self._num_finished += 1
        with self._cv:
            self._states.pop(state.seq.request_id, None)


def _warm_up_failure(e: BaseException) -> HearthError:
    """The error ``Engine.load`` raises for a warm-up that failed (or was cancelled) on the
    engine thread, before the engine served anything."""
    if isinstance(e, HearthError):  # LoadCancelledError, or one already worded for a user
        return e
    err = ModelLoadError(
        f"the model loaded, but preparing it to serve failed ({type(e).__name__}: {e}), so it was "
        "not kept. Load it again; if this keeps happening, load it with a shorter context "
        "(--max-model-len).", options=("max_model_len",))
    err.__cause__ = e
    return err


def _describe_failure(e: Exception) -> tuple[str, tuple[str, ...]]:
    """The error text for a failed step, and the Engine.load keywords it names (as
    ``HearthError.options``)."""
    import torch

    if isinstance(e, HearthError):  # worded for a user already (a tensor-parallel rank that ended)
        return str(e), e.options
    if isinstance(e, torch.OutOfMemoryError):
        return ("out of GPU memory during a step: run fewer requests at once (--max-num-seqs), "
                "give the KV cache less memory (--kv-cache-memory), or use a smaller / "
                "quantized model.", ("max_num_seqs", "kv_cache_memory"))
    return f"the model step failed: {type(e).__name__}: {e}", ()
