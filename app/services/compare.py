"""Side-by-side comparison of one model's configurations (quantization x attention backend x
KV-cache dtype) on the same prompts: speed, memory and quality in one result. Qt-free: the
service behind ``hearth compare`` and the desktop app's Compare page.

    plan = ComparePlan(configs=(CompareConfig("bf16"), CompareConfig("int8"), CompareConfig("int4")),
                       prompts=tuple(bundled_prompt_texts()), model=None)
    result = run_comparison(plan, on_event=print, cancel=threading.Event())
    result.rows()   # the JSON of ``hearth compare --json``

Configurations run one after another, never two at once: each is loaded
(``Engine.from_config`` with the plan's load options), warmed up, asked every prompt alone
(batch 1), scored for perplexity, shut down and its memory given back
(``release_memory``) before the next loads. The first configuration that runs without an
error is the reference the others' agreement is measured against (normally the first).
With ``ComparePlan.side_by_side``, those that fit in memory together run as a group
instead, each prompt answered by all of them at once (``compare_fit``, ``compare_group``).

The rest of the service: ``compare_plan`` (what runs, checked up front), ``compare_results``
(what was measured), ``compare_events`` (the events ``on_event`` hears), ``compare_metrics``
(agreement, word-level divergence, peak memory), ``compare_store`` (save, list, reopen),
``compare_export`` (CSV, JSON, Markdown), ``compare_prompts`` (the bundled set, prompt files).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

from app.services.compare_events import (CompareEvent, ConfigFinished, ConfigProgress, ConfigStarted, PromptFinished,
                                         RunFinished, TokenDelta)
from app.services.compare_metrics import PeakMemoryMeter, agreement, mean, prefix_agreement
from app.services.compare_plan import MAX_CONFIGS, CompareConfig, ComparePlan
from app.services.compare_results import CANCELLED, ERROR, OK, ComparisonResult, ConfigResult, PromptResult
from engine.api import (Engine, FinishedEvent, HearthError, InvalidRequestError, LoadCancelledError,
                        ModelInfo, Request, SamplingParams, TokenEvent, byte_token_ids, model_display_name,
                        release_memory)

__all__ = ["run_comparison", "CompareConfig", "ComparePlan", "ComparisonResult", "ConfigResult", "PromptResult",
           "CompareEvent", "MAX_CONFIGS", "OK", "ERROR", "CANCELLED"]

log = logging.getLogger("hearth.app.compare")

#: How often a waiting runner looks at the cancel flag (an answer's tokens wake it sooner).
POLL_SECONDS = 0.05
#: The untimed request after each load: a short chat turn, a few tokens.
WARMUP_PROMPT = "Hello!"
WARMUP_TOKENS = 4

class _Cancelled(Exception):
    """Raised inside a configuration's run when the cancel flag is seen."""


class _CallbackFailed(Exception):
    """``on_event`` raised: a bug in the caller, passed on rather than recorded as the
    configuration's error."""


def run_comparison(plan: ComparePlan, *, on_event: Callable[[CompareEvent], None] | None = None,
                   cancel: threading.Event | Callable[[], bool] | None = None,
                   collect_garbage: bool = True) -> ComparisonResult:
    """Run ``plan`` and return what it measured (every configuration, in order).

    ``plan`` is checked first (``ComparePlan.checked``: InvalidRequestError, before
    anything loads). ``on_event(event)`` hears each ``compare_events`` event on the calling
    thread; an exception it raises stops the run (the engine shut down) and propagates.
    ``cancel``: a ``threading.Event`` or a callable returning True to stop, looked at
    between tokens, load stages, weight tensors, prompts and perplexity windows (at least
    every ``POLL_SECONDS`` while waiting): the answer in flight is aborted, the engine shut
    down, the configuration in flight and the ones after it are marked "cancelled", and the
    finished ones are kept. ``collect_garbage``: let ``release_memory`` run Python's
    garbage collector after each configuration; pass False from a Qt worker thread.

    A configuration that fails (out of memory, a choice not available here, a load error:
    any ``HearthError``, or an unexpected exception, which is also logged) records its
    error and the run goes on with the next. Blocks until done; call it from a worker
    thread in a GUI."""
    plan = plan.checked()
    should_stop = _stop_test(cancel)
    try:
        return _run(plan, _emitter(on_event), should_stop, collect_garbage)
    except _CallbackFailed as e:
        raise e.__cause__ from None


