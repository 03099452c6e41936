"""The load dialog on machines with and without a CUDA GPU, and the Model field's name."""

from __future__ import annotations

from app.gui.load_dialog import LoadDialog, save_load_options
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


H200 = {"index": 0, "name": "NVIDIA H200", "free_bytes": 120 * 2**30, "total_bytes": 140 * 2**30}


def _dialog(qtbot, gui_env, ref, gpu):
    dlg = LoadDialog(ref, gui_env["settings"], choices=_choices(gpu), gpus=[H200] if gpu else [])
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
    assert dlg.result() == LoadDialog.DialogCode.Accepted
    assert gui_env["settings"].value("load/model") != SNAPSHOT  # saved by the window once it has loaded
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


def test_int4_group_size_and_head_options_follow_the_method_and_are_saved(qtbot, gui_env):
    from app.gui.load_dialog import saved_load_options
    from engine.api import list_choices

    choices = {**_choices(gpu=False), "quantization": tuple(list_choices("quantization", "cpu"))}
    dlg = LoadDialog("acme/tiny-chat", gui_env["settings"], choices=choices)
    qtbot.addWidget(dlg)
    assert dlg.quantization.currentData() == "auto"  # a GGUF's own weights, else none
    assert not dlg.group_size.isEnabled() and not dlg.quant_head.isEnabled()
    # a disabled option says why in its tooltip, after what it does
    tip = dlg.group_size.toolTip()
    assert tip.startswith("int4, AWQ and GPTQ: how many weights") and "Off: only int4, AWQ and GPTQ" in tip
    assert "Off: type a device list above" in dlg.split_mode.toolTip()
    assert "Off: only int8 and int4" in dlg.quant_head.toolTip()
    assert dlg.options()["quant_group_size"] is None and dlg.options()["quant_head"] is False
    dlg.quantization.setCurrentIndex(dlg.quantization.findData("int4"))
    assert dlg.group_size.isEnabled() and dlg.quant_head.isEnabled()
    assert "Off:" not in dlg.group_size.toolTip() and dlg.group_size.toolTip().startswith("int4, AWQ")
    dlg.group_size.setCurrentIndex(dlg.group_size.findData(64))
    dlg.quant_head.setChecked(True)
    opts = dlg.options()
    assert (opts["quantization"], opts["quant_group_size"], opts["quant_head"]) == ("int4", 64, True)
    assert dlg.config().model.quant_group_size == 64
    dlg._accept()
    save_load_options(gui_env["settings"], dlg.options())  # as the window does once it loaded
    saved = saved_load_options(gui_env["settings"], choices)
    assert (saved["quantization"], saved["quant_group_size"], saved["quant_head"]) == ("int4", 64, True)
    # AWQ and GPTQ calibrate int4 in groups too (the command line's --group-size)
    for method in ("awq", "gptq"):
        dlg.quantization.setCurrentIndex(dlg.quantization.findData(method))
        assert dlg.group_size.isEnabled() and dlg.options()["quant_group_size"] == 64
        assert not dlg.quant_head.isEnabled()
    # int8 has no groups: the field is off and sends nothing
    dlg.quantization.setCurrentIndex(dlg.quantization.findData("int8"))
    assert not dlg.group_size.isEnabled() and dlg.options()["quant_group_size"] is None
    # keeping an untied head float is the other choice: ticking one clears the other, and it saves
    assert dlg.float_head.isEnabled() and not dlg.float_head.isChecked()
    dlg.float_head.setChecked(True)
    assert not dlg.quant_head.isChecked()
    assert (dlg.options()["float_head"], dlg.options()["quant_head"]) == (True, False)
    dlg.config()  # a valid load configuration (both together are refused)
    dlg._accept()
    save_load_options(gui_env["settings"], dlg.options())  # as the window does once it loaded
    saved = saved_load_options(gui_env["settings"], choices)
    assert (saved["float_head"], saved["quant_head"]) == (True, False)
    dlg.quant_head.setChecked(True)
    assert not dlg.float_head.isChecked()


