"""``hearth bench``: the command as a user types it, its JSON rows, and its measurements.

The decode run is the contract's exact command form; it doubles as a correctness check
(Hearth and transformers on identical float32 weights must pick the same greedy tokens).
The probe and baseline arithmetic are checked against hand-computed values.
"""

from __future__ import annotations

import datetime
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.cli import main
from engine.api import StepInfo
from engine.bench.hearth_suites import StepProbe, aggregate_decode_tok_s, kv_waste_pct
from engine.bench.hf_baseline import _static_waste
from engine.bench.options import BenchOptions
from engine.bench.rows import ROW_KEYS
from engine.bench.workload import TimedRequest

REPO = Path(__file__).resolve().parents[2]
STR_KEYS = ("suite", "engine", "card", "model", "quant", "attention", "date", "commit", "torch")
INT_KEYS = ("batch", "prompt_len", "output_len")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@functools.cache
def tiny_param_count() -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.shapes import shape_config

    cfg = shape_config("tiny")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    return sum(p.numel() for p in model.parameters())


def check_common(row: dict) -> None:
    assert set(ROW_KEYS) <= row.keys(), f"missing {set(ROW_KEYS) - row.keys()}"
    for k in STR_KEYS:
        assert isinstance(row[k], str) and row[k], k
    for k in INT_KEYS:
        assert isinstance(row[k], int) and row[k] > 0, k
    assert row["card"] == "cpu" and row["model"] == "shape:tiny" and row["quant"] == "fp32"
    assert row["torch"] == torch.__version__
    datetime.date.fromisoformat(row["date"])
    assert row["attention"] == ("sdpa" if row["engine"] == "hf" else "torch")
    assert row["weight_bytes"] == tiny_param_count() * 4


def test_decode_with_hf_baseline_writes_rows(capsys, tmp_path):
    out_file = tmp_path / "bench.json"
    rc, out, err = run_cli(capsys, "bench", "--shape", "tiny", "--device", "cpu", "--suite", "decode",
                           "--baseline", "hf", "--json", out_file)
    assert rc == 0, err
    data = json.loads(out_file.read_text())
    assert list(data) == ["rows"]
    rows = data["rows"]
    # CPU defaults: batch 1 and 4, 32-token prompts, 16 new tokens; hearth beside hf.
    assert [(r["engine"], r["batch"]) for r in rows] == [("hearth", 1), ("hf", 1), ("hearth", 4), ("hf", 4)]
    for r in rows:
        check_common(r)
        assert r["suite"] == "decode"
        assert (r["prompt_len"], r["output_len"]) == (32, 16)
        assert isinstance(r["decode_tok_s"], float) and r["decode_tok_s"] > 0
        assert isinstance(r["ttft_ms"], float) and r["ttft_ms"] > 0
        # Same float32 weights, same prompts, greedy: every token must agree.
        assert r["match_tokens"] == r["output_len"]
        if r["engine"] == "hearth":  # one device, no split
            assert (r["split"], r["num_devices"]) == ("none", 1)
    # The table: a title, a header, one line per row, with the speed-up on Hearth's lines.
    lines = out.strip().splitlines()
    assert lines[0].startswith("shape:tiny on cpu")
    assert "vs hf" in lines[1] and len(lines) == 2 + len(rows)
    assert lines[2].split()[:2] == ["decode", "hearth"] and lines[2].rstrip().endswith("16/16")
    assert "x" in lines[2].split()[-2]


def test_prefill_and_throughput(capsys, tmp_path):
    out_file = tmp_path / "pt.json"
    rc, _, err = run_cli(capsys, "bench", "--shape", "tiny", "--device", "cpu", "--suite", "prefill",
                         "--suite", "throughput", "--prefill-lens", "16,48", "--num-requests", "6",
                         "--min-len", "4", "--max-len", "24", "--hf-num-requests", "3", "--repeats", "1",
                         "--baseline", "hf", "--json", out_file, "--quiet")
    assert rc == 0, err
    assert "[hearth]" not in err  # --quiet
    rows = json.loads(out_file.read_text())["rows"]
    assert [(r["suite"], r["engine"]) for r in rows] == [
        ("prefill", "hearth"), ("prefill", "hf"), ("prefill", "hearth"), ("prefill", "hf"),
        ("throughput", "hearth"), ("throughput", "hf")]
    for r in rows:
        check_common(r)
    for r, n in zip(rows[:4], (16, 16, 48, 48)):
        assert (r["prompt_len"], r["output_len"], r["batch"]) == (n, 1, 1)
        assert r["ttft_ms"] > 0
    hearth, hf = rows[4:]
    assert hearth["num_requests"] == 6 and hf["num_requests"] == 3
    for r in (hearth, hf):
        assert r["output_tok_s"] > 0
        assert 0 <= r["kv_waste_pct"] < 100
        assert 4 <= r["prompt_len"] <= 24 and 4 <= r["output_len"] <= 24
    assert hearth["num_preemptions"] == 0