def _run(plan: ComparePlan, emit, should_stop, collect_garbage: bool) -> ComparisonResult:
    t0 = time.perf_counter()
    run = ComparisonResult(plan=plan, results=[], started=datetime.now().astimezone().isoformat(timespec="seconds"),
                           model=model_display_name(plan.model))
    eval_text = _evaluation_text() if plan.perplexity else None
    if plan.side_by_side:
        # Imported here: compare_group drives this module's _ConfigRun (a cycle at import time).
        from app.services.compare_group import run_side_by_side

        run_side_by_side(run, emit, should_stop, eval_text, collect_garbage)
    else:
        for index, config in enumerate(plan.configs):
            if should_stop():
                result = ConfigResult(index, config, status=CANCELLED, error="cancelled before it ran")
            else:
                emit(ConfigStarted(index, config, len(plan.configs)))
                result = _ConfigRun(plan, index, config, emit, should_stop, current_reference(run), eval_text,
                                    collect_garbage).run()
            finish_config(run, result, emit)
    run.results.sort(key=lambda r: r.index)  # side by side, one re-run alone may finish after a later one
    run.cancelled = any(r.status == CANCELLED for r in run.results)
    run.seconds = time.perf_counter() - t0
    emit(RunFinished(run, run.cancelled))
    return run


def current_reference(run: ComparisonResult) -> ConfigResult | None:
    """The reference so far: the first configuration that finished without an error."""
    return next((r for r in run.results if r.index == run.reference_index), None)


def finish_config(run: ComparisonResult, result: ConfigResult, emit) -> None:
    """``result`` is final: kept in ``run``, made the reference if it is the first that
    ran, scored against the reference, and announced (ConfigFinished)."""
    run.results.append(result)
    if run.reference_index is None and result.ok:
        run.reference_index = result.index
        result.is_reference = True
    score_agreement(result, current_reference(run))
    emit(ConfigFinished(result.index, result))


def score_agreement(result: ConfigResult, reference: ConfigResult | None) -> None:
    """Fill ``result``'s agreement with ``reference`` per prompt (where both answered it
    completely) and their means; the reference itself agrees fully. Nothing without a
    reference."""
    if reference is None:
        return
    # New PromptResults, not changed in place: the ones already sent in PromptFinished
    # events may be in another thread's hands.
    result.prompts = [_scored(p, reference) for p in result.prompts]
    result.agreement = mean(p.agreement for p in result.prompts)
    result.prefix_agreement = mean(p.prefix_agreement for p in result.prompts)


def _scored(prompt: PromptResult, reference: ConfigResult) -> PromptResult:
    """``prompt`` with its agreement with the reference's answer to the same prompt (None
    unless both are complete)."""
    ref = reference.prompts[prompt.prompt_index] if prompt.prompt_index < len(reference.prompts) else None
    if ref is None or not (prompt.complete and ref.complete):
        return replace(prompt, agreement=None, prefix_agreement=None)
    return replace(prompt, agreement=agreement(ref.token_ids, prompt.token_ids),
                   prefix_agreement=prefix_agreement(ref.token_ids, prompt.token_ids))


