"""The Compare page without running a model: a finished comparison rendered (columns,
highlighted divergence, numbers, charts, table), saved comparisons reopened and deleted
(damaged files listed as problems), exports, setup validation and the main window's page."""

from __future__ import annotations

import json

import pytest
from PySide6.QtGui import QImage, QTextCursor

from app.gui.compare_charts import chart_text
from app.services.compare_metrics import divergent_spans
from app.services.compare_plan import CompareConfig
from app.services.compare_results import PromptResult
from app.services.compare_store import list_comparisons, save_comparison
from engine.api import Choice
from tests.app.gui.compare_fixtures import OTHER, REF, built_result, make_page


@pytest.fixture
def page(qtbot, bridge, gui_env):
    return make_page(qtbot, bridge, gui_env)


def highlighted(column) -> list[tuple[int, int]]:
    """The character ranges of a column's output drawn with the highlight background."""
    doc = column.output.document()
    cursor = QTextCursor(doc)
    spans, start = [], None
    for pos in range(len(doc.toPlainText())):
        cursor.setPosition(pos + 1)  # the format of the character before the cursor
        marked = cursor.charFormat().background().style().value != 0
        if marked and start is None:
            start = pos
        elif not marked and start is not None:
            spans.append((start, pos))
            start = None
    if start is not None:
        spans.append((start, len(doc.toPlainText())))
    return spans


def test_columns_show_outputs_with_divergent_words_highlighted_and_the_numbers(page):
    page.show_result(built_result())
    ref, int8, awq = page.columns.columns
    assert ref.output.toPlainText() == REF[0] and int8.output.toPlainText() == OTHER[0]
    # int8 wrote "a red mat" where the reference has "the mat": those words are marked, nothing else
    assert highlighted(int8) == divergent_spans(REF[0], OTHER[0]) != []
    assert OTHER[0][slice(*highlighted(int8)[0])] == "a red"
    assert highlighted(ref) == []  # the reference is never marked against itself
    assert ref.badge.isVisibleTo(page) and not int8.badge.isVisibleTo(page)
    # the prompt tabs are shared: the second prompt's answers agree word for word
    page.columns.tabs.setCurrentIndex(1)
    assert int8.output.toPlainText() == OTHER[1] and highlighted(int8) == []
    values = {k: v.text() for k, v in ref.values.items()}
    assert values == {"ttft": "40.0 ms", "decode": "90.0 tok/s", "weights": "512.0 MiB", "kv": "16.0 MiB",
                      "peak": "900.0 MiB", "load": "1.5 s", "ppl": "12.250", "agree": "100.0%", "prefix": "100.0%"}
    assert ref.captions["peak"].text() == "Peak RAM"  # measured on the CPU: the process's memory
    assert int8.values["agree"].text() == "75.0%" and int8.values["prefix"].text() == "50.0%"
    assert "agreement 75% (prefix 50%)" in int8.prompt_info.text()
    # the failed configuration says why in its column; its numbers are empty
    assert awq.error.isVisibleTo(page) and "not enough memory for the weights" in awq.error.text()
    assert awq.status.text() == "Failed" and awq.values["ttft"].text() == "—"
    assert page.columns.states[2].result.status == "error"


