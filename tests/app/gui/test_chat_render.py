"""How chat messages look: line breaks kept, code highlighted with a Copy per block, long
footers wrapped (no sideways scrolling), and errors worded for the GUI (dialog fields,
not CLI flags)."""

from __future__ import annotations

import re

import pytest
from PySide6.QtCore import QPoint, QRect, Qt
from PySide6.QtGui import QColor, QGuiApplication, QPalette, QTextDocument

from app.gui.chat_widgets import MessageWidget
from app.services.chat_store import ChatStore
from tests.app.gui.conftest import load_options

LOAD_TIMEOUT = 60_000
ANSWER_TIMEOUT = 60_000

HAIKU = "An old silent pond\nA frog jumps into the pond\nSplash! Silence again."
CODE = ("Two blocks:\n\n```python\ndef add(a, b):\n    return a + b  # sum\n```\n\n"
        "and\n\n```sh\necho 'hi' > out.txt\n\n\ncat out.txt\n```\n")


def shown_text(label) -> str:
    """The text a QLabel shows, as plain text (its Markdown or HTML laid out by Qt)."""
    doc = QTextDocument()
    if label.textFormat() == Qt.TextFormat.MarkdownText:
        doc.setMarkdown(label.text())
    else:
        doc.setHtml(label.text())
    return doc.toPlainText()


def _message(qtbot, text, role="assistant", **kw) -> MessageWidget:
    w = MessageWidget(1, role, text, **kw)
    qtbot.addWidget(w)
    w.resize(600, 400)
    w.show()
    return w


def _hex_colours(html: str) -> set[str]:
    return {m.lower() for m in re.findall(r"color:\s*(#[0-9a-fA-F]{6})", html)}