def test_model_folder_with_hf_baseline(capsys, tmp_path):
    """--model: both engines read the same checkpoint folder (a real tokenizer beside it)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.engine.conftest import build_tiny_tokenizer

    folder = build_tiny_tokenizer(tmp_path / "tiny-folder")
    vocab = len(AutoTokenizer.from_pretrained(str(folder)))
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128,
                      initializer_range=0.1, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    out_file = tmp_path / "m.json"
    rc, _, err = run_cli(capsys, "bench", "--model", folder, "--device", "cpu", "--baseline", "hf",
                         "--batch", "1", "--prompt-len", "12", "--output-len", "10", "--repeats", "1",
                         "--json", out_file)
    assert rc == 0, err
    rows = json.loads(out_file.read_text())["rows"]
    assert [r["engine"] for r in rows] == ["hearth", "hf"]
    for r in rows:
        assert r["model"] == "tiny-folder"
        assert r["match_tokens"] == 10
        assert r["decode_tok_s"] > 0


def test_no_baseline_and_comma_suites(capsys):
    rc, out, err = run_cli(capsys, "bench", "--shape", "tiny", "--device", "cpu", "--suite", "decode,prefill",
                           "--batch", "2", "--output-len", "3", "--prefill-lens", "8", "--repeats", "1")
    assert rc == 0, err
    lines = out.strip().splitlines()[2:]
    assert [ln.split()[:3] for ln in lines] == [["decode", "hearth", "2"], ["prefill", "hearth", "1"]]


@pytest.mark.parametrize("argv, message", [
    (["--shape", "nope"], "unknown shape 'nope'"),
    (["--shape", "tiny", "--suite", "speed"], "unknown suite 'speed'"),
    (["--shape", "tiny", "--baseline", "vllm"], "unknown baseline"),
    (["--shape", "tiny", "--batch", "8", "--max-num-seqs", "4"], "--max-num-seqs"),
    (["--shape", "tiny", "--suite", "prefill", "--prefill-lens", "4096"], "context"),
    (["--shape", "tiny", "--suite", "prefill", "--prefill-lens", "600", "--max-num-batched-tokens", "512"],
     "--max-num-batched-tokens"),
    (["--shape", "tiny", "--min-len", "9", "--max-len", "3"], "--min-len"),
    (["--shape", "tiny", "--json", "/no/such/folder/x.json"], "does not exist"),
    # a folder, or a place no file can be made, failed only after the whole bench ran
    (["--shape", "tiny", "--json", str(Path(__file__).parent)], "it is a folder"),
    (["--shape", "tiny", "--json", "/proc/x.json"], "cannot write --json /proc/x.json"),
    (["--shape", "tiny", "--json", ""], "--json is empty"),  # was no file at all, without a word
    (["--shape", "tiny", "--kv-cache-dtype", "int2"], "kv_cache_dtype must be one of auto, fp8"),
    # numpy's seed sequence raised a ValueError traceback mid-run
    (["--shape", "tiny", "--seed", "-1"], "--seed must be an integer from 0"),
    (["--shape", "tiny", "--seed", str(2**64)], "--seed must be an integer from 0"),
])
def test_bad_options_exit_2_with_advice(capsys, argv, message):
    rc, _, err = run_cli(capsys, "bench", "--device", "cpu", *argv)
    assert rc == 2
    assert message in err
    if "nope" in argv:
        assert "llama-8b" in err  # the known shapes are listed


def test_the_json_path_check_leaves_files_as_they_were(tmp_path):
    from app.commands.common import check_output_file

    existing = tmp_path / "old.json"
    existing.write_text("keep", encoding="utf-8")
    check_output_file(existing)
    assert existing.read_text(encoding="utf-8") == "keep"
    check_output_file(tmp_path / "new.json")
    assert sorted(tmp_path.iterdir()) == [existing]


def test_the_json_path_check_keeps_links_and_does_not_open_a_fifo(tmp_path):
    """A dangling link's try made its target and deleted the link (an empty file left
    behind); a FIFO's open blocked until a reader came (and that reader then saw its end)."""
    import os
    import threading

    from app.commands.common import check_output_file

    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "target.json")
    check_output_file(link)
    assert link.is_symlink() and not (tmp_path / "target.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json"]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    checked = threading.Thread(target=check_output_file, args=(fifo,), daemon=True)
    checked.start()
    checked.join(10)
    if checked.is_alive():  # let the blocked open go (a reader), then fail
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
    assert not checked.is_alive(), "the check opened the FIFO and waited for a reader"


