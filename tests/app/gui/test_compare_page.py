"""The Compare page running real comparisons of the tiny model on the CPU: columns filled
as the run streams, a configuration that fails while the others complete, cancel at any
moment, the result saved, and the chat's model unloaded for the run and loaded again."""

from __future__ import annotations

import threading

import pytest

from app.gui.compare_charts import chart_text
from app.gui.compare_page import KEEP, UNLOAD
from app.services.compare_events import ConfigFinished, TokenDelta
from app.services.compare_store import list_comparisons, load_comparison
from engine.api import Engine, OutOfMemoryError
from tests.app.gui.compare_fixtures import make_page, set_up_tiny
from tests.app.gui.conftest import load_options

RUN_TIMEOUT_MS = 180_000


@pytest.fixture
def engines(monkeypatch):
    """Every engine a comparison loads, and the ones shut down."""
    loaded, shut = [], []
    real_load, real_shutdown = Engine.from_config.__func__, Engine.shutdown

    def from_config(cls, config, **kw):
        if config.model.quantization in failing:
            raise OutOfMemoryError("not enough memory for the weights: 9 GiB needed, 2 free")
        engine = real_load(cls, config, **kw)
        loaded.append(engine)
        return engine

    def shutdown(self):
        shut.append(self)
        real_shutdown(self)

    failing: set[str] = set()
    monkeypatch.setattr(Engine, "from_config", classmethod(from_config))
    monkeypatch.setattr(Engine, "shutdown", shutdown)
    return loaded, shut, failing


def wait_for_a_token(qtbot, worker) -> None:
    """Until the run has streamed a token. Not ``qtbot.waitSignal``: its blocker disconnects
    from the worker's signal while the worker thread goes on emitting it, and PySide can
    then run a queued call into the freed slot (a segfault, seen on CI)."""
    seen = []
    worker.event.connect(seen.append)  # stays connected for the worker's life
    qtbot.waitUntil(lambda: any(isinstance(ev, TokenDelta) for ev in seen), timeout=60_000)


def wait_idle(qtbot, page) -> None:
    qtbot.waitUntil(lambda: not page.running, timeout=RUN_TIMEOUT_MS)


@pytest.mark.slow
def test_a_full_run_streams_into_the_columns_and_is_saved(qtbot, bridge, gui_env, chat_model, engines):
    loaded, shut, _ = engines
    page = make_page(qtbot, bridge, gui_env)
    set_up_tiny(page, chat_model)
    events, statuses = [], []
    assert page.run()
    page.worker.event.connect(events.append)
    # connected after the page: what the column says once the page has handled the event
    page.worker.event.connect(lambda ev: statuses.append(page.columns.columns[1].status.text())
                              if getattr(ev, "index", None) == 1 else None)
    assert page.running and not page.setup.isEnabled() and page.cancel_button.isVisibleTo(page)
    assert not page.run_button.isEnabled()
    wait_idle(qtbot, page)
    result = page.result
    assert [r.status for r in result.results] == ["ok", "ok", "ok"]
    assert any(isinstance(e, TokenDelta) for e in events)  # the answers streamed in
    for said in ("Loading…", "Loading: ", "Warming up (untimed)", "Prompt 1 of 2", "Prompt 2 of 2", "Perplexity: ",
                 "Done in "):
        assert any(s.startswith(said) for s in statuses), (said, statuses)
    for i, column in enumerate(page.columns.columns):
        r = result.results[i]
        assert column.output.toPlainText() == r.prompts[0].text != ""
        assert column.status.text().startswith("Done in")
        for key in ("ttft", "decode", "weights", "kv", "peak", "load", "ppl", "agree", "prefix"):
            assert column.values[key].text() != "—", (i, key)
        assert column.badge.isVisibleTo(page) == (i == 0)
    assert page.columns.columns[0].values["agree"].text() == "100.0%"
    assert page.columns.columns[0].captions["peak"].text() == "Peak RAM"
    assert all(v is not None for v in page.charts.values["weights"])
    w = page.charts.values["weights"]
    assert w[0] > w[1] > w[2]  # bf16 > int8 > int4
    assert page.table.rowCount() == 3
    # back to idle, saved, listed, the engines shut down
    assert page.setup.isEnabled() and page.run_button.isEnabled() and not page.cancel_button.isVisibleTo(page)
    saved = load_comparison(page.saved_path)
    assert saved.name == result.name and [r["outputs"] for r in saved.rows()] == [r.outputs for r in result.results]
    assert page.saved.list.count() == 1 and "Saved as" in page.message.text()
    assert len(loaded) == 3 and shut == loaded


