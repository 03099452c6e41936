"""The Compare page's side-by-side view: one column per configuration, a prompt tab bar
shared by all of them.

Each column shows its answer to the prompt picked (streaming while it is written), the
words where it diverges from the reference's answer highlighted
(``compare_metrics.divergent_spans``), a line of that prompt's own figures, and the
configuration's numbers (means over the prompts): TTFT, decode speed, weight / KV / peak
memory, load time, perplexity and agreement. A configuration that failed says why in its
column; a cancelled one says so and keeps what it wrote.

The view holds what it shows (``ColumnState``: the texts so far, each prompt's result,
the configuration's result), fed by the comparison's events during a run (``on_event``)
or all at once from a finished or reopened comparison (``show_result``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PySide6.QtCore import QEvent, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import (QFrame, QGridLayout, QHBoxLayout, QLabel, QProgressBar, QScrollArea, QSizePolicy,
                               QTabBar, QTextBrowser, QVBoxLayout, QWidget)

from app.gui.chat_widgets import is_dark
from app.gui.compare_setup import page_text
from app.gui.elided_label import ElidedLabel
from app.services.compare_events import (ConfigFinished, ConfigProgress, ConfigStarted, PromptFinished,
                                         TokenDelta)
from app.services.compare_export import cells
from app.services.compare_metrics import divergent_spans
from app.services.compare_plan import CompareConfig, ComparePlan
from app.services.compare_prompts import bundled_prompt_names, bundled_prompt_texts
from app.services.compare_results import CANCELLED, ERROR, ComparisonResult, ConfigResult, PromptResult

#: how often a streaming column's text is redrawn at most (see CompareColumns.__init__)
REDRAW_MS = 50
#: One colour per configuration, in order (Tableau 10: mid-luminance hues that read on
#: light and dark backgrounds); the charts use the same ones.
CONFIG_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2")
#: The highlight behind divergent words: a light amber under dark text, a dark one under light text.
HIGHLIGHT = {"light": "#ffd966", "dark": "#7a5a00"}
#: Style sheets with every colour given (none taken from the palette, which a style sheet
#: would not follow when the theme changes).
BADGE_STYLE = "color: #ffffff; background: #5f6368; border-radius: 3px; padding: 1px 5px"
ERROR_STYLE = "color: #d93025; border: 1px solid #d93025; border-radius: 3px; padding: 4px"
#: (key, caption) of the numbers under each column; the keys are ``metric_texts``'.
METRICS = (("ttft", "TTFT"), ("decode", "Decode"), ("weights", "Weights"), ("kv", "KV cache"),
           ("peak", "Peak memory"), ("load", "Load"), ("ppl", "Perplexity"), ("agree", "Agreement"),
           ("prefix", "Prefix agreement"))
METRIC_TIPS = {
    "ttft": "Time to first token: from sending a prompt to its first token (mean over the prompts)",
    "decode": "Output tokens per second after the first (mean over the prompts)",
    "weights": "Memory the loaded weights take",
    "kv": "Memory of the KV cache (one sequence of the full context)",
    "peak": "The most memory used from load to unload",
    "load": "Time to load (a first AWQ/GPTQ load includes its calibration)",
    "ppl": "Perplexity on the bundled evaluation text: lower is better",
    "agree": "Share of tokens identical to the reference's, position by position, over the whole output",
    "prefix": "Share of tokens identical to the reference's before the first one that differs"}
_FINISH = {"stop": "ended", "length": "max tokens", "abort": "cancelled", "error": "failed"}


def prompt_titles(prompts) -> list[str]:
    """Tab titles: the bundled prompts by name ("1 · fact"), others by their first words."""
    named = dict(zip(bundled_prompt_texts(), bundled_prompt_names()))
    titles = []
    for i, text in enumerate(prompts, start=1):
        name = named.get(text)
        if name is None:
            words = " ".join(text.split())
            name = words if len(words) <= 18 else words[:17].rstrip() + "…"
        titles.append(f"{i} · {name}")
    return titles


def peak_caption(r: ConfigResult | None) -> str:
    """"Peak VRAM" for a CUDA measurement, "Peak RAM" for the process's (CPU)."""
    source = (r.peak_memory_source or "") if r is not None else ""
    if source.startswith("cuda") or (not source and r is not None and (r.device or "").startswith("cuda")):
        return "Peak VRAM"
    return "Peak RAM" if source or (r is not None and r.device == "cpu") else "Peak memory"


