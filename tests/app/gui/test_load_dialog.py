"""The load dialog on machines with and without a CUDA GPU, and the Model field's name."""

from __future__ import annotations

from app.gui.load_dialog import LoadDialog

SNAPSHOT = "/home/u/.cache/huggingface/hub/models--acme--tiny-chat/snapshots/f374231cc2e0a1b2c3d4e5f60718293a4b5c6d7e"


def _choices(gpu: bool) -> dict:
    devices = [{"id": "auto", "label": "Automatic"}]
    if gpu:
        devices.append({"id": "cuda:0", "label": "cuda:0 — NVIDIA H100"})
    devices.append({"id": "cpu", "label": "CPU"})
    return {"devices": devices, "attention": {"torch": [], "triton": [] if gpu else ["needs a CUDA GPU"]},
            "quantization": {"none": []}, "dtypes": ["auto", "float32"], "kv_cache_dtypes": {"auto": []}}


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