def test_an_old_saved_none_does_not_pin_the_default_gguf_to_floats(qtbot, gui_env):
    from app.gui.load_dialog import saved_load_options
    from engine.api import list_choices

    gui_env["settings"].setValue("load/quantization", "none")  # what every earlier release saved
    choices = {**_choices(gpu=False), "quantization": tuple(list_choices("quantization", "cpu"))}
    assert saved_load_options(gui_env["settings"], choices)["quantization"] == "auto"


def test_the_device_picker_lists_the_gpus_and_takes_a_layer_split(qtbot, gui_env):
    from app.gui.load_dialog import saved_load_options

    dlg = _dialog(qtbot, gui_env, "acme/tiny-chat", gpu=True)
    assert dlg.gpu_list.text() == "cuda:0 — NVIDIA H200: 120.0 GiB free of 140.0 GiB"
    assert dlg.device.isEnabled() and not dlg.split_ratio.isEnabled()
    assert "devices" not in dlg.options()  # one device: no split
    dlg.devices.setText("cuda:0,cpu")
    assert not dlg.device.isEnabled() and dlg.split_ratio.isEnabled()
    dlg.split_ratio.setText("0.7,0.3")
    opts = dlg.options()
    assert (opts["device"], opts["devices"], opts["split_ratio"]) == ("auto", "cuda:0,cpu", "0.7,0.3")
    assert dlg.config().model.split_ratio == (0.7, 0.3)
    dlg.split_ratio.setText("1,2,3")
    dlg._accept()  # the engine's own message, in the dialog
    assert "3 shares for 2 devices" in dlg.error.text()
    dlg.split_ratio.setText("")
    dlg._accept()
    save_load_options(gui_env["settings"], dlg.options())  # as the window does once it loaded
    assert saved_load_options(gui_env["settings"], _choices(True))["devices"] == "cuda:0,cpu"
    # The saved split names a GPU this machine doesn't have: the start-up load leaves it out.
    assert "devices" not in saved_load_options(gui_env["settings"], _choices(False))
    assert "No CUDA GPU here" in _dialog(qtbot, gui_env, "acme/tiny-chat", gpu=False).gpu_list.text()


def test_the_split_mode_picks_tensor_parallel_and_is_saved(qtbot, gui_env):
    from app.gui.load_dialog import saved_load_options

    dlg = _dialog(qtbot, gui_env, "acme/tiny-chat", gpu=True)
    assert not dlg.split_mode.isEnabled()  # one device: nothing to split
    dlg.devices.setText("cpu,cpu")
    assert dlg.split_mode.isEnabled() and dlg.split_mode.currentData() == "layer"
    dlg.split_ratio.setText("1,3")
    dlg.split_mode.setCurrentIndex(dlg.split_mode.findData("tensor"))
    assert not dlg.split_ratio.isEnabled()  # tensor parallel splits every layer evenly
    opts = dlg.options()
    assert (opts["devices"], opts["split"], opts["split_ratio"]) == ("cpu,cpu", "tensor", None)
    assert dlg.config().model.split == "tensor"
    dlg._accept()
    save_load_options(gui_env["settings"], dlg.options())  # as the window does once it loaded
    saved = saved_load_options(gui_env["settings"], _choices(True))
    assert (saved["devices"], saved["split"], saved["split_ratio"]) == ("cpu,cpu", "tensor", None)