def metric_texts(r: ConfigResult) -> dict[str, str]:
    """The numbers under a column, with their units ("—" where there is none)."""
    c = cells(r)
    units = {"ttft": " ms", "decode": " tok/s", "load": " s"}
    return {key: (c[key] + units.get(key, "")) if c[key] else "—" for key, _ in METRICS}


def prompt_line(p: PromptResult | None) -> str:
    """One prompt's own figures: tokens, how it ended, TTFT, speed, agreement."""
    if p is None:
        return ""
    if p.error and not p.token_ids:
        return f"failed: {page_text(p.error)}"
    parts = [f"{p.output_tokens} tokens ({_FINISH.get(p.finish_reason or '', p.finish_reason or '…')})"]
    if p.ttft_ms is not None:
        parts.append(f"TTFT {p.ttft_ms:.1f} ms")
    if p.decode_tok_s is not None:
        parts.append(f"{p.decode_tok_s:.1f} tok/s")
    if p.agreement is not None:
        parts.append(f"agreement {100 * p.agreement:.0f}% (prefix {100 * (p.prefix_agreement or 0):.0f}%)")
    return " · ".join(parts)


@dataclass
class ColumnState:
    """What one column knows: its configuration, the texts written so far (per prompt),
    each finished prompt's result, the final result, and what it is doing."""

    config: CompareConfig
    texts: list[str]
    prompts: list[PromptResult | None]
    result: ConfigResult | None = None
    status: str = "Waiting"
    progress: tuple[int, int] | None = None  # (done, total) of the stage running
    running: bool = False
    stopped: bool = False  # the run ended (an error) before this one finished
    extra: dict = field(default_factory=dict)


