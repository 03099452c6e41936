"""bitsandbytes quantization (``--quant bnb-nf4``, ``bnb-nf4-dq``, ``bnb-int8``; issue 17).

Against independent references: each projection's product against its weight dequantized
by bitsandbytes' own ``dequantize_4bit`` (or int8 rows x absmax / 127) and multiplied in
float64; a tiny model against transformers' own model loaded with ``BitsAndBytesConfig``
on the same weights (and a checkpoint transformers saved so, loaded by Hearth as it is).
Refusals: without bitsandbytes the choices say why and what to do, before anything loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is an optional extra (pip install 'bitsandbytes>=0.45')")

from engine.config import load_config  # noqa: E402
from engine.errors import InvalidRequestError, UnsupportedModelError  # noqa: E402
from engine.layers.bnb_linear import BnbLinear  # noqa: E402
from engine.layers.linear import Linear, QKVLinear, SwiGLUDownLinear  # noqa: E402
from engine.loader.engine_loader import load_model  # noqa: E402
from engine.quant.bnb import BnbSource, import_problem  # noqa: E402
from engine.runner.lifecycle import release_runner  # noqa: E402
from tests.quant.test_quantized_models import PROMPT, hearth_logits  # noqa: E402

F = bnb.functional
REPO = Path(__file__).resolve().parents[2]


def _fill(module, shards: dict, nested: bool = False) -> BnbLinear:
    """A BnbLinear replacing ``module``, loaded from float ``shards`` (shard id -> rows)."""
    lin = BnbLinear.replacing(module, BnbSource("bnb-nf4-dq" if nested else "bnb-nf4"), nested=nested)
    for shard_id, rows in shards.items():
        lin.load_part("weight", rows, shard_id)
    assert lin.finish_loading() == []
    return lin


@pytest.mark.parametrize("nested", [False, True])
def test_nf4_of_fused_shards_is_bitsandbytes_nf4_of_the_whole_matrix(nested):
    """q, k and v stream in one by one; the module holds exactly what quantize_4bit of the
    stacked matrix gives (double quantization too: it waits for the last shard), and its
    product is that weight's, to float32 rounding."""
    torch.manual_seed(0)
    shards = {"q": torch.randn(64, 64), "k": torch.randn(32, 64) * 3, "v": torch.randn(32, 64) * 0.1}
    lin = _fill(QKVLinear(64, 4, 2, 16, dtype=torch.float32), shards, nested)
    assert (lin.absmax.dtype == torch.uint8) == nested
    whole = torch.cat(list(shards.values()))
    packed, state = F.quantize_4bit(whole, blocksize=64, quant_type="nf4", compress_statistics=nested)
    assert torch.equal(lin.weight.view(-1), packed.view(-1))
    want_w = F.dequantize_4bit(packed, state).double()
    assert torch.equal(lin.dequantized().double(), want_w)
    x = torch.randn(5, 64)
    for rows in (x[:1], x):  # one row (bitsandbytes' GEMV) and several
        got = lin(rows).double()
        want = rows.double() @ want_w.t()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
    # what quantizing did: far from the float product, and from a shard order mixed up
    assert (lin(x).double() - x.double() @ whole.double().t()).abs().max() > 1e-2


def test_a_gated_down_projection_applies_swiglu_first():
    torch.manual_seed(1)
    lin = _fill(SwiGLUDownLinear(128, 64, dtype=torch.float32), {None: torch.randn(64, 128)})
    x = torch.randn(3, 256)
    gate, up = x.double().chunk(2, dim=-1)
    want = (torch.nn.functional.silu(gate) * up) @ lin.dequantized().double().t()
    assert lin.input_width == 256
    assert torch.allclose(lin(x).double(), want, rtol=1e-5, atol=1e-5)


