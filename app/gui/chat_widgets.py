"""Pieces of the chat page: one message bubble, and the sampling-parameters panel."""

from __future__ import annotations

from PySide6.QtCore import QSettings, Qt, Signal
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (QDoubleSpinBox, QFormLayout, QFrame, QGroupBox, QHBoxLayout,
                               QLabel, QPlainTextEdit, QPushButton, QSpinBox, QVBoxLayout)

from engine.api import SamplingParams

ROLE_TITLES = {"user": "You", "assistant": "Assistant", "notice": "Notice"}


def answer_footer(meta: dict, status: str) -> str:
    """'TTFT 120 ms · 41.2 tok/s · 57 tokens' plus how the answer ended."""
    parts = []
    if meta.get("ttft_ms") is not None:
        parts.append(f"TTFT {meta['ttft_ms']:.0f} ms")
    if meta.get("decode_tok_s"):
        parts.append(f"{meta['decode_tok_s']:.1f} tok/s")
    if meta.get("tokens") is not None:
        parts.append(f"{meta['tokens']} tokens")
    if meta.get("model"):
        parts.append(meta["model"])
    ending = {"stopped": "stopped", "interrupted": "interrupted (the app closed mid-answer)",
              "error": f"error: {meta.get('error', 'unknown')}", "streaming": "…"}.get(status)
    if meta.get("finish") == "length" and status == "complete":
        ending = "hit the max-tokens limit"
    if ending:
        parts.append(ending)
    return " · ".join(parts)


def display_markdown(text: str) -> str:
    """The Markdown to show for ``text``: a code fence still open (the answer is streaming
    mid-block) is closed for display, so the block renders as code while it grows."""
    fences = sum(1 for line in text.splitlines() if line.lstrip().startswith("```"))
    return text + "\n```" if fences % 2 else text


class MessageWidget(QFrame):
    """One turn: who, the text rendered as Markdown, a footer, and actions."""

    copyRequested = Signal(int)
    editRequested = Signal(int)
    regenerateRequested = Signal(int)
    versionRequested = Signal(int, int)  # message id, -1 for the previous version or +1 for the next

    def __init__(self, msg_id: int, role: str, text: str = "", status: str = "complete",
                 meta: dict | None = None, parent=None) -> None:
        super().__init__(parent)
        self.msg_id = msg_id
        self.role = role
        self._text = text
        self.setObjectName(f"message-{role}")
        self.setFrameShape(QFrame.StyledPanel)
        self.setAutoFillBackground(role == "user")
        if role == "user":
            self.setBackgroundRole(self.palette().ColorRole.AlternateBase)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(10, 6, 10, 6)
        head = QHBoxLayout()
        title = QLabel(f"<b>{ROLE_TITLES.get(role, role)}</b>")
        head.addWidget(title)
        head.addStretch(1)
        self.copy_button = QPushButton("Copy")
        self.copy_button.setFlat(True)
        self.copy_button.clicked.connect(self.copy)
        head.addWidget(self.copy_button)
        if role == "user":
            self.edit_button = QPushButton("Edit")
            self.edit_button.setFlat(True)
            self.edit_button.setToolTip("Put this message back in the input box; sending replaces it "
                                        "and everything after it")
            self.edit_button.clicked.connect(lambda: self.editRequested.emit(self.msg_id))
            head.addWidget(self.edit_button)
        if role == "assistant":
            self.regen_button = QPushButton("Regenerate")
            self.regen_button.setFlat(True)
            self.regen_button.clicked.connect(lambda: self.regenerateRequested.emit(self.msg_id))
            head.addWidget(self.regen_button)
        if role == "notice":
            self.copy_button.hide()
        lay.addLayout(head)
        self.body = QLabel()
        self.body.setObjectName("messageBody")
        self.body.setWordWrap(True)
        self.body.setTextFormat(Qt.TextFormat.MarkdownText)
        self.body.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse
                                          | Qt.TextInteractionFlag.LinksAccessibleByMouse)
        self.body.setOpenExternalLinks(True)
        lay.addWidget(self.body)
        self.footer = QLabel()
        self.footer.setObjectName("messageFooter")
        self.footer.setEnabled(False)  # greyed, in light and dark palettes alike
        lay.addWidget(self.footer)
        self.set_text(text)
        self.set_footer(meta or {}, status)

    @property
    def text(self) -> str:
        return self._text

    def set_text(self, text: str) -> None:
        self._text = text
        self.body.setText(display_markdown(text) if text else "…")

    def set_footer(self, meta: dict, status: str) -> None:
        line = answer_footer(meta, status) if self.role == "assistant" else ""
        self.footer.setText(line)
        self.footer.setVisible(bool(line))

    def set_actions_enabled(self, enabled: bool) -> None:
        for name in ("edit_button", "regen_button"):
            button = getattr(self, name, None)
            if button is not None:
                button.setEnabled(enabled)

    def copy(self) -> None:
        QGuiApplication.clipboard().setText(self._text)
        self.copyRequested.emit(self.msg_id)

    # -- answer versions (‹ 1/2 ›), built on first use ------------------------------------
    versions_bar: QFrame | None = None
    _versions_enabled = True

    def set_versions(self, version: int, count: int) -> None:
        """Show "‹ version/count ›" in the header; hidden while there is only one version."""
        if self.versions_bar is None:
            if count <= 1:
                return
            self._build_versions_bar()
        self.versions_label.setText(f"{version}/{count}")
        self.versions_label.setToolTip(f"Version {version} of {count} of this answer")
        self._version, self._version_count = version, count
        self.versions_bar.setVisible(count > 1)
        self.set_versions_enabled(self._versions_enabled)

    def set_versions_enabled(self, enabled: bool) -> None:
        self._versions_enabled = enabled
        if self.versions_bar is not None:
            self.prev_version_button.setEnabled(enabled and self._version > 1)
            self.next_version_button.setEnabled(enabled and self._version < self._version_count)

    def _build_versions_bar(self) -> None:
        self.versions_bar = QFrame()
        self.versions_bar.setObjectName("versionsBar")
        row = QHBoxLayout(self.versions_bar)
        row.setContentsMargins(0, 0, 0, 0)
        row.setSpacing(0)

        def arrow(name: str, text: str, tip: str, step: int) -> QPushButton:
            b = QPushButton(text)
            b.setObjectName(name)
            b.setFlat(True)
            b.setToolTip(tip)
            b.setFixedWidth(b.fontMetrics().horizontalAdvance(text) + 14)
            b.clicked.connect(lambda: self.versionRequested.emit(self.msg_id, step))
            return b

        self.prev_version_button = arrow("previousVersion", "‹", "Previous version of this answer", -1)
        self.versions_label = QLabel()
        self.versions_label.setObjectName("versionLabel")
        self.next_version_button = arrow("nextVersion", "›", "Next version of this answer", +1)
        for w in (self.prev_version_button, self.versions_label, self.next_version_button):
            row.addWidget(w)
        # Into the header row, just before the Copy button.
        head = self._header_layout()
        head.insertWidget(head.indexOf(self.copy_button), self.versions_bar)

    def _header_layout(self) -> QHBoxLayout:
        """The row holding the role title and the action buttons (found by its Copy
        button, so the header can be arranged differently without breaking this)."""
        rows = [self.layout()]
        while rows:
            row = rows.pop()
            if row.indexOf(self.copy_button) >= 0:
                return row
            rows += [row.itemAt(i).layout() for i in range(row.count()) if row.itemAt(i).layout()]
        raise LookupError("the message header has no Copy button")


