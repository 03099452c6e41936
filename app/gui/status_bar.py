"""The main window's status bar: temporary messages in an elided label.

QStatusBar paints a temporary message (``showMessage``) over the bar up to the permanent
widgets and cuts it there mid-word, so a long one ("Loading failed: ...") seemed to run into
the model's labels on the right; it also hid every normal widget meanwhile (Cancel loading
among them). Here a message shows in a label of its own that ends in "…" where it is cut,
the whole text its tooltip, in place of the widgets that ``give_way`` to it (the load's
progress line); ``currentMessage``, ``clearMessage`` and ``messageChanged`` behave as
QStatusBar's.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QStatusBar, QWidget

from app.gui.elided_label import ElidedLabel


class StatusBar(QStatusBar):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.message_label = ElidedLabel("", self, mode=Qt.TextElideMode.ElideRight)
        self.message_label.setObjectName("statusMessage")
        self.message_label.hide()
        self._yielding: list[QWidget] = []  # hidden while a message shows
        self._normal: list[QWidget] = []  # the normal widgets, in order (insertWidget's indices)
        self._text = ""
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.clearMessage)

    def addWidget(self, widget: QWidget, stretch: int = 0) -> None:  # noqa: N802 (Qt naming)
        self._normal.append(widget)
        super().addWidget(widget, stretch)

    def give_way(self, widget: QWidget, stretch: int = 1) -> None:
        """Put the message's label beside ``widget`` (a normal widget already added), which
        it replaces while a message shows."""
        self._yielding.append(widget)
        at = self._normal.index(widget) + 1
        self._normal.insert(at, self.message_label)
        self.insertWidget(at, self.message_label, stretch)
        self.message_label.setVisible(bool(self._text))
        widget.setVisible(not self._text)

    def showMessage(self, text: str, timeout: int = 0) -> None:  # noqa: N802 (Qt naming)
        self._timer.stop()
        if not text:
            self.clearMessage()
            return
        self._text = text
        self.message_label.setText(text)
        for w in self._yielding:
            w.hide()
        self.message_label.show()
        if timeout > 0:
            self._timer.start(timeout)
        self.messageChanged.emit(text)

    def clearMessage(self) -> None:  # noqa: N802 (Qt naming)
        self._timer.stop()
        if not self._text:
            return
        self._text = ""
        self.message_label.hide()
        self.message_label.setText("")
        for w in self._yielding:
            w.show()
        self.messageChanged.emit("")

    def currentMessage(self) -> str:  # noqa: N802 (Qt naming)
        return self._text
