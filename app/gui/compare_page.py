"""The Compare page: one model's quantizations x attention backends x KV-cache dtypes on the
same prompts, side by side: speed, memory and quality in one view.

Left, the setup (``compare_setup``) and the saved comparisons (``compare_saved``); right,
the results: the columns (``compare_columns``), the bar charts (``compare_charts``) and a
table, with CSV / JSON / Markdown / PNG export. The comparison itself is the Qt-free
service ``app.services.compare`` on a worker thread (``compare_worker``): configurations
run one after another, each loaded, measured and unloaded, or side by side (the setup's
option) when they fit in memory together, their answers streaming at once; every event
reaches the page on the GUI thread and lands in its column as it happens.

Memory: Run asks first when the chat's model is loaded (or loading): unload it for the
comparison (the default) or keep it; one unloaded is loaded again by itself when the
comparison ends, and the page says so (``compare_chat_model``).

Cancel works at any moment: the answer in flight is aborted, the engine shut down, the
finished columns kept and the rest marked cancelled; the page is idle again when the
run's last event arrives. Every comparison that ends is saved (``compare_store``) and
listed under Saved.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

from PySide6.QtCore import QEvent, QObject, QSettings, Qt, Slot
from PySide6.QtGui import QAction, QKeySequence, QPalette, QShortcut
from PySide6.QtWidgets import (QAbstractItemView, QFileDialog, QHBoxLayout, QHeaderView, QLabel,
                               QMenu, QPushButton, QScrollArea, QSplitter, QStackedWidget, QTableWidget,
                               QTableWidgetItem, QTabWidget, QToolButton, QVBoxLayout, QWidget)

from app.gui.compare_charts import CompareCharts
from app.gui.compare_chat_model import KEEP, UNLOAD, ChatModelHandoff
from app.gui.compare_columns import CompareColumns
from app.gui.compare_saved import SavedComparisons
from app.gui.compare_setup import CompareSetup, _sentence, page_text
from app.gui.compare_worker import CompareWorker
from app.gui.export_dirs import ask_overwrite, export_start_dir, export_target, write_export
from app.gui.models_workers import TaskRunner
from app.services.compare_events import ConfigFinished, ConfigStarted, RunFinished, SideBySidePlanned
from app.services.compare_export import COLUMNS, cells, export_comparison, summary_line
from app.services.compare_plan import ComparePlan
from app.services.compare_results import ComparisonResult
from app.services.compare_store import ComparisonFileError, save_comparison
from app.services.library import Library
from engine.api import HearthError, model_display_name

log = logging.getLogger("hearth.gui.compare")

__all__ = ["ComparePage", "UNLOAD", "KEEP"]

#: Export formats: suffix, dialog caption, name filter.
EXPORTS = {"csv": ("Export the comparison as CSV", "CSV file (*.csv)"),
           "json": ("Export the comparison as JSON", "JSON file (*.json)"),
           "md": ("Export the comparison as Markdown", "Markdown (*.md)"),
           "png": ("Export a picture of the results", "PNG image (*.png)")}
TAB_COLUMNS, TAB_CHARTS, TAB_TABLE = 0, 1, 2
#: How long closing the window waits for a comparison to stop (it stops within a token
#: or a weight tensor; a first-time AWQ calibration checks less often).
SHUTDOWN_WAIT_MS = 30_000


#: workers still running when their page closed (see ComparePage.shutdown)
_DETACHED: set = set()
#: the setup panel's narrowest (it scrolls sideways below its own width)
SETUP_MIN_WIDTH = 240


class _Reaper(QObject):
    """Lets go of a detached worker once it has finished, on the GUI thread (its
    ``finished`` arrives queued here): the last reference dropped from the worker's own
    thread would destroy a QThread that is still running."""

    @Slot()
    def reap(self) -> None:
        worker = self.sender()
        if worker is not None:
            worker.wait()  # returns at once: it has finished
            _DETACHED.discard(worker)


_REAPER: _Reaper | None = None


def _detach(worker) -> None:
    global _REAPER
    if _REAPER is None:
        _REAPER = _Reaper()
    worker.setParent(None)
    _DETACHED.add(worker)
    worker.finished.connect(_REAPER.reap)


class ComparePage(QWidget):
    """The Compare page over an ``EngineBridge`` (for the chat model: unload, reload).

    For tests: ``ask_unload(name) -> UNLOAD | KEEP | None`` (None: don't run) and
    ``choose_save_path(caption, suggested, filter) -> path | None`` replace the dialogs;
    ``setup``, ``columns``, ``charts``, ``table``, ``saved`` are the parts; ``result`` the
    comparison shown; ``running`` whether one runs. ``choices`` / ``library`` /
    ``saved_folder`` default to this machine's, the user's library and data folder."""

    def __init__(self, bridge, settings: QSettings | None = None, parent: QWidget | None = None, *,
                 choices=None, library: Library | None = None, saved_folder: str | Path | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("comparePage")
        self.bridge = bridge
        self.settings = settings
        self.library = library or Library()
        self.runner = TaskRunner(self, max_threads=1)
        self.result: ComparisonResult | None = None
        self.worker: CompareWorker | None = None
        self.saved_path: Path | None = None
        self.chat_model = ChatModelHandoff(bridge, settings, self)
        self.choose_save_path = self._dialog_save_path
        self.confirm_overwrite = ask_overwrite(self)
        self._live: list = []  # ConfigResults finished in this run, for the charts
        self._groups: dict[int, tuple[int, ...]] = {}  # side by side: each configuration's group
        self._started: set[int] = set()  # configurations that have started (a deferred one starts twice)
        self._models_listed = False
        self._closed = False
        self._unloaded_chat = "The chat's model"  # the one a Run unloaded, for the message while it runs

        self.setup = CompareSetup(settings, choices)
        self.saved = SavedComparisons(saved_folder)
        self.columns = CompareColumns()
        self.charts = CompareCharts()
        self.table = _results_table()
        self._build()
        self._apply_palette()
        self.setup.changed.connect(self._update_buttons)
        self.saved.openRequested.connect(self.show_result)
        if self.setup.model_ref() is None:
            self.setup.set_model(self.chat_model.ref())
        self.saved.refresh()
        self._update_buttons()

    # -- construction --------------------------------------------------------------------
    def _build(self) -> None:
        left = QTabWidget()
        left.setObjectName("compareLeftTabs")
        setup_tab = QWidget()
        setup_lay = QVBoxLayout(setup_tab)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setWidget(self.setup)
        # The setup scrolls sideways in a narrow window rather than forcing the window wider
        # than the other pages need (640 x 480 must work): its splitter share starts wide.
        scroll.setMinimumWidth(SETUP_MIN_WIDTH)
        setup_lay.addWidget(scroll, 1)
        # What keeps Run off is said beside it, not at the foot of the scrolled setup (out of
        # sight below the sampling options at the default window size).
        self.setup.layout().removeWidget(self.setup.error)
        setup_lay.addWidget(self.setup.error)
        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run comparison")
        self.run_button.setObjectName("compareRunButton")
        self.run_button.setDefault(True)
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setObjectName("compareCancelButton")
        self.cancel_button.setToolTip("Stop now: the finished configurations are kept, the rest marked cancelled")
        self.cancel_button.clicked.connect(self.cancel)
        # Esc cancels a running comparison wherever focus is in the window while this page shows
        # (as Esc stops a chat answer on the chat page); enabled only while one runs.
        self._esc = QShortcut(QKeySequence(Qt.Key.Key_Escape), self)
        self._esc.setContext(Qt.ShortcutContext.WindowShortcut)
        self._esc.activated.connect(self.cancel)
        self._esc.setEnabled(False)
        buttons.addWidget(self.run_button, 1)
        buttons.addWidget(self.cancel_button)
        setup_lay.addLayout(buttons)
        left.addTab(setup_tab, "Setup")
        left.addTab(self.saved, "Saved")
        left.currentChanged.connect(lambda i: self.saved.refresh() if left.widget(i) is self.saved else None)
        self.left_tabs = left

        right = QWidget()
        rlay = QVBoxLayout(right)
        rlay.setContentsMargins(0, 0, 0, 0)
        head = QHBoxLayout()
        self.setup_toggle = QToolButton()
        self.setup_toggle.setObjectName("compareSetupToggle")
        self.setup_toggle.setText("◂ Setup")
        self.setup_toggle.setCheckable(True)
        self.setup_toggle.setToolTip("Hide or show the setup, to give the results the whole page")
        self.setup_toggle.toggled.connect(self._toggle_setup)
        head.addWidget(self.setup_toggle, 0, Qt.AlignmentFlag.AlignTop)
        self.summary = QLabel("")
        self.summary.setObjectName("compareSummary")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        head.addWidget(self.summary, 1)
        # One Export button with a menu: four buttons made the page wider than a 640-pixel window
        self.export_button = QToolButton()
        self.export_button.setObjectName("compareExport")
        self.export_button.setText("Export")
        self.export_button.setToolTip("Export this comparison as CSV, JSON, Markdown or a PNG picture")
        self.export_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        menu = QMenu(self.export_button)
        self.export_buttons: dict[str, QAction] = {}
        for kind, text in (("csv", "CSV…"), ("json", "JSON…"), ("md", "Markdown…"), ("png", "PNG…")):
            action = menu.addAction(text)
            action.setObjectName(f"compareExport_{kind}")
            action.setToolTip(EXPORTS[kind][0] + (" (the view shown: columns, charts or table)"
                                                  if kind == "png" else ""))
            action.triggered.connect(lambda _=False, k=kind: self.export(k))
            self.export_buttons[kind] = action
        menu.setToolTipsVisible(True)
        self.export_button.setMenu(menu)
        head.addWidget(self.export_button, 0, Qt.AlignmentFlag.AlignTop)
        rlay.addLayout(head)
        self.message = QLabel("")
        self.message.setObjectName("compareMessage")
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        rlay.addWidget(self.message)
        self.results_tabs = QTabWidget()
        self.results_tabs.setObjectName("compareResultsTabs")
        self.results_tabs.addTab(self.columns, "Side by side")
        self.results_tabs.addTab(self.charts, "Charts")
        self.results_tabs.addTab(self.table, "Table")
        self.placeholder = QLabel("Pick a model and 2 to 6 configurations, then Run comparison.\n\nEach "
                                  "configuration is loaded, warmed up, asked every prompt, scored for perplexity "
                                  "and unloaded, one after another (or side by side, when they fit in memory "
                                  "together and the setup asks for it); the first is the reference the others' "
                                  "outputs are compared with. Finished comparisons are saved under Saved.")
        self.placeholder.setObjectName("comparePlaceholder")
        self.placeholder.setWordWrap(True)
        self.placeholder.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.placeholder.setEnabled(False)
        self.results_stack = QStackedWidget()
        self.results_stack.addWidget(self.placeholder)
        self.results_stack.addWidget(self.results_tabs)
        rlay.addWidget(self.results_stack, 1)

        split = QSplitter(Qt.Orientation.Horizontal)
        split.setObjectName("compareSplitter")
        split.addWidget(left)
        split.addWidget(right)
        split.setStretchFactor(1, 1)
        split.setSizes([400, 900])
        split.setCollapsible(1, False)
        self.splitter = split
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(split)

    def _toggle_setup(self, hidden: bool) -> None:
        self.left_tabs.setVisible(not hidden)
        self.setup_toggle.setText("▸ Setup" if hidden else "◂ Setup")

    # -- state ---------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """A comparison runs (or waits for the chat model to unload first)."""
        return self.worker is not None or self.chat_model.waiting

    def _update_buttons(self) -> None:
        running = self.running
        self.setup.setEnabled(not running)
        self.run_button.setEnabled(not running and self.setup.problem is None)
        self.run_button.setToolTip(self.setup.problem or "Run every configuration on the prompts, one after another")
        self.cancel_button.setVisible(running)
        self._esc.setEnabled(running)
        if not running:
            self.cancel_button.setEnabled(True)
            self.cancel_button.setText("Cancel")
        has_result = self.result is not None and not running
        for b in self.export_buttons.values():
            b.setEnabled(has_result)
        self.export_button.setEnabled(has_result)
        self.saved.set_busy(running)

    # -- running -------------------------------------------------------------------------
    def run(self) -> bool:
        """Start a comparison of the setup (asking first about a loaded chat model).
        Returns whether it started (or waits for the chat model to unload)."""
        if self.running:
            return False
        try:
            plan = self.setup.plan()
        except HearthError as e:
            self.setup.validate()  # the same message, under the setup
            self.message.setText(str(e))
            return False
        self.setup.save_settings()
        chat = self.chat_model.name()
        if chat is not None:
            answer = self.ask_unload(chat)
            if answer is None:
                return False
            if answer == UNLOAD:
                self._unloaded_chat = chat
                self.message.setText(f"Unloading {chat} for the comparison (once an answer it is writing has "
                                     "finished); it is loaded again when the comparison ends.")
                self.chat_model.release(lambda: self._start(plan), self._unload_withdrawn)
                self._update_buttons()
                return True
        self._start(plan)
        return True

    def _unload_withdrawn(self, name: str) -> None:
        """The user loaded a model for the chat while the comparison waited for the chat's
        model to go: that load withdrew the unload, so the comparison doesn't start."""
        self.message.setText(f"The comparison did not start: a load of {name} for the chat came while it waited, so "
                             "the chat's model was not unloaded for it. Run the comparison again when you want it "
                             "(you'll be asked about the chat's model then).")
        self._update_buttons()

    def _start(self, plan: ComparePlan) -> None:
        self.result = None
        self.saved_path = None
        self._live = []
        self._groups = {}
        self._started: set[int] = set()
        self.columns.begin(plan)
        self.charts.show_results([])
        self.table.setRowCount(0)
        self.results_stack.setCurrentWidget(self.results_tabs)
        self.results_tabs.setCurrentIndex(TAB_COLUMNS)
        self.summary.setText(f"Comparing {len(plan.configs)} configurations of {_model_name(plan.model)} on "
                             f"{len(plan.prompts)} prompt{'s' if len(plan.prompts) != 1 else ''}…")
        # Unloaded by now: said in the past tense ("Unloading ..." stayed up all the run).
        self.message.setText(f"{self._unloaded_chat} was unloaded for the comparison; it is loaded again when "
                             "the comparison ends." if self.chat_model.released else "")
        worker = CompareWorker(plan, self)
        worker.event.connect(self._on_event)
        worker.failed.connect(self._on_failed)
        worker.finished.connect(self._worker_done)
        self.worker = worker
        self._update_buttons()
        worker.start()

    def cancel(self) -> None:
        """Stop the comparison now (the page is idle again when its last event arrives)."""
        if self.chat_model.waiting:  # still waiting for the chat model to unload: nothing ran
            self.message.setText("Comparison cancelled before it started." + self.chat_model.restore())
            self._update_buttons()
            return
        if self.worker is None:
            return
        self.worker.cancel()
        self.cancel_button.setEnabled(False)
        self.cancel_button.setText("Cancelling…")

    def _on_event(self, ev) -> None:
        if self._closed:  # queued before the window closed: shutdown saved the result
            return
        if isinstance(ev, RunFinished):
            self._finished(ev.result)
            return
        self.columns.on_event(ev)
        if isinstance(ev, SideBySidePlanned):
            self._groups = {i: group for group in ev.groups for i in group}
            if ev.notes:
                keep = self.message.text()
                self.message.setText((keep + " " if keep else "") + " ".join(_sentence(n) for n in ev.notes))
        elif isinstance(ev, ConfigStarted):
            if ev.index in self._started:  # started again: deferred out of its group, it runs alone now
                self._groups.pop(ev.index, None)
            self._started.add(ev.index)
            group = self._groups.get(ev.index, ())
            plan = self.worker.plan if self.worker else None
            what = (f"{' + '.join(plan.configs[i].label for i in group)} side by side" if plan and len(group) > 1
                    else f"{ev.index + 1} of {ev.total}: {ev.config.label}")
            self.summary.setText(f"Running {what} · {_model_name(plan.model if plan else None)}")
        elif isinstance(ev, ConfigFinished):
            self._live.append(ev.result)
            self.charts.show_results(self._live)
            fill_table(self.table, self._live)

    def _finished(self, result: ComparisonResult) -> None:
        """The run's last event: show everything, save it, load the chat model again."""
        self.result = result
        self.columns.show_result(result)
        self.charts.show_result(result)
        fill_table(self.table, result.results)
        failed = [r for r in result.results if r.status == "error"]
        if result.results and len(failed) == len(result.results) \
                and not any(r.load_s is not None or r.prompts for r in failed):
            # Nothing ran at all (every load refused or failed): nothing to keep under Saved.
            self.saved_path, saved = None, "Nothing was saved."
        else:
            try:
                self.saved_path = save_comparison(result)  # names it
                saved = f"Saved as “{result.name}” (under Saved)."
            except ComparisonFileError as e:
                saved = f"Not saved: {e}"
        self.summary.setText(_summary(result))
        if result.cancelled:
            done = "Comparison cancelled; the finished configurations are kept."
        elif result.results and len(failed) == len(result.results):
            done = "Comparison finished, but every configuration failed: its column says why."
        else:
            done = "Comparison finished."
        self.message.setText(f"{done} {saved}{self.chat_model.restore()}")
        self.saved.refresh()
        if self.saved_path is not None:
            self.saved.select_path(self.saved_path)

    def _on_failed(self, message: str) -> None:
        if self._closed:
            return
        self.columns.stop()
        plan = self.worker.plan if self.worker else None
        self.summary.setText(f"The comparison of {_model_name(plan.model if plan else None)} stopped before it "
                             "finished.")
        self.message.setText(f"The comparison could not run: {message}{self.chat_model.restore()}")

    def _worker_done(self) -> None:
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.deleteLater()
        self._update_buttons()

    def shutdown(self, timeout_ms: int = SHUTDOWN_WAIT_MS) -> None:
        """Stop a running comparison and wait for its engine to shut down (the window is
        closing): what finished is saved; the chat model is not loaded again."""
        self._closed = True
        self.chat_model.abandon()
        self.runner.shutdown()
        worker = self.worker
        if worker is None:
            return
        worker.cancel()
        if not worker.wait(timeout_ms):
            # Still running (a step that can't be interrupted): it must not be destroyed
            # with the page (Qt aborts on a running QThread's destruction). Detached and kept
            # alive until it finishes; the process exits around it.
            # Its connections to this page stay: the slots ignore what comes after the
            # close (``_closed``). Disconnecting here raced the events already queued to them
            # (PySide freed the slot a queued call was about to run: a crash).
            log.warning("the comparison did not stop within %d ms", timeout_ms)
            _detach(worker)
            self.worker = None
        elif worker.outcome is not None and self.result is not worker.outcome:
            try:
                save_comparison(worker.outcome)
            except ComparisonFileError as e:
                log.warning("%s", e)

    # -- the chat's model ----------------------------------------------------------------
    @property
    def ask_unload(self):
        """``(name) -> UNLOAD | KEEP | None``: what to do with the chat's model (a question
        box; tests replace it)."""
        return self.chat_model.ask

    @ask_unload.setter
    def ask_unload(self, ask) -> None:
        self.chat_model.ask = ask

    # -- results -------------------------------------------------------------------------
    def show_result(self, result: ComparisonResult) -> None:
        """Show a finished comparison (a reopened one: not while one runs)."""
        if self.running:
            return
        self.result = result
        self.saved_path = None
        self.columns.show_result(result)
        self.charts.show_result(result)
        fill_table(self.table, result.results)
        self.summary.setText(_summary(result))
        self.message.setText("")
        self.results_stack.setCurrentWidget(self.results_tabs)
        self._update_buttons()

    def showEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        super().showEvent(event)
        if not self._models_listed:  # the library is scanned once, when the page is first seen
            self._models_listed = True
            self.runner.run("library", self.library.scan, self._models_scanned, lambda _e: None)

    def _models_scanned(self, models) -> None:
        listed = [(m.ref, m.name) for m in models if m.complete]
        self.setup.set_models(listed, self.setup.model_ref() or self.chat_model.ref())

    # -- export --------------------------------------------------------------------------
    def export(self, kind: str) -> bool:
        """Export the comparison shown as ``kind`` (csv, json, md, png) to a file chosen
        in a dialog; returns whether a file was written."""
        if self.result is None:
            return False
        caption, name_filter = EXPORTS[kind]
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        chosen = self.choose_save_path(caption, f"hearth-comparison-{stamp}.{kind}", name_filter)
        path = export_target(chosen, kind, self.confirm_overwrite) if chosen else None
        if path is None:
            return False

        def write(target: Path) -> str:
            if kind == "png":
                self.export_png(target)
                return "a picture of the results"
            try:
                export_comparison(self.result, target)
            except ComparisonFileError as e:
                raise OSError(str(e)) from None
            return f"the comparison ({kind.upper() if kind != 'md' else 'Markdown'})"
        outcome = write_export(path, write, self.settings)
        self.message.setText(outcome.message)
        return outcome.saved

    def export_png(self, path: str | Path) -> None:
        """A picture of the results view shown (columns, charts or table). OSError on failure."""
        shown = self.results_tabs.currentWidget()
        if isinstance(shown, QScrollArea) and shown.widget() is not None:
            shown = shown.widget()  # every chart, also those scrolled out of view
        if shown.layout() is not None:
            shown.layout().activate()  # what changed since the last event loop pass is laid out
        if not shown.grab().save(str(path), "PNG"):
            raise OSError(f"could not write a PNG image to {path}")

    def _dialog_save_path(self, caption: str, suggested: str, name_filter: str) -> str | None:
        kind = "pictures" if suggested.endswith(".png") else "documents"
        start = Path(export_start_dir(self.settings, kind)) / suggested
        path, _ = QFileDialog.getSaveFileName(self, caption, str(start), name_filter)
        return path or None

    # -- look ----------------------------------------------------------------------------
    def _apply_palette(self) -> None:
        pal = self.palette()
        self.charts.apply_palette(pal.color(QPalette.ColorRole.Base), pal.color(QPalette.ColorRole.Text))

    def changeEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        if event.type() in (QEvent.Type.PaletteChange, QEvent.Type.ApplicationPaletteChange,
                            QEvent.Type.StyleChange):
            self._apply_palette()
        super().changeEvent(event)


def _results_table() -> QTableWidget:
    table = QTableWidget(0, len(COLUMNS))
    table.setObjectName("compareTable")
    table.setHorizontalHeaderLabels([title for _key, title, _right in COLUMNS])
    table.verticalHeader().hide()
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setWordWrap(True)
    header = table.horizontalHeader()
    header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
    header.setSectionResizeMode(len(COLUMNS) - 1, QHeaderView.ResizeMode.Stretch)
    return table


def fill_table(table: QTableWidget, results) -> None:
    """One row per configuration: ``compare_export.cells`` (the CLI's table)."""
    table.setRowCount(len(results))
    for row, r in enumerate(results):
        c = cells(r)
        c["error"] = page_text(c["error"])
        for col, (key, _title, right) in enumerate(COLUMNS):
            item = QTableWidgetItem(c[key])
            item.setToolTip(c[key] if key == "error" else "")
            if right:
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            table.setItem(row, col, item)
    table.resizeRowsToContents()  # an error's reason wraps in its cell


def _model_name(ref: str | None) -> str:
    return model_display_name(ref)


def _summary(result: ComparisonResult) -> str:
    name = f"{result.name}\n" if result.name else ""
    return name + summary_line(result) + "."