def test_the_per_device_estimate_sizes_the_chosen_split(qtbot, gui_env):
    from engine.api import DeviceShare, ModelCheck

    asked = []

    def check(model, **opts):
        asked.append((model, opts["devices"], opts["split"]))
        gib = 2**30
        return ModelCheck("tiny", "cuda:0,cpu", 30 * gib, 2 * gib, 150 * gib, False, (
            DeviceShare("cuda:0", "layers 0-29, embedding, LM head", 28 * gib, 2 * gib, 120 * gib),
            DeviceShare("cpu", "layers 30-31", 2 * gib, gib // 8, 2 * gib)))

    dlg = LoadDialog("acme/tiny-chat", gui_env["settings"], choices=_choices(True), gpus=[H200], model_check=check)
    qtbot.addWidget(dlg)
    assert not dlg.split_fit.isEnabled()  # one device: nothing to estimate
    dlg.devices.setText("cuda:0,cpu")
    assert dlg.split_fit.isEnabled()
    dlg.estimate_split().join(10)
    qtbot.waitUntil(lambda: "cpu (" in dlg.split_fit_result.text(), timeout=5000)
    lines = dlg.split_fit_result.text().splitlines()
    assert lines == ["cuda:0 (layers 0-29, embedding, LM head): fits, 30.0 GiB of 120.0 GiB free",
                     "cpu (layers 30-31): won't fit, 2.1 GiB of 2.0 GiB free"]
    assert "cuda:0: weights 28.0 GiB, KV cache 2.0 GiB" in dlg.split_fit_result.toolTip()
    assert asked == [("acme/tiny-chat", "cuda:0,cpu", "layer")]
    dlg.split_ratio.setText("1,2,3")  # a bad option is said at once, without sizing anything
    assert dlg.estimate_split() is None and "3 shares for 2 devices" in dlg.split_fit_result.text()


def test_a_choice_with_a_caveat_here_is_marked_slow_and_says_why(qtbot, gui_env):
    """A choice that runs here with a caveat: offered, marked "(slow here)", its tooltip why.
    (The fp8 KV cache on the CPU was one until the C decode step read it: now it is plain.)"""
    import dataclasses

    from engine.api import list_choices

    kv = tuple(list_choices("kv_cache_dtype", "cpu"))
    dlg = LoadDialog("acme/tiny-chat", gui_env["settings"], choices={**_choices(gpu=False), "kv_cache_dtype": kv})
    qtbot.addWidget(dlg)
    i = dlg.kv_dtype.findData("fp8")
    assert not dlg.kv_dtype.itemText(i).endswith(")") and dlg.kv_dtype.model().item(i).toolTip() == ""
    cautious = tuple(dataclasses.replace(c, caveats=("decoding is slower here",)) if c.name == "fp8" else c for c in kv)
    dlg = LoadDialog("acme/tiny-chat", gui_env["settings"], choices={**_choices(gpu=False), "kv_cache_dtype": cautious})
    qtbot.addWidget(dlg)
    i = dlg.kv_dtype.findData("fp8")
    item = dlg.kv_dtype.model().item(i)
    assert item.isEnabled() and dlg.kv_dtype.itemText(i).endswith("(slow here)")
    assert item.toolTip() == "decoding is slower here"
    auto = dlg.kv_dtype.findData("auto")
    assert not dlg.kv_dtype.itemText(auto).endswith(")") and dlg.kv_dtype.model().item(auto).toolTip() == ""


def test_a_context_too_short_for_a_chat_is_refused_with_the_field_named(qtbot, gui_env):
    from app.gui.load_dialog import MIN_CHAT_CONTEXT

    dlg = _dialog(qtbot, gui_env, "acme/tiny-chat", gpu=False)
    dlg.context.setValue(20)
    dlg._accept()
    assert dlg.result() != LoadDialog.DialogCode.Accepted
    assert dlg.error.text().startswith("Context length: 20 tokens can't hold a chat")
    assert str(MIN_CHAT_CONTEXT) in dlg.error.text()
    dlg.context.setValue(MIN_CHAT_CONTEXT)
    dlg._accept()
    assert dlg.result() == LoadDialog.DialogCode.Accepted
    assert dlg.options()["max_model_len"] == MIN_CHAT_CONTEXT


def test_the_reasons_keep_every_line_in_a_narrowed_dialog(qtbot, gui_env):
    """Made as narrow as it goes, the dialog grows taller: no reason loses its last lines."""
    long = "a reason long enough to wrap over several lines of the form's field column " * 3
    choices = {**_choices(gpu=False),
               "quantization": (Choice("quantization", "none", "none"),
                                Choice("quantization", "q1", "q1", reasons=(long + "one",)),
                                Choice("quantization", "q2", "q2", reasons=(long + "two",)))}
    dlg = LoadDialog("acme/tiny-chat", gui_env["settings"], choices=choices, gpus=[])
    qtbot.addWidget(dlg)
    dlg.show()
    qtbot.waitExposed(dlg)
    dlg.resize(dlg.minimumWidth(), dlg.height())
    qtbot.waitUntil(lambda: dlg.width() == dlg.minimumWidth())
    label = dlg.reasons
    qtbot.waitUntil(lambda: label.height() >= label.heightForWidth(label.width()))
