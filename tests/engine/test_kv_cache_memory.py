"""An explicit ``kv_cache_memory`` is read strictly and checked against free memory
before anything is allocated (issue 12 item 3: ``--kv-cache-memory 100TiB`` on the CPU
allocated 22.5 GiB and the kernel's OOM killer ended the process; ``1.2.3`` gave a
ValueError traceback).

Free memory is faked (bring-up's memory checks, ``engine.runner.memory.free_memory_bytes``):
nothing large is allocated.
"""

from __future__ import annotations

import pytest

import engine.runner.memory as runner_memory
from engine.api import Engine, HearthError, InvalidRequestError, OutOfMemoryError, parse_bytes
from engine.memory_plan import explicit_kv_problem, format_bytes, kv_headroom
from engine.runner.model_runner import ModelRunner

MIB, GIB, TIB = 2**20, 2**30, 2**40


@pytest.mark.parametrize("text, expected", [
    ("4GiB", 4 * GIB), ("512MiB", 512 * MIB), ("2.5GB", int(2.5 * GIB)), ("1024", 1024), ("1024B", 1024),
    ("16 MiB", 16 * MIB), ("1.5G", int(1.5 * GIB)), ("2k", 2048), (".5GiB", GIB // 2), ("100TiB", 100 * TIB),
    (3 * MIB, 3 * MIB),
])
def test_parse_bytes_reads_the_accepted_forms(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["1.2.3", ".", "abc", "-1GiB", "0", "0.0001", "", "4XB", "4 i", "1e9", -5, 0,
                                  True, None, 2.5])
def test_parse_bytes_refuses_anything_else_with_the_accepted_forms(text):
    with pytest.raises(InvalidRequestError) as info:
        parse_bytes(text)
    msg = str(info.value)
    assert isinstance(info.value, HearthError)
    assert "4GiB" in msg and "512MiB" in msg, msg


def test_format_bytes_uses_a_unit_that_fits():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1000) == "1000 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(300 * MIB) == "300.0 MiB"
    assert format_bytes(22.5 * GIB) == "22.5 GiB"
    assert format_bytes(100 * TIB) == "100.0 TiB"


def test_explicit_kv_problem_rule():
    free, total = 8 * GIB, 16 * GIB
    room = free - GIB - kv_headroom(total)
    assert explicit_kv_problem(requested=room, pool_bytes=room, free_bytes=free, total_bytes=total,
                               weights_bytes=GIB, where="RAM") is None
    msg = explicit_kv_problem(requested=100 * TIB, pool_bytes=room + 1, free_bytes=free, total_bytes=total,
                              weights_bytes=GIB, where="RAM")
    assert "100.0 TiB" in msg and "8.0 GiB free" in msg and "RAM" in msg and "--kv-cache-memory" in msg
    # The suggested size is one that fits, written so that --kv-cache-memory reads it.
    suggested = parse_bytes(msg.split("--kv-cache-memory ")[-1].split(")")[0])
    assert 0 < suggested <= room
    # No room at all: say so, and suggest no size.
    msg = explicit_kv_problem(requested=GIB, pool_bytes=GIB, free_bytes=GIB, total_bytes=total,
                              weights_bytes=GIB, where="RAM")
    assert "no memory left" in msg


@pytest.fixture
def tiny(tiny_models):
    return tiny_models["llama-tied"]


@pytest.fixture
def spy(monkeypatch):
    """Records whether the weights were built and the KV cache allocated."""
    calls: list[str] = []
    import engine.runner.bring_up as bring_up

    real_load, real_alloc = bring_up.materialize_weights, ModelRunner.allocate_kv_cache

    def materialize_weights(*a, **k):
        calls.append("weights")
        return real_load(*a, **k)

    def allocate(self, n):
        calls.append("kv")
        return real_alloc(self, n)

    monkeypatch.setattr(bring_up, "materialize_weights", materialize_weights)
    monkeypatch.setattr(ModelRunner, "allocate_kv_cache", allocate)
    return calls


def fake_free(monkeypatch, *answers: tuple[int, int]) -> None:
    """The loader sees these (free, total) answers in turn (the last one repeats)."""
    seq = list(answers)
    monkeypatch.setattr(runner_memory, "free_memory_bytes",
                        lambda device: seq.pop(0) if len(seq) > 1 else seq[0])


def test_more_than_free_ram_is_refused_before_the_weights_load(monkeypatch, tiny, spy):
    # The tiny model's weights take ~13 MiB and its largest useful pool 16 MiB; 512 MiB
    # stays spare: 530 MiB free leaves a few MiB for the KV cache.
    fake_free(monkeypatch, (530 * MIB, 1 * GIB))
    with pytest.raises(OutOfMemoryError) as info:
        Engine.load(str(tiny), device="cpu", kv_cache_memory="100TiB")
    msg = str(info.value)
    assert "100.0 TiB" in msg and "530.0 MiB free" in msg and "RAM" in msg and "weights" in msg, msg
    assert "leave it out" in msg, msg
    assert spy == []  # refused before the weights loaded, let alone the KV cache


def test_free_memory_is_checked_again_after_the_weights_load(monkeypatch, tiny, spy):
    # Plenty free when the load starts; then something else takes the memory.
    fake_free(monkeypatch, (64 * GIB, 64 * GIB), (520 * MIB, 64 * GIB))
    with pytest.raises(OutOfMemoryError, match=r"520\.0 MiB free"):
        Engine.load(str(tiny), device="cpu", kv_cache_memory="8MiB")
    assert spy == ["weights"]  # never allocated the KV cache


def test_a_size_that_fits_loads(monkeypatch, tiny, spy):
    fake_free(monkeypatch, (4 * GIB, 8 * GIB))
    with Engine.load(str(tiny), device="cpu", kv_cache_memory="100TiB", max_model_len=64) as engine:
        # 100 TiB is a budget: the pool takes only what every sequence at full length can use.
        assert engine.model_info.kv_cache_bytes < 16 * MIB
    assert spy == ["weights", "kv"]