def test_a_runs_events_land_in_their_columns_as_they_come(page, qtbot):
    from app.services.compare_events import ConfigFinished, ConfigProgress, ConfigStarted, PromptFinished, TokenDelta

    done = built_result()
    cols = page.columns
    page.results_stack.setCurrentWidget(page.results_tabs)  # as a run starting shows them
    cols.begin(done.plan)
    first, second, third = cols.columns
    assert [c.status.text() for c in cols.columns] == ["Waiting"] * 3
    assert first.badge.isVisibleTo(page)  # the first is the reference until it fails
    steps = [(ConfigStarted(0, done.plan.configs[0], 3), "Loading…"),
             (ConfigProgress(0, "load", "loading weights: layer 1 of 2"), "Loading: loading weights: layer 1 of 2"),
             (ConfigProgress(0, "warmup", "warming up (untimed)"), "Warming up (untimed)"),
             (ConfigProgress(0, "prompt", "prompt 2 of 2", 1, 2), "Prompt 2 of 2"),
             (ConfigProgress(0, "perplexity", "perplexity: scored 10 of 47 tokens", 10, 47),
              "Perplexity: 10 of 47 tokens")]
    for ev, status in steps:
        cols.on_event(ev)
        assert first.status.text() == status
    assert (first.progress.value(), first.progress.maximum()) == (10, 47)
    for p, text in enumerate(REF):
        cols.on_event(PromptFinished(0, p, done.results[0].prompts[p]))
    cols.on_event(ConfigFinished(0, done.results[0]))
    assert first.status.text() == "Done in 3.0 s" and first.values["ttft"].text() == "40.0 ms"
    # the second streams word by word into its own column, the divergence marked as it comes
    cols.on_event(ConfigStarted(1, done.plan.configs[1], 3))
    words = OTHER[0].split(" ")
    for word in words:
        cols.on_event(TokenDelta(1, 0, word + " "))
    # the first token is drawn at once, the rest together (a redraw per token would stall
    # the window when six columns stream at GPU speed)
    assert second.output.toPlainText() == words[0] + " "
    qtbot.waitUntil(lambda: second.output.toPlainText() == OTHER[0] + " ", timeout=2000)
    assert cols.tabs.currentIndex() == 0
    assert OTHER[0][slice(*highlighted(second)[0])] == "a red"
    assert third.output.toPlainText() == "" and "Waiting" in third.output.placeholderText()
    # a prompt the user picked stays picked while another streams
    cols.tabs.tabBarClicked.emit(1)
    cols.tabs.setCurrentIndex(1)
    cols.on_event(TokenDelta(1, 0, "more"))
    assert cols.tabs.currentIndex() == 1 and second.output.toPlainText() == ""


def test_a_cancelled_configuration_says_so_in_its_column(page):
    page.show_result(built_result(cancelled_last=True))
    last = page.columns.columns[2]
    assert last.status.text() == "Cancelled before it ran" and not last.error.isVisibleTo(page)
    assert "Cancelled" in last.output.placeholderText()
    assert "CANCELLED" in page.summary.text()


def test_charts_have_a_labelled_bar_per_configuration_that_ran(page):
    page.show_result(built_result())
    charts = page.charts
    assert charts.values["ttft"] == [40.0, 50.0, None]
    assert chart_text(charts, "weights") == ["512.0", "256.0", "failed"]
    assert chart_text(charts, "agree") == ["100.0%", "75.0%", "failed"]
    assert chart_text(charts, "ppl") == ["12.250", "13.250", "failed"]
    # every number of the columns has its chart: load time, KV memory, agreement before the
    # first divergence too
    assert list(charts.plots) == ["ttft", "decode", "load", "weights", "kv", "peak", "ppl", "prefix", "agree"]
    assert chart_text(charts, "load")[:2] == ["1.5", "2.5"] and chart_text(charts, "prefix")[:2] == ["100.0%", "50.0%"]
    assert chart_text(charts, "kv")[2] == "failed" and charts.titles()["kv"] == "KV-cache memory"
    assert charts.titles()["peak"] == "Peak RAM"
    assert "MiB" in charts.plots["weights"].getPlotItem().getAxis("bottom").labelText
    ticks = charts.plots["decode"].getPlotItem().getAxis("left")._tickLevels[0]
    # bf16 asked for, float32 ran (the CPU's): the labels say both
    assert [label for _pos, label in ticks] == ["bf16 (float32)", "int8", "awq"]
    assert page.table.rowCount() == 3 and page.table.item(0, 0).text() == "bf16 (float32) (ref)"
    assert page.columns.columns[0].title.text() == "bf16 (float32)"
    assert "not enough memory" in page.table.item(2, page.table.columnCount() - 1).text()


