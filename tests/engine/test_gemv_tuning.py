"""The batch-1 matmul tuner's choice logic (CPU: timings are faked; the GPU pass runs the
real tuner at every CUDA load). Candidates of one layer kind are always timed the same
way: all in CUDA graphs, or all eagerly when a capture fails."""

from __future__ import annotations

import pytest
import torch

import engine.runner.gemv_tuning as tuning
from engine.api import Engine

disagreement = tuning.disagreement  # the real one (a fixture stubs it for the timing tests)


@pytest.fixture(autouse=True)
def no_kernel_runs(monkeypatch):
    """The compile probe would run each candidate through the (slow) interpreter."""
    import hearth_kernels.gemv

    monkeypatch.setattr(hearth_kernels.gemv, "gemv", lambda *a, **k: None)
    # (so no candidate computes anything: their agreement check is tested on its own below)
    monkeypatch.setattr(tuning, "disagreement", lambda got, expected: None)


@pytest.fixture(scope="module")
def model(tiny_models):
    e = Engine.load(str(tiny_models["llama3"]), device="cpu", dtype="float32", attention="torch", num_blocks=8)
    yield e.runner.model
    e.shutdown()


def _fake_time(costs, calls):
    """Per kind, cuBLAS is timed first, then the candidates in ``candidates(n, k)`` order."""

    def fake(fn, count, graphed=True, reps=3):
        calls.append(graphed)
        return costs[(len(calls) - 1) % len(costs)]
    return fake


def test_the_fastest_by_a_margin_wins_and_is_set_on_every_layer(model, monkeypatch):
    calls = []
    # cuBLAS 1.0, then candidates: 0.99 (within the 3% margin: not taken), 0.90, 0.88 (not
    # 3% better than 0.90), 0.80, then none 3% better than 0.80
    costs = [1.0, 0.99, 0.90, 0.88, 0.80, 0.79, 0.785, 0.781, 0.78]
    monkeypatch.setattr(tuning, "_time", _fake_time(costs, calls))
    kinds = tuning._kinds(model)
    sizes = {len(tuning.candidates(*mods[0].weight.shape)) for mods in kinds.values()}
    assert sizes == {len(costs) - 1}  # one cycle of fake costs per kind
    choices = tuning.tune_gemv(model, torch.device("cpu"))
    assert set(choices) == {"qkv", "o", "gate_up", "down", "lm_head"}
    for kind, mods in kinds.items():
        want = tuning.candidates(*mods[0].weight.shape)[3]  # the 0.80 one
        assert choices[kind] == "triton gemv %dx%d/%dw" % want
        assert all(m.kernel.config == want for m in mods)  # each module runs the chosen kernel
    assert all(calls)  # every timing in graphs


def test_each_shape_tries_its_default_config_first():
    from hearth_kernels.gemv import default_config

    for n, k in ((28672, 4096), (128256, 4096), (64, 96)):
        got = tuning.candidates(n, k)
        assert got[0] == default_config(n, k)
        assert len(set(got)) == len(got) and set(tuning.CANDIDATES) <= set(got)


def test_a_failed_capture_times_the_whole_kind_eagerly(model, monkeypatch):
    calls = []

    def fake(fn, count, graphed=True, reps=3):
        calls.append(graphed)
        if graphed:
            raise RuntimeError("operation not permitted when stream is capturing")
        return 1.0  # nothing beats cuBLAS
    monkeypatch.setattr(tuning, "_time", fake)
    choices = tuning.tune_gemv(model, torch.device("cpu"))
    assert set(choices.values()) == {"cublas"}
    # Per kind: one failed graph timing, then cuBLAS and every candidate eagerly.
    per_kind = 1 + 1 + len(tuning.CANDIDATES) + 1  # the tiny shapes' defaults aren't among them
    assert len(calls) == 5 * per_kind
    for k in range(5):
        assert calls[k * per_kind:(k + 1) * per_kind] == [True] + [False] * (per_kind - 1)


