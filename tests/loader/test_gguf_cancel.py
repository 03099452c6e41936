"""A GGUF file's one-time conversion can be cancelled while it reads the file's tensors (a
Cancel in the load dialog waited for the whole conversion) or its config and tokenizer
(transformers parses the whole file for each, ~10 s on a slow machine, and can't be
interrupted: the reads run on a worker thread that a cancel abandons), says how far it is,
and leaves nothing half-written behind."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from engine.errors import LoadCancelledError


def stop_after(n: int):
    """A should_stop that turns true on its n-th question."""
    asked = [0]

    def should_stop() -> bool:
        asked[0] += 1
        return asked[0] >= n
    should_stop.asked = asked
    return should_stop


def test_a_conversion_stops_mid_file_and_leaves_nothing(default_model, tmp_path, monkeypatch):
    import engine.loader.gguf as gguf_mod
    from engine.loader.resolve import default_gguf_path

    monkeypatch.setattr(gguf_mod, "PROGRESS_EVERY_S", 0.0)
    said: list[str] = []
    stopped_at: list[float] = []

    def steps() -> list[str]:
        return [m for m in said if m.startswith("Converting ") and m.endswith(" tensors")]

    def should_stop() -> bool:  # true once 60 tensors were reported
        if len(steps()) >= 60 and not stopped_at:
            stopped_at.append(time.monotonic())
        return bool(stopped_at)
    out = tmp_path / "converted"
    with pytest.raises(LoadCancelledError, match="conversion was stopped"):
        gguf_mod.convert_gguf(default_gguf_path(), out, progress=said.append, keep_quantized=True,
                              should_stop=should_stop)
    assert time.monotonic() - stopped_at[0] < 1.0  # stopped at once
    done = steps()  # reported tensor by tensor (on the calling thread), up to the stop
    assert 60 <= len(done) < 272 and all(m.endswith(f" {i}/272 tensors") for i, m in enumerate(done)), done[-3:]
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no half-written folder or temporary one
    # Outside a conversion transformers' reader has its own tqdm back (for this thread too).
    import transformers.modeling_gguf_pytorch_utils as reader

    assert getattr(gguf_mod._steps, "current", None) is None
    import tqdm

    assert isinstance(reader.tqdm([1, 2], disable=True), tqdm.tqdm)


def test_conversions_on_two_threads_each_answer_their_own_stop(monkeypatch):
    """The load dialog's estimate and the load itself may convert at once: each read asks its
    own thread's should_stop and reports its own file (transformers' tqdm is one global)."""
    import threading

    import transformers.modeling_gguf_pytorch_utils as reader

    import engine.loader.gguf as gguf_mod

    monkeypatch.setattr(gguf_mod, "PROGRESS_EVERY_S", 0.0)
    inside = threading.Barrier(2)
    seen: dict[str, list[str]] = {"a": [], "b": []}
    outcome: dict[str, str] = {}

    def read(name: str, stop_at: int | None) -> None:
        asked = [0]

        def check() -> None:
            asked[0] += 1
            if stop_at is not None and asked[0] >= stop_at:
                raise LoadCancelledError("stop")
        steps = gguf_mod._TensorSteps(f"{name}.gguf", seen[name].append, check)
        try:
            with gguf_mod._reader_steps(steps):
                for i in reader.tqdm(range(6), desc="Converting and de-quantizing GGUF tensors..."):
                    if i == 1:
                        inside.wait(timeout=10)  # both threads are mid-read now
            outcome[name] = "done"
        except LoadCancelledError:
            outcome[name] = "stopped"

    threads = [threading.Thread(target=read, args=("a", 4)), threading.Thread(target=read, args=("b", None))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert outcome == {"a": "stopped", "b": "done"}
    assert all(m.startswith("Converting a.gguf") for m in seen["a"]) and len(seen["a"]) == 3
    assert all(m.startswith("Converting b.gguf") for m in seen["b"]) and len(seen["b"]) == 6
    assert isinstance(reader.tqdm, gguf_mod._StepsDispatch) and getattr(gguf_mod._steps, "current", None) is None


def test_check_model_and_load_stop_a_gguf_conversion(default_model, tmp_path):
    """The pre-flight converts a GGUF it hasn't seen (the load then reads the conversion):
    both ask should_stop while they do."""
    from engine.api import Engine, check_model
    from engine.loader.resolve import default_gguf_path

    copy = tmp_path / "copy-of-default.gguf"
    copy.symlink_to(default_gguf_path())
    for run in (lambda stop: check_model(str(copy), device="cpu", should_stop=stop),
                lambda stop: Engine.load(str(copy), device="cpu", should_stop=stop)):
        stop = stop_after(30)
        with pytest.raises(LoadCancelledError):
            run(stop)
        assert stop.asked[0] == 30


def test_a_stop_while_the_quantized_tensors_are_repacked_stops_there(default_model, tmp_path, monkeypatch):
    """Keeping a GGUF's weights quantized repacks them tensor by tensor after the read (a few
    seconds on a big file): a cancel then stops at the next tensor, not after the save."""
    import engine.loader.gguf as gguf_mod
    import engine.quant.gguf_blocks as blocks
    from engine.loader.resolve import default_gguf_path

    repacked: list[str] = []
    real = blocks.blocks_to_weight

    def counted(data, kind):
        repacked.append(kind)
        return real(data, kind)

    monkeypatch.setattr(blocks, "blocks_to_weight", counted)
    out = tmp_path / "converted"
    with pytest.raises(LoadCancelledError, match="conversion was stopped"):
        gguf_mod.convert_gguf(default_gguf_path(), out, keep_quantized=True,
                              should_stop=lambda: len(repacked) >= 5)
    assert len(repacked) == 5  # (SmolLM2's 30 layers have 210 Q4_1 projections)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def write_tiny_gguf(path):
    """A one-layer Llama GGUF of float32 tensors (hidden size 16) with an eight-token
    byte-level BPE vocabulary: converted in a blink."""
    import gguf

    vocab = ["<s>", "</s>", "a", "b", "c", "\u0120", "ab", "\u0120a"]
    hidden, ffn, heads = 16, 32, 2
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name("tiny")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(1)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([3, 3] + [1] * (len(vocab) - 2))
    w.add_token_merges(["a b", "\u0120 a"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(vocab), hidden), "blk.0.attn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (hidden // heads, hidden),
              "blk.0.attn_v.weight": (hidden // heads, hidden), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_norm.weight": (hidden,), "blk.0.ffn_gate.weight": (ffn, hidden),
              "blk.0.ffn_up.weight": (ffn, hidden), "blk.0.ffn_down.weight": (hidden, ffn),
              "output_norm.weight": (hidden,)}
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "hearth-gguf-read"]


@pytest.mark.parametrize("slow", ["config", "tokenizer"])
def test_a_stop_while_transformers_reads_the_config_or_tokenizer_returns_at_once(slow, tmp_path, monkeypatch):
    """transformers' AutoConfig / AutoTokenizer on a GGUF take ~10-15 s each on a slow machine
    (here: held for up to 5 s) and can't be interrupted: a stop returns within a second all
    the same, and the read, left to finish on its thread, writes nothing."""
    import transformers
    from transformers import LlamaConfig

    import engine.loader.gguf as gguf_mod

    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf")
    reading, release = threading.Event(), threading.Event()
    finished: list[str] = []

    def held(what, result):
        reading.set()
        release.wait(5)
        finished.append(what)
        return result

    def small_config():
        return LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=8)

    def config(*args, **kwargs):
        return held("config", small_config()) if slow == "config" else small_config()

    def tokenizer(*args, **kwargs):
        assert slow == "tokenizer", "the tokenizer is read after a stop during the config"
        return held("tokenizer", object())
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", config)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    before = set(_readers())
    cache = tmp_path / "cache"
    out = cache / "converted"
    t0 = time.monotonic()
    with pytest.raises(LoadCancelledError, match="conversion was stopped"):
        gguf_mod.convert_gguf(gguf_path, out, keep_quantized=True, should_stop=reading.is_set)
    assert time.monotonic() - t0 < 1.5  # (the read is held for 5 s)
    assert reading.is_set() and not finished  # stopped while the read was held ...
    started = [t for t in _readers() if t not in before]
    assert started, "the read runs on a worker thread"
    release.set()
    for t in started:
        t.join(10)
    assert finished == [slow]  # ... which then finished, abandoned
    assert not cache.exists() and sorted(tmp_path.iterdir()) == [gguf_path]  # and nothing was written


def test_the_config_and_tokenizer_are_parsed_once(tmp_path, monkeypatch):
    """AutoConfig and AutoTokenizer each parse the whole file (transformers' metadata parse,
    the slow part of either): a conversion parses it once for both, and gets what they give."""
    import json

    import transformers.modeling_gguf_pytorch_utils as reader
    from transformers import AutoConfig, AutoTokenizer

    import engine.loader.gguf as gguf_mod

    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf")
    with gguf_mod._parse_once(gguf_mod._ParsedOnce(gguf_path.resolve())):
        pass  # (puts the dispatch in place)
    dispatch = reader.load_gguf_checkpoint
    assert isinstance(dispatch, gguf_mod._ParseOnceDispatch)
    parses: list[dict] = []
    original = dispatch.original

    def counted(path, *args, **kwargs):
        parses.append(kwargs)
        return original(path, *args, **kwargs)
    monkeypatch.setattr(dispatch, "original", counted)

    out = gguf_mod.convert_gguf(gguf_path, tmp_path / "once", keep_quantized=True)
    # one for the config and the tokenizer, one for the tensors
    assert [bool(kw.get("return_tensors")) for kw in parses] == [False, True], parses
    assert getattr(gguf_mod._parsed, "current", None) is None

    # Outside a conversion every call parses, and gives what the conversion wrote.
    parses.clear()
    cfg = AutoConfig.from_pretrained(str(tmp_path), gguf_file=gguf_path.name)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=gguf_path.name)
    assert len(parses) >= 2
    saved = json.loads((out / "config.json").read_text())
    assert saved == json.loads(cfg.to_json_string())
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads(tok.backend_tokenizer.to_str())


def test_a_stop_while_the_tensor_names_are_mapped_stops_there(tmp_path):
    """Before the first tensor, transformers maps the file's tensor names by calling
    get_gguf_hf_weights_map for every submodule (each takes the module's state_dict, torch
    calls that let go of the GIL; ~4 s for SmolLM2 on a slow machine): a read stopped then
    stops at the next call, not after the map. (A Ctrl-C there left the abandoned read inside
    torch when the process exited, which aborted it: "terminate called without an active
    exception".)"""
    import torch
    import transformers.modeling_gguf_pytorch_utils as reader
    from transformers import AutoConfig, AutoModelForCausalLM

    import engine.loader.gguf as gguf_mod

    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf")
    cfg = AutoConfig.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    tensors_read: list[int] = []

    class Steps(gguf_mod._TensorSteps):
        def __call__(self, iterable, *args, **kwargs):
            tensors_read.append(1)
            yield from super().__call__(iterable)
    asked = [0]

    def check() -> None:
        asked[0] += 1
        if asked[0] >= 3:
            raise LoadCancelledError("stop")
    with gguf_mod._reader_steps(Steps("tiny.gguf", None, check)):
        with pytest.raises(LoadCancelledError):
            reader.load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    assert asked[0] == 3 and tensors_read == []  # stopped while mapping the names
    # other threads (no conversion of theirs) map as before
    assert reader.get_gguf_hf_weights_map(model, reader.TensorProcessor())
