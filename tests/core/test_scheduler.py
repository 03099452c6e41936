"""Scheduler: chunked prefill, mixed batches, preemption, FCFS and a property test."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.core.block_manager import BlockManager
from engine.core.scheduler import Scheduler, SchedulerOutput
from engine.core.sequence import Sequence, SequenceStatus


def make_seq(rid, n, start=0):
    return Sequence(request_id=rid, prompt_token_ids=list(range(start, start + n)))


def step(sched: Scheduler, token=7) -> SchedulerOutput:
    out = sched.schedule()
    sched.update(out, [token] * sum(s.sample for s in out.scheduled))
    return out


def live(sched):
    return list(sched.running) + list(sched.waiting)


@pytest.mark.parametrize("kw", [{"max_num_seqs": 0}, {"max_num_batched_tokens": 0}])
def test_constructor_validates(kw):
    with pytest.raises(ValueError):
        Scheduler(BlockManager(4, 4), **kw)


def test_chunked_prefill_splits_by_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_batched_tokens=8)
    a = make_seq("a", 20)
    sched.add(a)
    chunks = []
    while a.num_output_tokens == 0:
        out = step(sched)
        assert out.num_batched_tokens <= 8
        (s,) = out.scheduled
        chunks.append((s.num_new_tokens, s.sample))
    assert chunks == [(8, False), (8, False), (4, True)]
    assert a.num_computed_tokens == 20 and a.num_tokens == 21
    out = step(sched)
    assert [(s.num_new_tokens, s.sample) for s in out.scheduled] == [(1, True)]


def test_decode_and_prefill_mixed_in_one_step():
    sched = Scheduler(BlockManager(64, 4), max_num_batched_tokens=10)
    a = make_seq("a", 3)
    sched.add(a)
    step(sched)  # a prefilled, now decoding
    b = make_seq("b", 30, start=100)
    sched.add(b)
    out = step(sched)
    got = [(s.seq.request_id, s.num_new_tokens, s.sample) for s in out.scheduled]
    assert got == [("a", 1, True), ("b", 9, False)]  # decode first, prefill gets the rest
    assert out.num_batched_tokens == 10
    out = step(sched)
    got = [(s.seq.request_id, s.num_new_tokens, s.sample) for s in out.scheduled]
    assert got == [("a", 1, True), ("b", 9, False)]


def test_max_num_seqs_respected_and_fcfs():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2)
    seqs = [make_seq(f"s{i}", 3, start=10 * i) for i in range(4)]
    for s in seqs:
        sched.add(s)
    out = step(sched)
    assert [s.seq.request_id for s in out.scheduled] == ["s0", "s1"]
    assert sched.num_running == 2 and sched.num_waiting == 2
    sched.finish("s1", "stop")
    out = step(sched)
    assert [s.seq.request_id for s in out.scheduled] == ["s0", "s2"]


def test_fcfs_no_skipping_ahead():
    # s1 needs more blocks than are free; the small s2 behind it must not jump ahead.
    sched = Scheduler(BlockManager(6, 2), max_num_batched_tokens=100)
    s0, s1, s2 = make_seq("s0", 5), make_seq("s1", 9, start=20), make_seq("s2", 1, start=40)
    sched.add(s0)
    step(sched)  # s0 holds 3 blocks (5 prompt tokens + 1 sampled)
    sched.add(s1)
    sched.add(s2)
    out = step(sched)
    assert [s.seq.request_id for s in out.scheduled] == ["s0"]
    assert list(sched.waiting) == [s1, s2]
    assert s1.block_table == [] and s1.num_computed_tokens == 0
    sched.block_manager.check_invariants(live(sched))


def test_preemption_latest_arrival_goes_to_front_and_completes():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_batched_tokens=64)
    a, b, c = make_seq("a", 3), make_seq("b", 3, start=10), make_seq("c", 1, start=20)
    sched.add(a)
    sched.add(b)
    out = step(sched)
    assert len(out.scheduled) == 2 and bm.num_free_blocks == 0  # 2 blocks each
    sched.add(c)
    # Both now have 4 tokens (3 computed); a's decode fits its 2nd block, and so does b's.
    out = step(sched)
    assert not out.preempted
    # Next decode needs a 3rd block for a: b (newest) is preempted.
    out = step(sched)
    assert out.preempted == [b]
    assert [s.seq for s in out.scheduled] == [a]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert b.block_table == [] and b.num_preemptions == 1
    assert list(sched.waiting) == [b, c]  # preempted goes ahead of the never-run c
    bm.check_invariants(live(sched))
    b_tokens = list(b.token_ids)
    assert len(b_tokens) == 5  # its generated tokens are kept for recompute
    sched.finish("a", "stop")
    out = step(sched)
    assert out.scheduled[0].seq is b and out.scheduled[0].num_new_tokens == 5
    assert out.scheduled[0].sample
    assert b.token_ids[:5] == b_tokens
    for _ in range(20):
        if not sched.has_work():
            break
        step(sched)
        for s in list(sched.running):
            if s.num_output_tokens >= 3:
                sched.finish(s, "length")
        bm.check_invariants(live(sched))
    assert not sched.has_work()
    assert bm.num_free_blocks == 4


def test_preempted_seqs_stay_ordered_by_arrival():
    bm = BlockManager(num_blocks=6, block_size=1, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_batched_tokens=64)
    a, b, c = make_seq("a", 2), make_seq("b", 2, start=10), make_seq("c", 2, start=20)
    for s in (a, b, c):
        sched.add(s)
    step(sched)  # 6 blocks used, each has 3 tokens, 2 computed
    out = step(sched)  # a needs a 7th block: c (newest) is preempted, then b fits
    assert out.preempted[0] is c
    while b.status is SequenceStatus.RUNNING:  # a keeps growing until b is preempted too
        step(sched)
    assert list(sched.waiting)[:2] == [b, c]


def test_cant_grow_finishes_with_length():
    bm = BlockManager(num_blocks=2, block_size=2)
    sched = Scheduler(bm)
    a = make_seq("a", 3)
    sched.add(a)
    step(sched)
    assert a.num_tokens == 4
    step(sched)  # 4 tokens computed, 5 held: the 5th needs a third block
    out = sched.schedule()
    assert out.finished == [a] and not out.scheduled and not out.preempted
    assert a.status is SequenceStatus.FINISHED and a.finish_reason == "length"
    assert bm.num_free_blocks == 2 and not sched.has_work()
    assert sched.get("a") is None


def test_prompt_larger_than_pool_finishes_with_length():
    bm = BlockManager(num_blocks=2, block_size=2)
    sched = Scheduler(bm, max_num_batched_tokens=100)
    a = make_seq("a", 9)
    b = make_seq("b", 2, start=50)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert out.finished == [a] and a.finish_reason == "length"
    assert [s.seq for s in out.scheduled] == [b]  # the queue moves on
    bm.check_invariants(live(sched))


def test_chunk_shrinks_instead_of_finishing_when_alone():
    # Alone and out of room for the whole chunk: compute what fits, then "length".
    bm = BlockManager(num_blocks=3, block_size=2)
    sched = Scheduler(bm, max_num_batched_tokens=4)
    a = make_seq("a", 10)
    sched.add(a)
    out = step(sched)
    assert out.scheduled[0].num_new_tokens == 4
    out = step(sched)
    assert out.scheduled[0].num_new_tokens == 2 and not out.scheduled[0].sample
    out = sched.schedule()
    assert out.finished == [a] and a.finish_reason == "length"


def test_abort_waiting_and_running_frees_blocks():
    bm = BlockManager(num_blocks=8, block_size=2)
    sched = Scheduler(bm, max_num_seqs=1)
    a, b = make_seq("a", 3), make_seq("b", 3, start=10)
    sched.add(a)
    sched.add(b)
    step(sched)
    assert a.status is SequenceStatus.RUNNING and b.status is SequenceStatus.WAITING
    assert sched.abort("b") is b
    assert b.status is SequenceStatus.FINISHED and b.finish_reason == "abort"
    assert sched.num_waiting == 0
    assert sched.abort("a") is a and a.finish_reason == "abort"
    assert bm.num_used_blocks == 0 and not sched.has_work()
    # Unknown or already finished ids are a no-op.
    assert sched.abort("a") is None
    assert sched.finish("nope", "stop") is None
    bm.check_invariants([])


def test_update_skips_seqs_finished_meanwhile():
    sched = Scheduler(BlockManager(8, 2))
    a, b = make_seq("a", 2), make_seq("b", 2, start=10)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    sched.finish("a", "abort")
    sched.update(out, [5, 6])
    assert a.num_tokens == 2
    assert b.token_ids == [10, 11, 6] and b.num_computed_tokens == 2
    with pytest.raises(ValueError):
        sched.update(sched.schedule(), [])


def test_prefix_cache_used_on_admission():
    bm = BlockManager(num_blocks=16, block_size=2)
    sched = Scheduler(bm)
    a = make_seq("a", 7)
    sched.add(a)
    step(sched)
    b = make_seq("b", 7)
    sched.add(b)
    out = step(sched)
    sb = [s for s in out.scheduled if s.seq is b][0]
    assert b.num_cached_tokens == 6 and sb.num_new_tokens == 1
    assert b.block_table[:3] == a.block_table[:3]
    bm.check_invariants(live(sched))


def test_add_rejects_duplicates_and_empty():
    sched = Scheduler(BlockManager(8, 2))
    sched.add(make_seq("a", 2))
    with pytest.raises(ValueError):
        sched.add(make_seq("a", 2))
    with pytest.raises(ValueError):
        sched.add(make_seq("e", 0))


# --------------------------------------------------------------------------- property

# Prompts start with a prefix of one of a few shared "system prompts" and continue
# with tokens from a tiny alphabet, so full blocks repeat and the prefix cache is hit.
BASE_PROMPTS = [[0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0], [2, 2, 1, 1, 0, 0] * 3, [1] * 16]

op_strategy = st.one_of(
    st.tuples(
        st.just("submit"),
        st.integers(0, len(BASE_PROMPTS) - 1),
        st.integers(0, 16),
        st.lists(st.integers(0, 2), max_size=10),
        st.integers(1, 12),
    ),
    st.tuples(st.just("step")),
    st.tuples(st.just("step")),
    st.tuples(st.just("step")),
    st.tuples(st.just("abort"), st.integers(0, 1000)),
)


class Harness:
    """A fake engine: runs the scheduler and a shadow KV cache that checks block contents."""

    def __init__(self, num_blocks, block_size, max_num_seqs, budget, caching, seed, lookahead=0, hold=(0.0, 0)):
        self.bm = BlockManager(num_blocks, block_size, caching)
        self.sched = Scheduler(self.bm, max_num_seqs, budget, lookahead_slots=lookahead, admit_ratio=hold[0],
                               max_hold_steps=hold[1])
        self.rng = random.Random(seed)
        self.max_tokens: dict[str, int] = {}
        self.all: list[Sequence] = []
        # Shadow KV: (block_id, slot) -> token written there by the fake runner.
        self.kv: dict[tuple[int, int], int] = {}
        self.steps = 0

    def check(self):
        seqs = live(self.sched)
        self.bm.check_invariants(seqs)
        assert self.bm.num_free_blocks + self.bm.num_used_blocks == self.bm.num_blocks
        assert self.sched.num_running <= self.sched.max_num_seqs
        for s in self.sched.running:
            assert s.status is SequenceStatus.RUNNING
        for s in self.sched.waiting:
            assert s.status is SequenceStatus.WAITING and not s.block_table
            assert s.num_computed_tokens == 0
        # Only running sequences hold blocks: finished/waiting ones hold none.
        for s in self.all:
            if s.status is SequenceStatus.FINISHED:
                assert not s.block_table and self.sched.get(s.request_id) is None

    def submit(self, prompt, max_tokens):
        seq = Sequence(request_id=f"r{len(self.all)}", prompt_token_ids=prompt)
        self.all.append(seq)
        self.max_tokens[seq.request_id] = max_tokens
        self.sched.add(seq)

    def abort(self, idx):
        if self.all:
            seq = self.all[idx % len(self.all)]
            was_live = not seq.is_finished
            res = self.sched.abort(seq.request_id)
            assert (res is seq) == was_live
            assert seq.is_finished

    def step(self):
        sched, bm = self.sched, self.bm
        waiting_before = list(sched.waiting)
        out = sched.schedule()
        self.steps += 1
        assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
        assert out.num_batched_tokens <= sched.max_num_batched_tokens
        assert len(out.scheduled) <= sched.max_num_seqs
        ids = [s.seq.request_id for s in out.scheduled]
        assert len(ids) == len(set(ids))
        # Running seqs first (arrival order), then newly admitted in FCFS order.
        admitted = {id(s.seq) for s in out.scheduled if any(s.seq is w for w in waiting_before)}
        flags = [id(s.seq) in admitted for s in out.scheduled]
        assert flags == sorted(flags)
        run_part = [s.seq.arrival for s in out.scheduled if id(s.seq) not in admitted]
        assert run_part == sorted(run_part)
        # Admission is a prefix of the old waiting queue: strict FCFS, no skipping.
        left = {id(s) for s in out.finished} | admitted
        k = sum(1 for w in waiting_before if id(w) in left)
        assert {id(w) for w in waiting_before[:k]} == left & {id(w) for w in waiting_before}
        if out.preempted:
            assert not admitted
        for s in out.preempted:
            assert s.status is SequenceStatus.WAITING and s.num_computed_tokens == 0
        for s in out.finished:
            assert s.finish_reason == "length" and s.is_finished
        bs = bm.block_size
        sampled = []
        for item in out.scheduled:
            seq, n = item.seq, item.num_new_tokens
            assert n >= 1
            c = seq.num_computed_tokens
            assert c + n <= seq.num_tokens
            assert item.sample == (c + n == seq.num_tokens)
            assert len(seq.block_table) * bs >= c + n
            # Already-computed KV (own or shared via the prefix cache) must be exactly
            # this sequence's tokens: catches wrong prefix hits and overwritten blocks.
            for pos in range(c):
                assert self.kv.get((seq.block_table[pos // bs], pos % bs)) == seq.token_ids[pos]
            for pos in range(c, c + n):
                bid = seq.block_table[pos // bs]
                # We only ever write into blocks nobody else references.
                assert bm._blocks[bid].ref_count == 1
                self.kv[(bid, pos % bs)] = seq.token_ids[pos]
            if item.sample:
                sampled.append(self.rng.randrange(3))
        sched.update(out, sampled)
        for item in out.scheduled:
            seq = item.seq
            if item.sample and not seq.is_finished:
                if seq.num_output_tokens >= self.max_tokens[seq.request_id]:
                    assert sched.finish(seq, "length") is seq

    def drain(self):
        # Each request needs at most (26 + 12) tokens; recompute after preemption is
        # bounded because the oldest running request always progresses.
        bound = 200 + 40 * len(self.all) * 40
        n = 0
        while self.sched.has_work():
            self.step()
            self.check()
            n += 1
            assert n <= bound, "requests did not finish: starvation or livelock"
        for s in self.all:
            assert s.is_finished
            assert s.num_output_tokens <= self.max_tokens[s.request_id]
            assert s.finish_reason in ("length", "abort")
        assert self.bm.num_free_blocks == self.bm.num_blocks
        self.bm.check_invariants([])


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    num_blocks=st.integers(4, 40),
    block_size=st.integers(1, 8),
    max_num_seqs=st.integers(1, 6),
    budget=st.integers(1, 32),
    caching=st.booleans(),
    lookahead=st.sampled_from([0, 0, 1]),  # the engine uses 1 with CUDA-graph decode
    hold=st.sampled_from([(0.0, 0), (0.3, 16), (1.0, 3)]),  # admission batching (the engine's default: 0.3, 16)
    seed=st.integers(0, 2**16),
    ops=st.lists(op_strategy, min_size=20, max_size=80),
)
def test_random_operations_keep_invariants(
    num_blocks, block_size, max_num_seqs, budget, caching, lookahead, hold, seed, ops
):
    h = Harness(num_blocks, block_size, max_num_seqs, budget, caching, seed, lookahead, hold)
    for op in ops:
        if op[0] == "submit":
            _, base, k, tail, max_tokens = op
            prompt = BASE_PROMPTS[base][:k] + list(tail)
            h.submit(prompt or [0], max_tokens)
        elif op[0] == "step":
            h.step()
        else:
            h.abort(op[1])
        h.check()
    h.drain()


def _decoding(sched, n):
    """``n`` sequences prefilled and decoding."""
    seqs = [make_seq(f"d{i}", 3, start=10 * i) for i in range(n)]
    for s in seqs:
        sched.add(s)
    while any(s.num_output_tokens == 0 for s in seqs):
        step(sched)
    return seqs


def test_admission_batching_holds_a_trickle_until_enough_wait():
    """While every running sequence decodes, one new prompt waits (it would make an eager
    mixed step of its own) until admit_ratio x running have come, then all go in at once."""
    sched = Scheduler(BlockManager(256, 4), max_num_seqs=10, admit_ratio=0.5, max_hold_steps=8)
    _decoding(sched, 4)  # enough = max(1, int(0.5 * 4)) = 2
    sched.add(make_seq("x", 5, start=100))
    for _ in range(3):
        out = step(sched)
        assert [s.seq.request_id for s in out.scheduled] == ["d0", "d1", "d2", "d3"]
        assert out.num_waiting == 1
    sched.add(make_seq("y", 5, start=200))
    out = step(sched)
    assert [s.seq.request_id for s in out.scheduled][4:] == ["x", "y"] and out.num_waiting == 0


def test_admission_batching_waits_at_most_max_hold_steps():
    sched = Scheduler(BlockManager(256, 4), max_num_seqs=10, admit_ratio=1.0, max_hold_steps=3)
    _decoding(sched, 4)
    sched.add(make_seq("x", 5, start=100))
    admitted_at = next(k for k in range(1, 10) if any(s.seq.request_id == "x" for s in step(sched).scheduled))
    assert admitted_at == 4  # held 3 steps, admitted on the 4th


def test_admission_batching_never_holds_when_it_saves_nothing():
    # nothing runs: admitted at once
    sched = Scheduler(BlockManager(256, 4), max_num_seqs=10, admit_ratio=1.0, max_hold_steps=50)
    sched.add(make_seq("a", 5))
    assert [s.seq.request_id for s in step(sched).scheduled] == ["a"]
    # a prompt is being read (the step is mixed anyway): another joins it
    sched = Scheduler(BlockManager(256, 4), max_num_seqs=10, max_num_batched_tokens=64, admit_ratio=1.0,
                      max_hold_steps=50)
    _decoding(sched, 2)
    sched.add(make_seq("long", 100, start=100))
    for _ in range(51):  # held at most max_hold_steps, then read in chunks (62, then 38)
        out = step(sched)
        if any(s.seq.request_id == "long" for s in out.scheduled):
            break
    sched.add(make_seq("b", 3, start=300))
    out = step(sched)
    assert {"long", "b"} <= {s.seq.request_id for s in out.scheduled}
    # the free places are fewer than the share: as many as fit are enough
    sched = Scheduler(BlockManager(256, 4), max_num_seqs=5, admit_ratio=1.0, max_hold_steps=50)
    _decoding(sched, 4)
    sched.add(make_seq("z", 3, start=400))
    assert "z" in [s.seq.request_id for s in step(sched).scheduled]


def test_lookahead_slot_for_decoding_sequences():
    """With lookahead, a decoding sequence always holds a slot for the token after the one
    being computed (pipelined decode), taken only from free blocks."""
    bm = BlockManager(8, 4)
    sched = Scheduler(bm, lookahead_slots=1)
    a = make_seq("a", 3)
    sched.add(a)
    step(sched)  # prefill: 3 tokens in block 0, then one sampled
    for _ in range(9):
        out = step(sched)
        assert [s.num_new_tokens for s in out.scheduled] == [1]
        # computed tokens, plus this step's, plus one ahead fit in the table
        assert len(a.block_table) * 4 >= a.num_computed_tokens + 1
        bm.check_invariants([a])
    assert len(a.block_table) * 4 >= a.num_computed_tokens + 1
    # A full pool: the lookahead is skipped, nobody is preempted for it.
    tight = BlockManager(1, 4)
    s2 = Scheduler(tight, lookahead_slots=1)
    b = make_seq("b", 2)
    s2.add(b)
    step(s2)
    out = step(s2)  # decode of token 3 in the only block: no room ahead, no preemption
    assert out.scheduled and not out.preempted and len(b.block_table) == 1


def test_a_short_prompt_gets_in_beside_a_long_prompt_read_in_chunks():
    """A long prompt being read leaves room for a short one waiting (it was held until the
    whole long prompt was read) and for the answer that short one then decodes."""
    sched = Scheduler(BlockManager(256, 4), max_num_batched_tokens=64)
    long = make_seq("long", 600)
    sched.add(long)
    step(sched)  # its first chunk: the whole budget
    short = make_seq("short", 10, start=1000)
    sched.add(short)
    out = step(sched)
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("long", 54), ("short", 10)]
    assert out.num_batched_tokens == 64
    for _ in range(5):  # the short one decodes every step while the long one is still read
        out = step(sched)
        assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("long", 63), ("short", 1)]
    assert short.num_output_tokens == 6 and long.num_output_tokens == 0


def test_a_long_waiting_prompt_still_waits_its_turn():
    sched = Scheduler(BlockManager(256, 4), max_num_batched_tokens=64)
    first = make_seq("first", 300)
    sched.add(first)
    step(sched)
    sched.add(make_seq("second", 100, start=1000))  # more than a quarter of the budget
    out = step(sched)
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("first", 64)]


def test_no_room_is_kept_for_a_short_prompt_the_kv_cache_cant_hold_now():
    """With the KV cache nearly full, the long prompt's chunk takes the whole budget (a short
    prompt let in would be preempted again by its next chunk)."""
    sched = Scheduler(BlockManager(20, 4), max_num_batched_tokens=64)
    long = make_seq("long", 70)
    sched.add(long)
    step(sched)  # 64 tokens: 16 of the 20 blocks
    sched.add(make_seq("short", 10, start=1000))
    out = step(sched)
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled][0] == ("long", 6)
