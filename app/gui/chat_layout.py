"""Layout pieces of the chat page: a transcript that follows its end, a three-pane
splitter that gives a narrow window's width to the transcript, and a side pane's
show/hide toggle."""

from __future__ import annotations

from PySide6.QtCore import QObject, QSettings, QSignalBlocker, Qt
from PySide6.QtGui import QAction
from PySide6.QtWidgets import QApplication, QScrollArea, QSplitter, QWidget

TRANSCRIPT_MIN_WIDTH = 250  # what the transcript keeps when nothing else can give way
TRANSCRIPT_COMFORT_WIDTH = 460  # in a narrow window, side panes shrink to give it this
LIST_NARROW_WIDTH = 120  # the conversation list gives way down to this first


def tab_stops(widget: QWidget) -> list[QWidget]:
    """The widgets inside ``widget`` that Tab stops at, in creation order."""
    return [c for c in widget.findChildren(QWidget) if c.focusPolicy() & Qt.FocusPolicy.TabFocus]


def scrolling_pane(widget: QWidget) -> QScrollArea:
    """``widget`` in a frameless pane that scrolls vertically when short of height, as
    narrow as ``widget`` allows (never sideways)."""
    pane = QScrollArea()
    pane.setWidget(widget)
    pane.setWidgetResizable(True)
    pane.setFrameShape(QScrollArea.Shape.NoFrame)
    pane.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    pane.setFocusPolicy(Qt.FocusPolicy.NoFocus)  # the widget's own fields are the stops
    pane.setMinimumWidth(widget.minimumSizeHint().width())
    return pane


class TranscriptScroll(QScrollArea):
    """A scroll area that follows the end of its content (a new answer, its growth) unless
    the user has scrolled up to read: then it stays put until they come back down.

    Following reacts to the scroll range itself, so it also works when the layout grows
    the content only after the call that asked to show the end (a new answer bubble whose
    size is known at the next layout pass)."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.setMinimumWidth(TRANSCRIPT_MIN_WIDTH)
        self._follow = True
        bar = self.verticalScrollBar()
        bar.rangeChanged.connect(self._on_range)
        bar.valueChanged.connect(self._on_value)

    def follow_end(self) -> None:
        """Show the end now and as the content grows (until the user scrolls up)."""
        self._follow = True
        bar = self.verticalScrollBar()
        bar.setValue(bar.maximum())

    def stop_following(self) -> None:
        """Stay where the view is (e.g. at an answer just flipped to another version)."""
        self._follow = False

    @property
    def following(self) -> bool:
        return self._follow

    def _on_range(self, _low: int, high: int) -> None:
        if self._follow:
            self.verticalScrollBar().setValue(high)

    def _on_value(self, value: int) -> None:
        self._follow = value >= self.verticalScrollBar().maximum()


class ChatSplitter(QSplitter):
    """Side pane, main pane, side pane. A plain splitter squeezes its stretching middle
    pane first when the window narrows; this one takes the width from the side panes
    instead (the first down to LIST_NARROW_WIDTH, then both to their minimums) until the
    middle has TRANSCRIPT_COMFORT_WIDTH, and gives it back to them when there is room, up
    to their preferred widths (the user's, once they drag a handle)."""

    def __init__(self, left_width: int, right_width: int, parent=None) -> None:
        super().__init__(parent)
        self._pane_widths = {0: left_width, 2: right_width}
        self.splitterMoved.connect(self._remember_pane_widths)

    def add_panes(self, left, middle, right) -> None:
        for pane in (left, middle, right):
            self.addWidget(pane)
        self.setStretchFactor(1, 1)
        self.setCollapsible(1, False)
        self.setSizes([self._pane_widths[0], 700, self._pane_widths[2]])

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        super().resizeEvent(event)
        self.fit()

    def fit(self) -> None:
        sizes = self.sizes()
        if len(sizes) != 3 or sum(sizes) == 0:
            return
        new = list(sizes)
        floors = [(0, LIST_NARROW_WIDTH), (2, self.widget(2).minimumWidth()),
                  (0, self.widget(0).minimumSizeHint().width())]
        for index, floor in floors:
            need = TRANSCRIPT_COMFORT_WIDTH - new[1]
            if need <= 0:
                break
            give = max(0, min(need, new[index] - floor)) if new[index] else 0
            new[index] -= give
            new[1] += give
        for index in (0, 2):  # a hidden (0) pane stays hidden
            room = new[1] - TRANSCRIPT_COMFORT_WIDTH
            if new[index] and new[index] < self._pane_widths[index] and room > 0:
                give = min(self._pane_widths[index] - new[index], room)
                new[index] += give
                new[1] -= give
        if new != sizes:
            self.setSizes(new)

    def _remember_pane_widths(self, *_args) -> None:
        sizes = self.sizes()
        for index in (0, 2):
            if sizes[index]:
                self._pane_widths[index] = sizes[index]


class PaneToggle(QObject):
    """Shows and hides a side pane through a checkable action (for a tool button and a
    View menu alike); the user's choice is remembered in QSettings under ``key``.

    A page narrower than ``auto_hide_below`` hides the pane by itself, leaving the
    remembered choice alone, and shows it again once the page is wide again; the user can
    still show it while narrow."""

    def __init__(self, pane: QWidget, action: QAction, settings: QSettings, key: str,
                 auto_hide_below: int) -> None:
        super().__init__(pane)
        self._pane, self._action, self._settings, self._key = pane, action, settings, key
        self._limit = auto_hide_below
        self._auto_hidden = False
        self._width = -1  # the page's width at the last resize
        action.setCheckable(True)
        action.toggled.connect(self.set_visible)
        self.set_visible(str(settings.value(key, "true")).lower() == "true")

    @property
    def visible(self) -> bool:
        return self._action.isChecked()

    def set_visible(self, visible: bool) -> None:
        """The user's choice: show or hide the pane, and remember it."""
        self._auto_hidden = False
        self._show(visible)
        self._settings.setValue(self._key, "true" if visible else "false")

    def page_resized(self, old_width: int, new_width: int) -> None:
        # A page resized while another one showed gets one resize when shown again, without
        # an old size: the width it had last time stands in (or the pane, hidden while
        # the window was narrow, stayed hidden in a wide one).
        old_width = old_width if old_width >= 0 else self._width
        self._width = new_width
        narrow, was_narrow = new_width < self._limit, 0 <= old_width < self._limit
        if narrow and not was_narrow and self.visible:
            self._show(False)
            self._auto_hidden = True
        elif was_narrow and not narrow and self._auto_hidden:
            self._show(True)
            self._auto_hidden = False

    def _show(self, visible: bool) -> None:
        self._pane.setVisible(visible)
        with QSignalBlocker(self._action):  # not a choice of the user's: nothing to save
            self._action.setChecked(visible)


def focus_fell_out(page: QWidget) -> bool:
    """Whether focus fell out of ``page`` while it is in use (the focused widget was deleted
    by a transcript rebuild, e.g. the Regenerate button that was clicked)."""
    if not page.isVisible() or not page.isActiveWindow():
        return False
    focus = QApplication.focusWidget()
    return focus is None or focus is page.window() or not focus.isVisible()
