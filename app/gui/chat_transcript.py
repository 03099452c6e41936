"""The chat transcript: one ``MessageWidget`` per message shown, in a scroll area that
follows the end of a growing answer (``TranscriptScroll``).

The page decides what to show (the selected path of the conversation tree from the store)
and when; this widget only builds, drops and finds message widgets, keeps them in the Tab
order between the transcript and the message box, and passes on what their buttons ask for.
"""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QVBoxLayout, QWidget

from app.gui.chat_layout import TranscriptScroll, tab_stops
from app.gui.chat_widgets import MessageWidget
from app.services.chat_store import Message


class Transcript(TranscriptScroll):
    editRequested = Signal(int)          # a user message's Edit
    regenerateRequested = Signal(int)    # an answer's Regenerate
    versionRequested = Signal(int, int)  # an answer's ‹ / ›: message id, -1 or +1

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("transcript")
        self.content = QWidget()
        self._layout = QVBoxLayout(self.content)
        self._layout.addStretch(1)
        self.setWidget(self.content)
        self.widgets: list[MessageWidget] = []

    def add_message(self, m: Message) -> MessageWidget:
        """Add a stored message (with its answer versions) at the end."""
        w = self.append(m.id, m.role, m.content, m.status, m.meta)
        w.set_versions(m.version, m.version_count)
        return w

    def append(self, msg_id, role, text, status="complete", meta=None) -> MessageWidget:
        w = MessageWidget(msg_id, role, text, status, meta)
        w.editRequested.connect(self.editRequested)
        w.regenerateRequested.connect(self.regenerateRequested)
        w.versionRequested.connect(self.versionRequested)
        self._layout.insertWidget(self._layout.count() - 1, w)
        self.widgets.append(w)
        self._place_in_tab_order(w)
        return w

    def drop_from(self, position: int) -> None:
        """Remove the widgets from the ``position``-th on."""
        for w in self.widgets[position:]:
            w.setParent(None)
            w.deleteLater()
        del self.widgets[position:]

    def widget_for(self, msg_id: int) -> MessageWidget | None:
        return next((w for w in self.widgets if w.msg_id == msg_id), None)

    def _place_in_tab_order(self, w: MessageWidget) -> None:
        """Tab goes through the messages between the transcript and the message box (Qt
        would put a widget made later after every other control, past the parameters)."""
        previous: QWidget = self
        if len(self.widgets) > 1:
            stops = tab_stops(self.widgets[-2])
            previous = stops[-1] if stops else previous
        for stop in tab_stops(w):
            QWidget.setTabOrder(previous, stop)
            previous = stop