def test_a_candidate_whose_result_disagrees_is_left_out_however_fast(model, monkeypatch):
    """The tuner checks each candidate's product against cuBLAS's on this GPU first: a
    kernel that is wrong here (a miscompile, an instruction this card lacks) never wins."""
    calls = []
    monkeypatch.setattr(tuning, "_time", _fake_time([1.0, 0.5, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995], calls))
    verdicts = iter(["12.0% RMS from the baseline's result"] + [None] * 100)  # the first candidate is wrong
    monkeypatch.setattr(tuning, "disagreement", lambda got, expected: next(verdicts))
    choices = tuning.tune_gemv(model, torch.device("cpu"))
    mods = tuning._kinds(model)["qkv"]
    # candidate 0 was timed at 0.5 but disagreed; candidate 1 (0.9) is the best that agreed
    assert choices["qkv"] == "triton gemv %dx%d/%dw" % tuning.candidates(*mods[0].weight.shape)[1]


def test_disagreement_tolerates_rounding_and_catches_wrong_products():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(1, 256, generator=g)
    assert disagreement(y * (1 + 0.01 * torch.randn(1, 256, generator=g)), y) is None  # 1% noise: rounding
    assert "RMS" in disagreement(y.flip(1), y)
    few_wrong = y.clone()
    few_wrong[0, 0] += 0.5 * y.pow(2).mean().sqrt()  # one output: 3% in the RMS, but half the RMS itself
    assert "of the RMS away" in disagreement(few_wrong, y)
    assert disagreement(torch.full_like(y, float("nan")), y) == "not finite"
    assert "shape" in disagreement(y[:, :8], y)


class _FakeQuantModule:
    """A quantized module's tuning surface: its kernels' products are scripted by name."""

    qweight = True  # what marks a quantized module

    def __init__(self, outputs):
        self.outputs, self.kernel = outputs, None

    def use_kernel(self, kernel):
        self.kernel = kernel

    def __call__(self, x):
        return self.outputs[self.kernel.name]


class _K:
    def __init__(self, name):
        self.name = name

    def with_norm_first(self):  # (QuantKernel's: no such choice)
        return None


def test_a_quantized_layer_checks_its_first_config_too_and_falls_back_to_the_reference(monkeypatch):
    """A quantized layer's candidates are all Triton configs: each, the first included, must
    agree with dequantize+matmul; if none does, the reference kernel itself runs."""
    y = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(tuning, "disagreement", disagreement)  # the real check
    monkeypatch.setattr(tuning, "_reference", lambda mod, x: y)
    monkeypatch.setattr(tuning, "_time", lambda fn, count, graphed=True, reps=3: 1.0)
    wrong = {"first": -y, "second": y + 1.0, "dequantize+matmul": y}
    best, _ = tuning._choose([_FakeQuantModule(wrong)], [_K("first"), _K("second")], torch.zeros(1, 8), "qkv", True)
    assert best.name == "dequantize+matmul"
    right = {"first": -y, "second": y.clone()}
    best, _ = tuning._choose([_FakeQuantModule(right)], [_K("first"), _K("second")], torch.zeros(1, 8), "qkv", True)
    assert best.name == "second"  # the first config disagreed: left out, though it came first


