"""A scrolled grid of charts that takes fewer charts a row where the page is narrow (the
Compare page's bar charts, the Performance page's time charts): each chart keeps at least
``chart_min_width`` pixels, so titles and legends are never cut off; the grid scrolls instead."""

from __future__ import annotations

from PySide6.QtWidgets import QScrollArea


class ChartGrid(QScrollArea):
    """A subclass sets ``max_columns`` and ``chart_min_width`` and, as it builds, ``_grid``
    (the QGridLayout), ``plots`` (the charts in order) and ``_columns`` (as laid out)."""

    max_columns = 2
    chart_min_width = 320

    def columns(self) -> int:
        """How many charts a row holds now."""
        return self._columns

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        super().resizeEvent(event)
        columns = max(1, min(self.max_columns, self.viewport().width() // self.chart_min_width))
        if columns != self._columns:  # a narrower page: fewer charts a row, more rows (it scrolls)
            self._columns = columns
            for plot in self.plots.values():
                self._grid.removeWidget(plot)
            for i, plot in enumerate(self.plots.values()):
                self._grid.addWidget(plot, i // columns, i % columns)
            self._grid.activate()  # the new rows' height, before the scroll area sizes the grid
            self.setWidgetResizable(True)
