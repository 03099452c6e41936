"""The load dialog on machines with and without a CUDA GPU, and the Model field's name."""

from __future__ import annotations

from app.gui.load_dialog import LoadDialog
from engine.api import Choice

SNAPSHOT = "/home/u/.cache/huggingface/hub/models--acme--tiny-chat/snapshots/f374231cc2e0a1b2c3d4e5f60718293a4b5c6d7e"


def _choices(gpu: bool) -> dict:
    """A choices table as ``engine.api.list_choices`` gives it, on a machine with or without a GPU."""
    gpus = ([Choice("device", "cuda:0", "cuda:0 — NVIDIA H100")] if gpu else
            [Choice("device", "cuda", "cuda", reasons=("torch sees no CUDA GPU here",))])
    return {"device": (Choice("device", "auto", "Automatic"), *gpus, Choice("device", "cpu", "CPU")),
            "attention": (Choice("attention", "torch", "torch"),
                          Choice("attention", "triton", "triton", reasons=() if gpu else ("needs a CUDA GPU",))),
            "quantization": (Choice("quantization", "none", "none"),),
            "dtype": (Choice("dtype", "auto", "auto"), Choice("dtype", "float32", "float32")),
            "kv_cache_dtype": (Choice("kv_cache_dtype", "auto", "auto"),)}


def _dialog(qtbot, gui_env, ref, gpu):
    dlg = LoadDialog(ref, gui_env["settings"], choices=_choices(gpu))
    qtbot.addWidget(dlg)
    return dlg


def test_cuda_graphs_switch_is_off_without_a_gpu_and_says_why(qtbot, gui_env):
    dlg = _dialog(qtbot, gui_env, "acme/tiny-chat", gpu=False)
    assert not dlg.eager.isEnabled()
    assert "no CUDA GPU" in dlg.eager.toolTip()
    # Every device choice on this machine is the CPU in the end: it stays off.
    dlg.device.setCurrentIndex(dlg.device.findData("cpu"))
    assert not dlg.eager.isEnabled()


def test_cuda_graphs_switch_follows_the_device_on_a_gpu_machine(qtbot, gui_env):
    dlg = _dialog(qtbot, gui_env, "acme/tiny-chat", gpu=True)
    assert dlg.device.currentData() == "auto" and dlg.eager.isEnabled()
    assert "CUDA graphs replay" in dlg.eager.toolTip()
    dlg.device.setCurrentIndex(dlg.device.findData("cpu"))
    assert not dlg.eager.isEnabled() and "CPU device never uses CUDA graphs" in dlg.eager.toolTip()
    dlg.device.setCurrentIndex(dlg.device.findData("cuda:0"))
    assert dlg.eager.isEnabled()


def test_model_field_shows_the_repo_id_and_loads_the_exact_path(qtbot, gui_env):
    dlg = _dialog(qtbot, gui_env, SNAPSHOT, gpu=False)
    assert dlg.model.text() == "acme/tiny-chat" and dlg.model.toolTip() == SNAPSHOT
    assert dlg.options()["model"] == SNAPSHOT
    dlg._accept()
    assert gui_env["settings"].value("load/model") == SNAPSHOT
    # A name typed over it is what loads.
    dlg.model.setText("acme/other-model")
    assert dlg.options()["model"] == "acme/other-model"
    gguf = _dialog(qtbot, gui_env, "/models/Llama-3.2-1B.Q4_K_M.gguf", gpu=False)
    assert gguf.model.text() == "Llama-3.2-1B.Q4_K_M.gguf"
    assert gguf.options()["model"] == "/models/Llama-3.2-1B.Q4_K_M.gguf"


def test_the_dialog_offers_exactly_the_engines_registry(qtbot, gui_env, monkeypatch):
    """Every list is the engine's registry of choices as this machine sees it: a choice
    the engine registers appears (greyed out with its reason where it can't run), and
    accepting builds the engine's own validated config."""
    from engine import choices
    from engine.api import CHOICE_KINDS, list_choices

    for kind in CHOICE_KINDS:
        monkeypatch.setitem(choices._REGISTRY, kind, dict(choices._REGISTRY[kind]))
    choices.register(choices.Choice("quantization", "test-q", "test q", bytes_per_param=1,
                                    check=lambda _device: ["a test choice"]))
    dlg = LoadDialog("acme/tiny-chat", gui_env["settings"])
    qtbot.addWidget(dlg)
    combos = {"device": dlg.device, "dtype": dlg.dtype, "attention": dlg.attention,
              "kv_cache_dtype": dlg.kv_dtype, "quantization": dlg.quantization}
    for kind, combo in combos.items():
        listed = list_choices(kind, "auto")
        assert [combo.itemData(i) for i in range(combo.count())] == [c.name for c in listed], kind
        for i, c in enumerate(listed):
            assert combo.model().item(i).isEnabled() == c.available, (kind, c.name)
    item = dlg.quantization.model().item(dlg.quantization.findData("test-q"))
    assert item.toolTip() == "a test choice" and "test-q: a test choice" in dlg.reasons.text()
    dlg.dtype.setCurrentIndex(dlg.dtype.findData("float32"))
    config = dlg.config()
    assert (config.model.model, config.model.dtype, config.attention) == ("acme/tiny-chat", "float32", "auto")
