"""Per-request output processing: detokenize, check stops, time, and emit events."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from engine.core.sequence import Sequence
from engine.events import (FinishedEvent, PromptProgressEvent, TokenEvent, TokenLogprob, Timings,
                           Usage)
from engine.requests import EventCallback
from engine.sampling_params import SamplingParams
from engine.stop import StopStringMatcher
from engine.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(slots=True, eq=False)
class RequestState:
    """What the engine loop keeps per live request besides the core Sequence."""

    seq: Sequence
    params: SamplingParams
    # Where the events go: the handle's queue, or an EventCallback pushing them to the
    # client's callback (Engine.submit's on_event). Both take ``put(event)``.
    events: queue.Queue | EventCallback
    detok: IncrementalDetokenizer
    matcher: StopStringMatcher
    eos_ids: frozenset
    max_model_len: int
    implementation: str = "native"
    report_progress: bool = False  # send PromptProgressEvents (Request.prompt_progress)
    t_submit: float = field(default_factory=time.perf_counter)
    t_scheduled: float | None = None
    t_first: float | None = None
    t_last: float | None = None
    finished: bool = False
    # finish() may be called from the engine thread and from shutdown (or a dying loop)
    # at once; the lock makes its check-and-set atomic, so exactly one FinishedEvent goes out.
    finish_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def create(cls, seq: Sequence, params: SamplingParams, tokenizer: Tokenizer,
               max_model_len: int, implementation: str = "native",
               report_progress: bool = False, events: EventCallback | None = None) -> "RequestState":
        return cls(
            seq=seq,
            params=params,
            events=queue.Queue() if events is None else events,
            detok=IncrementalDetokenizer(tokenizer, seq.prompt_token_ids,
                                         skip_special_tokens=params.skip_special_tokens),
            matcher=StopStringMatcher(params.stop, params.include_stop_str_in_output),
            # A grammar ends a complete answer with EOS, ignore_eos or not (nothing may follow).
            eos_ids=frozenset() if params.ignore_eos and params.structured is None else tokenizer.eos_token_ids,
            max_model_len=max_model_len,
            implementation=implementation,
            report_progress=report_progress,
        )

    # ------------------------------------------------------------------------------
    def on_prompt_progress(self) -> None:
        """Report how much of the prompt has been read (the engine calls this before the
        first prompt chunk runs and after each one), if the request asked for it."""
        if self.report_progress:
            seq = self.seq
            done = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            self.events.put(PromptProgressEvent(seq.request_id, done, seq.num_prompt_tokens))

    def on_token(self, token: int, logprobs, now: float) -> str | None:
        """Handle one sampled token; emit its event. Returns a finish reason or None."""
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        p = self.params
        reason, stop = None, None
        text = ""
        if token in p.stop_token_ids:
            reason, stop = "stop", token
        elif token in self.eos_ids:
            reason, stop = "stop", token
        else:
            text, stopped = self.matcher.feed(self.detok.push(token))
            if stopped:
                reason, stop = "stop", self.matcher.matched
        if reason is None:
            if self.seq.num_output_tokens >= p.max_tokens:
                reason = "length"
            elif self.seq.num_tokens >= self.max_model_len:
                reason = "length"
        if reason is not None and not isinstance(stop, str):
            text += self.drain()
        self.events.put(TokenEvent(self.seq.request_id, text, (token,), _convert(logprobs)))
        return None if reason is None else (reason, stop)

    def drain(self) -> str:
        """Text still held back (incomplete characters, possible stop-string starts)."""
        tail, stopped = self.matcher.feed(self.detok.flush())
        if not stopped:
            tail += self.matcher.flush()
        return tail

    def finish(self, reason: str, stop=None, error: str | None = None,
               error_options: tuple[str, ...] = ()) -> FinishedEvent | None:
        """Send the request's FinishedEvent and return it; None (nothing sent) when the
        request has finished already: a handle gets exactly one FinishedEvent."""
        with self.finish_lock:
            if self.finished:
                return None
            self.finished = True
        now = time.perf_counter()
        seq = self.seq
        n_out = seq.num_output_tokens
        ttft = (self.t_first - self.t_submit) * 1e3 if self.t_first else 0.0
        decode_s = (self.t_last - self.t_first) if (self.t_first and self.t_last) else 0.0
        timings = Timings(
            queue_ms=((self.t_scheduled or now) - self.t_submit) * 1e3,
            ttft_ms=ttft,
            itl_ms=(decode_s * 1e3 / (n_out - 1)) if n_out > 1 else 0.0,
            decode_tok_s=((n_out - 1) / decode_s) if n_out > 1 and decode_s > 0 else 0.0,
            total_ms=(now - self.t_submit) * 1e3,
        )
        usage = Usage(seq.num_prompt_tokens, n_out, seq.num_cached_tokens)
        ev = FinishedEvent(seq.request_id, reason, usage, timings, error=error,
                           error_options=tuple(error_options), stop=stop,
                           implementation=self.implementation)
        self.events.put(ev)
        return ev


def _convert(lp) -> tuple[TokenLogprob, ...] | None:
    if lp is None:
        return None
    return (TokenLogprob(lp.token_id, float(lp.logprob), int(lp.rank),
                         tuple((int(t), float(v)) for t, v in lp.top)),)