class _ConfigRun:
    """One configuration: load, warm up, answer, score, unload (``run``). A side-by-side
    group (``compare_group``) drives the same steps itself, for several at once."""

    def __init__(self, plan: ComparePlan, index: int, config: CompareConfig, emit, should_stop,
                 reference: ConfigResult | None, eval_text: str | None, collect_garbage: bool) -> None:
        self.plan, self.index, self.config = plan, index, config
        self.emit, self.should_stop = emit, should_stop
        self.reference, self.eval_text, self.collect_garbage = reference, eval_text, collect_garbage
        self.result = ConfigResult(index, config)
        self.engine: Engine | None = None
        self.chat = False

    def run(self) -> ConfigResult:
        res = self.result
        meter = PeakMemoryMeter()
        meter.start()
        t0 = time.perf_counter()
        try:
            self._measure()
        except _CallbackFailed:
            raise
        except Exception as e:
            self.fail(e)
        finally:
            try:
                self.unload()
            finally:
                # A configuration that never loaded (res.device unset) has no peak of its own:
                # the meter would give the process's (the app's, the model before it), shown
                # beside the error as if it were this configuration's.
                peak = meter.stop(res.device)
                res.peak_vram_bytes = peak if res.device is not None else None
                res.peak_memory_source = meter.source if res.peak_vram_bytes is not None else None
                res.seconds = time.perf_counter() - t0
        return res

    def fail(self, error: Exception) -> None:
        """Record why this configuration stopped: a cancel, the engine's own error, or an
        unexpected one (its traceback logged, for hearth -v)."""
        res = self.result
        if isinstance(error, (_Cancelled, LoadCancelledError)):
            res.status, res.error = CANCELLED, "cancelled"
        elif isinstance(error, HearthError):
            res.status, res.error = ERROR, str(error)
        else:
            log.info("configuration %s failed", self.config.label, exc_info=error)
            res.status, res.error = ERROR, f"unexpected error ({type(error).__name__}): {error}"

    def unload(self, release: bool = True) -> None:
        """Shut the engine down (if it loaded) and, with ``release``, give its memory back."""
        try:
            if self.engine is not None:
                engine, self.engine = self.engine, None
                engine.shutdown()
        finally:
            if release:
                release_memory(collect=self.collect_garbage)

    def _progress(self, stage: str, message: str, done: int | None = None, total: int | None = None) -> None:
        self.emit(ConfigProgress(self.index, stage, message, done, total))

    def _check_stop(self) -> None:
        if self.should_stop():
            raise _Cancelled

    def _measure(self) -> None:
        plan = self.plan
        self.load()
        if plan.warmup:
            self._check_stop()
            self.progress_warmup()
            self._answer(self.warmup_request(), None)
        for p in range(len(plan.prompts)):
            self._check_stop()
            self.progress_prompt(p)
            self.record_answer(p, self._answer(self.prompt_request(p), p))
            self._check_stop()
        if self.eval_text is not None:
            self.perplexity()

    def load(self) -> None:
        """Load the engine (timed), record what it resolved, settle chat or raw prompts."""
        res = self.result
        config = self.plan.engine_config(self.config)
        t0 = time.perf_counter()
        def progress(msg: str) -> None:
            # also a cancel point: kernel tuning, graph capture and a first calibration only
            # report progress, they don't ask should_stop (the app's loads stop the same way)
            self._check_stop()
            self._progress("load", msg)

        self.engine = engine = Engine.from_config(config, progress=progress, should_stop=self.should_stop)
        res.load_s = time.perf_counter() - t0
        _record_info(res, engine.model_info)
        self.chat = self._chat_mode(engine)

    def progress_warmup(self) -> None:
        self._progress("warmup", "warming up (untimed)")

    def progress_prompt(self, p: int) -> None:
        self._progress("prompt", f"prompt {p + 1} of {len(self.plan.prompts)}", p, len(self.plan.prompts))

    def warmup_request(self) -> Request:
        return self._request(WARMUP_PROMPT, self.chat, SamplingParams(max_tokens=WARMUP_TOKENS, temperature=0.0))

    def prompt_request(self, p: int) -> Request:
        return self._request(self.plan.prompts[p], self.chat, self.plan.sampling())

    def record_answer(self, p: int, answer: PromptResult) -> None:
        """Keep prompt ``p``'s answer (scored against a reference that already ran) and say so."""
        if self.reference is not None:
            answer = _scored(answer, self.reference)
        self.result.prompts.append(answer)
        self.emit(PromptFinished(self.index, p, answer))

    def perplexity(self) -> None:
        self._perplexity(self.engine)

    def _chat_mode(self, engine: Engine) -> bool:
        has_template = bool(getattr(engine.tokenizer, "has_chat_template", False))
        if self.plan.chat and not has_template:
            raise InvalidRequestError(f"{engine.model_info.name} has no chat template, so the prompts can't be sent "
                                      "as chat messages: compare with raw prompts (chat off).")
        return has_template if self.plan.chat is None else self.plan.chat

    def _request(self, prompt: str, chat: bool, params: SamplingParams) -> Request:
        info = self.engine.model_info
        if info.source == "shape":  # random weights, no tokenizer: the text's bytes stand in for tokens
            return Request(prompt_token_ids=byte_token_ids(prompt, info.vocab_size), params=params)
        if chat:
            return Request(messages=[{"role": "user", "content": prompt}], params=params)
        return Request(prompt=prompt, params=params)

    def _answer(self, request: Request, prompt_index: int | None) -> PromptResult:
        """Send ``request`` alone and wait for its answer, streaming it as TokenDeltas
        (``prompt_index`` None: the warm-up, not streamed); aborted on cancel."""
        (answer,) = answer_together([(self, request)], prompt_index, self.should_stop)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def _perplexity(self, engine: Engine) -> None:
        res, plan = self.result, self.plan
        info = engine.model_info
        ids = (byte_token_ids(self.eval_text, info.vocab_size) if info.source == "shape"
               else engine.tokenizer.encode(self.eval_text))
        if plan.eval_tokens is not None:
            ids = ids[:plan.eval_tokens]
        self._check_stop()
        self._progress("perplexity", f"perplexity: scoring {len(ids):,} tokens of the evaluation text", 0, len(ids) - 1)

        def progress(done: int, total: int) -> None:
            self._progress("perplexity", f"perplexity: scored {done:,} of {total:,} tokens", done, total)
            self._check_stop()

        scored = engine.perplexity(ids, progress=progress)
        res.perplexity, res.perplexity_tokens = scored.perplexity, scored.tokens
        res.perplexity_window, res.perplexity_stride = scored.window, scored.stride


