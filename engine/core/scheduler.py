"""Continuous-batching scheduler with chunked prefill and recompute preemption.

Every sequence simply has ``num_tokens - num_computed_tokens`` tokens outstanding: a
whole prompt, the rest of a chunked prompt, or one decode token. Each step packs as many
of those as a token budget allows, running sequences first, then new ones in FCFS order;
a prompt's chunk leaves room for the decodes after it and a short prompt waiting.
"""

from __future__ import annotations

import bisect
import os
from collections import deque
from dataclasses import dataclass, field

from engine.core.block_manager import BlockManager
from engine.core.sequence import Sequence, SequenceStatus


#: A prompt's chunk leaves room for the decodes and a short prompt after it (``_room_after``);
#: ``HEARTH_SCHED_ROOM=0`` turns that off (A/B runs of its cost to throughput). Measured at af74b67 on
#: an H100, 8B shape, 512 requests, interleaved: on 13547/13240 against off 13361/13313 tok/s (fp8,
#: fp8 cache), on 9426 against off 9377 (bf16): no cost, so it stays on (benchmarks/results/
#: 2026-12-07-i17-sched-room-ab-*).
ROOM_AFTER = os.environ.get("HEARTH_SCHED_ROOM", "1") != "0"


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's share of a step."""

    seq: Sequence
    num_new_tokens: int  # tokens to compute this step (prefill chunk, or 1 for decode)
    sample: bool  # this step reaches the end of seq.token_ids: sample from the last position


