"""A one-line label that never widens its window: text that doesn't fit is elided."""

from __future__ import annotations

from PySide6.QtCore import QSize, Qt
from PySide6.QtWidgets import QLabel, QSizePolicy, QWidget

#: Widest a label asks to be (it may get more where the layout stretches it).
MAX_HINT_PX = 520


class ElidedLabel(QLabel):
    """Shows as much of its text as fits, with "…" where the rest was cut; the whole text
    is then its tooltip. Its size hint is the text's width (at most ``max_hint`` px) and its
    minimum only a few characters, so a long model path can't push the window wider.

    ``text()`` returns the whole text, not the part shown.
    """

    def __init__(self, text: str = "", parent: QWidget | None = None, *,
                 mode: Qt.TextElideMode = Qt.TextElideMode.ElideMiddle, max_hint: int = MAX_HINT_PX) -> None:
        super().__init__(parent)
        self._full = ""
        self._detail = ""
        self._mode = mode
        self._max_hint = max_hint
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Preferred)
        self.setText(text)

    def setText(self, text: str) -> None:  # noqa: N802 (Qt naming)
        self._full = text or ""
        self.updateGeometry()
        self._elide()

    def text(self) -> str:
        return self._full

    def set_detail(self, detail: str) -> None:
        """A line the tooltip always shows (after the whole text, when that is cut)."""
        self._detail = detail or ""
        self._elide()

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt naming)
        hint = super().sizeHint()
        margins = self.contentsMargins()
        width = self.fontMetrics().horizontalAdvance(self._full) + margins.left() + margins.right() + 2
        return QSize(min(width, self._max_hint), hint.height())

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt naming)
        width = self.fontMetrics().horizontalAdvance("Wo…") if self._full else 0
        return QSize(min(width, self.sizeHint().width()), super().minimumSizeHint().height())

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        super().resizeEvent(event)
        self._elide()

    def _elide(self) -> None:
        shown = self.fontMetrics().elidedText(self._full, self._mode, max(self.contentsRect().width(), 0))
        super().setText(shown)
        self.setToolTip("\n".join(t for t in (self._full if shown != self._full else "", self._detail) if t))