class ConfigColumn(QFrame):
    """One configuration's column (see the module docstring)."""

    def __init__(self, index: int, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.index = index
        self.labels: list[str] = []  # every configuration's label, for "side by side with …"
        self.setObjectName(f"compareColumn_{index}")
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.setMinimumWidth(210)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(8, 0, 8, 8)
        lay.setSpacing(4)
        stripe = QFrame()
        stripe.setFixedHeight(4)
        stripe.setStyleSheet(f"background: {CONFIG_COLOURS[index % len(CONFIG_COLOURS)]}; border: none")
        lay.addWidget(stripe)
        head = QHBoxLayout()
        self.title = ElidedLabel("", mode=Qt.TextElideMode.ElideRight)
        self.title.setObjectName("compareColumnTitle")
        font = self.title.font()
        font.setBold(True)
        font.setPointSizeF(font.pointSizeF() * 1.15)
        self.title.setFont(font)
        self.badge = QLabel("reference")
        self.badge.setObjectName("compareReferenceBadge")
        self.badge.setToolTip("The others' agreement and highlighted words are measured against this one")
        # Colours of its own (a style sheet's palette() colours stay those of the theme it
        # was first drawn in): white on grey reads on light and dark pages alike.
        self.badge.setStyleSheet(BADGE_STYLE)
        head.addWidget(self.title, 1)
        head.addWidget(self.badge)
        lay.addLayout(head)
        self.detail = ElidedLabel("", mode=Qt.TextElideMode.ElideRight)
        self.detail.setObjectName("compareColumnDetail")
        self.detail.setEnabled(False)  # muted
        lay.addWidget(self.detail)
        # What it is doing in words, over a thin bar (a busy bar draws no text in every style).
        self.status = ElidedLabel("", mode=Qt.TextElideMode.ElideRight)
        self.status.setObjectName("compareColumnStatus")
        self.progress = QProgressBar()
        self.progress.setObjectName("compareColumnProgress")
        self.progress.setTextVisible(False)
        self.progress.setFixedHeight(6)
        lay.addWidget(self.status)
        lay.addWidget(self.progress)
        self.error = QLabel()
        self.error.setObjectName("compareColumnError")
        self.error.setWordWrap(True)
        self.error.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.error.setStyleSheet(ERROR_STYLE)
        self.error.hide()
        lay.addWidget(self.error)
        self.output = QTextBrowser()
        self.output.setObjectName("compareColumnOutput")
        self.output.setOpenLinks(False)
        self.output.setMinimumHeight(140)
        lay.addWidget(self.output, 1)
        self.prompt_info = QLabel()
        self.prompt_info.setObjectName("compareColumnPromptInfo")
        self.prompt_info.setWordWrap(True)
        self.prompt_info.setEnabled(False)
        lay.addWidget(self.prompt_info)
        grid = QGridLayout()
        grid.setHorizontalSpacing(10)
        grid.setVerticalSpacing(1)
        self.captions: dict[str, QLabel] = {}
        self.values: dict[str, QLabel] = {}
        for row, (key, caption) in enumerate(METRICS):
            cap = QLabel(caption)
            val = QLabel("—")
            val.setObjectName(f"compareMetric_{key}")
            val.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            val.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            cap.setToolTip(METRIC_TIPS.get(key, ""))
            grid.addWidget(cap, row, 0)
            grid.addWidget(val, row, 1)
            self.captions[key], self.values[key] = cap, val
        grid.setColumnStretch(1, 1)
        lay.addLayout(grid)

    # -- drawing -------------------------------------------------------------------------
    def show_state(self, state: ColumnState, is_reference: bool) -> None:
        """Header, status and numbers of ``state`` (the output is ``show_text``'s)."""
        r = state.result
        self.title.setText(state.config.label if r is None else r.shown_label)
        self.badge.setVisible(is_reference)
        self.detail.setText(_resolved(r) if r is not None else "")
        self._show_status(state)
        failed = r is not None and r.status == ERROR
        self.error.setVisible(failed)
        self.error.setText(f"Failed: {page_text(r.error)}" if failed else "")
        texts = metric_texts(r) if r is not None else {}
        for key, _caption in METRICS:
            value = texts.get(key, "—")
            if self.values[key].text() != value:
                self.values[key].setText(value)
        self.captions["peak"].setText(peak_caption(r))
        self.values["peak"].setToolTip(f"measured as {r.peak_memory_source}" if r and r.peak_memory_source else "")
        shared = side_by_side_text(r, self.labels)
        for key in ("ttft", "decode"):
            self.values[key].setToolTip(shared)
        if r is not None and r.perplexity_tokens:
            self.values["ppl"].setToolTip(f"over {r.perplexity_tokens:,} tokens of the bundled evaluation text "
                                          f"(window {r.perplexity_window}, stride {r.perplexity_stride}); lower "
                                          "is better")

    def _show_status(self, state: ColumnState) -> None:
        bar = self.progress
        if state.progress is not None and state.progress[1] > 0:
            bar.setRange(0, state.progress[1])
            bar.setValue(min(state.progress[0], state.progress[1]))
        elif state.running:
            bar.setRange(0, 0)  # busy: loading, warming up
        else:
            bar.setRange(0, 1)
            bar.setValue(1 if state.result is not None and state.result.ok else 0)
        self.status.setText(state.status)

    def show_text(self, text: str, spans: list[tuple[int, int]], highlight: QColor, info: str,
                  placeholder: str) -> None:
        """The answer with ``spans`` (character ranges) highlighted, then its figures."""
        doc = self.output.document()
        self.output.setPlaceholderText(placeholder)
        bar = self.output.verticalScrollBar()
        at_end = bar.value() >= bar.maximum() - 4
        doc.setPlainText(text)
        if spans:
            fmt = QTextCharFormat()
            fmt.setBackground(highlight)
            cursor = QTextCursor(doc)
            for start, end in spans:
                cursor.setPosition(start)
                cursor.setPosition(end, QTextCursor.MoveMode.KeepAnchor)
                cursor.mergeCharFormat(fmt)
        if at_end:
            bar.setValue(bar.maximum())  # a streaming answer stays in view as it grows
        self.prompt_info.setText(info)
        self.prompt_info.setVisible(bool(info))


class CompareColumns(QWidget):
    """The prompt tabs, the prompt's text and the columns (scrolling sideways when six
    don't fit). ``promptChanged(index)`` when another prompt is picked."""

    promptChanged = Signal(int)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("compareColumns")
        self.states: list[ColumnState] = []
        self.columns: list[ConfigColumn] = []
        self.prompts: list[str] = []
        self.reference: int | None = None
        self.follow = True  # during a run, show the prompt being written (until one is picked)
        # Streaming text is redrawn at most every REDRAW_MS per column: each redraw diffs the
        # whole answer against the reference's and sets it again, so one redraw per token
        # (six columns side by side at hundreds of tokens/s on a GPU) would stall the window.
        # The first token after a pause is drawn at once.
        self._dirty: set[int] = set()
        self._redraw = QTimer(self)
        self._redraw.setSingleShot(True)
        self._redraw.setInterval(REDRAW_MS)
        self._redraw.timeout.connect(self._flush)
        self.tabs = QTabBar()
        self.tabs.setObjectName("comparePromptTabs")
        self.tabs.setExpanding(False)
        self.tabs.setElideMode(Qt.TextElideMode.ElideRight)
        self.tabs.currentChanged.connect(self._tab_changed)
        self.tabs.tabBarClicked.connect(lambda *_: setattr(self, "follow", False))
        self.prompt_text = ElidedLabel("", mode=Qt.TextElideMode.ElideRight, max_hint=2000)
        self.prompt_text.setObjectName("comparePromptText")
        self.prompt_text.setEnabled(False)
        self.prompt_text.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.row = QWidget()
        self.row_layout = QHBoxLayout(self.row)
        self.row_layout.setContentsMargins(0, 0, 0, 0)
        self.scroll = QScrollArea()
        self.scroll.setObjectName("compareColumnsArea")
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.scroll.setWidget(self.row)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.tabs)
        lay.addWidget(self.prompt_text)
        lay.addWidget(self.scroll, 1)

    # -- content -------------------------------------------------------------------------
    def begin(self, plan: ComparePlan) -> None:
        """Empty columns for a run of ``plan`` (the first is the reference until it fails)."""
        self._build(plan.prompts, [ColumnState(c, [""] * len(plan.prompts), [None] * len(plan.prompts))
                                   for c in plan.configs])
        self.reference = None
        self.follow = True
        self.redraw()

    def show_result(self, result: ComparisonResult) -> None:
        """Every column of a finished (or reopened) comparison."""
        prompts = result.plan.prompts
        states = []
        for r in result.results:
            answers: list[PromptResult | None] = [None] * len(prompts)
            for p in r.prompts:
                if 0 <= p.prompt_index < len(prompts):
                    answers[p.prompt_index] = p
            states.append(ColumnState(r.config, [a.text if a else "" for a in answers], answers, r,
                                      status=_final_status(r)))
        self._build(prompts, states)
        self.reference = result.reference_index
        self.follow = False
        self.redraw()

    def stop(self) -> None:
        """The run stopped without its last event (an error ended it): the columns that had
        not finished say so, rather than waiting on for their turn."""
        for state in self.states:
            if state.result is None:
                state.status = "Stopped" if state.running else "Not run"
                state.running, state.progress, state.stopped = False, None, True
        self.redraw()

    def on_event(self, ev) -> None:
        """One event of the run (the page hands every one on; ``RunFinished`` is the page's)."""
        if not 0 <= getattr(ev, "index", -1) < len(self.states):
            return
        state = self.states[ev.index]
        if isinstance(ev, ConfigStarted):
            state.running, state.status, state.progress = True, "Loading…", None
        elif isinstance(ev, ConfigProgress):
            state.status, state.progress = _progress_status(ev)
        elif isinstance(ev, TokenDelta):
            state.texts[ev.prompt_index] += ev.text
            if self.follow and self.tabs.currentIndex() != ev.prompt_index:
                self.tabs.setCurrentIndex(ev.prompt_index)  # redraws every column
            elif ev.prompt_index == self.tabs.currentIndex():
                self._draw_soon(ev.index)
            return
        elif isinstance(ev, PromptFinished):
            state.prompts[ev.prompt_index] = ev.result
            state.texts[ev.prompt_index] = ev.result.text
        elif isinstance(ev, ConfigFinished):
            state.result, state.running, state.progress = ev.result, False, None
            state.status = _final_status(ev.result)
            for p in ev.result.prompts:  # the final ones carry the agreement
                if 0 <= p.prompt_index < len(state.prompts):
                    state.prompts[p.prompt_index] = p
                    state.texts[p.prompt_index] = p.text
            if ev.result.is_reference:
                self.reference = ev.index
                self.redraw()
                return
        self._draw_column(ev.index)

    # -- drawing -------------------------------------------------------------------------
    def redraw(self) -> None:
        for i in range(len(self.columns)):
            self._draw_column(i)

    def _draw_column(self, i: int) -> None:
        self.columns[i].show_state(self.states[i], self._is_reference(i))
        self._draw_text(i)

    def _is_reference(self, i: int) -> bool:
        if self.reference is not None:
            return i == self.reference
        # Before any configuration finished: the first that hasn't failed will be.
        first = next((j for j, s in enumerate(self.states) if s.result is None or s.result.ok), None)
        return i == first

    def _draw_soon(self, i: int) -> None:
        """Redraw column ``i``'s streaming text now, or with the next batch if one was
        drawn less than REDRAW_MS ago."""
        if self._redraw.isActive():
            self._dirty.add(i)
        else:
            self._draw_text(i)
            self._redraw.start()

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for i in sorted(dirty):
            if i < len(self.states):
                self._draw_text(i)
        if dirty:
            self._redraw.start()

    def _draw_text(self, i: int) -> None:
        p = self.tabs.currentIndex()
        if p < 0:
            return
        state = self.states[i]
        text = state.texts[p]
        spans: list[tuple[int, int]] = []
        ref = self.reference
        if ref is not None and ref != i and text:
            ref_answer = self.states[ref].prompts[p]
            if ref_answer is not None and ref_answer.text is not None:
                spans = divergent_spans(ref_answer.text, text)
        placeholder = _placeholder(state, p)
        self.columns[i].show_text(text, spans, self.highlight_colour(), prompt_line(state.prompts[p]), placeholder)

    def highlight_colour(self) -> QColor:
        return QColor(HIGHLIGHT["dark" if is_dark(self.palette()) else "light"])

    def _build(self, prompts, states: list[ColumnState]) -> None:
        for column in self.columns:
            self.row_layout.removeWidget(column)
            column.deleteLater()
        self.columns = [ConfigColumn(i) for i in range(len(states))]
        for column in self.columns:
            column.labels = [state.config.label for state in states]
            self.row_layout.addWidget(column, 1)
            column.show()  # (a layout shows a new child of a visible widget only later)
        self.states = states
        self.prompts = list(prompts)
        self.tabs.blockSignals(True)
        while self.tabs.count():
            self.tabs.removeTab(0)
        for i, title in enumerate(prompt_titles(self.prompts)):
            self.tabs.addTab(title)
            self.tabs.setTabToolTip(i, self.prompts[i][:800])
        self.tabs.setCurrentIndex(0 if self.prompts else -1)
        self.tabs.blockSignals(False)
        self._show_prompt_text()

    def _tab_changed(self, _index: int) -> None:
        self._show_prompt_text()
        for i in range(len(self.columns)):
            self._draw_text(i)
        self.promptChanged.emit(self.tabs.currentIndex())

    def _show_prompt_text(self) -> None:
        p = self.tabs.currentIndex()
        text = " ".join(self.prompts[p].split()) if 0 <= p < len(self.prompts) else ""
        self.prompt_text.setText(f"Prompt: {text}" if text else "")

    def changeEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        if event.type() in (QEvent.Type.PaletteChange, QEvent.Type.ApplicationPaletteChange) and self.columns:
            for i in range(len(self.columns)):
                self._draw_text(i)  # the highlight follows the theme
        super().changeEvent(event)


