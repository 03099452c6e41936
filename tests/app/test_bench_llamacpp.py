"""``hearth bench --baseline llamacpp``: the same GGUF through llama-cpp-python, rows beside
Hearth's (an optional extra: without it the baseline is refused, saying how to install it)."""

from __future__ import annotations

import json
import sys

import pytest

from app.cli import main


def test_without_llama_cpp_python_the_baseline_is_refused_with_the_install_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails
    rc = main(["bench", "--model", "default", "--suite", "decode", "--batch", "1", "--baseline", "llamacpp",
               "--prompt-len", "8",
               "--output-len", "4", "--repeats", "1", "--device", "cpu"])
    assert rc == 2 and "pip install llama-cpp-python" in capsys.readouterr().err


def test_the_baseline_needs_a_gguf_model(tiny_models, capsys):
    rc = main(["bench", "--model", str(tiny_models["llama3"]), "--suite", "decode", "--batch", "1",
               "--baseline", "llamacpp", "--device", "cpu", "--repeats", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and ("needs a GGUF file" in err or "pip install llama-cpp-python" in err)


@pytest.mark.slow
def test_llamacpp_rows_beside_hearths_on_the_default_gguf(tmp_path, capsys):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install '.[llamacpp]')")
    out = tmp_path / "rows.json"
    rc = main(["bench", "--model", "default", "--suite", "decode,prefill", "--batch", "1", "--prompt-len", "16",
               "--output-len", "8",
               "--prefill-lens", "32", "--repeats", "1", "--baseline", "llamacpp", "--device", "cpu",
               "--max-model-len", "256", "--json", str(out), "-q"])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())["rows"]
    engines = {(r["suite"], r["engine"]) for r in rows}
    assert engines == {("decode", "hearth"), ("decode", "llamacpp"), ("prefill", "hearth"), ("prefill", "llamacpp")}
    base = next(r for r in rows if r["engine"] == "llamacpp" and r["suite"] == "decode")
    assert base["decode_tok_s"] > 0 and base["threads"] >= 1 and base["quant"] == "gguf"
    hearth = next(r for r in rows if r["engine"] == "hearth" and r["suite"] == "decode")
    assert hearth["quant"] == "gguf" and 0 <= hearth["match_tokens"] <= 8
    assert "vs llamacpp" in capsys.readouterr().out
