"""GUI test fixtures: offscreen Qt, a private data folder and settings file, the bridge."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def qt_binding_guard(qapp):
    """As in the app: a Qt binding that drops references to None/True can't abort the run."""
    from app.gui import binding_guard

    binding_guard.install()


@pytest.fixture(autouse=True)
def no_modal_questions(monkeypatch):
    """A modal message box in a test would wait forever offscreen: fail at once instead
    (a test that expects one replaces it with its own answer)."""
    from PySide6.QtWidgets import QMessageBox

    def refuse(*args, **kwargs):
        raise AssertionError(f"a test opened a modal QMessageBox: {args[1:3]!r}")
    for name in ("question", "warning", "information", "critical"):
        monkeypatch.setattr(QMessageBox, name, refuse)


@pytest.fixture(autouse=True)
def gui_thread_gc(qapp):
    """As in the app: cyclic GC only on the GUI thread (never in the bridge's worker,
    where collecting a test's leftover widgets would crash Qt)."""
    import gc

    from app.gui.gc_guard import GuiThreadGC

    guard = GuiThreadGC(qapp, interval_ms=100)
    yield guard
    gc.collect()  # this test's garbage goes now, on this thread
    guard.stop()


@pytest.fixture
def gui_env(tmp_path, monkeypatch):
    """HEARTH_DATA_DIR and a QSettings ini file of this test's own (never the user's)."""
    from PySide6.QtCore import QSettings

    data = tmp_path / "data"
    monkeypatch.setenv("HEARTH_DATA_DIR", str(data))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Never touch the developer's real OS keyring from a test.
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    return {"data": data, "settings": settings, "tmp": tmp_path}


@pytest.fixture
def chat_model(tiny_models):
    """A tiny random-weight Llama with SmolLM2's tokenizer and chat template."""
    return str(tiny_models["llama-tied"])


@pytest.fixture
def bridge(qtbot):
    from app.gui.bridge import EngineBridge

    b = EngineBridge()
    yield b
    b.shutdown()


def load_options(model: str, **over) -> dict:
    opts = {"model": model, "device": "cpu", "attention": "torch", "dtype": "float32",
            "max_model_len": 256, "kv_cache_memory": "16MiB", "quantization": "none"}
    opts.update(over)
    return opts
