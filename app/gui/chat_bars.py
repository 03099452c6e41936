"""The two bars of the chat page around its transcript: the header (the model in use, the
parameters-panel toggle) and the message bar (the message box, Send, Stop)."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction
from PySide6.QtWidgets import (QHBoxLayout, QPushButton, QSizePolicy, QToolButton, QVBoxLayout,
                               QWidget)

from app.gui.chat_widgets import ChatInput
from app.gui.elided_label import ElidedLabel

from engine.api import ModelInfo


class ChatHeader(QWidget):
    """The model line (elided: a long description never widens the page) and the
    Parameters button; ``params_action`` is also offered in the View menu."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model_label = ElidedLabel("No model loaded", mode=Qt.TextElideMode.ElideRight)
        self.model_label.setObjectName("chatModelLabel")
        # A long model description must not widen the page (at 640 px it is cut).
        self.model_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.params_action = QAction("Parameters panel", self)
        self.params_action.setIconText("Parameters")  # what the tool button shows
        self.params_action.setObjectName("paramsAction")
        self.params_action.setCheckable(True)
        self.params_action.setToolTip("Show or hide the parameters panel (system prompt, sampling)")
        self.params_button = QToolButton()
        self.params_button.setObjectName("paramsButton")
        self.params_button.setDefaultAction(self.params_action)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.model_label, 1)
        row.addWidget(self.params_button)


class MessageBar(QWidget):
    """The message box with Send and Stop beside it (the page connects them)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.input = ChatInput()
        self.input.setObjectName("chatInput")
        self.input.setPlaceholderText("Message (Ctrl+Enter sends, Esc stops)")
        self.input.setToolTip("Ctrl+Enter sends · Esc stops the answer · Tab moves on, "
                              "Ctrl+Tab types a tab")
        self.input.setMaximumHeight(120)
        self.send_button = QPushButton("Send")
        self.send_button.setObjectName("sendButton")
        self.send_button.setToolTip("Send (Ctrl+Enter)")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setObjectName("stopButton")
        self.stop_button.setToolTip("Stop the answer (Esc); the text so far is kept")
        self.stop_button.setEnabled(False)
        buttons = QVBoxLayout()
        buttons.addWidget(self.send_button)
        buttons.addWidget(self.stop_button)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.input, 1)
        row.addLayout(buttons)


def model_line(info: ModelInfo) -> str:
    """The header's description of a loaded model (its ``model_info``)."""
    line = f"{info.name} · {info.device} · {info.dtype} · {info.attention} · context {info.max_model_len}"
    if info.implementation == "transformers-fallback":
        line += " · transformers fallback (slower)"
    return line
