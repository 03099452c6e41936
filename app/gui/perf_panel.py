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
* axes change rarely (``app.services.chart_ranges``): values from zero to a nice ceiling,
  time in steps of a tenth of the span, set on one chart (all x axes are linked), so a
  tick normally repaints curves only, not axes, ticks and grids.

Time on every chart is seconds since the panel started or was cleared. The charts follow
the data (mouse zoom and pan are off, as the next step would undo them); legends sit in a
row under each chart, never over the data.

With an NVIDIA GPU the memory chart stacks weights, KV cache and "other" on the GPU that
holds the model, under that GPU's used and total lines (other GPUs: used and total only).
Without one (NVML missing, no driver) it shows process RSS (split the same way when the
model is on the CPU) and system RAM, adds a CPU chart, and a label says why.

Pause freezes the charts and the numbers row, but recording goes on: on resume the charts
jump to the present with nothing missing. Clear forgets everything (paused or not).
"""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QEvent, Qt, QTimer
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (QFileDialog, QFrame, QGridLayout, QHBoxLayout, QLabel, QPushButton,
                               QScrollArea, QVBoxLayout, QWidget)

from app.gui.export_dirs import export_start_dir, remember_export_dir
from app.services.chart_ranges import time_window, value_range
from app.services.perf_history import PerfHistory, SamplePoint
from app.services.telemetry import Telemetry

__all__ = ["PerfPanel"]

log = logging.getLogger("hearth.gui.perf")

TICK_MS = 250
IDLE_REDRAW_S = 1.0  # with no engine activity the charts move slowly: redraw at 1 Hz
STATS_STALE_S = 2.0  # older stats mean the engine stopped reporting: draw a gap, not a flat line
GIB = float(1 << 30)

# Data colours (Tableau 10): mid-luminance hues that read on light and dark backgrounds.
# Text and backgrounds come from the palette.
COLOURS = {"weights": "#4e79a7", "kv": "#f28e2b", "other": "#bab0ac", "ttft": "#e15759",
           "decode_request": "#76b7b2", "decode_aggregate": "#59a14f", "kv_pct": "#f28e2b",
           "running": "#4e79a7", "waiting": "#e15759", "process_cpu": "#b07aa1",
           "system_cpu": "#9c755f", "rss": "#b07aa1", "ram_used": "#9c755f", "ram_total": "#9c755f"}
GPU_COLOURS = ("#59a14f", "#edc948", "#ff9da7", "#76b7b2", "#af7aa1", "#e15759")

# key, title, unit, the top of the value axis with no data / its least top with data.
CHARTS = (("ttft", "Time to first token per request", "ms", 100.0, 10.0),
          ("decode", "Decode speed", "tok/s", 10.0, 1.0),
          ("memory", "GPU memory", "GiB", 1.0, 0.0),
          ("kv", "KV-cache usage", "%", 100.0, 100.0),
          ("queue", "Requests", "count", 4.0, 4.0),
          ("cpu", "CPU", "%", 100.0, 100.0))
LEGEND_COLUMNS = {"memory": 3}


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
        self._model_info: dict | None = getattr(bridge, "model_info", None)
        self._stats = None
        self._stats_t = 0.0
        self._paused = False
        self._gpu_mode: bool | None = None  # unknown until the first sample
        self._why_no_gpu: str | None = None
        self._drawn = {"requests": -1, "samples": -1}  # history versions on screen
        self.clock = time.monotonic  # for the idle redraw interval (tests replace it)
        self._drawn_at = -math.inf  # clock time of the last drawing
        self._drawn_activity = None  # engine-side figures of the newest sample drawn
        self._axis_ranges: dict[str, tuple[float, float]] = {}
        self.draw_count = 0  # drawings made (for tests and the soak test)
        self._aggregate = self._request_decode = np.zeros(0)  # both feed the decode chart's range
        self._export_dir: str | None = None  # the last folder saved to, without settings
        self.plots: dict[str, pg.PlotWidget] = {}
        self.curves: dict[str, pg.PlotDataItem] = {}
        self._curve_plot: dict[str, str] = {}  # curve name -> chart key
        self._build_ui()
        self._apply_palette()
        for key, *_ in CHARTS:  # empty charts read 0-100 ms, 0-10 tok/s ... from the start
            self._fit_values(key)
        self._fit_time_axis()

        bridge.statsUpdated.connect(self._on_stats)
        bridge.requestFinished.connect(self._on_finished)
        bridge.modelLoaded.connect(self._on_loaded)
        bridge.modelUnloaded.connect(self._on_unloaded)
        # A load leaves the loaded model serving (its figures go on) until modelLoaded, or
        # until modelUnloaded where it makes room; a failed load leaves it serving.
        if hasattr(bridge, "loadFailed"):
            bridge.loadFailed.connect(self._on_load_failed)
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

        # Captions over their values in one grid, so each figure sits under its name.
        numbers = QGridLayout()
        numbers.setHorizontalSpacing(28)
        numbers.setVerticalSpacing(0)
        self.values: dict[str, QLabel] = {}
        self.captions: dict[str, QLabel] = {}
        for col, (key, title) in enumerate((("ttft", "Last TTFT"), ("decode", "Last decode"),
                                            ("aggregate", "Aggregate"), ("kv", "KV cache"),
                                            ("memory", "VRAM"))):
            caption = QLabel(title)
            caption.setObjectName(f"perfCaption_{key}")
            value = QLabel("—")
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

        # The charts scroll inside the page, so a small window (640x480) still fits it.
        charts = QWidget()
        grid = QGridLayout(charts)
        grid.setContentsMargins(0, 0, 0, 0)
        self.chart_area = QScrollArea()
        self.chart_area.setObjectName("perfChartArea")
        self.chart_area.setWidgetResizable(True)
        self.chart_area.setFrameShape(QFrame.Shape.NoFrame)
        self.chart_area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.chart_area.setWidget(charts)
        for i, (key, title, unit, _empty_top, _floor_top) in enumerate(CHARTS):
            plot = pg.PlotWidget()
            plot.setObjectName(f"perfPlot_{key}")
            plot.setMinimumHeight(170)
            item = plot.getPlotItem()
            # Plain unit labels: an automatic SI multiplier read "tok/s (x0.001)" on an empty chart.
            for side, label in (("left", unit), ("bottom", "time (s)")):
                plot.setLabel(side, label)
                item.getAxis(side).enableAutoSIPrefix(False)
            plot.showGrid(x=True, y=True, alpha=0.2)
            item.getAxis("left").setWidth(52)  # one width for all, so the linked time axes line up
            # The legend is a row of the plot's own layout, under the time axis: never over data.
            legend = _RowLegend(colCount=LEGEND_COLUMNS.get(key, 2), verSpacing=-4,
                                labelTextSize="8pt", frame=False)
            item.layout.addItem(legend, 4, 1)
            item.legend = legend  # curves added with a name list themselves here
            plot.setDownsampling(auto=True, mode="peak")
            # The panel sets every range itself (see the module docstring).
            item.disableAutoRange()
            plot.setMouseEnabled(x=False, y=False)
            plot.setMenuEnabled(False)
            plot.hideButtons()
            if self.plots:
                plot.setXLink(next(iter(self.plots.values())))
            plot.setProperty("hearthTitle", title)
            self.plots[key] = plot
            grid.addWidget(plot, i // 2, i % 2)
        root.addWidget(self.chart_area, 1)

        self._curve("ttft", "ttft", "TTFT", scatter=True)
        self._curve("decode", "decode_request", "per request", scatter=True)
        self._curve("decode", "decode_aggregate", "aggregate")
        # The memory stack is drawn as three opaque fills from 0, tallest first and
        # shortest on top, which reads as stacked bands without FillBetweenItem's trouble
        # with gaps.
        for z, (name, label) in enumerate((("other", "other"), ("kv", "KV cache"), ("weights", "weights"))):
            c = self._curve("memory", name, label, fill=True)
            c.setZValue(z - 10)
        self._curve("memory", "rss", "process RSS")
        self._curve("memory", "ram_used", "system RAM used")
        self._curve("memory", "ram_total", "system RAM total", dashed=True)
        self._curve("kv", "kv_pct", "KV blocks used")
        self._curve("queue", "running", "running")
        self._curve("queue", "waiting", "waiting")
        self._curve("cpu", "process_cpu", "Hearth process (100 = one core)")
        self._curve("cpu", "system_cpu", "whole machine")

    def _button(self, text, name, layout, tip) -> QPushButton:
        b = QPushButton(text)
        b.setObjectName(name)
        b.setToolTip(tip)
        layout.addWidget(b)
        return b

    def _curve(self, plot: str, name: str, label: str, *, scatter=False, fill=False, dashed=False,
               colour: str | None = None) -> pg.PlotDataItem:
        colour = colour or COLOURS[name]
        if scatter:
            item = pg.PlotDataItem(pen=None, symbol="o", symbolSize=7, symbolPen=None,
                                   symbolBrush=colour, name=label)
        else:
            style = Qt.PenStyle.DashLine if dashed else Qt.PenStyle.SolidLine
            pen = pg.mkPen(colour, width=2, style=style)
            item = pg.PlotDataItem(pen=pen, name=label, connect="finite")
            if fill:
                item.setFillLevel(0)
                item.setBrush(pg.mkBrush(colour))
        self.plots[plot].addItem(item)
        self.curves[name] = item
        self._curve_plot[name] = plot
        return item

    # -- bridge slots ----------------------------------------------------------------------
    def _on_stats(self, stats) -> None:
        self._stats = stats
        self._stats_t = time.monotonic()

    def _on_finished(self, _request_id: str, event) -> None:
        try:
            self.history.add_request(event)
        except (AttributeError, TypeError, ValueError):  # not a FinishedEvent: nothing to chart
            log.debug("ignored a finished event without usage/timings: %r", event)

    def _on_loaded(self, info: dict) -> None:
        self._model_info = dict(info)

    def _on_load_failed(self, *_) -> None:
        info = getattr(self.bridge, "model_info", None)
        self._model_info = dict(info) if info else None

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
        self.history.add_sample(self._stats if fresh else None, sample, self._model_info)
        if self._due():
            self.redraw()

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
            self._draw_requests()
        if new_samples:
            self._draw_samples(h.samples, gpu_mode)
        self._update_numbers(last, gpu_mode)
        self._fit_time_axis()
        self._drawn = {"requests": h.requests_version, "samples": h.samples_version}
        self._drawn_at = self.clock()
        self._drawn_activity = _activity(last)
        self.draw_count += 1

    def _set_range(self, key: str, axis: str, lo: float, hi: float) -> None:
        """Set one axis range, only when it differs from what is shown (a new range
        regenerates that axis's ticks, labels and grid)."""
        if self._axis_ranges.get(f"{key}.{axis}") == (lo, hi):
            return
        self._axis_ranges[f"{key}.{axis}"] = (lo, hi)
        if axis == "x":
            self.plots[key].setXRange(lo, hi, padding=0)
        else:
            self.plots[key].setYRange(lo, hi, padding=0)

    def _fit_values(self, key: str, *series: np.ndarray) -> None:
        """Value axis of one chart from zero to a nice top over the data drawn."""
        _, _, _, empty_top, floor_top = next(c for c in CHARTS if c[0] == key)
        tops = [float(np.nanmax(a)) for a in series if len(a) and not np.isnan(a).all()]
        self._set_range(key, "y", *value_range(tops, empty_top, floor_top))

    def _fit_time_axis(self) -> None:
        """Time axis: the whole recorded span, moving in steps (see chart_ranges). The x
        axes are linked, so setting the first chart's sets them all."""
        h = self.history
        ends = [(p.t, q.t) for p, q in ((h.first_sample, h.last_sample),
                                         (h.first_request, h.last_request)) if p is not None]
        window = time_window(min(a for a, _ in ends) if ends else None,
                             max(b for _, b in ends) if ends else None)
        self._set_range(CHARTS[0][0], "x", *window)

    def _switch_mode(self, gpu_mode: bool) -> None:
        self._gpu_mode = gpu_mode
        for name in ("rss", "ram_used", "ram_total"):
            self._show_curve(name, not gpu_mode)
        for name in list(self.curves):
            if name.startswith("gpu"):
                self._show_curve(name, gpu_mode)
        self.plots["cpu"].setVisible(not gpu_mode)
        self.plots["memory"].setProperty("hearthTitle", "GPU memory" if gpu_mode else
                                         "Process and system memory")
        self.captions["memory"].setText("VRAM" if gpu_mode else "Memory")
        self._apply_titles()

    def _show_curve(self, name: str, shown: bool) -> None:
        """Hide a curve and its legend entry together (a hidden curve's legend misleads)."""
        c = self.curves[name]
        c.setVisible(shown)
        legend = self.plots[self._curve_plot[name]].getPlotItem().legend
        listed = legend.getLabel(c) is not None
        if shown and not listed:
            legend.addItem(c, c.name())
        elif not shown and listed:
            legend.removeItem(c)

    def _draw_requests(self) -> None:
        reqs = self.history.requests
        t_ttft = np.array([r.t for r in reqs if r.ttft_ms is not None], float)
        ttft = np.array([r.ttft_ms for r in reqs if r.ttft_ms is not None], float)
        t_dec = np.array([r.t for r in reqs if r.decode_tok_s is not None], float)
        dec = np.array([r.decode_tok_s for r in reqs if r.decode_tok_s is not None], float)
        self.curves["ttft"].setData(t_ttft, ttft)
        self.curves["decode_request"].setData(t_dec, dec)
        self._fit_values("ttft", ttft)
        self._request_decode = dec
        self._fit_values("decode", dec, self._aggregate)

    def _draw_samples(self, samples: list[SamplePoint], gpu_mode: bool) -> None:
        """Every visible sample curve (hidden ones are drawn when they are shown again:
        switching mode forces a full redraw)."""
        t = np.array([s.t for s in samples], float)

        def col(values) -> np.ndarray:
            return np.array([math.nan if v is None else v for v in values], float)

        def put(name: str, y: np.ndarray) -> np.ndarray:
            self.curves[name].setData(t, y)
            return y

        self._aggregate = put("decode_aggregate", col(s.gen_tok_s for s in samples))
        self._fit_values("decode", self._request_decode, self._aggregate)
        self._fit_values("kv", put("kv_pct", col(s.kv_usage_pct for s in samples)))
        self._fit_values("queue", put("running", col(s.running for s in samples)),
                         put("waiting", col(s.waiting for s in samples)))
        memory = []
        if not gpu_mode:
            self._fit_values("cpu", put("process_cpu", col(s.process_cpu_pct for s in samples)),
                             put("system_cpu", col(s.system_cpu_pct for s in samples)))
            memory += [put("rss", col(s.process_rss_bytes / GIB for s in samples)),
                       put("ram_used", col(s.ram_used_bytes / GIB for s in samples)),
                       put("ram_total", col(s.ram_total_bytes / GIB for s in samples))]

        # The stack: weights / KV / other on the model's GPU, or inside RSS for a CPU model.
        # Zero where the split is unknown (no model, model elsewhere), so the band vanishes.
        stack = np.zeros((3, len(samples)))
        for j, s in enumerate(samples):
            split = _split_of(s, gpu_mode)
            if split is not None:
                stack[:, j] = split
        tops = np.cumsum(stack, axis=0) / GIB
        for name, row in (("weights", 0), ("kv", 1), ("other", 2)):
            memory.append(put(name, tops[row]))

        if gpu_mode:
            drawn = {int(n[3:-5]) for n in self.curves if n.startswith("gpu") and n.endswith("_used")}
            # Every GPU curve is rewritten, including those of GPUs no longer in the buffer
            # (after a clear), so none keeps stale points.
            per_sample = [{g.index: g for g in s.gpus} for s in samples]
            for i in sorted(drawn | set(self.history.gpu_indices())):
                self._gpu_curves(i)
                by = [m.get(i) for m in per_sample]
                memory.append(put(f"gpu{i}_used", col(None if g is None else g.used_bytes / GIB for g in by)))
                memory.append(put(f"gpu{i}_total", col(None if g is None else g.total_bytes / GIB for g in by)))
        self._fit_values("memory", *memory)

    def _gpu_curves(self, index: int) -> tuple[pg.PlotDataItem, pg.PlotDataItem]:
        name = f"gpu{index}_used"
        if name not in self.curves:
            colour = GPU_COLOURS[index % len(GPU_COLOURS)]
            last = self.history.last_sample
            label = next((g.name for g in (last.gpus if last else ()) if g.index == index), "")
            self._curve("memory", name, f"GPU {index} used ({label})" if label else f"GPU {index} used",
                        colour=colour)
            self._curve("memory", f"gpu{index}_total", f"GPU {index} total", dashed=True, colour=colour)
        return self.curves[name], self.curves[f"gpu{index}_total"]

    def _update_numbers(self, last: SamplePoint | None, gpu_mode: bool) -> None:
        reqs = self.history.requests
        ttft = next((r.ttft_ms for r in reversed(reqs) if r.ttft_ms is not None), None)
        dec = next((r.decode_tok_s for r in reversed(reqs) if r.decode_tok_s is not None), None)
        agg = last.gen_tok_s if last is not None else None
        kv = last.kv_usage_pct if last is not None else None
        if last is None:
            memory = "—"
        elif gpu_mode:
            memory = "  ".join(f"{'GPU%d ' % g.index if len(last.gpus) > 1 else ''}"
                               f"{g.used_bytes / GIB:.1f} / {g.total_bytes / GIB:.1f} GiB"
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
        path = self.choose_save_path(caption, suggested, name_filter)
        if not path:
            return
        path = Path(path)
        if path.suffix.lower() != f".{kind}":
            path = path.with_name(path.name + f".{kind}")
        try:
            if kind == "png":
                self.export_png(path)
                self.message.setText(f"Saved {path}")
            else:
                rows = self.export_csv(path)
                self.message.setText(f"Saved {rows} rows to {path}")
        except OSError as e:
            self.message.setText(f"Could not save {path}: {e.strerror or e}. "
                                 "Choose a folder you can write to.")
            return
        self._export_dir = str(path.parent)
        remember_export_dir(self.settings, path)

    # -- look ----------------------------------------------------------------------------------
    def _apply_palette(self) -> None:
        """Chart background and text follow the widget palette (system light / dark)."""
        pal = self.palette()
        bg, fg = pal.color(QPalette.ColorRole.Base), pal.color(QPalette.ColorRole.Text)
        for plot in self.plots.values():
            plot.setBackground(bg)
            item = plot.getPlotItem()
            for axis in ("left", "bottom"):
                ax = item.getAxis(axis)
                ax.setPen(fg)
                ax.setTextPen(fg)
            legend = item.legend
            if legend is not None:
                # A translucent legend keeps the lines under it visible.
                legend.setBrush(pg.mkBrush(bg.red(), bg.green(), bg.blue(), 200))
                legend.setLabelTextColor(fg)
                for _, label in legend.items:  # existing labels keep their colour otherwise
                    label.setText(label.text, color=fg)
        self._apply_titles()

    def _apply_titles(self) -> None:
        fg = self.palette().color(QPalette.ColorRole.Text)
        for plot in self.plots.values():
            plot.setTitle(plot.property("hearthTitle"), color=fg)

    def changeEvent(self, event) -> None:
        if event.type() in (QEvent.Type.PaletteChange, QEvent.Type.ApplicationPaletteChange,
                            QEvent.Type.StyleChange):
            self._apply_palette()
        super().changeEvent(event)

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if not self._paused:
            self.redraw()  # catch up on what was recorded while another page was shown


class _RowLegend(pg.LegendItem):
    """A legend placed by its plot's layout (a row under the time axis). pyqtgraph's own
    resizing moves the legend to the plot's corner, over the data; this one only tells the
    layout the size it needs, and the layout places it."""

    def updateSize(self) -> None:  # noqa: N802 (pyqtgraph naming)
        self.layout.invalidate()
        hint = self.layout.effectiveSizeHint(Qt.SizeHint.PreferredSize)
        self.setMinimumHeight(hint.height())
        self.setPreferredSize(hint.width(), hint.height())
        self.setMaximumHeight(hint.height())
        self.updateGeometry()


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


def _split_of(s: SamplePoint, gpu_mode: bool) -> tuple[int, int, int] | None:
    """(weights, kv, other) bytes for one sample, or None where there is no split."""
    if gpu_mode:
        g = next((g for g in s.gpus if g.holds_model), None)
        return None if g is None else (g.weights_bytes, g.kv_cache_bytes, g.other_bytes)
    if s.gpus or s.weights_bytes is None:
        return None  # no model, or the model lives on a GPU
    weights, kv = s.weights_bytes, s.kv_cache_bytes or 0
    return weights, kv, max(0, s.process_rss_bytes - weights - kv)
