"""The Performance page: live charts of latency, throughput, memory and load.

Data flow: the bridge's ``statsUpdated`` / ``requestFinished`` / ``modelLoaded`` /
``modelUnloaded`` signals and a 250 ms timer that samples ``Telemetry`` feed a Qt-free
``PerfHistory``. Recording never stops; drawing is kept cheap, because on a CPU-only
machine the page competes with the engine for the same cores:

* nothing is drawn while the page is not on screen (another page, a hidden or minimised
  window) or paused; showing it again catches up at once;
* a tick redraws only what changed: request charts when a request finished, sample curves
  that are visible, labels whose text changed; and when only the machine's own figures
  moved (CPU, RSS) with no engine activity, the page redraws once a second instead of
  four times;
* axes change rarely (``app.gui.perf_charts``), so a tick normally repaints curves only,
  not axes, ticks and grids.

Time on every chart is seconds since the panel started or was cleared.

With an NVIDIA GPU the memory chart stacks weights, KV cache and "other" on the GPU that
holds the model, under that GPU's used and total lines (other GPUs: used and total only);
the numbers row gives each GPU's VRAM and how busy it is (NVML's utilisation). Without one
(NVML missing, no driver) it shows process RSS (split the same way when the
model is on the CPU) and system RAM, adds a CPU chart, and a label says why.

The charts follow the chat's engine only: while models run elsewhere (a comparison loads
its own), a line under the buttons says so (``away_note``, set by the main window).

Pause freezes the charts and the numbers row, but recording goes on: on resume the charts
jump to the present with nothing missing. Clear forgets everything (paused or not).
"""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime
from pathlib import Path

from PySide6.QtCore import QEvent, QSize, QTimer
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (QFileDialog, QGridLayout, QHBoxLayout, QLabel, QPushButton,
                               QVBoxLayout, QWidget)

from app.gui.export_dirs import ask_overwrite, export_start_dir, export_target, write_export
from app.gui.perf_charts import GIB, PerfCharts
from app.services.perf_history import PerfHistory, SamplePoint
from app.services.telemetry import Telemetry

from engine.api import ModelInfo

__all__ = ["PerfPanel"]

log = logging.getLogger("hearth.gui.perf")

TICK_MS = 250
IDLE_REDRAW_S = 1.0  # with no engine activity the charts move slowly: redraw at 1 Hz
STATS_STALE_S = 2.0  # older stats mean the engine stopped reporting: draw a gap, not a flat line

class Figure(QLabel):
    """A figure of the row under the buttons: one line where there is room (its size hint
    is its text's width), wrapped where the page is narrow (its minimum is a word's): a long
    one ("RSS 0.64 GiB · RAM 1.2 / 23.5 GiB") set the window's minimum width to ~850 px."""

    def __init__(self, text: str = "") -> None:
        super().__init__(text)
        self.setWordWrap(True)

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt naming)
        margins = self.contentsMargins()
        width = self.fontMetrics().horizontalAdvance(self.text()) + margins.left() + margins.right() + 2
        return QSize(width, self.heightForWidth(width))