class ParamsPanel(QGroupBox):
    """System prompt and sampling parameters; values persist in QSettings."""

    systemPromptEdited = Signal(str)

    def __init__(self, settings: QSettings, parent=None) -> None:
        super().__init__("Parameters", parent)
        self.settings = settings
        outer = QVBoxLayout(self)
        form = QFormLayout()
        outer.addLayout(form)
        outer.addStretch(1)  # keep the fields together at the top
        self.system_prompt = QPlainTextEdit()
        self.system_prompt.setObjectName("systemPrompt")
        self.system_prompt.setPlaceholderText("System prompt (this conversation)")
        self.system_prompt.setMaximumHeight(90)
        self.system_prompt.textChanged.connect(
            lambda: self.systemPromptEdited.emit(self.system_prompt.toPlainText()))
        form.addRow(QLabel("System prompt"))
        form.addRow(self.system_prompt)

        def dspin(name, lo, hi, step, default, decimals=2):
            w = QDoubleSpinBox()
            w.setObjectName(name)
            w.setRange(lo, hi)
            w.setSingleStep(step)
            w.setDecimals(decimals)
            w.setValue(float(settings.value(f"sampling/{name}", default)))
            w.valueChanged.connect(lambda v: settings.setValue(f"sampling/{name}", v))
            return w

        def ispin(name, lo, hi, default, special=None):
            w = QSpinBox()
            w.setObjectName(name)
            w.setRange(lo, hi)
            if special:
                w.setSpecialValueText(special)
            w.setValue(int(settings.value(f"sampling/{name}", default)))
            w.valueChanged.connect(lambda v: settings.setValue(f"sampling/{name}", v))
            return w

        self.temperature = dspin("temperature", 0.0, 2.0, 0.05, 0.7)
        self.top_p = dspin("top_p", 0.01, 1.0, 0.05, 1.0)
        self.top_k = ispin("top_k", 0, 1000, 0, special="off")
        self.min_p = dspin("min_p", 0.0, 1.0, 0.01, 0.0)
        self.repetition_penalty = dspin("repetition_penalty", 0.5, 2.0, 0.05, 1.0)
        self.max_tokens = ispin("max_tokens", 1, 131072, 512)
        self.seed = ispin("seed", -1, 2**31 - 1, -1, special="random")
        self.temperature.setToolTip("0 = greedy (always the most likely token)")
        form.addRow("Temperature", self.temperature)
        form.addRow("Top-p", self.top_p)
        form.addRow("Top-k", self.top_k)
        form.addRow("Min-p", self.min_p)
        form.addRow("Repetition penalty", self.repetition_penalty)
        form.addRow("Max tokens", self.max_tokens)
        form.addRow("Seed", self.seed)

    def set_system_prompt(self, text: str) -> None:
        self.system_prompt.blockSignals(True)
        self.system_prompt.setPlainText(text)
        self.system_prompt.blockSignals(False)

    def sampling_params(self) -> SamplingParams:
        seed = self.seed.value()
        return SamplingParams(
            temperature=self.temperature.value(),
            top_p=self.top_p.value(),
            top_k=self.top_k.value(),
            min_p=self.min_p.value(),
            repetition_penalty=self.repetition_penalty.value(),
            max_tokens=self.max_tokens.value(),
            seed=None if seed < 0 else seed,
        )


class NoticeBar(QLabel):
    """A one-line message strip (errors and hints) that the user can read at a glance."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("noticeBar")
        self.setWordWrap(True)
        self.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.setFrameShape(QFrame.StyledPanel)
        self.setContentsMargins(6, 4, 6, 4)
        self.hide()

    def show_message(self, text: str) -> None:
        self.setText(text)
        self.setVisible(bool(text))
