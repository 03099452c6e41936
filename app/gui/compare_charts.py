"""The Compare page's bar charts: TTFT, decode speed, load time, weight memory, KV-cache
memory, peak memory, perplexity and agreement with the reference (before the first
divergence, and over the whole output), one horizontal bar per configuration.

Horizontal bars, so each configuration's label reads whole on the left axis, in the
order of the columns (the reference on top) and in its column's colour; each bar carries
its value at its end, so nobody needs to read the axis. A configuration without a value
(it failed, was cancelled, or the measurement was off) gets no bar and a "—" in its row.
Mouse zoom and pan are off (nothing to explore in a few bars). Background and text follow
the palette (light / dark), as on the Performance page.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QFont
from PySide6.QtWidgets import QFrame, QGridLayout, QWidget

from app.gui.chart_grid import ChartGrid
from app.gui.compare_columns import CONFIG_COLOURS, peak_caption
from app.services.compare_results import ComparisonResult, ConfigResult

MIB, GIB = float(1 << 20), float(1 << 30)


def _bytes_unit(values: Sequence[float | None]) -> tuple[float, str]:
    top = max((v for v in values if v is not None), default=0.0)
    return (GIB, "GiB") if top >= GIB else (MIB, "MiB")


def _percent(v: float | None) -> float | None:
    return None if v is None else 100.0 * v


#: key, title, how to read it (shown after the unit), the value of a result.
CHARTS: tuple[tuple[str, str, str, Callable[[ConfigResult], float | None]], ...] = (
    ("ttft", "Time to first token", "lower is better", lambda r: r.ttft_ms),
    ("decode", "Decode speed", "higher is better", lambda r: r.decode_tok_s),
    ("load", "Load time", "lower is better", lambda r: r.load_s),
    ("weights", "Weight memory", "lower is better", lambda r: r.weight_bytes),
    ("kv", "KV-cache memory", "lower is better", lambda r: r.kv_bytes),
    ("peak", "Peak memory", "lower is better", lambda r: r.peak_vram_bytes),
    ("ppl", "Perplexity", "lower is better", lambda r: r.perplexity),
    # (titles short enough for a chart ~200 px wide: the columns' names for the same figures)
    ("prefix", "Prefix agreement", "before divergence · higher is better",
     lambda r: _percent(r.prefix_agreement)),
    ("agree", "Agreement", "whole output · higher is better", lambda r: _percent(r.agreement)),
)
UNITS = {"ttft": "ms", "decode": "tok/s", "load": "s", "ppl": "", "prefix": "%", "agree": "%"}
BYTES = ("weights", "kv", "peak")
PERCENT = ("prefix", "agree")
BAR_HEIGHT = 0.62


def _fmt(value: float, key: str) -> str:
    if key == "ppl":
        return f"{value:.3f}" if value < 100 else f"{value:,.1f}"
    if key in PERCENT:
        return f"{value:.1f}%"
    if key in BYTES:
        return f"{value:.2f}" if value < 10 else f"{value:.1f}"
    return f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


def _missing(r: ConfigResult) -> str:
    """What a row without a bar says: why there is no value."""
    return {"error": "failed", "cancelled": "cancelled"}.get(r.status, "—")


#: The least width a chart is laid out at: narrower, the grid takes fewer columns.
CHART_MIN_WIDTH = 240


class CompareCharts(ChartGrid):
    """Nine bar charts in a grid (three columns, fewer where the page is narrow; scrolling
    where it is short). ``plots`` / ``bars`` / ``values`` by chart key (``values``: what
    each bar shows)."""

    max_columns = 3
    chart_min_width = CHART_MIN_WIDTH

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("compareCharts")
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.plots: dict[str, pg.PlotWidget] = {}
        self.bars: dict[str, pg.BarGraphItem] = {}
        self.values: dict[str, list[float | None]] = {}
        self._texts: dict[str, list[pg.TextItem]] = {}
        self._text_colour = QColor("black")
        self._titles: dict[str, str] = {}
        inner = QWidget()
        self._grid = grid = QGridLayout(inner)
        self._columns = 3
        grid.setContentsMargins(0, 0, 0, 0)
        grid.setSpacing(6)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        for i, (key, *_rest) in enumerate(CHARTS):
            plot = pg.PlotWidget()
            plot.setObjectName(f"compareChart_{key}")
            plot.setMinimumHeight(200)
            plot.setMenuEnabled(False)
            plot.setMouseEnabled(x=False, y=False)
            plot.hideButtons()
            item = plot.getPlotItem()
            item.invertY(True)  # the first configuration (the reference) on top, as in the columns
            item.showGrid(x=True, y=False, alpha=0.15)
            item.getAxis("bottom").enableAutoSIPrefix(False)
            item.getAxis("left").setStyle(tickLength=0)
            self.plots[key] = plot
            grid.addWidget(plot, i // 3, i % 3)
        self.setWidget(inner)
        self.show_results([])

    def show_result(self, result: ComparisonResult | None) -> None:
        self.show_results(result.results if result is not None else [])

    def show_results(self, results: Sequence[ConfigResult]) -> None:
        """Draw every chart for ``results`` (in column order; None-valued ones get no bar)."""
        labels = [r.shown_label for r in results]
        peak_name = next((peak_caption(r) for r in results if r.peak_memory_source), "Peak memory")
        for key, title, reading, value_of in CHARTS:
            raw = [value_of(r) for r in results]
            if key in BYTES:
                scale, unit = _bytes_unit(raw)
                values = [None if v is None else v / scale for v in raw]
            else:
                unit, values = UNITS[key], [None if v is None else float(v) for v in raw]
            if key == "peak":
                title = peak_name
            self._titles[key] = title
            # The unit and how to read it under the bars: a title that long would set the
            # chart's least width.
            self.plots[key].setLabel("bottom", f"{unit + ' · ' if unit else ''}{reading}")
            self._draw(key, labels, values, [_missing(r) for r in results])
        self._apply_text_colour()

    def _draw(self, key: str, labels: list[str], values: list[float | None], missing: list[str]) -> None:
        plot = self.plots[key]
        item = plot.getPlotItem()
        old = self.bars.pop(key, None)
        if old is not None:
            item.removeItem(old)
        for text in self._texts.pop(key, []):
            item.removeItem(text)
        self.values[key] = values
        rows = [i for i, v in enumerate(values) if v is not None]
        if rows:  # (pyqtgraph's bars can't be empty)
            bars = pg.BarGraphItem(x0=np.zeros(len(rows)), y=np.array(rows, float), height=BAR_HEIGHT,
                                   width=np.array([values[i] for i in rows], float), pen=pg.mkPen(None),
                                   brushes=[pg.mkBrush(CONFIG_COLOURS[i % len(CONFIG_COLOURS)]) for i in rows])
            item.addItem(bars)
            self.bars[key] = bars
        top = max((v for v in values if v is not None), default=0.0)
        span = top * 1.3 if top > 0 else 1.0  # room for the value after the longest bar
        if key in PERCENT:
            span = 140.0  # (room for "100.0%" after a full bar)
        texts = []
        font = QFont()
        font.setPointSizeF(font.pointSizeF() * 0.9)
        for i, v in enumerate(values):
            text = pg.TextItem(missing[i] if v is None else _fmt(v, key), anchor=(0, 0.5), color=self._text_colour)
            text.setFont(font)
            text.setPos(0 if v is None else v, i)
            item.addItem(text)
            texts.append(text)
        self._texts[key] = texts
        left = item.getAxis("left")
        left.setTicks([[(i, label) for i, label in enumerate(labels)], []])
        item.setXRange(0, span, padding=0)
        item.setYRange(-0.6, max(len(labels), 1) - 0.4, padding=0)

    # -- look ----------------------------------------------------------------------------
    def apply_palette(self, background: QColor, text: QColor) -> None:
        """Chart background and text in the widget palette's colours (light / dark)."""
        self._text_colour = QColor(text)
        for plot in self.plots.values():
            plot.setBackground(background)
            item = plot.getPlotItem()
            for side in ("left", "bottom"):
                axis = item.getAxis(side)
                axis.setPen(text)
                axis.setTextPen(text)
        self._apply_text_colour()

    def _apply_text_colour(self) -> None:
        for key, plot in self.plots.items():
            plot.setTitle(self._titles.get(key, ""), color=self._text_colour, size="10pt")
            for t in self._texts.get(key, []):
                t.setColor(self._text_colour)

    def titles(self) -> dict[str, str]:
        """Each chart's title as shown (for tests and the PNG's reader)."""
        return dict(self._titles)


def chart_text(charts: CompareCharts, key: str) -> list[str]:
    """The value labels one chart shows, in row order (tests read these)."""
    return [t.textItem.toPlainText() for t in charts._texts.get(key, [])]