def test_charts_fit_the_page_taking_fewer_columns_where_it_is_narrow(qtbot):
    """At the default 1200x780 window the charts share the page with the setup (~640 px):
    three a row cut the right-hand column and the long titles. Now a row takes as many as fit
    (at least CHART_MIN_WIDTH each), the titles fit their charts, nothing overlaps, and the
    page scrolls down instead."""
    from PySide6.QtGui import QFont, QFontMetrics

    from app.gui.compare_charts import CHART_MIN_WIDTH, CompareCharts

    charts = CompareCharts()
    qtbot.addWidget(charts)
    charts.show_result(built_result())
    charts.show()
    qtbot.waitExposed(charts)
    font = QFont()
    font.setPointSizeF(10)
    for width, columns in ((640, 2), (1000, 3), (400, 1)):
        charts.resize(width, 480)
        qtbot.waitUntil(lambda: charts.columns() == columns)
        qtbot.wait(20)
        inner = charts.widget()
        assert inner.width() <= charts.viewport().width()
        boxes = [p.geometry() for p in charts.plots.values()]
        for i, box in enumerate(boxes):
            assert box.right() < inner.width() and box.height() >= 200 and box.width() >= CHART_MIN_WIDTH - 20
            assert not any(box.intersects(other) for other in boxes[i + 1:]), (width, i)
        for key, title in charts.titles().items():
            assert QFontMetrics(font).horizontalAdvance(title) < charts.plots[key].width() - 20, (width, title)
    qtbot.waitUntil(lambda: charts.verticalScrollBar().maximum() > 0)  # one a row: it scrolls


def test_a_saved_comparison_reopens_and_damaged_files_are_problems_not_crashes(qtbot, bridge, gui_env):
    saved = save_comparison(built_result(), "tiny trial")
    folder = saved.parent
    (folder / "20990101-000000-broken.json").write_text("{not json", encoding="utf-8")
    (folder / "20990101-000001-other.json").write_text(json.dumps({"format": "something else"}), encoding="utf-8")
    page = make_page(qtbot, bridge, gui_env)
    panel = page.saved
    assert panel.list.count() == 1 and "tiny trial" in panel.list.item(0).text()
    assert len(panel.problems) == 2
    assert "2 saved files could not be read" in panel.message.text() and "broken.json" in panel.message.text()
    panel.list.setCurrentRow(0)
    with qtbot.waitSignal(panel.openRequested):
        panel.open_button.click()
    assert page.result.name == "tiny trial" and len(page.columns.columns) == 3
    assert "tiny trial" in page.summary.text()
    panel.confirm_delete = lambda name: name == "tiny trial"
    panel.delete_button.click()
    assert not saved.exists() and panel.list.count() == 0
    assert list_comparisons(folder) == []


def test_exports_write_csv_json_markdown_and_png(page, tmp_path, gui_env):
    assert not any(b.isEnabled() for b in page.export_buttons.values())  # nothing to export yet
    page.show_result(built_result())
    page.choose_save_path = lambda _caption, suggested, _filter: str(tmp_path / suggested)
    written = {}
    for kind in ("csv", "json", "md", "png"):
        assert page.export_buttons[kind].isEnabled()
        assert page.export(kind), page.message.text()
        written[kind] = next(tmp_path.glob(f"*.{kind}"))
        assert "Saved" in page.message.text()
    assert written["csv"].read_text().splitlines()[0].startswith("label,quant,")
    rows = json.loads(written["json"].read_text())
    assert [r["quant"] for r in rows] == ["bf16", "int8", "awq"] and rows[2]["error"]
    assert "| bf16 (float32) (ref) |" in written["md"].read_text()
    image = QImage(str(written["png"]))
    assert not image.isNull() and image.width() > 300 and image.height() > 200
    assert gui_env["settings"].value("export/last_dir") == str(tmp_path)