def test_a_failing_configuration_shows_why_and_the_others_complete(qtbot, bridge, gui_env, chat_model, engines):
    _, _, failing = engines
    failing.add("int8")
    page = make_page(qtbot, bridge, gui_env)
    set_up_tiny(page, chat_model, eval_tokens=0)
    page.run()
    wait_idle(qtbot, page)
    assert [r.status for r in page.result.results] == ["ok", "error", "ok"]
    failed = page.columns.columns[1]
    assert failed.error.isVisibleTo(page)
    assert "not enough memory for the weights: 9 GiB needed, 2 free" in failed.error.text()
    assert failed.status.text() == "Failed" and failed.output.toPlainText() == ""
    done = page.columns.columns[2]
    assert done.output.toPlainText() and done.values["agree"].text().endswith("%")
    assert chart_text(page.charts, "ttft")[1] == "failed"
    assert page.charts.values["ttft"][2] is not None


def test_cancel_mid_run_keeps_the_finished_columns_and_marks_the_rest(qtbot, bridge, gui_env, chat_model, engines):
    loaded, shut, _ = engines
    page = make_page(qtbot, bridge, gui_env)
    set_up_tiny(page, chat_model, max_tokens=200, eval_tokens=0)
    page.run()

    def cancel_on_second(ev):  # on the GUI thread, like a click on Cancel
        if isinstance(ev, TokenDelta) and ev.index == 1:
            page.cancel_button.click()

    page.worker.event.connect(cancel_on_second)
    wait_idle(qtbot, page)
    result = page.result
    assert [r.status for r in result.results] == ["ok", "cancelled", "cancelled"] and result.cancelled
    first, second, third = page.columns.columns
    assert first.status.text().startswith("Done") and first.output.toPlainText()
    assert second.status.text() == "Cancelled" and second.output.toPlainText()  # what it wrote is kept
    assert third.status.text() == "Cancelled before it ran"
    assert "cancelled" in page.message.text() and page.run_button.isEnabled()
    assert page.cancel_button.text() == "Cancel" and page.cancel_button.isEnabled()
    assert list_comparisons()[0].cancelled
    assert len(loaded) == 2 and shut == loaded  # the engine in flight was shut down


def test_esc_cancels_a_running_comparison(qtbot, bridge, gui_env, chat_model, engines):
    """Esc, wherever focus is in the window while the page shows, cancels as the button does
    (the chat page's Esc stops an answer); it does nothing while no comparison runs."""
    from PySide6.QtCore import Qt

    page = make_page(qtbot, bridge, gui_env)
    set_up_tiny(page, chat_model, max_tokens=200, eval_tokens=0)
    page.activateWindow()
    assert not page._esc.isEnabled()
    page.run()

    def esc_on_second(ev):  # on the GUI thread, like a key press
        if isinstance(ev, TokenDelta) and ev.index == 1 and page.cancel_button.isEnabled():
            qtbot.keyClick(page.setup.typed, Qt.Key.Key_Escape)

    page.worker.event.connect(esc_on_second)
    wait_idle(qtbot, page)
    assert [r.status for r in page.result.results] == ["ok", "cancelled", "cancelled"]
    assert not page._esc.isEnabled()


def test_a_run_whose_every_configuration_failed_says_so_and_saves_nothing(qtbot, bridge, gui_env, chat_model,
                                                                         engines):
    """It said "Comparison finished." and was saved like a run that measured something."""
    _, _, failing = engines
    failing.update({"int8", "int4"})
    page = make_page(qtbot, bridge, gui_env)
    set_up_tiny(page, chat_model, quants=("int8", "int4"), eval_tokens=0)
    page.run()
    wait_idle(qtbot, page)
    assert [r.status for r in page.result.results] == ["error", "error"]
    assert "every configuration failed" in page.message.text() and "Nothing was saved" in page.message.text()
    assert page.saved_path is None and list_comparisons() == []