def test_int8_keeps_outlier_columns_in_fp16():
    """LLM.int8(): rows in int8 with an absmax each; an activation column holding a value
    of at least 6 runs in fp16 against the dequantized weight. Against the float64 product
    of the dequantized weight the error is the int8 rounding of the other activations; with
    the outlier in the int8 part instead (threshold 0) it is many times larger."""
    torch.manual_seed(2)
    w = torch.randn(48, 64)
    x = torch.randn(4, 64)
    x[:, 7] = 40.0  # an outlier feature
    errors = {}
    for threshold in (6.0, 0.0):
        lin = BnbLinear.replacing(Linear(64, 48, dtype=torch.float32), BnbSource("bnb-int8", threshold=threshold))
        lin.load_part("weight", w, None)
        w16 = w.half().float()  # bitsandbytes quantizes from fp16, as Int8Params does
        scb = w16.abs().amax(dim=1)
        assert torch.equal(lin.SCB, scb)
        assert (lin.weight.int() - torch.round(w16 * 127 / scb[:, None]).int()).abs().max() <= 1
        with torch.inference_mode():
            got = lin(x).double()
        want = x.double() @ lin.dequantized(torch.float64).t()
        errors[threshold] = float((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt())
    assert errors[6.0] < 0.01 and errors[0.0] > 3 * errors[6.0], errors


# -- whole models against transformers ---------------------------------------------------------
def _load(path, **options):
    config = load_config(str(path), device="cpu", dtype="float32", attention="torch", num_blocks=8,
                         max_model_len=128, **options)
    return load_model(config)


def _bnb_config(method: str, compute: torch.dtype = torch.float32):
    """transformers' BitsAndBytesConfig of ``method``, its 4-bit layers computing in ``compute``."""
    from transformers import BitsAndBytesConfig

    if method == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                              bnb_4bit_use_double_quant=method == "bnb-nf4-dq")


def _hf_logits(model, ids=PROMPT) -> torch.Tensor:
    # On CPUs with AVX512-BF16 bitsandbytes' Linear4bit repacks its weight on the first
    # forward for a CPU kernel, assuming the inputs are a multiple of the block size (64): the
    # tiny models' 96 inputs fail there ("shape '[64, 1]' is invalid for input of size 96",
    # bitsandbytes 0.50.2). The reference takes bitsandbytes' generic path instead (the one
    # Hearth's bnb modules call, bnb.matmul_4bit), on every CPU.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def hf_quantized(tiny_models, tmp_path_factory):
    """method -> (transformers' model of tiny llama3 quantized by bitsandbytes, that model
    saved as a checkpoint (with the tokenizer))."""
    pytest.importorskip("accelerate", reason="transformers' bitsandbytes loading needs accelerate")
    from transformers import AutoModelForCausalLM

    src = tiny_models["llama3"]
    out = {}
    for method in ("bnb-nf4", "bnb-nf4-dq", "bnb-int8"):
        model = AutoModelForCausalLM.from_pretrained(str(src), quantization_config=_bnb_config(method),
                                                     dtype=torch.float32, device_map="cpu").eval()
        folder = tmp_path_factory.mktemp(f"tiny-llama3-{method}")
        model.save_pretrained(str(folder))
        for f in src.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation")):
                (folder / f.name).write_bytes(f.read_bytes())
        out[method] = (model, folder)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-nf4-dq", "bnb-int8"])
def test_a_tiny_model_quantized_as_it_loads_gives_transformers_bitsandbytes_logits(tiny_models, hf_quantized, method):
    """transformers quantizes q, k and v apart, Hearth the fused matrix: the same blocks, so
    NF4 and int8 agree to rounding. Double quantization nests the fused matrix's absmaxes
    together (one mean, blocks of 256 across q/k/v): close, not equal."""
    loaded = _load(tiny_models["llama3"], quantization=method)
    try:
        info, runner = loaded.info, loaded.runner
        assert info.quantization == method
        layers = [m for m in runner.model.modules() if isinstance(m, BnbLinear)]
        assert len(layers) == 4 * 2 and isinstance(runner.model.lm_head, Linear)  # the head stays float
        assert "bnb" in info.quant_detail and info.cpu_decode is not True  # the C step says why not
        got, want = hearth_logits(runner), _hf_logits(hf_quantized[method][0])
        diff = float((got - want).abs().max())
        float_loaded = _load(tiny_models["llama3"], quantization="none")
        try:
            quantizing = float((hearth_logits(float_loaded.runner) - got).abs().max())
            assert info.weight_bytes < float_loaded.info.weight_bytes
        finally:
            release_runner(float_loaded.runner)
        if method == "bnb-nf4-dq":
            assert diff < quantizing / 10, (diff, quantizing)
        else:
            assert diff < 1e-4, diff
        assert quantizing > 1e-3  # the quantization mattered, so agreeing means something
    finally:
        release_runner(loaded.runner)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-nf4-dq", "bnb-int8"])
