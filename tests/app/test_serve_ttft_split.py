"""The serve bench's split of each request's time to first token into the engine's part
(the server's ``hearth`` timings, on the answer's last chunks) and the HTTP path's."""

from __future__ import annotations

from app.commands.serve_bench import format_serve_table
from app.services.serve_load import _engine_ttft
from engine.bench import RequestTiming, latency_summary


def test_engine_ttft_is_read_from_the_hearth_field_earliest_choice_first():
    assert _engine_ttft(None, None) is None
    assert _engine_ttft({"ttft_ms": 7.5}, None) == 7.5
    assert _engine_ttft("garbage", 3.0) == 3.0  # not Hearth's shape: what was known stays
    assert _engine_ttft({"ttft_ms": True}, None) is None
    # n > 1: the usage chunk's field lists each choice; the client's TTFT is its earliest token
    assert _engine_ttft({"ttft_ms": 9.0, "choices": [{"ttft_ms": 9.0}, {"ttft_ms": 4.0}]}, None) == 4.0
    assert _engine_ttft({"ttft_ms": 6.0}, 4.0) == 4.0  # a later finish chunk doesn't replace an earlier one


def test_summary_and_table_split_the_ttft():
    a = RequestTiming(sent=10.0, tokens=2, engine_ttft_ms=30.0)
    a.token(10.050)
    a.token(10.060)
    b = RequestTiming(sent=10.0, tokens=2, engine_ttft_ms=10.0)
    b.token(10.020)
    b.token(10.030)
    plain = RequestTiming(sent=10.0, tokens=2)  # no hearth field: left out of the split
    plain.token(10.5)
    plain.token(10.6)
    fig = latency_summary([a, b], 1.0)
    assert fig["engine_ttft_p50_ms"] == 20.0 and round(fig["http_ttft_p50_ms"], 6) == 15.0
    assert "engine_ttft_p50_ms" not in latency_summary([plain], 1.0)
    row = {"suite": "serve", "model": "m", "card": "c", "quant": "q", "attention": "a", "prompt_len": 1,
           "output_len": 2, "commit": "x", "date": "d", "concurrency": 2, **fig}
    table = format_serve_table([row])
    assert "of it engine / HTTP ms" in table and "20.0 / 15.0" in table