def test_a_run_that_stops_on_an_error_leaves_no_column_waiting(qtbot, bridge, gui_env, monkeypatch):
    """A run ended by an unexpected error (no RunFinished) left the summary at "Comparing
    ..." and every column "Waiting for its turn..." for good, under the error message."""
    import app.services.compare as service

    def unreadable():
        raise OSError("the evaluation text can't be read")
    monkeypatch.setattr(service, "_evaluation_text", unreadable)
    page = make_page(qtbot, bridge, gui_env)
    set_up_tiny(page, str(gui_env["tmp"] / "model"))  # never loaded: the run stops before
    assert page.run()
    wait_idle(qtbot, page)
    assert "could not run" in page.message.text() and "evaluation text" in page.message.text()
    assert "stopped before it finished" in page.summary.text() and "Comparing" not in page.summary.text()
    for column in page.columns.columns:
        assert column.status.text() == "Not run"
        assert "Waiting" not in column.output.placeholderText()
    assert page.run_button.isEnabled()


def test_cancel_before_anything_loaded_returns_to_idle(qtbot, bridge, gui_env, chat_model, engines):
    loaded, _, _ = engines
    page = make_page(qtbot, bridge, gui_env)
    set_up_tiny(page, chat_model, quants=("int8", "int4"))
    finished = []
    page.run()
    page.worker.event.connect(lambda ev: finished.append(ev) if isinstance(ev, ConfigFinished) else None)
    page.cancel()
    assert page.cancel_button.text() == "Cancelling…"
    wait_idle(qtbot, page)
    assert all(r.status == "cancelled" for r in page.result.results)
    assert len(loaded) <= 1  # the first load may have begun; it stopped at its first check


@pytest.mark.slow
def test_the_chat_model_is_unloaded_for_the_run_and_loaded_again(qtbot, bridge, gui_env, chat_model):
    with qtbot.waitSignal(bridge.modelLoaded, timeout=60_000):
        bridge.load(load_options(chat_model))
    page = make_page(qtbot, bridge, gui_env)
    set_up_tiny(page, chat_model, quants=("int8", "int4"), eval_tokens=0, prompts=("Hello",))
    asked = []
    page.ask_unload = lambda name: asked.append(name) or None  # the user cancels the question
    assert page.run() is False and not page.running and bridge.model_info is not None
    seen_during = []
    page.ask_unload = lambda name: UNLOAD
    with qtbot.waitSignal(bridge.modelUnloaded, timeout=30_000):
        assert page.run()
    assert page.running
    qtbot.waitUntil(lambda: page.worker is not None, timeout=30_000)
    seen_during.append(bridge.model_info)
    assert "was unloaded for the comparison" in page.message.text(), page.message.text()  # not "Unloading ..." still
    with qtbot.waitSignal(bridge.modelLoaded, timeout=RUN_TIMEOUT_MS) as reloaded:
        wait_idle(qtbot, page)
    assert len(asked) == 1 and asked[0].startswith("tiny-llama-tied") and seen_during == [None]
    assert reloaded.args[0].path == chat_model and reloaded.args[0].attention == "torch"
    assert "again for the chat" in page.message.text()
    # cancelled while the chat's model is still being unloaded: nothing runs, the model comes back
    page.ask_unload = lambda name: UNLOAD
    with qtbot.waitSignal(bridge.modelLoaded, timeout=60_000):
        assert page.run() and page.running and page.worker is None
        page.cancel()
        assert not page.running and "cancelled before it started" in page.message.text()
    assert page.worker is None and bridge.model_info is not None
    # keeping it loaded runs beside it: nothing unloaded, nothing reloaded
    page.ask_unload = lambda name: KEEP
    page.run()
    wait_idle(qtbot, page)
    assert bridge.model_info is not None and all(r.ok for r in page.result.results)


@pytest.mark.slow
def test_a_model_loaded_while_the_unload_waits_for_an_answer_keeps_the_run_from_starting(qtbot, bridge, gui_env,
                                                                                       chat_model):
    """Run (unload the chat's model) while the chat writes an answer: the unload waits for
    it. The user loads a model for the chat meanwhile, which withdraws the unload: the page
    must not wait for good for an unload that won't come; it says why nothing started."""
    from engine.api import SamplingParams

    with qtbot.waitSignal(bridge.modelLoaded, timeout=60_000):
        bridge.load(load_options(chat_model))
    page = make_page(qtbot, bridge, gui_env)
    set_up_tiny(page, chat_model, quants=("int8", "int4"), eval_tokens=0, prompts=("Hello",))
    with qtbot.waitSignal(bridge.tokenReceived, timeout=30_000):
        rid = bridge.submit(prompt="Hello", params=SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True))
    gate = threading.Event()  # the answer can't end until it is set: the unload surely waits
    bridge._host.engine.add_step_listener(lambda _info: gate.wait(60))
    try:
        page.ask_unload = lambda name: UNLOAD
        assert page.run() and page.running and page.worker is None  # waiting for the answer to end
        bridge.load(load_options(chat_model, max_model_len=128))
        qtbot.waitUntil(lambda: not page.running, timeout=30_000)
        assert page.worker is None and "did not start" in page.message.text(), page.message.text()
        assert page.run_button.isEnabled()
    finally:
        gate.set()
    with qtbot.waitSignal(bridge.modelLoaded, timeout=60_000):
        bridge.abort(rid)  # (the new model waits for the answer before it takes over)
    assert bridge.model_info is not None and bridge.model_info.max_model_len == 128 and page.worker is None


