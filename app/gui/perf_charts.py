"""The Performance page's six charts: their plots and curves, ranges, and drawing.

``PerfCharts`` draws what ``app.gui.perf_panel.PerfPanel`` hands it from a ``PerfHistory``
and decides nothing about when: it keeps each axis range it set, and sets a range again
only when it must move (``app.services.chart_ranges``: values from zero to a round top,
time in steps of a tenth of the span, on the first chart; the others' x axes are linked
to it), because a new range regenerates that axis's ticks, labels and grid.

The charts follow the data: mouse zoom and pan are off, as the next step would undo them.
Legends sit in a row under each chart, never over the data. The whole grid scrolls inside
its area, so a small window (640x480) still fits the page.
"""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QFrame, QGridLayout, QWidget

from app.gui.chart_grid import ChartGrid
from app.services.chart_ranges import time_window, value_range
from app.services.perf_history import PerfHistory, SamplePoint

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
#: The least width a chart is laid out at (its title and legend whole): narrower, the grid
#: takes one chart a row (it scrolls) instead of cutting both charts of a row off.
CHART_MIN_WIDTH = 320


class PerfCharts(ChartGrid):
    """The chart grid. ``plots`` and ``curves`` name every chart item."""

    max_columns = 2
    chart_min_width = CHART_MIN_WIDTH

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("perfChartArea")
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.plots: dict[str, pg.PlotWidget] = {}
        self.curves: dict[str, pg.PlotDataItem] = {}
        self._curve_plot: dict[str, str] = {}  # curve name -> chart key
        self._ranges: dict[str, tuple[float, float]] = {}  # "key.axis" -> range shown
        self._aggregate = self._request_decode = np.zeros(0)  # both set the decode chart's range
        self._build()
        for key, *_ in CHARTS:  # empty charts read 0-100 ms, 0-10 tok/s ... from the start
            self.fit_values(key)
        self.fit_time_axis(None)

    # -- construction --------------------------------------------------------------------
    def _build(self) -> None:
        grid_widget = QWidget()
        self._grid = grid = QGridLayout(grid_widget)
        self._columns = 2
        grid.setContentsMargins(0, 0, 0, 0)
        self.setWidget(grid_widget)
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
            item.disableAutoRange()  # every range is set here (see the module docstring)
            plot.setMouseEnabled(x=False, y=False)
            plot.setMenuEnabled(False)
            plot.hideButtons()
            if self.plots:
                plot.setXLink(next(iter(self.plots.values())))
            plot.setProperty("hearthTitle", title)
            self.plots[key] = plot
            grid.addWidget(plot, i // 2, i % 2)

        self.curve("ttft", "ttft", "TTFT", scatter=True)
        self.curve("decode", "decode_request", "per request", scatter=True)
        self.curve("decode", "decode_aggregate", "aggregate")
        # The memory stack is drawn as three opaque fills from 0, tallest first and
        # shortest on top, which reads as stacked bands without FillBetweenItem's trouble
        # with gaps.
        for z, (name, label) in enumerate((("other", "other"), ("kv", "KV cache"), ("weights", "weights"))):
            c = self.curve("memory", name, label, fill=True)
            c.setZValue(z - 10)
        self.curve("memory", "rss", "process RSS")
        self.curve("memory", "ram_used", "system RAM used")
        self.curve("memory", "ram_total", "system RAM total", dashed=True)
        self.curve("kv", "kv_pct", "KV blocks used")
        self.curve("queue", "running", "running")
        self.curve("queue", "waiting", "waiting")
        self.curve("cpu", "process_cpu", "Hearth process (100 = one core)")
        self.curve("cpu", "system_cpu", "whole machine")

    def curve(self, plot: str, name: str, label: str, *, scatter=False, fill=False, dashed=False,
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

    def gpu_curves(self, index: int, label: str = "") -> tuple[pg.PlotDataItem, pg.PlotDataItem]:
        """The used / total lines of one GPU, made the first time it is seen."""
        name = f"gpu{index}_used"
        if name not in self.curves:
            colour = GPU_COLOURS[index % len(GPU_COLOURS)]
            self.curve("memory", name, f"GPU {index} used ({label})" if label else f"GPU {index} used",
                       colour=colour)
            self.curve("memory", f"gpu{index}_total", f"GPU {index} total", dashed=True, colour=colour)
        return self.curves[name], self.curves[f"gpu{index}_total"]

    # -- ranges --------------------------------------------------------------------------
    def set_range(self, key: str, axis: str, lo: float, hi: float) -> None:
        """Set one axis range, only when it differs from what is shown."""
        if self._ranges.get(f"{key}.{axis}") == (lo, hi):
            return
        self._ranges[f"{key}.{axis}"] = (lo, hi)
        if axis == "x":
            self.plots[key].setXRange(lo, hi, padding=0)
        else:
            self.plots[key].setYRange(lo, hi, padding=0)

    def fit_values(self, key: str, *series: np.ndarray) -> None:
        """Value axis of one chart from zero to a round top over the data drawn."""
        _, _, _, empty_top, floor_top = next(c for c in CHARTS if c[0] == key)
        tops = [float(np.nanmax(a)) for a in series if len(a) and not np.isnan(a).all()]
        self.set_range(key, "y", *value_range(tops, empty_top, floor_top))

    def fit_time_axis(self, h: PerfHistory | None) -> None:
        """Time axis: the whole recorded span, moving in steps. The x axes are linked, so
        setting the first chart's sets them all."""
        ends = [] if h is None else [(p.t, q.t) for p, q in ((h.first_sample, h.last_sample),
                                                             (h.first_request, h.last_request))
                                     if p is not None]
        window = time_window(min(a for a, _ in ends) if ends else None,
                             max(b for _, b in ends) if ends else None)
        self.set_range(CHARTS[0][0], "x", *window)

    # -- modes ---------------------------------------------------------------------------
    def switch_mode(self, gpu_mode: bool) -> None:
        """GPU memory lines (NVML) or process memory and a CPU chart (no NVIDIA GPU)."""
        for name in ("rss", "ram_used", "ram_total"):
            self.show_curve(name, not gpu_mode)
        for name in list(self.curves):
            if name.startswith("gpu"):
                self.show_curve(name, gpu_mode)
        self.plots["cpu"].setVisible(not gpu_mode)
        self.plots["memory"].setProperty("hearthTitle", "GPU memory" if gpu_mode else
                                         "Process and system memory")

    def show_curve(self, name: str, shown: bool) -> None:
        """Hide a curve and its legend entry together (a hidden curve's legend misleads)."""
        c = self.curves[name]
        c.setVisible(shown)
        legend = self.plots[self._curve_plot[name]].getPlotItem().legend
        listed = legend.getLabel(c) is not None
        if shown and not listed:
            legend.addItem(c, c.name())
        elif not shown and listed:
            legend.removeItem(c)

    # -- drawing -------------------------------------------------------------------------
    def draw_requests(self, h: PerfHistory) -> None:
        reqs = h.requests
        t_ttft = np.array([r.t for r in reqs if r.ttft_ms is not None], float)
        ttft = np.array([r.ttft_ms for r in reqs if r.ttft_ms is not None], float)
        t_dec = np.array([r.t for r in reqs if r.decode_tok_s is not None], float)
        dec = np.array([r.decode_tok_s for r in reqs if r.decode_tok_s is not None], float)
        self.curves["ttft"].setData(t_ttft, ttft)
        self.curves["decode_request"].setData(t_dec, dec)
        self.fit_values("ttft", ttft)
        self._request_decode = dec
        self.fit_values("decode", dec, self._aggregate)

    def draw_samples(self, h: PerfHistory, gpu_mode: bool) -> None:
        """Every visible sample curve (a mode switch comes with a full redraw, so hidden
        curves are drawn when they are shown again)."""
        samples = h.samples
        t = np.array([s.t for s in samples], float)

        def col(values) -> np.ndarray:
            return np.array([math.nan if v is None else v for v in values], float)

        def put(name: str, y: np.ndarray) -> np.ndarray:
            self.curves[name].setData(t, y)
            return y

        self._aggregate = put("decode_aggregate", col(s.gen_tok_s for s in samples))
        self.fit_values("decode", self._request_decode, self._aggregate)
        self.fit_values("kv", put("kv_pct", col(s.kv_usage_pct for s in samples)))
        self.fit_values("queue", put("running", col(s.running for s in samples)),
                        put("waiting", col(s.waiting for s in samples)))
        memory = []
        if not gpu_mode:
            self.fit_values("cpu", put("process_cpu", col(s.process_cpu_pct for s in samples)),
                            put("system_cpu", col(s.system_cpu_pct for s in samples)))
            memory += [put("rss", col(s.process_rss_bytes / GIB for s in samples)),
                       put("ram_used", col(s.ram_used_bytes / GIB for s in samples)),
                       put("ram_total", col(s.ram_total_bytes / GIB for s in samples))]

        # The stack: weights / KV / other on the model's GPU, or inside RSS for a CPU model.
        # Zero where the split is unknown (no model, model elsewhere), so the band vanishes.
        stack = np.zeros((3, len(samples)))
        for j, s in enumerate(samples):
            split = split_of(s, gpu_mode)
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
            names = {g.index: g.name for g in (h.last_sample.gpus if h.last_sample else ())}
            for i in sorted(drawn | set(h.gpu_indices())):
                self.gpu_curves(i, names.get(i, ""))
                by = [m.get(i) for m in per_sample]
                memory.append(put(f"gpu{i}_used", col(None if g is None else g.used_bytes / GIB for g in by)))
                memory.append(put(f"gpu{i}_total", col(None if g is None else g.total_bytes / GIB for g in by)))
        self.fit_values("memory", *memory)

    # -- look ----------------------------------------------------------------------------
    def apply_palette(self, background: QColor, text: QColor) -> None:
        """Chart background and text in the widget palette's colours (light / dark)."""
        for plot in self.plots.values():
            plot.setBackground(background)
            item = plot.getPlotItem()
            for axis in ("left", "bottom"):
                ax = item.getAxis(axis)
                ax.setPen(text)
                ax.setTextPen(text)
            legend = item.legend
            legend.setLabelTextColor(text)
            for _, label in legend.items:  # existing labels keep their colour otherwise
                label.setText(label.text, color=text)
        self.apply_titles(text)

    def apply_titles(self, text: QColor) -> None:
        for plot in self.plots.values():
            plot.setTitle(plot.property("hearthTitle"), color=text)


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


def split_of(s: SamplePoint, gpu_mode: bool) -> tuple[int, int, int] | None:
    """(weights, kv, other) bytes for one sample, or None where there is no split."""
    if gpu_mode:
        g = next((g for g in s.gpus if g.holds_model), None)
        return None if g is None else (g.weights_bytes, g.kv_cache_bytes, g.other_bytes)
    if s.gpus or s.weights_bytes is None:
        return None  # no model, or the model lives on a GPU
    weights, kv = s.weights_bytes, s.kv_cache_bytes or 0
    return weights, kv, max(0, s.process_rss_bytes - weights - kv)
