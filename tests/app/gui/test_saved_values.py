"""A settings file with something else than numbers where numbers go (edited by hand, cut
short by a crash): the window's parts read the defaults instead of failing to start."""

from __future__ import annotations

from app.gui.chat_list import ChatList
from app.gui.chat_widgets import ParamsPanel
from app.gui.load_dialog import LoadDialog, saved_load_options
from app.services.chat_store import ChatStore


def test_values_that_are_not_numbers_read_as_the_defaults(qtbot, gui_env):
    s = gui_env["settings"]
    for key, value in {"sampling/max_tokens": "lots", "sampling/temperature": "warm", "sampling/seed": "",
                       "load/max_model_len": "abc", "load/quant_group_size": "x",
                       "chat/last_conversation": "zzz"}.items():
        s.setValue(key, value)
    params = ParamsPanel(s)
    qtbot.addWidget(params)
    assert params.max_tokens.value() == 512 and params.temperature.value() == 0.7
    opts = saved_load_options(s)
    assert opts["max_model_len"] is None and opts["quant_group_size"] is None
    dlg = LoadDialog("acme/tiny-chat", s)
    qtbot.addWidget(dlg)
    assert dlg.options()["max_model_len"] is None
    store = ChatStore(gui_env["data"] / "chats.sqlite3")
    chats = ChatList(store, s)
    qtbot.addWidget(chats)
    assert chats.initial_conversation() is not None


def test_saved_head_flags_go_with_a_saved_method_that_cannot_run_here(gui_env):
    """fp8 saved with --float-head (a GPU machine), started where fp8 can't run: the method
    falls back to auto and the flag with it (the engine refuses --float-head with auto)."""
    s = gui_env["settings"]
    for key, value in {"load/quant": "fp8", "load/float_head": "true", "load/quant_group_size": "64"}.items():
        s.setValue(key, value)
    opts = saved_load_options(s)
    assert (opts["quantization"], opts["float_head"], opts["quant_group_size"]) == ("auto", False, None)
    s.setValue("load/quant", "int8")
    opts = saved_load_options(s)
    assert (opts["quantization"], opts["float_head"], opts["quant_group_size"]) == ("int8", True, None)
    s.setValue("load/quant", "int4")
    s.setValue("load/quant_head", "true")
    opts = saved_load_options(s)
    assert (opts["quant_head"], opts["float_head"], opts["quant_group_size"]) == (True, False, 64)