def test_closing_the_window_mid_run_stops_the_run_and_saves_what_finished(qtbot, bridge, gui_env, chat_model,
                                                                         engines):
    loaded, shut, _ = engines
    page = make_page(qtbot, bridge, gui_env)
    set_up_tiny(page, chat_model, quants=("int8", "int4"), max_tokens=200, eval_tokens=0)
    page.run()
    worker = page.worker
    wait_for_a_token(qtbot, worker)
    page.shutdown()
    assert worker.isFinished() and shut == loaded and loaded
    (saved,) = list_comparisons()
    assert saved.cancelled and load_comparison(saved.path).results[0].status == "cancelled"


def test_a_run_that_outlasts_the_close_is_detached_not_destroyed(qtbot, bridge, gui_env, chat_model, engines,
                                                                  monkeypatch):
    """A step that can't be interrupted outlasts the close: the worker must not die with its
    page (Qt aborts on destroying a running QThread); it is detached and kept until it ends."""
    from app.gui import compare_page

    page = make_page(qtbot, bridge, gui_env)
    set_up_tiny(page, chat_model, quants=("int8", "int4"), max_tokens=200, eval_tokens=0)
    page.run()
    worker = page.worker
    wait_for_a_token(qtbot, worker)
    monkeypatch.setattr(worker, "wait", lambda *a: False)  # as if it were stuck in a long step
    page.shutdown()
    assert worker.parent() is None and worker in compare_page._DETACHED and page.worker is None
    qtbot.waitUntil(worker.isFinished, timeout=60_000)  # the cancel still reaches it
    qtbot.waitUntil(lambda: worker not in compare_page._DETACHED, timeout=10_000)


def test_side_by_side_is_a_remembered_option_and_fills_both_columns(qtbot, bridge, gui_env, chat_model, engines):
    from app.gui.compare_setup import CompareSetup

    loaded, shut, _ = engines
    page = make_page(qtbot, bridge, gui_env)
    set_up_tiny(page, chat_model, quants=("bf16", "int8"), eval_tokens=0)
    box = page.setup.findChild(type(page.setup.perplexity), "compareSideBySide")
    assert box is page.setup.side_by_side and not box.isChecked()  # off by default: speeds measured alone
    box.setChecked(True)
    assert page.run()
    wait_idle(qtbot, page)
    result = page.result
    assert result.plan.side_by_side and [r.ran_with for r in result.results] == [[1], [0]]
    for i, column in enumerate(page.columns.columns):
        assert column.output.toPlainText() == result.results[i].prompts[0].text != ""
        assert column.status.text().startswith("Done in") and column.detail.text().endswith("side by side")
        assert "speeds share the device" in column.values["decode"].toolTip()
    assert "measured side by side: speeds share the device (bf16 + int8)" in page.summary.text()
    assert len(loaded) == 2 and shut == loaded
    again = CompareSetup(gui_env["settings"])  # the setup is remembered when a comparison runs
    qtbot.addWidget(again)
    assert again.side_by_side.isChecked()


def test_a_context_too_short_for_a_chat_is_a_setup_problem(qtbot, gui_env):
    from app.gui.compare_setup import CompareSetup
    from app.gui.load_dialog import MIN_CHAT_CONTEXT

    setup = CompareSetup(gui_env["settings"])
    qtbot.addWidget(setup)
    setup.context.setValue(40)
    assert not setup.validate()
    assert "40 tokens can't hold a chat" in setup.problem and str(MIN_CHAT_CONTEXT) in setup.problem
    setup.context.setValue(0)
    assert "can't hold a chat" not in (setup.problem if not setup.validate() else "")