def test_step_probe_kv_waste_of_one_request():
    """20-token prompt, 5 new tokens, blocks of 16: after the 5 steps the cache holds
    20, 21, 22, 23, 24 tokens in 2 blocks (32 slots) -> waste 12..8 of 32, mean 31.25 %."""
    from engine.api import Engine, Request, SamplingParams

    engine = Engine.load("shape:tiny", device="cpu", max_model_len=64, block_size=16)
    request = Request(prompt_token_ids=list(range(100, 120)),
                      params=SamplingParams(temperature=0, ignore_eos=True, max_tokens=5))
    try:
        with StepProbe(engine) as probe:
            engine.generate([request])
        engine.generate([Request(prompt_token_ids=[7, 8, 9], params=request.params)])
    finally:
        engine.shutdown()
    # Five steps, and none after the probe ended (it stopped listening).
    assert [(r.first_tokens, r.later_tokens, r.kv_slots_allocated, r.kv_slots_used) for r in probe.records] == [
        (1, 0, 32, 20), (0, 1, 32, 21), (0, 1, 32, 22), (0, 1, 32, 23), (0, 1, 32, 24)]
    assert [r.finished_at for r in probe.records] == sorted(r.finished_at for r in probe.records)
    assert probe.kv_waste_pct() == pytest.approx(100 * (12 + 11 + 10 + 9 + 8) / 5 / 32)


def test_aggregate_decode_rate_starts_when_all_have_their_first_token():
    recs = [StepInfo(0.0, 1, 0, 0, 0),  # request A prefilled
            StepInfo(1.0, 1, 1, 0, 0),  # B prefilled, A decodes: window starts here
            StepInfo(2.0, 0, 2, 0, 0),
            StepInfo(4.0, 0, 2, 0, 0)]
    assert aggregate_decode_tok_s(recs, 2) == pytest.approx(4 / 3.0)
    assert aggregate_decode_tok_s(recs, 3) == 0.0  # never all started
    assert kv_waste_pct([StepInfo(0, 0, 0, 10, 5), StepInfo(0, 0, 0, 0, 0), StepInfo(0, 0, 0, 4, 4)]) == 25.0


