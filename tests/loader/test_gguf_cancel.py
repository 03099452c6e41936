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
    # The reader is transformers' own again: a conversion without a stop runs to its end.
    import transformers.modeling_gguf_pytorch_utils as reader

    assert not isinstance(reader.tqdm, gguf_mod._TensorSteps)


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
