"""Pieces of the chat page: one message bubble, the message box, and the
sampling-parameters panel."""

from __future__ import annotations

import html

from PySide6.QtCore import QEvent, QMimeData, QSettings, QSize, Qt, QUrl, Signal
from PySide6.QtGui import QAction, QDesktopServices, QGuiApplication, QKeySequence, QPalette
from PySide6.QtWidgets import (QDoubleSpinBox, QFormLayout, QFrame, QGroupBox, QHBoxLayout,
                               QLabel, QMenu, QPlainTextEdit, QPushButton, QSizePolicy, QSpinBox,
                               QVBoxLayout)

from app.gui.chat_markdown import COPY_SCHEME, ZWSP, Rendered, code_blocks, render_markdown, strip_breaks
from app.gui.saved_values import saved_float, saved_int
from engine.api import SamplingParams

ROLE_TITLES = {"user": "You", "assistant": "Assistant", "notice": "Notice"}
NO_ANSWER = "<i>(no answer)</i>"  # an answer that ended before its first word
#: A user's message longer than this shows its start only: a rich-text label lays all of its
#: text out again on every resize and reopening (a 324 KB paste blocked the window 2-4 s each
#: time). Answers are shown whole (they grow as they stream, and have no Edit).
SHOWN_CHARS = 20_000


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


def prompt_progress_text(done: int, total: int) -> str:
    """What a streaming answer shows while the model reads a long prompt."""
    return f"Reading the prompt: {done:,} / {total:,} tokens"


def is_dark(palette: QPalette) -> bool:
    return palette.color(QPalette.ColorRole.Window).lightness() < 128


class TextBox(QPlainTextEdit):
    """A multi-line text box that Tab leaves (so the controls after it are reachable by
    keyboard); Ctrl+Tab types a tab."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setTabChangesFocus(True)

    @staticmethod
    def _is_ctrl_tab(event) -> bool:
        return event.key() == Qt.Key.Key_Tab and \
            event.modifiers() == Qt.KeyboardModifier.ControlModifier

    def event(self, event) -> bool:
        # Ctrl+Tab is ours even where a window-wide shortcut would take it.
        if event.type() == QEvent.Type.ShortcutOverride and self._is_ctrl_tab(event):
            event.accept()
            return True
        return super().event(event)

    def keyPressEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        if self._is_ctrl_tab(event):
            self.insertPlainText("\t")
            return
        super().keyPressEvent(event)


class ChatInput(TextBox):
    """Multi-line input: Ctrl+Enter (or Cmd+Enter) sends, Enter adds a line, Tab moves on
    to the next control and Ctrl+Tab types a tab."""

    submitted = Signal()

    def keyPressEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and \
                event.modifiers() & Qt.KeyboardModifier.ControlModifier:
            self.submitted.emit()
            return
        super().keyPressEvent(event)


class MarkdownLabel(QLabel):
    """A word-wrapped rich-text label that lays its text out once per width.

    A plain QLabel lays a long answer out again for its size hint, its minimum size hint
    and each height-for-width query, at different widths, on every streamed update (over
    twice the cost of the one layout at the width it has). Its width always comes from the
    transcript (horizontal policy Ignored), so the hints only need the height there."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._heights: dict[int, int] = {}
        self.setWordWrap(True)
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)

    def setText(self, text: str) -> None:  # noqa: N802 (Qt naming)
        self._heights.clear()
        super().setText(text)

    def heightForWidth(self, width: int) -> int:  # noqa: N802 (Qt naming)
        height = self._heights.get(width)
        if height is None:
            height = self._heights[width] = super().heightForWidth(width)
        return height

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt naming)
        width = self.width() if self.width() > 0 else 400
        return QSize(width, self.heightForWidth(width))

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt naming)
        return QSize(0, self.fontMetrics().height())

    def changeEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        if event.type() in (QEvent.Type.FontChange, QEvent.Type.StyleChange):
            self._heights.clear()
        super().changeEvent(event)

    # A long run's break points (``chat_markdown.breakable``) stay out of what is copied: Qt
    # copies (its plain text, HTML and other forms), then the clipboard is cleaned of them.
    def keyPressEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        copying = event.matches(QKeySequence.StandardKey.Copy) and self.hasSelectedText()
        super().keyPressEvent(event)
        if copying:
            _clean_clipboard()

    def contextMenuEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        # QLabel's own menu (Copy, Copy Link Location, Select All) pops up and returns at once;
        # its Copy (the action Qt names "edit-copy") cleans the clipboard right after copying.
        before = set(self.findChildren(QMenu))
        super().contextMenuEvent(event)
        menu = next((m for m in self.findChildren(QMenu) if m not in before), None)
        copy = menu.findChild(QAction, "edit-copy") if menu is not None else None
        if copy is not None:
            copy.triggered.connect(_clean_clipboard)


def _clean_clipboard() -> None:
    """The clipboard's text forms without the break points (forms that aren't text go: they
    can't be cleaned, and a paste takes the text or the HTML)."""
    clipboard = QGuiApplication.clipboard()
    data = clipboard.mimeData()
    if data is None or ZWSP not in data.text() + data.html():
        return
    clean = QMimeData()
    if data.hasHtml():
        clean.setHtml(strip_breaks(data.html()))
    if data.hasText():
        clean.setText(strip_breaks(data.text()))
    if "text/markdown" in data.formats():
        clean.setData("text/markdown", strip_breaks(bytes(data.data("text/markdown")).decode("utf-8", "replace")).encode())
    clipboard.setMimeData(clean)