def test_a_bitsandbytes_checkpoint_saved_by_transformers_loads_as_it_is(hf_quantized, method):
    """config.json's quantization_config (quant_method bitsandbytes) and its tensors
    (weight.absmax, weight.nested_absmax, ...; SCB): Hearth's logits are transformers' own
    forward of that checkpoint's; it loads as ``auto`` or its own method, nothing else."""
    model, folder = hf_quantized[method]
    loaded = _load(folder, quantization="auto")
    try:
        assert loaded.info.quantization == method
        got, want = hearth_logits(loaded.runner), _hf_logits(model)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    finally:
        release_runner(loaded.runner)
    with pytest.raises(InvalidRequestError, match=rf"already quantized with bitsandbytes \({method}\).*--quant auto"):
        _load(folder, quantization="int4")


def test_bitsandbytes_quantization_configs_are_read_or_refused_naming_the_field():
    from engine.quant.formats import parse_quantization_config

    def parse(**qc):
        return parse_quantization_config({"quantization_config": {"quant_method": "bitsandbytes", **qc}}, "org/m")

    q = parse(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
              bnb_4bit_compute_dtype="bfloat16", llm_int8_skip_modules=["lm_head"])
    assert (q.method, q.bits, q.not_converted, q.compute_dtype) == ("bnb-nf4-dq", 4, ("lm_head",), "bfloat16")
    assert parse(load_in_4bit=True, bnb_4bit_quant_type="nf4").method == "bnb-nf4"
    q = parse(load_in_8bit=True, llm_int8_threshold=4.0)
    assert (q.method, q.bits, q.threshold) == ("bnb-int8", 8, 4.0)
    for qc, field in (({"load_in_4bit": True}, "bnb_4bit_quant_type"),  # transformers' default: fp4
                      ({"load_in_4bit": True, "load_in_8bit": True}, "load_in_4bit"),
                      ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_quant_storage": "bfloat16"},
                       "bnb_4bit_quant_storage"),
                      ({"load_in_8bit": True, "llm_int8_has_fp16_weight": True}, "llm_int8_has_fp16_weight")):
        with pytest.raises(UnsupportedModelError, match=rf"quantization_config\.{field} in org/m: .*--quant"):
            parse(**qc)