def _progress_status(ev: ConfigProgress) -> tuple[str, tuple[int, int] | None]:
    if ev.stage == "load":
        return f"Loading: {ev.message}", None
    if ev.stage == "warmup":
        return "Warming up (untimed)", None
    if ev.stage == "prompt" and ev.done is not None and ev.total:
        return f"Prompt {ev.done + 1} of {ev.total}", (ev.done, ev.total)
    if ev.stage == "perplexity" and ev.done is not None and ev.total:
        return f"Perplexity: {ev.done:,} of {ev.total:,} tokens", (ev.done, ev.total)
    return ev.message[:1].upper() + ev.message[1:], None


def _final_status(r: ConfigResult) -> str:
    if r.status == ERROR:
        return "Failed"
    if r.status == CANCELLED:
        return "Cancelled before it ran" if r.error == "cancelled before it ran" else "Cancelled"
    return f"Done in {r.seconds:.1f} s" if r.seconds is not None else "Done"


def _resolved(r: ConfigResult) -> str:
    """What the load resolved: device, weights dtype, attention, KV dtype; "side by side"
    where it ran beside others."""
    parts = [x for x in (r.device, r.dtype, r.attention_used,
                         r.kv_dtype_used and f"KV {r.kv_dtype_used}", r.side_by_side and "side by side") if x]
    return " · ".join(parts)


def side_by_side_text(r: ConfigResult | None, labels: list[str]) -> str:
    """The speeds' caveat for a configuration measured side by side (else "")."""
    if r is None or not r.side_by_side:
        return ""
    others = " + ".join(labels[i] if 0 <= i < len(labels) else f"configuration {i + 1}" for i in r.ran_with)
    return f"Measured side by side with {others}: speeds share the device, peak memory is the group's"


def _placeholder(state: ColumnState, p: int) -> str:
    """The empty answer box's one line: short, since a placeholder doesn't wrap in a narrow
    column (why it failed is in the column's error box, a prompt's error in the line below)."""
    r = state.result
    if r is not None and r.status == ERROR:
        return "No answer: it failed."
    if r is not None and r.status == CANCELLED:
        return "Cancelled."
    if state.prompts[p] is not None and state.prompts[p].error:
        return "No answer: see below."
    if state.running:
        return "The answer appears here as it is written."
    if state.stopped:
        return "Not run: the comparison stopped."
    return "Waiting for its turn…" if r is None else "No answer."