def _contrast(a: str, b: str) -> float:
    def lum(c: str) -> float:
        col = QColor(c)
        ch = [v / 255 for v in (col.red(), col.green(), col.blue())]
        ch = [v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4 for v in ch]
        return 0.2126 * ch[0] + 0.7152 * ch[1] + 0.0722 * ch[2]
    hi, lo = sorted((lum(a), lum(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


# -- item 4: line breaks, highlighting, Copy per code block -------------------------------
@pytest.mark.parametrize("role", ["assistant", "user"])
def test_single_line_breaks_are_kept(qtbot, role):
    w = _message(qtbot, HAIKU, role=role)
    assert shown_text(w.body) == HAIKU


def test_model_html_is_shown_as_text_not_run(qtbot):
    w = _message(qtbot, "a <b>bold</b> claim & <img src=x>")
    assert shown_text(w.body) == "a <b>bold</b> claim & <img src=x>"


@pytest.mark.parametrize("dark", [False, True])
def test_code_is_highlighted_in_colours_that_read_on_its_background(qtbot, dark):
    w = _message(qtbot, CODE)
    if dark:
        pal = QPalette(w.palette())
        pal.setColor(QPalette.ColorRole.Window, QColor("#202124"))
        pal.setColor(QPalette.ColorRole.WindowText, QColor("#e8eaed"))
        w.setPalette(pal)  # the theme changes: the message re-renders its code
    html = w.body.text()
    bg = re.search(r'bgcolor="(#[0-9a-fA-F]{6})"', html)[1]
    assert (QColor(bg).lightness() < 128) == dark
    code_html = html[html.index("<pre"):html.index("</pre>")]
    colours = _hex_colours(code_html)
    assert len(colours) >= 3  # keywords, names, operators, comments... not one plain colour
    assert all(_contrast(c, bg) >= 3.0 for c in colours), (bg, colours)


def test_each_code_block_copies_exactly_its_code(qtbot):
    w = _message(qtbot, CODE)
    assert w.code_blocks == ("def add(a, b):\n    return a + b  # sum",
                             "echo 'hi' > out.txt\n\n\ncat out.txt")
    assert shown_text(w.body).count("Copy") == 2
    # By keyboard, as a user without a mouse would: Tab reaches each block's Copy link.
    w.body.setFocus()
    qtbot.keyClick(w.body, Qt.Key.Key_Tab)
    qtbot.keyClick(w.body, Qt.Key.Key_Tab)
    with qtbot.waitSignal(w.codeCopied) as copied:
        qtbot.keyClick(w.body, Qt.Key.Key_Return)
    assert copied.args == [1, 1]
    assert QGuiApplication.clipboard().text() == w.code_blocks[1]
    # The message's own Copy still copies the whole answer, fences and all.
    qtbot.mouseClick(w.copy_button, Qt.MouseButton.LeftButton)
    assert QGuiApplication.clipboard().text() == CODE


URL = "https://example.com/" + "a" * 40 + "/" + "b" * 60 + "?q=" + "c" * 50 + "&x=1"
LONG = (f"See {URL} for it, or run `inline_code_{'x' * 80}`.\n\n| col |\n|---|\n| {'t' * 90} |\n\n"
        f"```\n{'y' * 150}\n```\n")


def _widest_line(label, width: int) -> float:
    """The widest line of ``label``'s HTML laid out as a QLabel lays it out (wrapping at word
    boundaries only) in ``width`` pixels."""
    from PySide6.QtGui import QTextOption

    doc = QTextDocument()
    doc.setDefaultFont(label.font())
    option = doc.defaultTextOption()
    option.setWrapMode(QTextOption.WrapMode.WordWrap)
    doc.setDefaultTextOption(option)
    doc.setHtml(label.text())
    doc.setTextWidth(width)
    return doc.idealWidth()


def test_a_long_url_or_code_line_wraps_instead_of_being_cut(qtbot):
    w = _message(qtbot, LONG)
    width = 320
    assert _widest_line(w.body, width) <= width
    shown = shown_text(w.body)
    assert URL in shown.replace("\u200b", "")  # all of it, in order
    assert "y" * 150 in shown.replace("\u200b", "")
    assert w.code_blocks == ("y" * 150,)  # a block's Copy: its exact text
    # Without the break points the same HTML is wider than the transcript: cut at its edge.
    w.body.setText(w.body.text().replace("\u200b", ""))
    assert _widest_line(w.body, width) > 1.5 * width


def test_copying_a_selection_leaves_the_break_points_out(qtbot):
    text = f"Open {URL} now\nsecond line\n\n```py\nx = 1\ny = 2\n```\n"
    w = _message(qtbot, text)
    assert "\u200b" in w.body.text()
    w.body.setSelection(0, len(shown_text(w.body).rstrip("\n")))
    assert "\u200b" in w.body.selectedText()
    w.body.setFocus()
    QGuiApplication.clipboard().clear()
    qtbot.keyClick(w.body, Qt.Key.Key_C, Qt.KeyboardModifier.ControlModifier)
    data = QGuiApplication.clipboard().mimeData()
    copied = data.text()
    # Qt's own copy (lines as lines, the code block's too), less the break points
    assert copied.startswith(f"Open {URL} now\nsecond line\n") and "x = 1\ny = 2" in copied, repr(copied)
    assert not set(copied) & {"\u200b", "\u2028", "\u2029", "\ufdd0", "\ufdd1"}
    assert data.hasHtml() and "\u200b" not in data.html() and URL.replace("&", "&amp;") in data.html()


def test_the_context_menus_copy_leaves_them_out_too(qtbot):
    from PySide6.QtGui import QContextMenuEvent
    from PySide6.QtWidgets import QApplication, QMenu

    w = _message(qtbot, f"Open {URL} now")
    w.body.setSelection(0, len(shown_text(w.body).rstrip("\n")))
    QGuiApplication.clipboard().clear()
    seen = []

    def pick():
        menu = QApplication.activePopupWidget()
        names = [a.text().replace("&", "") for a in menu.actions()]
        seen.extend(names)
        next(a for a, n in zip(menu.actions(), names) if n.startswith("Copy") and "Link" not in n).trigger()
        menu.close()

    point = QPoint(5, 5)
    w.body.contextMenuEvent(QContextMenuEvent(QContextMenuEvent.Reason.Mouse, point, w.body.mapToGlobal(point)))
    qtbot.waitUntil(lambda: QApplication.activePopupWidget() is not None)  # (it pops up)
    pick()
    assert seen, "the menu never opened"
    assert QGuiApplication.clipboard().text() == f"Open {URL} now"
    qtbot.waitUntil(lambda: not w.body.findChildren(QMenu))
    # menus opened and closed without copying leave the clipboard alone
    for _ in range(2):
        w.body.contextMenuEvent(QContextMenuEvent(QContextMenuEvent.Reason.Mouse, point, w.body.mapToGlobal(point)))
        qtbot.waitUntil(lambda: QApplication.activePopupWidget() is not None)
        QApplication.activePopupWidget().close()
    qtbot.waitUntil(lambda: not w.body.findChildren(QMenu))
    QGuiApplication.clipboard().setText("a\u200bb")
    assert QGuiApplication.clipboard().text() == "a\u200bb"


def test_short_runs_and_addresses_are_left_alone():
    from app.gui.chat_markdown import breakable

    link = '<a href="https://example.com/' + "z" * 50 + '">here</a> and ' + "w" * 23
    assert breakable(link) == link
    assert breakable("a&amp;" + "b" * 30).split("\u200b")[0] == "a&amp;" + "b" * 10  # one character
    # scripts written without spaces, emoji sequences and combining marks are left whole
    for text in ("สวัสดีครับผมชื่อสมชายยินดีที่ได้รู้จักครับวันนี้อากาศดีมาก", "👨\u200d👩\u200d👧" * 12,
                 "これは日本語の文章です。とても長い文章ですね。" * 2):
        assert breakable(text) == text
    accented = breakable("e\u0301" * 30)
    assert accented.replace("\u200b", "") == "e\u0301" * 30 and "\u200b\u0301" not in accented


def test_streaming_reparses_only_the_last_block(qtbot, monkeypatch):
    from app.gui import chat_markdown

    parsed = []  # the length of every text Markdown-parsed
    real = chat_markdown._markdown()

    class Counting:
        def render(self, text, env):
            parsed.append(len(text))
            return real.render(text, env)

    monkeypatch.setattr(chat_markdown, "_markdown", Counting)
    chat_markdown._render_block.cache_clear()
    w = _message(qtbot, "")
    paragraphs = [f"Paragraph {i} with `code` and *emphasis*.\nSecond line {i}." for i in range(30)]
    text = ""
    for p in paragraphs:
        for word in p.split(" "):
            text += word + " "
            w.set_text(text)  # what every 50 ms render does while the answer streams
        text += "\n\n"
    # Each render parses the growing last paragraph only, never the whole answer again.
    assert max(parsed) < 2 * max(len(p) for p in paragraphs)
    assert shown_text(w.body).count("Paragraph") == 30


# -- item 5: long footers wrap; errors name the dialog field -------------------------------
def _inside(widget, viewport) -> bool:
    top_left = widget.mapTo(viewport, QPoint(0, 0))
    return viewport.rect().contains(QRect(top_left, widget.size()))


def test_long_footers_wrap_and_keep_the_buttons_on_screen(qtbot, bridge, gui_env):
    from app.gui.chat_page import ChatPage

    store = ChatStore(gui_env["data"] / "chats.sqlite3")
    conv = store.create_conversation()
    long_error = ("the prompt has 3000 tokens but the context holds 2048: shorten the prompt or "
                  "load the model with a longer context (“Context length” in the Load model dialog).")
    store.add_message(conv.id, "user", "hello")
    store.add_message(conv.id, "assistant", "partial", status="error", meta={"error": long_error})
    store.add_message(conv.id, "assistant", "cut", meta={
        "model": "a-model-with-a-really-long-name-that-goes-on-and-on-Instruct-GGUF-Q4_K_M",
        "ttft_ms": 120.0, "decode_tok_s": 41.2, "tokens": 512, "finish": "length"})
    gui_env["settings"].setValue("chat/last_conversation", conv.id)
    page = ChatPage(bridge, store, gui_env["settings"])
    qtbot.addWidget(page)
    page.set_params_visible(False)
    page.resize(560, 600)
    page.show()
    qtbot.waitExposed(page)
    qtbot.waitUntil(lambda: page.scroll.viewport().width() > 0)
    assert page.scroll.horizontalScrollBar().maximum() == 0
    viewport = page.scroll.viewport()
    for w in page.message_widgets():
        assert _inside(w.copy_button, viewport)
        if w.role == "assistant":
            assert _inside(w.regen_button, viewport)
            assert w.footer.height() > w.footer.fontMetrics().height()  # it wrapped
    assert "max-tokens limit" in page.message_widgets()[-1].footer.text()


def test_gui_errors_name_the_load_dialog_field_not_a_flag(qtbot, bridge, gui_env, chat_model):
    from app.gui.chat_page import ChatPage

    with qtbot.waitSignal(bridge.modelLoaded, timeout=LOAD_TIMEOUT):
        bridge.load(load_options(chat_model, max_model_len=32))
    page = ChatPage(bridge, ChatStore(gui_env["data"] / "chats.sqlite3"), gui_env["settings"])
    qtbot.addWidget(page)
    page.input.setPlainText("far too long for a 32-token context " * 4)
    with qtbot.waitSignal(page.answerFinished, timeout=ANSWER_TIMEOUT) as finished:
        page.send()
    error = finished.args[1].error
    assert "“Context length” in the Load model dialog" in error and "--" not in error
    assert "“Context length”" in page.notice.text()
    assert "“Context length”" in page.message_widgets()[-1].footer.text()


def test_a_load_error_names_the_dialog_fields_and_the_cli_keeps_its_flags(qtbot, bridge, chat_model):
    from engine.api import Engine, OutOfMemoryError

    with pytest.raises(OutOfMemoryError) as raised:  # the CLI prints the engine's words
        Engine.load(chat_model, device="cpu", dtype="float32", max_model_len=256,
                    kv_cache_memory="16KiB")
    assert "--max-model-len" in str(raised.value) and "--kv-cache-memory" in str(raised.value)
    with qtbot.waitSignal(bridge.loadFailed, timeout=LOAD_TIMEOUT) as failed:
        bridge.load(load_options(chat_model, kv_cache_memory="16KiB"))
    message = failed.args[0]
    assert "“Context length” in the Load model dialog" in message
    assert "“KV-cache memory” in the Load model dialog" in message
    assert "--" not in message


def test_a_setting_without_a_dialog_field_is_left_out():
    import torch

    from app.gui.error_text import gui_error_text
    from engine.llm_engine import _describe_failure  # the wording of a failed step

    message, options = _describe_failure(torch.OutOfMemoryError("CUDA out of memory"))
    assert "--max-num-seqs" in message  # the CLI's advice
    text = gui_error_text(message, options)
    assert text == ("out of GPU memory during a step: run fewer requests at once, give the KV "
                    "cache less memory (“KV-cache memory” in the Load model dialog), or use a "
                    "smaller / quantized model.")


def test_a_context_longer_than_the_model_names_the_field(qtbot, bridge, chat_model):
    with qtbot.waitSignal(bridge.loadFailed, timeout=LOAD_TIMEOUT) as failed:
        bridge.load(load_options(chat_model, max_model_len=4096))  # the tiny model has 512
    assert failed.args[0] == ("a context of 4096 tokens is longer than the model's (512); use at "
                              "most 512 (“Context length” in the Load model dialog).")


def test_load_choice_and_kv_memory_errors_name_dialog_fields_too(monkeypatch):
    """Errors raised before or while loading (bad choices, a KV cache that does not fit)
    reach the GUI through the same wording: no flag a GUI user can't pass."""
    import re

    from app.gui.error_text import gui_error
    from engine.api import Engine, HearthError
    import engine.runner.memory as loader

    errors = []
    for kwargs in ({"attention": "no-such-backend"}, {"device": "cpu", "attention": "flash-attn"},
                   {"device": "cpu", "attention": "flash-attn", "kv_cache_dtype": "fp8"}):
        try:
            Engine.load("./no-model-needed", **kwargs)
        except HearthError as e:
            errors.append(e)
    monkeypatch.setattr(loader, "free_memory_bytes", lambda device: (3 * 2**30, 8 * 2**30))
    from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    import torch
    config = EngineConfig(model=ModelConfig(model="x"), cache=CacheConfig(kv_cache_memory=100 * 2**40),
                          scheduler=SchedulerConfig())
    try:
        loader.check_explicit_kv(config, torch.device("cpu"), block_bytes=2**20, max_model_len=2048,
                                  weights_bytes=2**30)
    except HearthError as e:
        errors.append(e)
    assert len(errors) == 4
    for e in errors:
        text = gui_error(e)
        assert not re.search(r"--(attention|dtype|device|kv-cache|max-model|model)", text), text
        assert "in the Load model dialog" in text, text
    assert "Ask for" in gui_error(errors[3]) and "KV-cache memory" in gui_error(errors[3])


def test_a_huge_paste_shows_its_start_and_keeps_all_of_it(qtbot):
    from app.gui.chat_widgets import SHOWN_CHARS

    text = "lorem ipsum dolor sit amet " * 12000  # 324 KB: laid out whole, it froze the window
    w = _message(qtbot, text, role="user")
    shown = shown_text(w.body)
    assert len(shown) < SHOWN_CHARS + 300 and shown.startswith("lorem ipsum")
    assert f"{len(text) - SHOWN_CHARS:,} more characters not shown" in shown
    assert w.text == text  # what Copy and Edit take
    qtbot.mouseClick(w.copy_button, Qt.MouseButton.LeftButton)
    assert QGuiApplication.clipboard().text() == text
    # a code block cut by the limit still copies all of its code; an answer is shown whole
    code = "x = 1\n" * 5000
    w = _message(qtbot, f"```py\n{code}```\n", role="user")
    assert "more characters not shown" in shown_text(w.body) and w.code_blocks == (code[:-1],)
    answer = _message(qtbot, "word " * 5000)
    assert "not shown" not in shown_text(answer.body) and shown_text(answer.body).count("word") == 5000