def fake_choices():
    def c(kind, name, *reasons):
        return Choice(kind, name, name, reasons=reasons)

    return {"device": (c("device", "auto"), c("device", "cpu")),
            "quantization": (c("quantization", "bf16"), c("quantization", "int8"), c("quantization", "int4"),
                             c("quantization", "fp8", "needs a GPU with fp8 support")),
            "attention": (c("attention", "auto"), c("attention", "torch"), c("attention", "triton", "CUDA only")),
            "kv_cache_dtype": (c("kv_cache_dtype", "auto"), c("kv_cache_dtype", "fp8")),
            "dtype": (c("dtype", "auto"),)}


def test_setup_refuses_fewer_than_two_configurations_or_two_alike_inline(qtbot, bridge, gui_env):
    page = make_page(qtbot, bridge, gui_env, choices=fake_choices())
    setup = page.setup
    assert [c.quant for c in setup.configs.configs()] == ["bf16", "int8", "int4"]
    assert setup.problem is None and page.run_button.isEnabled()
    # what can't run here is listed, greyed out, with the reason
    quant = setup.configs.rows[0].combos["quantization"]
    fp8 = quant.model().item(quant.findData("fp8"))
    assert not fp8.isEnabled() and "needs a GPU with fp8 support" in fp8.toolTip()
    setup.configs.remove_row(setup.configs.rows[2])
    setup.configs.remove_row(setup.configs.rows[1])
    assert "at least 2 configurations" in setup.problem
    assert setup.error.isVisibleTo(page) and "at least 2" in setup.error.text()
    assert not page.run_button.isEnabled() and page.run() is False and not page.running
    setup.configs.add_row(CompareConfig("bf16"))  # the same as the first
    assert "configuration 2 (bf16) is the same as configuration 1" in setup.problem
    attention = setup.configs.rows[1].combos["attention"]
    attention.setCurrentIndex(attention.findData("torch"))
    assert setup.problem is None and page.run_button.isEnabled()
    for _ in range(4):
        setup.configs.add_row()
    assert len(setup.configs.rows) == 6 and not setup.configs.add_button.isEnabled()
    setup.sources["typed"].setChecked(True)
    assert "Type at least one prompt" in setup.problem
    setup.typed.setPlainText("First prompt\n\nSecond prompt")
    assert setup.problem is None and setup.prompts() == ["First prompt", "Second prompt"]


def test_errors_in_the_results_name_this_pages_fields_not_command_line_flags(page):
    """A prompt too long for the context said "load the model with a longer context
    (--max-model-len)" in its column and the table: the page's field is Context."""
    result = built_result()
    long = "the prompt has 9000 tokens but the context holds 8192: shorten the prompt or load the model with a " \
           "longer context (--max-model-len)."
    result.results[1].prompts[0] = PromptResult(0, error=long, finish_reason="error")
    result.results[2].error = "the context (--max-model-len 100) can't hold a chat"
    page.show_result(result)
    int8, awq = page.columns.columns[1], page.columns.columns[2]
    assert int8.prompt_info.text() == "failed: " + long.replace("(--max-model-len)", "(“Context”)")
    assert awq.error.text() == "Failed: the context (“Context”) can't hold a chat"
    errors = [page.table.item(row, page.table.columnCount() - 1).text() for row in range(page.table.rowCount())]
    assert not any("--max-model-len" in e for e in errors) and "(“Context”)" in errors[2]


def test_tab_leaves_the_typed_prompts_and_ctrl_tab_types_one(qtbot, bridge, gui_env):
    """The typed prompts took every Tab as text: a keyboard user could not get past them to
    the sampling options or Run (as the chat's message box, Ctrl+Tab types a tab)."""
    from PySide6.QtCore import Qt

    page = make_page(qtbot, bridge, gui_env, choices=fake_choices())
    typed = page.setup.typed
    page.setup.sources["typed"].setChecked(True)
    typed.setPlainText("First prompt")
    qtbot.keyClick(typed, Qt.Key.Key_Tab)
    assert typed.toPlainText() == "First prompt"
    typed.moveCursor(typed.textCursor().MoveOperation.End)
    qtbot.keyClick(typed, Qt.Key.Key_Tab, Qt.KeyboardModifier.ControlModifier)
    assert typed.toPlainText() == "First prompt\t"


