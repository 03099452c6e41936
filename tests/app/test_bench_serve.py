"""``hearth bench --suite serve``: a real ``hearth serve`` child process driven over HTTP
beside the engine's offline closed loop on the same requests; and the latency maths."""

from __future__ import annotations

import json

import pytest

from app.cli import main
from engine.bench import RequestTiming, latency_summary
from engine.bench.serving import percentile


def test_percentiles_interpolate_between_ranks():
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)
    assert percentile([5.0, 1.0, 3.0], 0) == 1.0 and percentile([5.0, 1.0, 3.0], 100) == 5.0


def test_a_delivery_of_k_tokens_counts_as_k_gaps_and_failures_count_apart():
    t = RequestTiming(sent=10.0)
    for when, k in ((10.5, 1), (10.6, 1), (10.9, 3)):
        t.token(when, k)
    t.tokens = 5
    assert t.ttft_s == pytest.approx(0.5)
    assert t.itls_s() == pytest.approx([0.1, 0.1, 0.1, 0.1])
    bad = RequestTiming(sent=10.0, tokens=9, error="HTTP 500")
    s = latency_summary([t, bad], wall_s=2.0)
    assert s["output_tok_s"] == pytest.approx(2.5) and s["request_s"] == pytest.approx(0.5)
    assert s["failed_requests"] == 1 and s["num_requests"] == 2
    assert s["ttft_p50_ms"] == pytest.approx(500.0) and s["itl_p99_ms"] == pytest.approx(100.0)


@pytest.mark.slow
def test_serve_suite_drives_a_real_server_and_its_offline_twin(tmp_path, capsys):
    out = tmp_path / "serve.json"
    rc = main(["bench", "--shape", "tiny", "--suite", "serve", "--concurrency", "1,3", "--num-requests", "4",
               "--prompt-len", "8", "--output-len", "6", "--quiet", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["concurrency"] for r in rows] == [1, 3]
    for r in rows:
        assert r["suite"] == "serve" and r["model"] == "shape:tiny" and r["card"] == "cpu"
        assert r["num_requests"] == 4 and r["failed_requests"] == 0
        # every token of every request arrived, as the client counted them: 4 x 6
        assert r["client_tokens"] == 24 and r["output_tok_s"] == pytest.approx(24 / r["wall_s"])
        assert r["offline_output_tok_s"] > 0 and r["serve_vs_offline"] == pytest.approx(
            r["output_tok_s"] / r["offline_output_tok_s"])
        # a model without text still streams one chunk per token: ITLs exist on the HTTP side
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and 0 < r["itl_p50_ms"] <= r["itl_p99_ms"]
    table = capsys.readouterr().out
    assert "served/offline" in table and "shape:tiny" in table


def test_concurrency_without_the_serve_suite_is_refused(capsys):
    assert main(["bench", "--shape", "tiny", "--suite", "decode", "--concurrency", "4"]) != 0
    assert "--concurrency applies to --suite serve" in capsys.readouterr().err


def test_the_server_child_gets_the_benchs_load_options_tokenizer_included():
    from app.commands.serve_bench import serve_command

    load = {"model": "shape:llama-8b", "device": "cuda", "dtype": "auto", "attention": "auto",
            "kv_cache_dtype": "auto", "quantization": "auto", "max_num_seqs": 64, "max_model_len": 512,
            "tokenizer": "/carry/tok", "quant_head": False, "enforce_eager": True}
    cmd = serve_command(load, 8123, max_queue=320)
    assert cmd[cmd.index("--tokenizer") + 1] == "/carry/tok" and "--enforce-eager" in cmd
    assert cmd[cmd.index("--port") + 1] == "8123" and "--quant-head" not in cmd
    assert "--tokenizer" not in serve_command({**load, "tokenizer": None}, 8123, max_queue=320)


def test_the_offline_loop_ends_when_its_engine_shuts_down(caplog):
    """A Ctrl-C shuts the engine down under the closed loop: the aborted requests' successors
    can't be sent, which was a logged traceback per request ("the event callback ... failed")
    and left the loop waiting for requests never sent."""
    import logging
    import threading

    from engine.api import Engine, EngineDeadError
    from engine.bench.serving import closed_loop

    engine = Engine.load("shape:tiny", device="cpu", max_model_len=128)
    started = threading.Event()
    engine.add_step_listener(lambda step: started.set())  # requests in flight
    outcome: dict = {}

    def run() -> None:
        try:
            closed_loop(engine, [[5, 6, 7, 8]] * 2000, 64, 4)
        except EngineDeadError as e:
            outcome["dead"] = str(e)

    with caplog.at_level(logging.ERROR):
        thread = threading.Thread(target=run)
        thread.start()
        started.wait(30)
        engine.shutdown()
        thread.join(30)
    assert not thread.is_alive() and "dead" in outcome, outcome
    assert "callback" not in caplog.text, caplog.text