# -- can it run here, and why not ----------------------------------------------------------
@pytest.fixture
def no_bitsandbytes(monkeypatch):
    """bitsandbytes as if it were not installed: its import fails."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert import_problem() is not None


def test_without_bitsandbytes_the_choices_say_what_to_install_and_what_to_pick(no_bitsandbytes):
    from engine.api import get_choice

    for name in ("bnb-nf4", "nf4", "bnb-nf4-dq", "bnb-int8"):
        reasons = get_choice("quantization", name, "cpu").reasons
        assert len(reasons) == 1 and "not installed" in reasons[0], reasons
        assert "pip install 'bitsandbytes>=0.45'" in reasons[0] and "int4" in reasons[0]


def test_without_bitsandbytes_a_load_is_refused_before_the_model_is_looked_for(no_bitsandbytes, monkeypatch):
    import engine.loader.resolve as resolve_mod
    from engine.api import Engine

    def resolve_model(*a, **k):
        raise AssertionError("the model was resolved before the choice was refused")

    monkeypatch.setattr(resolve_mod, "resolve_model", resolve_model)
    with pytest.raises(InvalidRequestError, match=r"'bnb-nf4' can't be used here: bitsandbytes is not installed: "
                                                  r"pip install 'bitsandbytes>=0.45'") as err:
        Engine.load("/nonexistent/model", device="cpu", quantization="nf4")
    assert err.value.options == ("quantization",)


@pytest.mark.slow
def test_without_bitsandbytes_a_bitsandbytes_checkpoint_is_refused_before_its_weights_load(hf_quantized,
                                                                                           monkeypatch):
    """``auto`` finds the checkpoint's method after resolving it: still no weight is read."""
    from engine.runner import bring_up

    def materialize_weights(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(bring_up, "materialize_weights", materialize_weights)
    folder = hf_quantized["bnb-nf4"][1]
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(InvalidRequestError, match=r"bitsandbytes is not installed: pip install 'bitsandbytes>=0.45'"):
        _load(folder, quantization="auto")


@pytest.mark.slow
def test_a_bitsandbytes_checkpoint_whose_kernels_fail_here_is_refused_before_its_weights_load(hf_quantized,
                                                                                              monkeypatch):
    """bitsandbytes imports, but its kernels don't work on this device: ``auto`` still
    refuses the checkpoint with the registry's reason before any weight is read."""
    from engine.quant import bnb as support
    from engine.runner import bring_up

    def materialize_weights(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(bring_up, "materialize_weights", materialize_weights)
    monkeypatch.setattr(support, "_ops_problem", lambda kind, device: f"its {kind} kernels are broken on {device}")
    with pytest.raises(InvalidRequestError, match=r"quantized with bitsandbytes \(bnb-int8\), which can't run here: "
                                                  r"its int8 kernels are broken on cpu"):
        _load(hf_quantized["bnb-int8"][1], quantization="auto")


def test_doctor_lists_bitsandbytes_with_its_status(capsys, monkeypatch):
    from app.cli import main

    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert any(ln.split()[:2] == ["bitsandbytes", bnb.__version__] for ln in out.splitlines()), out
    for name in ("bnb-nf4", "bnb-nf4-dq", "bnb-int8"):
        assert any(ln.split()[:2] == [name, "ok"] for ln in out.splitlines()), out
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.split()[:1] == ["bnb-nf4"])
    assert "unavailable: bitsandbytes is not installed: pip install 'bitsandbytes>=0.45'" in line


def test_broken_bitsandbytes_kernels_are_a_reason_not_a_crash(monkeypatch):
    from engine.quant import bnb as support

    def broken(*a, **k):
        raise RuntimeError("CUDA Setup failed despite GPU being available.\nmore detail")

    support._ops_problem.cache_clear()
    monkeypatch.setattr(F, "quantize_4bit", broken)
    try:
        reasons = support.reasons("bnb-nf4", "cpu")
    finally:
        monkeypatch.undo()
        support._ops_problem.cache_clear()
    assert reasons and "can't run its NF4 kernels on cpu (CUDA Setup failed despite GPU being available.)" in \
        reasons[0] and "int4" in reasons[0]


# -- the runner's choices -----------------------------------------------------------------------
@pytest.mark.slow
def test_the_gemv_tuner_and_cuda_graphs_leave_bitsandbytes_alone_with_a_reason(tiny_models):
    """The batch-1 tuner has nothing of theirs to time; LLM.int8() can't be captured in a
    CUDA graph (a host sync per matmul): the runner says so instead of trying; NF4 is tried
    (a failed capture leaves the runner eager, saying why)."""
    from engine.runner.gemv_tuning import _kinds
    from engine.runner.model_runner import ModelRunner

    for method in ("bnb-int8", "bnb-nf4"):
        loaded = _load(tiny_models["llama3"], quantization=method)
        try:
            model = loaded.runner.model
            kinds = _kinds(model)
            assert not any(isinstance(m, BnbLinear) for mods in kinds.values() for m in mods)
            assert kinds["lm_head"] == [model.lm_head]  # the float head is still tuned
            on_a_gpu = SimpleNamespace(device=torch.device("cuda"), enforce_eager=False, attention="triton",
                                       backend_cls=SimpleNamespace(cuda_graphs=True), model=model,
                                       placement=None)
            reason = ModelRunner.graphs_reason(on_a_gpu)
            if method == "bnb-int8":
                assert "LLM.int8()" in reason and "run eagerly" in reason
            else:
                assert reason is None
        finally:
            release_runner(loaded.runner)


def test_random_weights_draw_quantized_bitsandbytes_layers():
    """Benchmark shapes (no checkpoint): each layer draws a random float matrix, quantized."""
    gen = torch.Generator().manual_seed(0)
    for method in ("bnb-nf4", "bnb-nf4-dq", "bnb-int8"):
        lin = BnbLinear.replacing(QKVLinear(64, 4, 2, 16, dtype=torch.float32), BnbSource(method),
                                  nested=method == "bnb-nf4-dq")
        lin.init_random(gen, 0.02)
        w = lin.dequantized()
        assert torch.isfinite(w).all() and 0.015 < float(w.std()) < 0.025, method
        assert lin._absmax32 is None  # double quantization done


def test_bitsandbytes_never_fetches_a_kernel_from_the_hub(tmp_path):
    """On a CPU with AVX512-BF16 bitsandbytes 0.50 runs ``from kernels import get_kernel``
    (the Hugging Face package, which downloads code from the Hub) as it imports. Such a CPU
    is simulated (its check answers yes while bitsandbytes imports) and a stand-in
    ``kernels`` package records the call. The plain import calls it; Hearth's doesn't (and
    says nothing about it) whether ``kernels`` was imported before or not, while another
    thread imports and uses ``kernels`` throughout without a failure; afterwards ``kernels``
    is the real module again. bitsandbytes works every way."""
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(textwrap.dedent("""
        import sys
        def get_kernel(repo, version=None):
            print("get_kernel called", repo, file=sys.stderr)
            raise RuntimeError("no network in this test")
    """))
    script = textwrap.dedent("""
        import importlib, importlib.abc, importlib.machinery, sys, threading, time
        class Hook(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name != "bitsandbytes.functional":
                    return None
                spec = importlib.machinery.PathFinder.find_spec(name, path)
                run = spec.loader.exec_module
                def exec_module(module):
                    run(module)
                    module.has_avx512bf16 = lambda: True
                spec.loader.exec_module = exec_module
                return spec
        sys.meta_path.insert(0, Hook())
        how = sys.argv[1]
        if how == "before":
            import kernels as first
        failures, lookups, done = [], [0], threading.Event()
        def other_thread():  # another thread using kernels all along
            while not done.is_set():
                try:
                    from kernels import get_kernel
                    lookups[0] += 1
                    time.sleep(0.0005)  # not a busy loop: it would hold the GIL from the import
                except Exception as e:
                    failures.append(repr(e))
        other = threading.Thread(target=other_thread) if how in ("threads", "before") else None
        if other is not None:
            other.start()
        if how == "plain":
            import bitsandbytes as bnb
        else:
            from engine.quant.bnb import import_bitsandbytes
            bnb = import_bitsandbytes()
            assert bnb is import_bitsandbytes()  # a second call: the module, nothing hidden
        done.set()
        if other is not None:
            other.join()
            assert not failures and lookups[0] > 0, (failures[:3], lookups)
        import kernels
        assert hasattr(kernels, "get_kernel") and type(kernels).__name__ == "module", "the real kernels again"
        if how == "before":
            assert kernels is first
        import torch
        w, x = torch.randn(64, 64), torch.randn(2, 64)
        packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
        y = bnb.matmul_4bit(x, packed, quant_state=state)
        ref = x @ bnb.functional.dequantize_4bit(packed, state).t()
        print("ok", float((y - ref).abs().max()) < 1e-4)
    """)
    path = [str(REPO), str(fake.parent), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    runs = {how: subprocess.run([sys.executable, "-c", script, how], capture_output=True, text=True, env=env,
                                cwd=str(REPO), timeout=300) for how in ("plain", "hearth", "before", "threads")}
    for how, run in runs.items():
        assert run.returncode == 0, (how, run.stderr[-2000:])
        assert run.stdout.startswith("ok True"), (how, run.stdout)
    assert "get_kernel called kernels-community" in runs["plain"].stderr, runs["plain"].stderr
    for how in ("hearth", "before", "threads"):
        assert "get_kernel called" not in runs[how].stderr, (how, runs[how].stderr)
        assert "kernels-community" not in runs[how].stderr, (how, runs[how].stderr)


def test_a_thread_checking_bitsandbytes_while_another_imports_it_waits_for_the_import():
    """The window lists the load choices on a thread of its own as it opens while a load
    (or the dialog) may check bitsandbytes too: a second checker must wait for the first
    one's import, never read the half-imported module (no __version__ yet: 'bitsandbytes 0
    is too old'). In a fresh process: one thread starts the import, the main thread checks
    while it runs."""
    script = textwrap.dedent("""
        import sys, threading, time
        from engine.quant.bnb import import_problem
        first = []
        t = threading.Thread(target=lambda: first.append(import_problem()))
        t.start()
        # (where Hugging Face's kernels is installed, it is imported first: wait for bitsandbytes)
        while "bitsandbytes" not in sys.modules and t.is_alive():
            time.sleep(0.002)
        time.sleep(0.05)
        assert "bitsandbytes" in sys.modules and t.is_alive(), "the import ended before the second check"
        second = import_problem()
        t.join()
        print("problems", first, [second])
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=str(REPO),
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "problems [None] [None]" in run.stdout, run.stdout + run.stderr[-1000:]


def test_the_transformers_fallback_imports_bitsandbytes_the_hearth_way_first(monkeypatch, tmp_path):
    """A bitsandbytes checkpoint that transformers builds (the fallback runner) would have
    transformers import bitsandbytes, unguarded: Hearth's import (no Hub fetch) comes first;
    any other checkpoint, or none readable, doesn't import it."""
    from engine.quant import bnb
    from engine.runner import hf_runner

    calls = []
    monkeypatch.setattr(bnb, "import_bitsandbytes", lambda: calls.append(1))
    for quant, expected in (({"quant_method": "bitsandbytes", "load_in_4bit": True}, [1]),
                            ({"quant_method": "gptq"}, []), (None, [])):
        calls.clear()
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": quant}))
        hf_runner._import_bitsandbytes_first(tmp_path)
        assert calls == expected, quant
    calls.clear()
    hf_runner._import_bitsandbytes_first(tmp_path / "missing")
    assert calls == []