def test_a_projection_after_a_fused_norm_is_timed_with_it(monkeypatch):
    """q/k/v of a quantized model under the fused plan is timed through
    ``normed`` (the norm inside their kernel, or the norm kernel first), so a config that
    takes the norm in competes as the decode step runs it; float projections and those
    after the reference norm are timed alone."""
    from engine.layers.norm import RMSNorm, TritonRMSNorm

    class Normed(_FakeQuantModule):
        first = None
        in_features = out_features = input_width = 8
        dtype = torch.float32

        def kernel_candidates(self):
            return [_K("first"), _K("second")]

        def normed(self, x, residual, norm):
            self.calls.append(norm)
            return self(x), x + residual

    y = torch.randn(1, 8, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(tuning, "disagreement", disagreement)  # the real check
    monkeypatch.setattr(tuning, "_reference", lambda mod, x: y)
    timed = []

    def fake_time(fn, count, graphed=True, reps=3):
        fn(0)
        timed.append(count)
        return 1.0

    monkeypatch.setattr(tuning, "_time", fake_time)
    fused = TritonRMSNorm(RMSNorm(8, 1e-6))
    for norm, want in ((fused, [fused] * 4), (RMSNorm(8, 1e-6), [])):
        mod = Normed({"first": y, "second": y})
        mod.calls = []
        tuning._tune_group("qkv", [mod], torch.device("cpu"), {id(mod): norm})
        assert mod.calls == want  # each candidate checked and timed with the norm, or neither

    class Broken(Normed):
        """The second config: right alone, but its fused kernel fails or is wrong."""

        def __init__(self, outputs, how):
            super().__init__(outputs)
            self.how, self.calls = how, []

        def normed(self, x, residual, norm):
            if self.kernel.name == "second":
                if self.how == "raises":
                    raise RuntimeError("out of resources")
                return -self(x), x + residual
            return super().normed(x, residual, norm)

    class NormFirst(_K):
        """A config whose kernel takes the norm in its prologue: the tuner also times it
        with the norm kernel first (``TritonQuant.with_norm_first``)."""

        def with_norm_first(self):
            return None if self.name.endswith("norm first") else _K(self.name + " norm first")

    class Wide(Normed):
        def kernel_candidates(self):
            return [_K("first"), NormFirst("second")]

    mod = Wide({"first": y, "second": y, "second norm first": y})
    mod.calls = []
    monkeypatch.setattr(tuning, "_time", lambda fn, count, graphed=True, reps=3: (
        fn(0), 0.5 if mod.kernel.name == "second norm first" else 1.0)[1])
    assert tuning._tune_group("gate_up", [mod], torch.device("cpu"), {id(mod): fused}) == "second norm first"
    mod.calls = []  # and not for a projection timed alone (no fused norm before it)
    tuning._tune_group("gate_up", [mod], torch.device("cpu"), {id(mod): RMSNorm(8, 1e-6)})
    assert mod.kernel.name != "second norm first"

    for how in ("raises", "wrong"):
        mod = Broken({"first": y, "second": y}, how)
        monkeypatch.setattr(tuning, "_time", lambda fn, count, graphed=True, reps=3: 2.0 if mod.kernel.name ==
                            "first" else 1.0)  # the second would win on speed
        assert tuning._tune_group("qkv", [mod], torch.device("cpu"), {id(mod): fused}) == "first"


def test_a_pinned_candidate_is_taken_instead_of_the_fastest(monkeypatch, caplog):
    """``HEARTH_GEMV_PIN`` (A/B runs): a kind takes the named candidate, still checked against
    the reference (a wrong one falls back to it); an unknown name is logged and the kind tuned."""
    monkeypatch.setenv(tuning.PIN_ENV, "gate_up=triton_quant_gemv_16x2/4w_k5_s2_norm_first; down = second")
    assert tuning.pinned("gate_up") == "triton quant gemv 16x2/4w k5 s2 norm first"
    assert tuning.pinned("down") == "second" and tuning.pinned("qkv") is None and tuning.pinned("o") is None

    class Mod(_FakeQuantModule):
        in_features = out_features = input_width = 8
        dtype = torch.float32

        def kernel_candidates(self):
            return [_K("first"), _K("second"), _K("third")]

    y = torch.randn(1, 8, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(tuning, "disagreement", disagreement)  # the real check
    monkeypatch.setattr(tuning, "_reference", lambda mod, x: y)
    cost = {"first": 1.0, "second": 2.0, "third": 0.5, "dequantize+matmul": 3.0}
    timed = []

    def fake_time(fn, count, graphed=True, reps=3):
        name = mod.kernel.name
        timed.append(name)
        return cost[name]

    monkeypatch.setattr(tuning, "_time", fake_time)
    ahead = []
    monkeypatch.setattr(tuning, "compile_side_by_side", lambda *a: ahead.append(a[0]) or 0)
    mod = Mod({"first": y, "second": y.clone(), "third": y.clone()})
    assert tuning._tune_group("down", [mod], torch.device("cpu")) == "second"
    assert timed == ["second"] and mod.kernel.name == "second"  # the others not even timed
    assert ahead == []  # nor compiled ahead
    timed.clear()
    assert tuning._tune_group("qkv", [mod], torch.device("cpu")) == "third"  # not pinned: the fastest
    assert timed == ["first", "second", "third"] and ahead == [mod]
    monkeypatch.setenv(tuning.PIN_ENV, "down=nonesuch")
    timed.clear()
    with caplog.at_level("WARNING", logger=tuning.log.name):
        assert tuning._tune_group("down", [mod], torch.device("cpu")) == "third"
    assert "no candidate 'nonesuch'" in caplog.text and "first, second, third" in caplog.text
    # a pinned candidate that is wrong, or can't compile, is left out (logged) and the kind tuned;
    # a float layer (no reference but its baseline's product) is checked against the baseline
    monkeypatch.setenv(tuning.PIN_ENV, "down=second")
    for reference in (y, None):
        monkeypatch.setattr(tuning, "_reference", lambda mod, x, reference=reference: reference)
        mod = Mod({"first": y, "second": -y, "third": y.clone()})
        caplog.clear()
        with caplog.at_level("WARNING", logger=tuning.log.name):
            assert tuning._tune_group("down", [mod], torch.device("cpu")) == "third"
        assert "the pinned second left out" in caplog.text

    class NoCompile(Mod):
        def __call__(self, x):
            if self.kernel.name == "second":
                raise RuntimeError("out of resources")  # (Triton's own errors aren't RuntimeErrors either)
            return super().__call__(x)

    mod = NoCompile({"first": y, "second": y, "third": y.clone()})
    assert tuning._tune_group("down", [mod], torch.device("cpu")) == "third"


# --- compiling a kind's candidates side by side (compile_side_by_side) ----------------------
# (on the GPU only: the tests below let the CPU pass, with the kernels replaced by recorders)


@pytest.fixture
def side_by_side(monkeypatch):
    monkeypatch.setattr(tuning, "_side_by_side_here", lambda device: True)


def test_nothing_compiles_side_by_side_on_the_cpu_or_under_the_interpreter(model, monkeypatch):
    """Triton's interpreter is not thread-safe (one global program id): never on its threads."""
    import hearth_kernels._compat

    monkeypatch.setenv(tuning.THREADS_ENV, "3")
    mod = tuning._kinds(model)["gate_up"][0]
    x = torch.randn(1, mod.in_features)
    assert tuning.compile_side_by_side(mod, mod.kernel_candidates(), x, None, torch.device("cpu")) == 0
    assert not tuning._side_by_side_here(torch.device("cpu"))
    monkeypatch.setattr(hearth_kernels._compat, "interpreting", lambda: True)
    assert not tuning._side_by_side_here(torch.device("cuda"))
    monkeypatch.setattr(hearth_kernels._compat, "interpreting", lambda: False)
    assert tuning._side_by_side_here(torch.device("cuda"))


def test_candidates_run_once_each_on_the_pool_and_the_modules_keep_their_kernel(model, monkeypatch,
                                                                                 side_by_side):
    """Every candidate of a float kind runs once, on the pool's threads (not the caller's) in
    inference mode, its product thrown away; the module's own kernel is untouched (nothing is
    put in use)."""
    import threading

    import hearth_kernels.gemv

    ran = []
    monkeypatch.setattr(hearth_kernels.gemv, "gemv", lambda *a, config=None, **k: ran.append(
        (config, threading.current_thread().name)) or ran_inference.append(torch.is_inference_mode_enabled()))
    ran_inference = []
    monkeypatch.setenv(tuning.THREADS_ENV, "3")
    mod = tuning._kinds(model)["gate_up"][0]
    kernel = mod.kernel
    cands = mod.kernel_candidates()
    x = torch.randn(1, mod.in_features)
    assert tuning.compile_side_by_side(mod, cands, x, None, torch.device("cpu")) == len(cands)
    assert sorted(c for c, _ in ran) == sorted(k.config for k in cands[1:])  # the GEMVs (cuBLAS: torch's)
    assert all(name.startswith("hearth-compile") for _, name in ran) and all(ran_inference)
    assert mod.kernel is kernel


def test_one_thread_compiles_nothing_ahead_and_a_bad_value_is_one(model, monkeypatch, caplog):
    mod = tuning._kinds(model)["o"][0]
    x = torch.randn(1, mod.in_features)
    monkeypatch.setenv(tuning.THREADS_ENV, "1")
    assert tuning.compile_side_by_side(mod, mod.kernel_candidates(), x, None, torch.device("cpu")) == 0
    monkeypatch.setenv(tuning.THREADS_ENV, "many")
    assert tuning.compile_threads() == 1 and "not a number of threads" in caplog.text
    monkeypatch.delenv(tuning.THREADS_ENV)
    assert 1 <= tuning.compile_threads() <= 8


def test_a_candidate_that_fails_ahead_is_left_for_the_timing(model, monkeypatch, side_by_side):
    """One that raises while compiling ahead doesn't stop the others, nor the tuning: the
    timing meets it again and skips it (as a config this GPU can't compile)."""
    import hearth_kernels.gemv

    bad = tuning._kinds(model)["qkv"][0].kernel_candidates()[2].config

    def gemv(*a, config=None, **k):
        if config == bad:
            raise RuntimeError("out of resources")
    monkeypatch.setattr(hearth_kernels.gemv, "gemv", gemv)
    monkeypatch.setenv(tuning.THREADS_ENV, "2")
    mod = tuning._kinds(model)["qkv"][0]
    cands = mod.kernel_candidates()
    assert tuning.compile_side_by_side(mod, cands, torch.randn(1, mod.in_features), None,
                                       torch.device("cpu")) == len(cands) - 1
    monkeypatch.setattr(tuning, "_time", lambda fn, count, graphed=True, reps=3: (fn(0), 1.0)[1])
    choices = tuning.tune_gemv(model, torch.device("cpu"))
    assert "qkv" in choices


def test_quantized_candidates_are_bound_first_and_run_with_their_norm(monkeypatch, side_by_side):
    """A quantized kind: each candidate bound to the module in the calling thread (an int4
    bind repacks the module's codes once), then run on the pool, through ``normed`` where its
    kernel takes the norm in; the module's kernel is untouched."""
    import threading

    import hearth_kernels.quant_gemv as qg
    from engine.layers.quant_kernels import TritonQuant

    eng = Engine.load("shape:tiny", device="cpu", quantization="int4", quant_group_size=32, num_blocks=8,
                      max_model_len=64)
    try:
        layer = eng.runner.model.model.layers[0]
        mod, norm = layer.self_attn.qkv_proj, layer.input_layernorm
        configs = [c for c in qg.quant_gemv_configs(mod.out_features, mod.in_features, 4, 32)
                   if c.kind in (qg.DP4A, qg.DP4A_TMA)][:4]
        # a norm-first twin is the same GEMV: not run twice
        cands = [TritonQuant(c) for c in configs] + [TritonQuant(configs[0], norm_first=True)]
        bound_on, bind = [], TritonQuant.bind
        monkeypatch.setattr(TritonQuant, "bind", lambda self, layer: bound_on.append(
            threading.current_thread().name) or bind(self, layer))
        ran, normed = [], []
        monkeypatch.setattr(qg, "quant_gemv", lambda x, p, config=None, **k: ran.append(
            (config, threading.current_thread().name)))
        monkeypatch.setattr(qg, "quant_gemv_normed", lambda x, p, w, eps, config=None, **k: normed.append(config))
        monkeypatch.setattr(TritonQuant, "fuses_norm", lambda self, layer, n: n is norm)
        monkeypatch.setenv(tuning.THREADS_ENV, "4")
        kernel = mod.kernel
        x = torch.randn(1, mod.in_features)
        assert tuning.compile_side_by_side(mod, cands, x, norm, torch.device("cpu")) == len(configs)
        assert bound_on == [threading.current_thread().name] * len(configs)
        assert sorted(map(tuple, (c for c, _ in ran))) == sorted(map(tuple, configs))
        assert all(name.startswith("hearth-compile") for _, name in ran)
        assert sorted(map(tuple, normed)) == sorted(map(tuple, configs))
        assert mod.kernel is kernel
    finally:
        eng.shutdown()
