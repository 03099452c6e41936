"""A GGUF file's one-time conversion can be cancelled while it reads the file's tensors (a
Cancel in the load dialog waited for the whole conversion), says how far it is, and leaves
nothing half-written behind."""

from __future__ import annotations

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
    stop = stop_after(60)
    out = tmp_path / "converted"
    with pytest.raises(LoadCancelledError, match="conversion was stopped"):
        gguf_mod.convert_gguf(default_gguf_path(), out, progress=said.append, keep_quantized=True, should_stop=stop)
    assert stop.asked[0] == 60  # asked tensor by tensor, stopped at once
    steps = [m for m in said if m.startswith("Converting ") and m.endswith(" tensors")]
    assert steps and steps[-1].endswith(f"{len(steps) - 1}/272 tensors"), said[-3:]  # (tensors done so far)
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
