"""A side-by-side comparison (``ComparePlan.side_by_side``): the configurations that fit in
memory together (``compare_fit.arrange``, decided before anything loads) are loaded as a
group and answer each prompt at the same time, so their outputs stream together.

In a group, each configuration loads in turn (its load time is its own, measured while
the others already loaded sit idle), then all warm up together, then every prompt goes to
all of them at once (each engine answers on its own thread; the events reach ``on_event``
on the calling thread, each with its configuration's index); the next prompt goes when
every answer to this one is done. Perplexity is scored one configuration at a time (alone
on the device: the same number as a sequential run), then every engine is shut down and
the memory given back, whatever happened (try/finally).

What side by side changes in the results: the speeds of a group share the device (each
result's ``ran_with`` names the others), and the peak memory is the group's (measured
from its first load to its last unload; ``peak_memory_source`` says so). Weights, KV
cache, load time, perplexity and agreement are each configuration's own. The reference is
still the first configuration that ran; agreement is scored as in a sequential run.

Failures stay each configuration's own: one that fails to load, or whose engine dies,
records its error and the others of the group go on. One whose load runs out of memory
beside the others (the estimate was wrong, e.g. a first AWQ calibration) is not failed:
it loads again alone after its group. A cancel shuts down the whole group: its
configurations that started are marked cancelled, those that never started "cancelled
before it ran", the finished groups kept.
"""

from __future__ import annotations

import logging
import time

from app.services.compare import (_CallbackFailed, _Cancelled, _ConfigRun, answer_together, current_reference,
                                  finish_config)
from app.services.compare_events import ConfigProgress, ConfigStarted, SideBySidePlanned
from app.services.compare_fit import arrange
from app.services.compare_metrics import PeakMemoryMeter
from app.services.compare_results import CANCELLED, ComparisonResult, ConfigResult
from engine.api import LoadCancelledError, OutOfMemoryError, release_memory

#: Appended to a group's ``peak_memory_source``: the number is the group's, not one configuration's.
GROUP_PEAK = "the side-by-side group's peak"

log = logging.getLogger("hearth.compare")


def run_side_by_side(run: ComparisonResult, emit, should_stop, eval_text: str | None,
                     collect_garbage: bool) -> None:
    """Run ``run.plan`` side by side, group after group, filling ``run.results`` (see the
    module docstring)."""
    plan = run.plan
    arrangement = arrange(plan, should_stop)
    emit(SideBySidePlanned(arrangement.groups, arrangement.notes))
    for group in arrangement.groups:
        if should_stop():
            for index in group:
                finish_config(run, ConfigResult(index, plan.configs[index], status=CANCELLED,
                                                error="cancelled before it ran"), emit)
            continue
        if len(group) == 1:
            _alone(run, group[0], emit, should_stop, eval_text, collect_garbage)
            continue
        together = _Group(run, group, emit, should_stop, eval_text, collect_garbage)
        for result in together.run():
            finish_config(run, result, emit)
        for index in together.deferred:  # out of memory beside the others: alone now
            if should_stop():
                finish_config(run, ConfigResult(index, plan.configs[index], status=CANCELLED, error="cancelled"),
                              emit)
            else:
                _alone(run, index, emit, should_stop, eval_text, collect_garbage)


def _alone(run: ComparisonResult, index: int, emit, should_stop, eval_text, collect_garbage: bool) -> None:
    plan = run.plan
    emit(ConfigStarted(index, plan.configs[index], len(plan.configs)))
    config_run = _ConfigRun(plan, index, plan.configs[index], emit, should_stop, current_reference(run), eval_text,
                            collect_garbage)
    finish_config(run, config_run.run(), emit)


