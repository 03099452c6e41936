"""The chat history's banner: shown over the transcript while something is wrong with it.

It says what the store says (``ChatStore.problem``): the history was damaged and moved
aside (news, with a Dismiss button), or chats can't be saved (read-only folder, full
disk) and live in memory. While saving may work again later it retries on a timer (and
on Try again); when a retry succeeds the chats are in the file and the banner goes.
The timer's retries are cheap while saving can't work (the store opens nothing), and
after a write-back that failed anyway the store pauses longer each time (5 s to 5 min);
Try again always tries at once.
"""

from __future__ import annotations

import shiboken6
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QPushButton, QSizePolicy

#: How often saving is tried again while it fails (a retry that can't succeed is cheap:
#: the store opens nothing while the disk is full or the file read-only).
RETRY_INTERVAL_MS = 5000

_STYLE = """
#storeBanner { border: 1px solid #d9a400; border-radius: 4px; background: #fff4ce; }
#storeBanner[severity="error"] { border-color: #c5221f; background: #fce8e6; }
#storeBanner QLabel { color: #202124; background: transparent; }
"""


class StoreBanner(QFrame):
    """Shows ``store.problem`` until it is gone (or dismissed, if it is only news)."""

    def __init__(self, store, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("storeBanner")
        self.setStyleSheet(_STYLE)
        self.store = store
        self._dismissed: str | None = None
        self.text = QLabel()
        self.text.setObjectName("storeBannerText")
        self.text.setWordWrap(True)
        self.text.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        # A long path must wrap, never widen the page.
        self.text.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.retry_button = QPushButton("Try again")
        self.retry_button.setObjectName("storeRetryButton")
        self.retry_button.setToolTip("Try to save the chats to the disk now")
        self.retry_button.clicked.connect(lambda: self.retry(now=True))
        self.dismiss_button = QPushButton("Dismiss")
        self.dismiss_button.setObjectName("storeDismissButton")
        self.dismiss_button.clicked.connect(self.dismiss)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(8, 6, 8, 6)
        lay.addWidget(self.text, 1)
        lay.addWidget(self.retry_button, 0, Qt.AlignmentFlag.AlignTop)
        lay.addWidget(self.dismiss_button, 0, Qt.AlignmentFlag.AlignTop)
        self.timer = QTimer(self)
        self.timer.setInterval(RETRY_INTERVAL_MS)
        self.timer.timeout.connect(lambda: self.retry(now=False))

        listener = self.refresh
        store.add_listener(listener)
        # The store may outlive this page (tests reuse one): stop hearing from it then.
        self.destroyed.connect(lambda *_: store.remove_listener(listener))
        self.refresh()

    def refresh(self) -> None:
        """Show what the store says now."""
        if not shiboken6.isValid(self):
            return
        problem = self.store.problem
        saving = self.store.mode == "normal"
        self.text.setText(problem or "")
        self.setProperty("severity", "info" if saving else "error")
        self.style().unpolish(self)
        self.style().polish(self)
        self.setAccessibleDescription(problem or "")
        self.retry_button.setVisible(self.store.retrying)
        self.dismiss_button.setVisible(saving)  # a problem that loses chats stays in sight
        self.setVisible(bool(problem) and problem != self._dismissed)
        if self.store.retrying:
            if not self.timer.isActive():
                self.timer.start()
        else:
            self.timer.stop()

    def retry(self, now: bool = True) -> None:
        """Try to save the chats (the store tells the banner if that worked). ``now=False``
        (the timer) lets the store wait out its pause after a write-back that failed."""
        if not self.store.retry_saving(now=now):
            self.refresh()

    def dismiss(self) -> None:
        self._dismissed = self.store.problem
        self.hide()