class MessageWidget(QFrame):
    """One turn: who, the text rendered as Markdown, a footer, and actions."""

    copyRequested = Signal(int)
    codeCopied = Signal(int, int)  # message id, code block number
    editRequested = Signal(int)
    regenerateRequested = Signal(int)
    versionRequested = Signal(int, int)  # message id, -1 for the previous version or +1 for the next

    def __init__(self, msg_id: int, role: str, text: str = "", status: str = "complete",
                 meta: dict | None = None, parent=None) -> None:
        super().__init__(parent)
        self.msg_id = msg_id
        self.role = role
        self._text = text
        self._rendered = Rendered("", ())
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
        self.body = MarkdownLabel()
        self.body.setObjectName("messageBody")
        self.body.setTextFormat(Qt.TextFormat.RichText)  # our own Markdown rendering
        # Selectable by mouse, links (a code block's Copy) reachable by Tab and Enter too.
        self.body.setTextInteractionFlags(Qt.TextInteractionFlag.TextBrowserInteraction)
        self.body.setOpenExternalLinks(False)
        self.body.linkActivated.connect(self._on_link)
        lay.addWidget(self.body)
        self.footer = QLabel()
        self.footer.setObjectName("messageFooter")
        self.footer.setWordWrap(True)  # a long error wraps rather than widen the transcript
        self.footer.setTextFormat(Qt.TextFormat.PlainText)  # an error quoting "<tag>" is text
        self.footer.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.footer.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.footer.setEnabled(False)  # greyed, in light and dark palettes alike
        lay.addWidget(self.footer)
        self.set_text(text)
        self.set_footer(meta or {}, status)

    @property
    def text(self) -> str:
        return self._text

    @property
    def code_blocks(self) -> tuple[str, ...]:
        """The exact text of each code block shown, in order (what its Copy copies)."""
        return self._rendered.code

    def set_text(self, text: str) -> None:
        self._text = text
        if not text:
            self._rendered = Rendered("", ())
            self.body.setText("…")
            return
        # a huge paste shows its start: laying all of it out froze the window for seconds
        shown = text if len(text) <= SHOWN_CHARS or self.role != "user" else text[:SHOWN_CHARS]
        self._rendered = render_markdown(shown, dark=is_dark(self.palette()))
        html = self._rendered.html
        if len(shown) < len(text):
            # (a block's Copy copies all of its code: the blocks' text comes from the whole message)
            self._rendered = Rendered(html, code_blocks(text))
            html += (f"<p><i>… {len(text) - len(shown):,} more characters not shown here (the message holds "
                     "them all: Copy copies them, Edit shows them).</i></p>")
        self.body.setText(html)

    def set_progress(self, done: int, total: int) -> None:
        """Show how much of the prompt the model has read (until the first text comes)."""
        if not self._text:
            self.body.setText(prompt_progress_text(done, total))

    def copy_code(self, number: int) -> None:
        QGuiApplication.clipboard().setText(self._rendered.code[number])
        self.codeCopied.emit(self.msg_id, number)

    def _on_link(self, link: str) -> None:
        url = QUrl(link)
        if url.scheme() == COPY_SCHEME:
            number = int(url.path())
            if 0 <= number < len(self._rendered.code):
                self.copy_code(number)
        elif url.scheme() in ("http", "https", "mailto"):
            QDesktopServices.openUrl(url)

    def changeEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        # Code colours follow the palette: re-render when the theme changes.
        if event.type() == QEvent.Type.PaletteChange and self._text and hasattr(self, "body"):
            self.set_text(self._text)
        super().changeEvent(event)

    def set_footer(self, meta: dict, status: str) -> None:
        line = answer_footer(meta, status) if self.role == "assistant" else ""
        self.footer.setText(line)
        self.footer.setVisible(bool(line))
        if not self._text and self.role == "assistant" and status != "streaming":
            # ended before its first word ("…" would read as still writing): the footer says why
            self.body.setText(NO_ANSWER)

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
        # In a narrow panel a field goes under its label rather than widen the panel.
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        outer.addLayout(form)
        outer.addStretch(1)  # keep the fields together at the top
        self.system_prompt = TextBox()
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
            w.setValue(saved_float(settings, f"sampling/{name}", default))
            w.valueChanged.connect(lambda v: settings.setValue(f"sampling/{name}", v))
            return w

        def ispin(name, lo, hi, default, special=None):
            w = QSpinBox()
            w.setObjectName(name)
            w.setRange(lo, hi)
            if special:
                w.setSpecialValueText(special)
            w.setValue(saved_int(settings, f"sampling/{name}", default))
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
        self.setTextFormat(Qt.TextFormat.PlainText)  # messages quote user and engine text
        self.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.setFrameShape(QFrame.StyledPanel)
        self.setContentsMargins(6, 4, 6, 4)
        self.hide()

        self._action = None  # show_action's callback, while its link shows
        self.linkActivated.connect(self._on_link)

    def show_message(self, text: str) -> None:
        self._action = None
        self.setTextFormat(Qt.TextFormat.PlainText)
        self.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.setText(text)
        self.setVisible(bool(text))

    def show_action(self, text: str, label: str, action) -> None:
        """``text`` and, after it, a link ``label`` that calls ``action`` (a way out of what
        the message says, e.g. cancelling an edit). ``text`` is shown as plain text."""
        self.show_message("")
        self.setTextFormat(Qt.TextFormat.RichText)
        self.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse
                                     | Qt.TextInteractionFlag.LinksAccessibleByMouse
                                     | Qt.TextInteractionFlag.LinksAccessibleByKeyboard)
        self.setText(f'{html.escape(text)} <a href="action">{html.escape(label)}</a>')
        self._action = action
        self.show()

    def trigger_action(self) -> bool:
        """Run the shown link's action (as a click on it does); False if none shows."""
        action, self._action = self._action, None
        if action is None:
            return False
        action()
        return True

    def _on_link(self, _href: str) -> None:
        self.trigger_action()