def test_what_keeps_run_off_is_in_sight_beside_it(qtbot, bridge, gui_env):
    """The setup's problem was the last thing in its scroll area, below the sampling options:
    at the default window size Run greyed out with its reason scrolled out of sight."""
    page = make_page(qtbot, bridge, gui_env, choices=fake_choices())
    page.resize(1060, 700)  # its size in the default 1200 x 780 window
    setup = page.setup
    setup.configs.add_row(CompareConfig("bf16"))  # the same as the first
    assert "is the same as configuration 1" in setup.problem and not page.run_button.isEnabled()
    qtbot.waitUntil(lambda: not setup.error.visibleRegion().isEmpty())
    shown = setup.error.visibleRegion().boundingRect()
    assert shown.height() >= setup.error.height() - 1  # all of it, not a clipped edge
    assert setup.error.mapTo(page, shown.topLeft()).y() < page.run_button.mapTo(page, page.run_button.rect().topLeft()).y()


def test_a_prompts_file_is_read_or_its_problem_shown(qtbot, bridge, gui_env, tmp_path):
    page = make_page(qtbot, bridge, gui_env, choices=fake_choices())
    good = tmp_path / "prompts.txt"
    good.write_text("One\n\nTwo\nlines\n\nThree", encoding="utf-8")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]", encoding="utf-8")
    page.setup.choose_file = lambda *_: str(bad)
    page.setup.open_file.click()
    assert "not a string" in page.setup.error.text()
    page.setup.choose_file = lambda *_: str(good)
    page.setup.open_file.click()
    assert page.setup.problem is None and page.setup.prompts() == ["One", "Two\nlines", "Three"]
    assert page.setup.file_label.text() == "3 prompts from prompts.txt"


def test_the_setup_is_remembered(qtbot, bridge, gui_env):
    page = make_page(qtbot, bridge, gui_env, choices=fake_choices())
    s = page.setup
    s.configs.set_configs([CompareConfig("int8", "torch"), CompareConfig("int4")])
    s.sources["typed"].setChecked(True)
    s.typed.setPlainText("Hello there")
    s.seeded.setChecked(True)
    s.seed.setValue(42)
    s.eval_tokens.setValue(0)  # the whole text
    s.save_settings()
    again = make_page(qtbot, bridge, gui_env, choices=fake_choices()).setup
    assert again.configs.configs() == [CompareConfig("int8", "torch"), CompareConfig("int4")]
    assert again.source() == "typed" and again.prompts() == ["Hello there"]
    plan = again.plan()
    assert plan.seed == 42 and plan.temperature == pytest.approx(0.7) and plan.eval_tokens is None


def test_the_main_window_has_a_compare_page(qtbot, gui_env, bridge):
    from app.gui.main_window import PAGES, MainWindow
    from app.services.chat_store import ChatStore

    win = MainWindow(bridge=bridge, store=ChatStore(gui_env["data"] / "chats.sqlite3"), settings=gui_env["settings"],
                     autoload=False)
    qtbot.addWidget(win)
    assert PAGES[3] == "Compare" and win.nav.item(3).text() == "Compare"
    win.show_page("Compare")
    assert win.stack.currentWidget() is win.compare
    assert win.compare.objectName() == "comparePage" and win.unfinished_work() is None


