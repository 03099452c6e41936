"""Engine.perplexity: the sliding-window perplexity equals transformers' own on the same
weights, on the native runner and the transformers fallback; bad input is refused."""

from __future__ import annotations

import math

import pytest
import torch

from engine.api import Engine, EngineDeadError, InvalidRequestError, OutOfMemoryError, Request, SamplingParams
from engine.evaluate import window_plan
from resources.texts import evaluation_text_path
from tests.conftest import engine_device

WINDOW, STRIDE = 64, 24


def text_sample() -> str:
    return evaluation_text_path().read_text(encoding="utf-8")[:1500]  # ~350 tokens


def load(path, **kw) -> Engine:
    # Chunks of 40 tokens: a 64-token window runs as two forward passes, the second on
    # the first's cached K/V (the engine's chunked-prefill path).
    return Engine.load(str(path), device=engine_device(), dtype="float32", num_blocks=64, max_model_len=128,
                       max_num_batched_tokens=40, **kw)


def transformers_perplexity(folder, text: str, window: int, stride: int) -> tuple[float, int]:
    """The strided perplexity of Hugging Face's guide, with transformers' model and its own
    loss (labels -100 outside each window's new tokens); returns (perplexity, tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(str(folder))(text).input_ids])
    n = ids.shape[1]
    nll_sum, count, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        window_ids = ids[:, begin:end]
        labels = window_ids.clone()
        labels[:, :-(end - prev_end)] = -100
        with torch.no_grad():
            loss = model(window_ids, labels=labels).loss
        scored = int((labels[:, 1:] != -100).sum())  # the loss shifts labels by one
        nll_sum += float(loss) * scored
        count += scored
        prev_end = end
        if end == n:
            break
    return math.exp(nll_sum / count), n


@pytest.fixture(scope="module")
def reference(tiny_models):
    return transformers_perplexity(tiny_models["llama-tied"], text_sample(), WINDOW, STRIDE)


@pytest.mark.parametrize("fallback", [False, True], ids=["native", "fallback"])
def test_perplexity_equals_transformers(tiny_models, reference, fallback):
    expected, tokens = reference
    eng = load(tiny_models["llama-tied"], force_fallback=fallback)
    try:
        assert type(eng.runner).__name__ == ("HFRunner" if fallback else "ModelRunner")
        res = eng.perplexity(text_sample(), window=WINDOW, stride=STRIDE)
    finally:
        eng.shutdown()
    assert res.tokens == tokens and res.scored == tokens - 1
    assert (res.window, res.stride) == (WINDOW, STRIDE)
    assert res.windows == len(window_plan(tokens, WINDOW, STRIDE)) > 3
    assert res.perplexity == pytest.approx(expected, rel=1e-4)
    assert res.nll == pytest.approx(math.log(expected), rel=1e-4)
    # A random-weight model over a 49k vocabulary: near-uniform, so perplexity in the tens of thousands.
    assert res.perplexity > 1000


def test_window_plan_scores_every_token_once_with_context():
    for n, window, stride in [(2, 64, 24), (100, 64, 24), (64, 64, 24), (65, 64, 24), (300, 50, 50),
                              (97, 10, 1)]:
        plan = window_plan(n, window, stride)
        scored = [t for _, end, first in plan for t in range(first, end)]
        if stride < window:
            assert scored == list(range(1, n))
        assert len(scored) == len(set(scored))
        for i, (begin, end, first) in enumerate(plan):
            assert end - begin <= window and begin < first <= end
            if i:  # after the first window, each scored token sees window - stride tokens before it
                assert first - begin >= min(window - stride, first)


@pytest.fixture(scope="module")
def engine(tiny_models):
    eng = load(tiny_models["llama-tied"])
    yield eng
    eng.shutdown()


def test_token_ids_and_text_agree_and_blocks_come_back(engine):
    ids = engine.tokenizer.encode(text_sample())[:150]
    free = engine.block_manager.num_free_blocks
    by_ids = engine.perplexity(ids, window=WINDOW, stride=STRIDE)
    assert engine.block_manager.num_free_blocks == free
    assert by_ids.tokens == 150
    # stride == window: no overlap, each window's first token unscored
    flat = engine.perplexity(ids, window=50, stride=50)
    assert flat.windows == 3 and flat.scored == 150 - 3


def test_ctrl_c_gives_the_perplexity_of_what_was_scored(engine, monkeypatch):
    """Ctrl-C in the middle of a long text: the windows scored so far are a perplexity of the
    text's beginning (the same number as scoring just that beginning), not lost."""
    from engine.api import PerplexityInterrupted

    ids = engine.tokenizer.encode(text_sample())[:200]
    plan = window_plan(len(ids), WINDOW, STRIDE)
    calls = []

    def progress(done, total):
        calls.append(done)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(PerplexityInterrupted) as err:
        engine.perplexity(ids, window=WINDOW, stride=STRIDE, progress=progress)
    partial = err.value.partial
    assert isinstance(err.value, KeyboardInterrupt) and partial.windows == 3 and partial.scored == calls[-1]
    head = engine.perplexity(ids[:plan[2][1]], window=WINDOW, stride=STRIDE)
    assert (head.windows, head.scored) == (3, partial.scored) and partial.tokens == 200
    assert partial.nll == pytest.approx(head.nll, rel=1e-12)

    def waited(fn):
        raise KeyboardInterrupt  # (Ctrl-C during the first window)

    monkeypatch.setattr(engine, "run_on_engine_thread", waited)
    with pytest.raises(PerplexityInterrupted) as err:  # before a window ended: nothing scored to say
        engine.perplexity(ids, window=WINDOW, stride=STRIDE)
    assert err.value.partial is None
    monkeypatch.undo()
    free = engine.block_manager.num_free_blocks
    engine.perplexity(ids[:WINDOW], window=WINDOW, stride=STRIDE)  # and the engine serves on
    assert engine.block_manager.num_free_blocks == free


def test_serving_is_unchanged_around_a_perplexity(engine):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompt = engine.tokenizer.encode("Alice was beginning to get very tired")
    before = engine.submit(Request(prompt_token_ids=prompt, params=params)).result().token_ids
    engine.perplexity(text_sample(), window=WINDOW, stride=STRIDE)
    after = engine.submit(Request(prompt_token_ids=prompt, params=params)).result().token_ids
    assert before == after


@pytest.mark.parametrize("text, kw, words", [
    ("", {}, "0 tokens long"),
    ("Hi", {}, "1 token long"),
    (list(range(10)), {"window": 1}, "at least 2"),
    (list(range(10)), {"window": 129}, "--max-model-len"),
    (list(range(10)), {"window": 32, "stride": 33}, "between 1 and the window"),
    ([5, 49152], {}, "outside the model's vocabulary"),
])
def test_bad_input_is_refused(engine, text, kw, words):
    if text == "Hi":
        assert len(engine.tokenizer.encode("Hi")) == 1
    with pytest.raises(InvalidRequestError, match=words):
        engine.perplexity(text, **kw)


def test_out_of_memory_is_worded_and_the_blocks_come_back(engine, monkeypatch):
    def no_memory(*args, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    free = engine.block_manager.num_free_blocks
    monkeypatch.setattr(engine.runner, "score", no_memory)
    with pytest.raises(OutOfMemoryError, match="smaller window"):
        engine.perplexity(list(range(100)), window=WINDOW, stride=STRIDE)
    assert engine.block_manager.num_free_blocks == free


def test_after_shutdown(tiny_models):
    eng = load(tiny_models["llama-tied"])
    eng.shutdown()
    with pytest.raises(EngineDeadError):
        eng.perplexity(list(range(10)))