class PerfPanel(QWidget):
    """Live performance charts for one ``EngineBridge`` (or anything with its signals).

    ``telemetry``: a ``Telemetry`` (default: a new one on the real NVML / psutil).
    For tests: ``tick()`` samples and redraws at once, ``export_png(path)`` /
    ``export_csv(path)`` write files, ``choose_save_path`` can be replaced by a callable
    ``(caption, suggested_name, name_filter) -> path | None`` instead of a file dialog,
    and ``curves`` / ``plots`` name every chart item.
    """

    def __init__(self, bridge, telemetry: Telemetry | None = None, parent: QWidget | None = None,
                 settings=None) -> None:
        super().__init__(parent)
        self.settings = settings  # a QSettings for the export folder (None: this session only)
        self.setObjectName("perfPanel")
        self.bridge = bridge
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        if telemetry is None:  # ours to release (NVML) when the panel goes
            self.destroyed.connect(lambda *_, tel=self.telemetry: tel.close())
        self.history = PerfHistory(sample_hz=1000 / TICK_MS)
        self.choose_save_path = self._dialog_save_path
        self.confirm_overwrite = ask_overwrite(self)  # (path) -> bool; tests replace it
        # () -> why the engine's charts stay empty while models run elsewhere (a comparison
        # loads its own), or None; the main window sets it.
        self.away_note = lambda: None
        self._model_info: ModelInfo | None = getattr(bridge, "model_info", None)
        self._stats = None
        self._stats_t = 0.0
        self._paused = False
        self._gpu_mode: bool | None = None  # unknown until the first sample
        self._why_no_gpu: str | None = None
        self._drawn = {"requests": -1, "samples": -1}  # history versions on screen
        self.clock = time.monotonic  # for the idle redraw interval (tests replace it)
        self._drawn_at = -math.inf  # clock time of the last drawing
        self._drawn_activity = None  # engine-side figures of the newest sample drawn
        self.draw_count = 0  # drawings made (for tests and the soak test)
        self._export_dir: str | None = None  # the last folder saved to, without settings
        self._build_ui()
        self._apply_palette()

        bridge.statsUpdated.connect(self._on_stats)
        bridge.requestFinished.connect(self._on_finished)
        bridge.modelLoaded.connect(self._on_loaded)
        bridge.modelUnloaded.connect(self._on_unloaded)
        # A load keeps the old model serving until the new one is ready (modelLoaded), and
        # when it must make room first the bridge says modelUnloaded: nothing to do on
        # modelLoading or loadFailed.
        self.timer = QTimer(self)
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self.tick)
        self.timer.start()

    # -- construction --------------------------------------------------------------------
    def _build_ui(self) -> None:
        root = QVBoxLayout(self)
        bar = QHBoxLayout()
        self.pause_button = self._button("Pause", "perfPauseButton", bar,
                                         "Freeze the charts; recording goes on in the background")
        self.pause_button.setCheckable(True)
        self.pause_button.toggled.connect(self.set_paused)
        self._button("Clear", "perfClearButton", bar, "Forget all recorded data").clicked.connect(self.clear)
        self._button("Export PNG…", "perfExportPngButton", bar,
                     "Save a picture of this page").clicked.connect(lambda: self._export("png"))
        self._button("Export CSV…", "perfExportCsvButton", bar,
                     "Save every recorded point as one CSV file").clicked.connect(lambda: self._export("csv"))
        self.message = QLabel("")
        self.message.setObjectName("perfMessage")
        bar.addWidget(self.message, 1)
        root.addLayout(bar)

        self.no_gpu_label = QLabel("")
        self.no_gpu_label.setObjectName("perfNoGpuLabel")
        self.no_gpu_label.setWordWrap(True)
        self.no_gpu_label.hide()
        root.addWidget(self.no_gpu_label)

        self.away_label = QLabel("")
        self.away_label.setObjectName("perfAwayLabel")
        self.away_label.setWordWrap(True)
        self.away_label.hide()
        root.addWidget(self.away_label)

        # Captions over their values in one grid, so each figure sits under its name.
        numbers = QGridLayout()
        numbers.setHorizontalSpacing(28)
        numbers.setVerticalSpacing(0)
        self.values: dict[str, QLabel] = {}
        self.captions: dict[str, QLabel] = {}
        for col, (key, title) in enumerate((("ttft", "Last TTFT"), ("decode", "Last decode"),
                                            ("aggregate", "Aggregate"), ("kv", "KV cache"),
                                            ("memory", "VRAM"))):
            caption = Figure(title)
            caption.setObjectName(f"perfCaption_{key}")
            value = Figure("—")
            value.setObjectName(f"perfValue_{key}")
            font = value.font()
            font.setPointSizeF(font.pointSizeF() * 1.4)
            font.setBold(True)
            value.setFont(font)
            numbers.addWidget(caption, 0, col)
            numbers.addWidget(value, 1, col)
            self.values[key] = value
            self.captions[key] = caption
        numbers.setColumnStretch(5, 1)
        root.addLayout(numbers)

        self.charts = PerfCharts()
        self.chart_area = self.charts
        self.plots, self.curves = self.charts.plots, self.charts.curves  # every chart item, by name
        root.addWidget(self.charts, 1)

    def _button(self, text, name, layout, tip) -> QPushButton:
        b = QPushButton(text)
        b.setObjectName(name)
        b.setToolTip(tip)
        layout.addWidget(b)
        return b

    # -- bridge slots ----------------------------------------------------------------------
    def _on_stats(self, stats) -> None:
        self._stats = stats
        self._stats_t = time.monotonic()

    def _on_finished(self, _request_id: str, event) -> None:
        try:
            self.history.add_request(event)
        except (AttributeError, TypeError, ValueError):  # not a FinishedEvent: nothing to chart
            log.debug("ignored a finished event without usage/timings: %r", event)

    def _on_loaded(self, info: ModelInfo, _reloaded: bool = False) -> None:
        self._model_info = info

    def _on_unloaded(self, *_) -> None:
        self._model_info = None
        self._stats = None

    # -- public ----------------------------------------------------------------------------
    @property
    def paused(self) -> bool:
        return self._paused

    def set_paused(self, paused: bool) -> None:
        """Freeze (True) or unfreeze the charts; data is recorded either way."""
        self._paused = bool(paused)
        if self.pause_button.isChecked() != self._paused:
            self.pause_button.setChecked(self._paused)  # re-enters once, harmlessly
        self.pause_button.setText("Resume" if self._paused else "Pause")
        if not self._paused:
            self.redraw(force=True)

    def clear(self) -> None:
        """Forget every recorded point and empty the charts (also while paused)."""
        self.history.clear()
        self.message.setText("")
        self.redraw(force=True)

    def tick(self) -> None:
        """Sample telemetry, record one point, and redraw what changed if on screen."""
        sample = self.telemetry.sample()
        fresh = self._stats is not None and time.monotonic() - self._stats_t <= STATS_STALE_S
        self._why_no_gpu = sample.why_no_gpu
        device = self._model_info.device if self._model_info is not None else None
        self.history.add_sample(self._stats if fresh else None, sample, device)
        if self.on_screen():
            self._show_away_note()
        if self._due():
            self.redraw()

    def _show_away_note(self) -> None:
        note = self.away_note()
        _set_text(self.away_label, note or "")
        self.away_label.setVisible(bool(note))

    def on_screen(self) -> bool:
        """True when drawing can be seen: the page is shown and its window not minimised."""
        return self.isVisible() and not self.window().isMinimized()

    def _due(self) -> bool:
        """Draw now? Not when paused or off screen; at every tick while the engine's
        figures move or a request finished; otherwise (only CPU / RSS moved) once a second."""
        if self._paused or not self.on_screen():
            return False
        if self.history.requests_version != self._drawn["requests"]:
            return True
        if _activity(self.history.last_sample) != self._drawn_activity:
            return True
        return self.clock() - self._drawn_at >= IDLE_REDRAW_S

    def export_png(self, path: str | Path) -> None:
        """Save a picture of the whole panel, at its current size. Raises OSError on failure."""
        self.layout().activate()  # the numbers row may have grown since the last event loop pass
        if not self.grab().save(str(path), "PNG"):
            raise OSError(f"could not write a PNG image to {path}")

    def export_csv(self, path: str | Path) -> int:
        """Save every recorded point (format: ``app.services.perf_history``); returns rows."""
        return self.history.to_csv(path)

    # -- drawing ---------------------------------------------------------------------------
    def redraw(self, force: bool = False) -> None:
        """Push what changed in the history into the charts (everything when ``force``)."""
        if not self.on_screen():
            return  # showEvent catches up
        h = self.history
        new_requests = force or h.requests_version != self._drawn["requests"]
        new_samples = force or h.samples_version != self._drawn["samples"]
        if not (new_requests or new_samples):
            return
        last = h.last_sample
        gpu_mode = bool(last.gpus) if last is not None else bool(self._gpu_mode)
        if gpu_mode != self._gpu_mode:
            self._switch_mode(gpu_mode)
        if new_requests:
            self.charts.draw_requests(h)
        if new_samples:
            self.charts.draw_samples(h, gpu_mode)
        self._update_numbers(last, gpu_mode)
        self.charts.fit_time_axis(h)
        self._drawn = {"requests": h.requests_version, "samples": h.samples_version}
        self._drawn_at = self.clock()
        self._drawn_activity = _activity(last)
        self.draw_count += 1

    def _switch_mode(self, gpu_mode: bool) -> None:
        self._gpu_mode = gpu_mode
        self.charts.switch_mode(gpu_mode)
        self.captions["memory"].setText("VRAM" if gpu_mode else "Memory")
        self._apply_titles()

    def _update_numbers(self, last: SamplePoint | None, gpu_mode: bool) -> None:
        reqs = self.history.requests
        ttft = next((r.ttft_ms for r in reversed(reqs) if r.ttft_ms is not None), None)
        dec = next((r.decode_tok_s for r in reversed(reqs) if r.decode_tok_s is not None), None)
        agg = last.gen_tok_s if last is not None else None
        kv = last.kv_usage_pct if last is not None else None
        if last is None:
            memory = "—"
        elif gpu_mode:
            # Each GPU's VRAM and how busy NVML says it is (a split load: every GPU it uses).
            memory = "  ".join(f"{'GPU%d ' % g.index if len(last.gpus) > 1 else ''}"
                               f"{g.used_bytes / GIB:.1f} / {g.total_bytes / GIB:.1f} GiB"
                               + ("" if g.util_pct is None else f", {g.util_pct:.0f} % busy")
                               for g in last.gpus)
        else:
            memory = (f"RSS {last.process_rss_bytes / GIB:.2f} GiB · RAM "
                      f"{last.ram_used_bytes / GIB:.1f} / {last.ram_total_bytes / GIB:.1f} GiB")
        texts = {"ttft": "—" if ttft is None else f"{ttft:.0f} ms",
                 "decode": "—" if dec is None else f"{dec:.1f} tok/s",
                 "aggregate": "—" if agg is None else f"{agg:.1f} tok/s",
                 "kv": "—" if kv is None else f"{kv:.0f} %",
                 "memory": memory}
        for key, text in texts.items():
            _set_text(self.values[key], text)
        show_why = not gpu_mode and last is not None
        if self.no_gpu_label.isVisibleTo(self) != show_why:
            self.no_gpu_label.setVisible(show_why)
        if show_why:
            why = self._why_no_gpu or self.telemetry.why_no_gpu or "NVML reported no GPU"
            _set_text(self.no_gpu_label, f"No NVIDIA GPU: showing process memory and CPU instead ({why}).")

    # -- export -------------------------------------------------------------------------------
    def export_dir(self, kind: str) -> str:
        """Where the save dialog opens: the last folder used, else Pictures (PNG) or
        Documents (CSV)."""
        if self.settings is None and self._export_dir and Path(self._export_dir).is_dir():
            return self._export_dir
        return export_start_dir(self.settings, "pictures" if kind == "png" else "documents")

    def _dialog_save_path(self, caption: str, suggested: str, name_filter: str) -> str | None:
        kind = "png" if suggested.endswith(".png") else "csv"
        path, _ = QFileDialog.getSaveFileName(self, caption, str(Path(self.export_dir(kind)) / suggested),
                                              name_filter)
        return path or None

    def _export(self, kind: str) -> None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        suggested = f"hearth-performance-{stamp}.{kind}"
        caption, name_filter = (("Export chart image", "PNG image (*.png)") if kind == "png" else
                                ("Export recorded data", "CSV file (*.csv)"))
        chosen = self.choose_save_path(caption, suggested, name_filter)
        path = export_target(chosen, kind, self.confirm_overwrite) if chosen else None
        if path is None:
            return

        def write(target: Path) -> str:
            if kind == "png":
                self.export_png(target)
                return "the chart image"
            return f"{self.export_csv(target)} rows"
        self.message.setText(write_export(path, write, self.settings).message)
        if path.exists():
            self._export_dir = str(path.parent)

    # -- look ----------------------------------------------------------------------------------
    def _apply_palette(self) -> None:
        """Chart background and text follow the widget palette (system light / dark)."""
        pal = self.palette()
        self.charts.apply_palette(pal.color(QPalette.ColorRole.Base), pal.color(QPalette.ColorRole.Text))

    def _apply_titles(self) -> None:
        self.charts.apply_titles(self.palette().color(QPalette.ColorRole.Text))

    def changeEvent(self, event) -> None:
        if event.type() in (QEvent.Type.PaletteChange, QEvent.Type.ApplicationPaletteChange,
                            QEvent.Type.StyleChange):
            self._apply_palette()
        super().changeEvent(event)

    def showEvent(self, event) -> None:
        super().showEvent(event)
        self._show_away_note()
        if not self._paused:
            self.redraw()  # catch up on what was recorded while another page was shown


def _set_text(label: QLabel, text: str) -> None:
    """Set a label's text only when it changed (a new text re-lays out the row)."""
    if label.text() != text:
        label.setText(text)


def _activity(s: SamplePoint | None) -> tuple | None:
    """The figures of a sample that the engine moves (not the machine's CPU and RSS): while
    these change the page redraws at every tick, otherwise once a second."""
    if s is None:
        return None
    return (s.gen_tok_s, s.prompt_tok_s, s.kv_usage_pct, s.running, s.waiting, s.weights_bytes,
            s.kv_cache_bytes, tuple((g.index, g.used_bytes, g.total_bytes) for g in s.gpus))