def test_the_page_follows_a_switch_to_the_dark_theme(qtbot, page, qapp):
    from PySide6.QtWidgets import QWidget

    from app.gui.app import dark_palette
    from app.gui.compare_columns import HIGHLIGHT

    page.show_result(built_result())
    before = qapp.palette()
    try:
        qapp.setPalette(dark_palette())
        qtbot.waitUntil(lambda: page.charts.plots["ttft"].backgroundBrush().color().name() == "#17181a")
        int8 = page.columns.columns[1]
        cursor = QTextCursor(int8.output.document())
        start, _end = highlighted(int8)[0]
        cursor.setPosition(start + 1)
        assert cursor.charFormat().background().color().name() == HIGHLIGHT["dark"]  # dark amber under light text
        # a style sheet taking palette() colours keeps the old theme's (dark text on a dark page)
        sheets = [w.styleSheet() for w in page.findChildren(QWidget) if w.styleSheet()]
        assert sheets and not any("palette(" in s for s in sheets)
    finally:
        qapp.setPalette(before)


def test_a_model_loaded_for_the_chat_during_the_run_is_not_replaced_afterwards(qtbot):
    """The chat's model was unloaded for the comparison; the user then loaded another one:
    the end of the run must not load the old one over it."""
    from PySide6.QtCore import QObject, Signal

    from app.gui.compare_chat_model import ChatModelHandoff

    class FakeBridge(QObject):
        modelUnloaded = Signal()
        unloadWithdrawn = Signal(str)

        def __init__(self):
            super().__init__()
            self.model_info, self.is_loading, self.loads = None, False, []

        def unload(self, after_answers=False):
            self.modelUnloaded.emit()

        def load(self, options):
            self.loads.append(options)

    bridge = FakeBridge()
    handoff = ChatModelHandoff(bridge, None)
    handoff._reload_options = lambda: {"model": "old-model"}
    ran = []
    handoff.release(lambda: ran.append(True))
    assert ran and handoff.released
    bridge.is_loading = True  # the user picked another model while the comparison ran
    said = handoff.restore()
    assert bridge.loads == [] and "not loaded again" in said
    handoff.release(lambda: None)
    bridge.is_loading = False  # nothing loaded meanwhile: the old model comes back
    assert "again for the chat" in handoff.restore() and bridge.loads == [{"model": "old-model"}]


def test_a_load_while_the_unload_waits_withdraws_it_and_the_comparison_does_not_start(qtbot):
    """The unload waits for the chat's answer; the user loads a model for the chat meanwhile:
    the engine host loads that one instead of unloading (unloadWithdrawn, no modelUnloaded), so the
    handoff must not wait for good: it says so, never starts the run, reloads nothing."""
    from PySide6.QtCore import QObject, Signal

    from app.gui.compare_chat_model import ChatModelHandoff

    class WaitingBridge(QObject):
        modelUnloaded = Signal()
        unloadWithdrawn = Signal(str)

        def __init__(self):
            super().__init__()
            self.model_info, self.is_loading, self.loads, self.kept = None, False, [], []

        def unload(self, after_answers=False):
            assert after_answers  # an answer is being written: the unload waits for it

        def load(self, options):
            self.loads.append(options)

        def keep_loaded(self, options):
            self.kept.append(options)

    bridge = WaitingBridge()
    handoff = ChatModelHandoff(bridge, None)
    handoff._reload_options = lambda: {"model": "old-model"}
    ran, withdrawn = [], []
    handoff.release(lambda: ran.append(True), withdrawn.append)
    assert handoff.waiting and handoff.released
    bridge.unloadWithdrawn.emit("new-model")
    assert withdrawn == ["new-model"] and not handoff.waiting and not handoff.released
    bridge.modelUnloaded.emit()  # (were one to come later: the run still doesn't start)
    assert ran == [] and handoff.restore() == "" and bridge.loads == [] and bridge.kept == []
    # without a load meanwhile, cancelling the wait takes the unload back (the model stays)
    handoff.release(lambda: ran.append(True), withdrawn.append)
    assert handoff.restore() == "" and bridge.kept == [{"model": "old-model"}] and not handoff.waiting
    bridge.unloadWithdrawn.emit("another")
    assert withdrawn == ["new-model"] and ran == []