def answer_together(jobs, prompt_index: int | None, should_stop) -> list:
    """Send each ``(config_run, request)`` of ``jobs`` to that run's engine at once and wait
    for every answer, streaming each as its run's TokenDeltas (``prompt_index`` None: the
    warm-up, not streamed). Each engine answers on its own thread, so two answers' tokens
    interleave; the events are handed to ``emit`` here, on the calling thread. On cancel
    every answer in flight is aborted (their FinishedEvents still come).

    Returns one item per job, in order: its PromptResult (``error`` set where the engine
    refused the request: this prompt only, e.g. too long for the context), or the
    exception its engine raised (EngineDeadError, or anything unexpected: the caller fails
    that configuration)."""
    events: queue.SimpleQueue = queue.SimpleQueue()
    answers: list = []
    pending: dict[int, tuple] = {}  # job -> (its handle, its text so far)
    for k, (run, request) in enumerate(jobs):
        answer = PromptResult(prompt_index if prompt_index is not None else -1)
        answers.append(answer)
        try:
            handle = run.engine.submit(request, on_event=lambda ev, k=k: events.put((k, ev)))
        except InvalidRequestError as e:  # this prompt only (too long for the context, ...)
            answer.error = str(e)
            continue
        except Exception as e:  # noqa: BLE001 - EngineDeadError or any other: that configuration fails, not the run
            answers[k] = e
            continue
        pending[k] = (handle, [])
    aborted = False
    while pending:
        try:
            k, ev = events.get(timeout=POLL_SECONDS)
        except queue.Empty:
            k, ev = -1, None
        if not aborted and should_stop():
            for handle, _text in pending.values():
                handle.abort()  # its FinishedEvent (reason "abort") still comes
            aborted = True
        if k not in pending:
            continue
        run, text, answer = jobs[k][0], pending[k][1], answers[k]
        if isinstance(ev, TokenEvent):
            text.append(ev.text)
            answer.token_ids.extend(ev.token_ids)
            if prompt_index is not None:
                run.emit(TokenDelta(run.index, prompt_index, ev.text, tuple(ev.token_ids)))
        elif isinstance(ev, FinishedEvent):
            _finished(answer, "".join(text), ev)
            del pending[k]
    return answers


def _finished(answer: PromptResult, text: str, fin: FinishedEvent) -> PromptResult:
    answer.text = text
    answer.finish_reason = fin.reason
    answer.prompt_tokens = fin.usage.prompt_tokens
    if fin.reason == "error":
        answer.error = fin.error or "the engine failed on this prompt"
    elif fin.reason == "abort":
        answer.error = "cancelled"
    if answer.token_ids:
        answer.ttft_ms = fin.timings.ttft_ms
    if len(answer.token_ids) >= 2 and fin.timings.decode_tok_s > 0:
        answer.decode_tok_s = fin.timings.decode_tok_s
    return answer


def _record_info(res: ConfigResult, info: ModelInfo) -> None:
    res.weight_bytes, res.kv_bytes = info.weight_bytes, info.kv_cache_bytes
    res.model, res.device, res.dtype = info.name, info.device, info.dtype
    res.attention_used, res.quant_used = info.attention, info.quantization
    res.kv_dtype_used, res.quant_detail = info.kv_cache_dtype, info.quant_detail


def _evaluation_text() -> str:
    from resources.texts import evaluation_text_path

    return evaluation_text_path().read_text(encoding="utf-8")


def _stop_test(cancel) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    if callable(cancel):
        return lambda: bool(cancel())
    raise TypeError(f"cancel must be a threading.Event or a callable returning bool, not {type(cancel).__name__}")


def _emitter(on_event) -> Callable[[CompareEvent], None]:
    if on_event is None:
        return lambda ev: None

    def emit(ev: CompareEvent) -> None:
        try:
            on_event(ev)
        except Exception as e:
            raise _CallbackFailed from e
    return emit