class _Group:
    """Two or more configurations loaded together (``run``: their results, in order, but
    for those ``deferred`` to run alone afterwards)."""

    def __init__(self, run: ComparisonResult, indexes, emit, should_stop, eval_text, collect_garbage: bool) -> None:
        plan = run.plan
        self.plan, self.emit, self.should_stop = plan, emit, should_stop
        self.collect_garbage = collect_garbage
        reference = current_reference(run)
        self.members = [_ConfigRun(plan, i, plan.configs[i], emit, should_stop, reference, eval_text,
                                   collect_garbage) for i in indexes]
        self.started: list[_ConfigRun] = []  # ConfigStarted sent
        self.live: list[_ConfigRun] = []  # loaded, not failed
        self.deferred: list[int] = []
        self._t0: dict[int, float] = {}

    def run(self) -> list[ConfigResult]:
        meter = PeakMemoryMeter()
        meter.start()
        try:
            self._measure()
        except (_Cancelled, LoadCancelledError):
            for member in self.started:
                if member.index not in self.deferred and member.result.error is None:
                    member.result.status, member.result.error = CANCELLED, "cancelled"
        finally:
            try:
                failed = None
                for member in self.members:  # every engine, even if another's shutdown raised
                    try:
                        member.unload(release=False)
                    except Exception as e:  # noqa: BLE001 - the others still shut down; the first re-raised
                        log.warning("configuration %s did not shut down cleanly", member.index, exc_info=True)
                        failed = failed or e
                if failed is not None:
                    raise failed
            finally:
                release_memory(collect=self.collect_garbage)
                self._record_peak(meter)
        results = []
        for member in self.members:
            if member.index in self.deferred:
                continue
            if member not in self.started:
                member.result.status, member.result.error = CANCELLED, "cancelled before it ran"
            results.append(member.result)
        return results

    def _measure(self) -> None:
        self._load()
        for member in self.live:
            member.result.ran_with = [other.index for other in self.live if other is not member]
        plan = self.plan
        if plan.warmup and self.live:
            self._check_stop()
            for member in self.live:
                member.progress_warmup()
            self._answer(None, lambda m: m.warmup_request())
        for p in range(len(plan.prompts)):
            if not self.live:
                break
            self._check_stop()
            for member in self.live:
                member.progress_prompt(p)
            for member, answer in self._answer(p, lambda m: m.prompt_request(p)):
                member.record_answer(p, answer)
            self._check_stop()
        if self.members[0].eval_text is not None:
            for member in list(self.live):  # one at a time: alone on the device, as in a sequential run
                self._guarded(member, member.perplexity)

    def _load(self) -> None:
        total = len(self.plan.configs)
        for member in self.members:
            self._check_stop()
            self.emit(ConfigStarted(member.index, member.config, total))
            self.started.append(member)
            self._t0[member.index] = time.perf_counter()
            try:
                member.load()
            except (_Cancelled, LoadCancelledError, _CallbackFailed):
                raise
            except OutOfMemoryError as e:
                member.unload(release=True)  # what the failed load held, before the next loads
                if not self.live:
                    member.fail(e)
                    continue
                self.deferred.append(member.index)
                beside = " and ".join(m.config.label for m in self.live)
                self.emit(ConfigProgress(member.index, "load", f"not enough memory beside {beside} ({e}): it loads "
                                                               "again alone after them"))
                continue
            except Exception as e:
                member.unload(release=True)
                member.fail(e)
                continue
            self.live.append(member)

    def _answer(self, prompt_index: int | None, request_of) -> list:
        """Every live member's answer to one request at once: (member, PromptResult) pairs
        for those that answered; a member whose engine failed is failed and dropped."""
        jobs = []
        for member in list(self.live):
            try:
                jobs.append((member, request_of(member)))
            except Exception as e:  # building its request failed (its tokenizer): this member only
                self._drop(member, e)
        answers = answer_together(jobs, prompt_index, self.should_stop)
        pairs = []
        for (member, _request), answer in zip(jobs, answers):
            if isinstance(answer, BaseException):
                self._drop(member, answer)
            else:
                pairs.append((member, answer))
        return pairs

    def _guarded(self, member: _ConfigRun, step) -> None:
        try:
            step()
        except (_Cancelled, LoadCancelledError, _CallbackFailed):
            raise
        except Exception as e:
            self._drop(member, e)

    def _drop(self, member: _ConfigRun, error: Exception) -> None:
        member.fail(error)
        if member in self.live:
            self.live.remove(member)
        member.unload(release=False)

    def _check_stop(self) -> None:
        if self.should_stop():
            raise _Cancelled

    def _record_peak(self, meter: PeakMemoryMeter) -> None:
        """Every member that started gets the group's peak (a deferred one is measured
        again when it runs alone) and its time from its load to the group's end."""
        started = [m for m in self.started if m.index not in self.deferred]
        device = next((m.result.device for m in started if m.result.device), None)
        device = device or (None if self.plan.device == "auto" else self.plan.device)
        peak = meter.stop(device)
        source = meter.source if peak is not None else None
        if source and any(m.result.ran_with for m in started):
            source = f"{source}; {GROUP_PEAK}"
        end = time.perf_counter()
        for member in started:
            member.result.peak_vram_bytes, member.result.peak_memory_source = peak, source
            member.result.seconds = end - self._t0[member.index]