def test_hearth_parser_reaches_the_bench_without_loading_torch():
    """`hearth bench` reaches the bench through its own public face, engine.bench (a client
    of engine.api, which no longer re-exports it); building hearth's parser, which every
    command (and the desktop app) does first, still loads no torch."""
    code = ("import sys, app.cli; app.cli.build_parser(); "
            "assert 'engine.bench' in sys.modules, 'the bench command is built from engine.bench'; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]; "
            "import engine.api; assert not hasattr(engine.api, 'run_bench')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_static_batch_waste():
    """Prompts of 2 and 4 tokens left-padded to 4, outputs of 1 and 3 tokens."""
    batch = [TimedRequest([1, 2], 1), TimedRequest([1, 2, 3, 4], 3)]
    # step s allocates 2 * (4 + s); used: (2 + min(s, 1)) + (4 + min(s, 3))
    expected = [(10 - 8) / 10, (12 - 9) / 12, (14 - 10) / 14]
    assert _static_waste(batch) == pytest.approx(expected)


def test_cuda_defaults_are_the_protocol():
    """On CUDA the sizes left out are BENCHMARKS.md's; the engine is sized to run them."""
    o = BenchOptions(shape="llama-8b", suites=("all",)).for_device(on_cuda=True)
    assert o.suites == ("decode", "prefill", "throughput")
    assert (o.batch, o.prompt_len, o.output_len) == ((1, 64), 128, 256)
    assert o.prefill_lens == (128, 512, 2048, 8192)
    assert (o.num_requests, o.min_len, o.max_len) == (512, 128, 1024)
    sched = o.engine.scheduler  # the one EngineConfig the bench loads with
    assert sched.max_num_batched_tokens >= 8192  # the longest prefill is one chunk
    assert sched.max_num_seqs >= 64 and o.engine.model.max_model_len == 8193 and o.repeats >= 3


@pytest.mark.gpu
def test_all_suites_on_cuda(capsys, tmp_path):
    """The CUDA path (sync, freeing the baseline, weights handed over to the GPU), float32
    so greedy tokens must still agree exactly."""
    out_file = tmp_path / "gpu.json"
    rc, _, err = run_cli(capsys, "bench", "--shape", "tiny", "--device", "cuda", "--dtype", "float32",
                         "--suite", "all", "--baseline", "hf", "--batch", "1,8", "--prompt-len", "64",
                         "--output-len", "32", "--prefill-lens", "64,1024", "--num-requests", "32",
                         "--min-len", "16", "--max-len", "128", "--hf-num-requests", "16",
                         "--repeats", "2", "--json", out_file)
    assert rc == 0, err
    rows = json.loads(out_file.read_text())["rows"]
    assert len(rows) == 10 and {r["engine"] for r in rows} == {"hearth", "hf"}
    for r in rows:
        assert r["card"] == torch.cuda.get_device_name() and r["quant"] == "fp32"
        if r["suite"] == "decode":
            assert r["decode_tok_s"] > 0 and r["match_tokens"] == 32
        elif r["suite"] == "prefill":
            assert r["ttft_ms"] > 0
        else:
            assert r["output_tok_s"] > 0 and 0 <= r["kv_waste_pct"] < 100


def test_throughput_with_an_fp8_kv_cache_names_it_in_the_row(capsys, tmp_path):
    out_file = tmp_path / "fp8.json"
    rc, _, err = run_cli(capsys, "bench", "--shape", "tiny", "--device", "cpu", "--suite", "throughput",
                         "--num-requests", "4", "--min-len", "4", "--max-len", "16", "--kv-cache-dtype",
                         "fp8", "--json", out_file, "--quiet")
    assert rc == 0, err
    (row,) = json.loads(out_file.read_text())["rows"]
    assert row["kv_cache_dtype"] == "float8_e4m3fn" and row["output_tok_s"] > 0


def test_tensor_parallel_rows_say_how_many_ranks_ran(capsys, tmp_path):
    out_file = tmp_path / "tp.json"
    rc, _, err = run_cli(capsys, "bench", "--shape", "tiny", "--devices", "cpu,cpu", "--split", "tensor",
                         "--suite", "decode", "--batch", "1", "--output-len", "4", "--json", out_file, "--quiet")
    assert rc == 0, err
    (row,) = json.loads(out_file.read_text())["rows"]
    assert (row["engine"], row["split"], row["num_devices"]) == ("hearth", "tensor", 2)
    assert row["decode_tok_s"] > 0


def test_rows_name_the_kernel_switches_set(monkeypatch):
    """An A/B pair of runs in one session (``HEARTH_QUANT_SWAP_INT8=0`` against the default, say)
    says in each row which side it was."""
    import torch

    from engine.bench.rows import KERNEL_KNOBS, RowMaker

    for knob in KERNEL_KNOBS:
        monkeypatch.delenv(knob, raising=False)
    assert "knobs" not in RowMaker("m", torch.device("cpu"), torch.float32, "torch").row("decode", "hearth", 1, 8, 4)
    monkeypatch.setenv("HEARTH_QUANT_SWAP_INT8", "1")
    monkeypatch.setenv("HEARTH_UNRELATED", "1")
    row = RowMaker("m", torch.device("cpu"), torch.float32, "torch").row("decode", "hearth", 1, 8, 4)
    assert row["knobs"] == {"HEARTH_QUANT_SWAP_INT8": "1"}


def test_the_baseline_rows_carry_the_baselines_own_weights(capsys, tmp_path):
    """--quant int4 beside transformers: Hearth's rows say int4, the baseline's the dtype
    transformers ran (they said int4 too)."""
    out_file = tmp_path / "q.json"
    rc, _, err = run_cli(capsys, "bench", "--shape", "tiny", "--device", "cpu", "--suite", "decode", "--batch", "1",
                         "--output-len", "4", "--quant", "int4", "--baseline", "hf", "--json", out_file, "--quiet")
    assert rc == 0, err
    rows = json.loads(out_file.read_text())["rows"]
    assert [(r["engine"], r["quant"]) for r in rows] == [("hearth", "int4"), ("hf", "fp32")]
    assert rows[1]["weight_bytes"] > rows[0]["weight_bytes"]