@dataclass(slots=True)
class SchedulerOutput:
    """What one :meth:`Scheduler.schedule` call decided."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)  # running first, then admitted
    preempted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # finished by the scheduler itself
    num_batched_tokens: int = 0
    num_waiting: int = 0  # left waiting after this step (a hint for pipelined decode)


def _by_arrival(seq: Sequence) -> int:
    return seq.arrival


class Scheduler:
    """Decides which sequences run each step and how many tokens each computes."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        lookahead_slots: int = 0,
        admit_ratio: float = 0.0,
        max_hold_steps: int = 0,
    ) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}"
            )
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Best-effort extra slots for decoding sequences, so the runner can launch the next
        # decode step before this one's tokens reach the host (pipelined decode). Taken
        # last, only from blocks nobody scheduled this step needs.
        self.lookahead_slots = lookahead_slots
        # Admission batching (as TGI's waiting_served_ratio / max_waiting_tokens): while
        # every running sequence is decoding, a step that admits a prompt runs eagerly
        # (no decode graph, no pipelined step), so prompts that trickle in one at a time
        # (a server's closed loop) would make one such step each. With ``admit_ratio`` > 0
        # they are held until they are at least that share of the running sequences (or
        # fill every free place), or the oldest has been held ``max_hold_steps`` steps.
        self.admit_ratio = admit_ratio
        self.max_hold_steps = max_hold_steps
        self._held_steps = 0
        self.waiting: deque[Sequence] = deque()
        # Kept sorted by arrival: preemption victims are taken from the end (newest), and
        # the oldest running request is never a victim, which guarantees progress.
        self.running: list[Sequence] = []
        self._seqs: dict[str, Sequence] = {}

    # ------------------------------------------------------------------ queries
    @property
    def num_running(self) -> int:
        """Sequences currently holding a place in the running batch."""
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Sequences queued for admission (new or preempted)."""
        return len(self.waiting)

    def has_work(self) -> bool:
        """True while any sequence is waiting or running."""
        return bool(self.running or self.waiting)

    def get(self, request_id: str) -> Sequence | None:
        """The live (waiting or running) sequence with this id, else None."""
        return self._seqs.get(request_id)

    # ------------------------------------------------------------------ lifecycle
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (FCFS)."""
        if seq.request_id in self._seqs:
            raise ValueError(f"request {seq.request_id!r} is already scheduled")
        if seq.num_tokens == 0:
            raise ValueError(f"request {seq.request_id!r} has no tokens")
        if seq.status is not SequenceStatus.WAITING:
            raise ValueError(f"request {seq.request_id!r} is {seq.status.value}, not waiting")
        self._seqs[seq.request_id] = seq
        self.waiting.append(seq)

    def finish(self, request_id_or_seq: str | Sequence, reason: str) -> Sequence | None:
        """Remove a live sequence, free its blocks and mark it finished with ``reason``.

        Returns None for unknown or already finished ids: aborts may race with finishing.
        """
        request_id = (
            request_id_or_seq.request_id
            if isinstance(request_id_or_seq, Sequence)
            else request_id_or_seq
        )
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._finish_removed(seq, reason)
        return seq

    def abort(self, request_id: str) -> Sequence | None:
        """Finish ``request_id`` with reason "abort" (None if it is not live)."""
        return self.finish(request_id, "abort")

    def _finish_removed(self, seq: Sequence, reason: str) -> None:
        """Finish a sequence already taken out of the running/waiting queues."""
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        del self._seqs[seq.request_id]

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-preempt a running sequence (already removed from ``running``)."""
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        # Preempted sequences go ahead of never-run ones, ordered by arrival among
        # themselves, so the oldest work resumes first.
        pos = 0
        for other in self.waiting:
            if other.num_preemptions == 0 or other.arrival > seq.arrival:
                break
            pos += 1
        self.waiting.insert(pos, seq)

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> SchedulerOutput:
        """Build one step's batch under the token budget and the sequence limit."""
        bm = self.block_manager
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        # 1. Running sequences, oldest first. Everything after index i is unscheduled.
        #    A prompt's chunk leaves room for what comes after it (``_room_after``).
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n <= 0:
                i += 1
                continue
            if n > 1 and ROOM_AFTER:
                room = self._room_after(i, n)
                if room:
                    n = min(n, max(budget - room, budget // 2))
            stop = False
            while not bm.allocate_slots(seq, n):
                if len(self.running) - 1 > i:
                    # Newest unscheduled running sequence gives its blocks back.
                    victim = self.running.pop()
                    self._preempt(victim)
                    out.preempted.append(victim)
                    continue
                # No one else to preempt. Compute whatever still fits rather than throw
                # away this sequence's work (only prefill chunks can shrink).
                fit = (len(seq.block_table) + bm.num_free_blocks) * bm.block_size
                fit -= seq.num_computed_tokens
                if 0 < fit < n:
                    n = fit
                    continue
                self.running.pop(i)
                if i == 0:
                    # Alone and every block is its own: the KV cache cannot hold more.
                    self._finish_removed(seq, "length")
                    out.finished.append(seq)
                else:
                    # Older sequences scheduled this step hold the blocks; wait for them.
                    self._preempt(seq)
                    out.preempted.append(seq)
                stop = True
                break
            if stop:
                break
            out.scheduled.append(
                ScheduledSeq(seq, n, seq.num_computed_tokens + n == seq.num_tokens)
            )
            budget -= n
            i += 1

        # 2. Admit waiting sequences, strictly FCFS, only if nobody was preempted (else
        #    we would evict one request just to admit another).
        if not out.preempted and not self._hold(out):
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                if not seq.block_table and seq.num_computed_tokens == 0:
                    bm.match_prefix(seq)
                n = min(seq.num_tokens - seq.num_computed_tokens, budget)
                if not bm.allocate_slots(seq, n):
                    if not self.running:
                        # Nothing else holds blocks and its first chunk still does not
                        # fit: it could never run, so finish it instead of waiting forever.
                        self.waiting.popleft()
                        self._finish_removed(seq, "length")
                        out.finished.append(seq)
                        continue
                    # No skipping ahead: strict FCFS keeps big requests from starving.
                    bm.undo_match_prefix(seq)
                    break
                self.waiting.popleft()
                seq.status = SequenceStatus.RUNNING
                bisect.insort(self.running, seq, key=_by_arrival)
                out.scheduled.append(
                    ScheduledSeq(seq, n, seq.num_computed_tokens + n == seq.num_tokens)
                )
                budget -= n

        # 3. Lookahead slots last, from whatever is still free: they never cost another
        #    sequence its place or an admission.
        if self.lookahead_slots:
            for item in out.scheduled:
                if item.num_new_tokens == 1 and item.sample:
                    bm.allocate_slots(item.seq, 1 + self.lookahead_slots)  # no-op when full
        out.num_batched_tokens = self.max_num_batched_tokens - budget
        out.num_waiting = len(self.waiting)
        return out

    def _room_after(self, i: int, n: int) -> int:
        """Tokens a prompt chunk of ``running[i]`` (``n`` tokens at most) leaves to others this step: one for each
        later running sequence that decodes, and a short waiting prompt (a quarter of the
        budget or less) at the head of the queue, so that one long prompt read in chunks
        stalls neither the answers under way nor a short request (each waited for the whole
        prompt: a 2,000-token paste held a 'Hi' 37 s on a CPU). A long waiting prompt still
        waits its turn (FCFS): two long ones read side by side would both start late."""
        room = sum(1 for seq in self.running[i + 1:] if seq.num_tokens - seq.num_computed_tokens == 1)
        if self.waiting and len(self.running) < self.max_num_seqs:
            head = self.waiting[0]
            rest = head.num_tokens - head.num_computed_tokens
            # (only where the KV cache has room for both now: else it would be held back, or
            # admitted only to be preempted again by this prompt's next chunk)
            if rest <= self.max_num_batched_tokens // 4 and \
                    self.block_manager.num_free_blocks * self.block_manager.block_size >= n + rest:
                room += rest
        return room

    def _hold(self, out: SchedulerOutput) -> bool:
        """Whether this step leaves the waiting sequences waiting (admission batching)."""
        if not self.waiting or self.admit_ratio <= 0 or not out.scheduled:
            self._held_steps = 0
            return False
        free = self.max_num_seqs - len(self.running)
        enough = min(free, max(1, int(self.admit_ratio * len(self.running))))
        decoding = all(item.num_new_tokens == 1 and item.sample for item in out.scheduled)
        if not decoding or len(self.waiting) >= enough or self._held_steps >= self.max_hold_steps:
            self._held_steps = 0
            return False
        self._held_steps += 1
        return True

    def update(self, output: SchedulerOutput, sampled_token_ids: list[int]) -> None:
        """Apply a step's results: advance computed tokens and append sampled tokens.

        ``sampled_token_ids`` holds one id per scheduled entry with ``sample=True``, in
        ``scheduled`` order; a negative one (the runner's ``NOT_A_NUMBER``: the model's output
        broke) is not appended. Stop conditions are the engine's job (it calls :meth:`finish`).
        """
        num_samples = sum(1 for s in output.scheduled if s.sample)
        if num_samples != len(sampled_token_ids):
            raise ValueError(
                f"expected {num_samples} sampled tokens, got {len(sampled_token_ids)}"
            )
        tokens = iter(sampled_token_ids)
        for item in output.scheduled:
            # Consume the token even for a sequence finished meanwhile, to stay aligned.
            token = next(tokens) if item.sample else None
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_full_blocks(seq)
            if token is not None and token >= 0:  # (< 0: the runner's NOT_A_NUMBER; the engine ends it)
                seq.token_ids.append(token)
