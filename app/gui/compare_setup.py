"""The Compare page's setup: the model, 2 to 6 configurations, the prompts, sampling, the
answers' length and perplexity; ``plan()`` turns them into a checked ``ComparePlan``.

What is wrong with the setup is said under it as it is edited (``problem``), in this
page's words (never a command-line flag), and Run stays off until it is fixed. The
setup is remembered in the settings (``save_settings``) when a comparison runs.

Choices where the service leaves the GUI free: side by side is off by default (one
after another measures each configuration's speed alone); perplexity scores the first 4,096 tokens
of the bundled evaluation text by default (the whole text, ~37,000 tokens, takes minutes
per configuration on a CPU; the spin box's lowest value picks it), and greedy decoding
is the default (a shared seed samples every configuration the same way).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from PySide6.QtCore import QSettings, Qt, Signal
from PySide6.QtWidgets import (QButtonGroup, QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout,
                               QGroupBox, QHBoxLayout, QLabel, QListWidget, QListWidgetItem,
                               QPushButton, QRadioButton, QSpinBox, QVBoxLayout, QWidget)

from app.gui.chat_widgets import TextBox
from app.gui.compare_configs import DEFAULT_CONFIGS, ConfigList
from app.gui.load_dialog import MIN_CHAT_CONTEXT, machine_choices
from app.gui.widget_tips import set_enabled
from app.services.compare_plan import SAMPLED_TEMPERATURE, CompareConfig, ComparePlan
from app.services.compare_prompts import bundled_prompt_names, bundled_prompt_texts, read_prompts_file
from engine.api import Choice, HearthError, InvalidRequestError, model_display_name, option_flag

#: Perplexity's default cap, in tokens of the evaluation text (see the module docstring).
DEFAULT_EVAL_TOKENS = 4096
DEFAULT_MAX_TOKENS = 128
MIN_CONFIGS = 2
#: This page's field for a load option an engine message names by its flag.
FIELD_NAMES = {"max_model_len": "Context", "device": "Device", "max_tokens": "Max tokens",
               "quantization": "Quantization", "attention": "Attention", "kv_cache_dtype": "KV cache",
               "seed": "Seed", "temperature": "Temperature"}
SOURCES = ("bundled", "typed", "file")
_BLANK_LINES = re.compile(r"\n[ \t]*\n")


def page_error(error: HearthError) -> str:
    """An engine message in this page's words: "(--max-model-len)" names the field here."""
    return page_text(str(error), getattr(error, "options", ()) or ())


def page_text(message: str, keywords=tuple(FIELD_NAMES)) -> str:
    """``page_error`` of a message kept as text (a configuration's or a prompt's error in a
    result): the flags of ``keywords`` (default: every field of this page) by their field."""
    for keyword in keywords:
        flag = re.escape(option_flag(keyword))
        field = FIELD_NAMES.get(keyword)
        message = re.sub(rf" ?\({flag}(?: [^)]*)?\)", f" (“{field}”)" if field else "", message)
        if field:
            message = re.sub(rf"{flag}(?![\w-])", f"“{field}”", message)
    return message


class CompareSetup(QWidget):
    """The setup panel. ``changed`` on any edit; ``plan()`` gives the checked plan or
    raises InvalidRequestError (``problem`` holds the same text, worded for this page).
    ``choices``: the registry's choices by kind (default: this machine's); ``choose_file``
    ``(caption, filter) -> path | None`` replaces the file dialog in tests."""

    changed = Signal()

    def __init__(self, settings: QSettings | None = None, choices: Mapping[str, Sequence[Choice]] | None = None,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("compareSetup")
        self.settings = settings
        self._injected_choices = choices
        self.choices = choices if choices is not None else machine_choices("auto")
        self.choose_file = self._dialog_file
        self.file_prompts: list[str] = []
        self.file_path: str | None = None
        self.problem: str | None = None

        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self._model_box())
        lay.addWidget(self._configs_box())
        lay.addWidget(self._prompts_box())
        lay.addWidget(self._run_box())
        self.error = QLabel()
        self.error.setObjectName("compareSetupError")
        self.error.setWordWrap(True)
        self.error.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.error.setStyleSheet("color: #d93025")
        lay.addWidget(self.error)
        lay.addStretch(1)
        self.restore_settings()
        self.changed.connect(self.validate)
        self.validate()

    # -- construction --------------------------------------------------------------------
    def _model_box(self) -> QGroupBox:
        box = QGroupBox("Model")
        form = QFormLayout(box)
        self.model = QComboBox()
        self.model.setObjectName("compareModel")
        self.model.setEditable(True)  # a Hub id or a path may be typed too
        self.model.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        # A long repo id or path must not widen the panel: the combo shows what fits.
        self.model.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.model.setMinimumContentsLength(16)
        self.model.setToolTip("A model of the library, or a Hub repo id, folder or .gguf file typed in")
        self.model.currentTextChanged.connect(self.changed)
        form.addRow("Model", self.model)
        self.device = QComboBox()
        self.device.setObjectName("compareDevice")
        self.device.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.device.setMinimumContentsLength(16)
        for c in self.choices.get("device", ()):
            self.device.addItem(c.label if c.available else f"{c.label}  (unavailable)", c.name)
            item = self.device.model().item(self.device.count() - 1)
            item.setEnabled(c.available)
            item.setToolTip("; ".join(c.reasons))
        self.device.currentIndexChanged.connect(self._device_changed)
        form.addRow("Device", self.device)
        self.context = QSpinBox()
        self.context.setObjectName("compareContext")
        self.context.setRange(0, 1 << 20)
        self.context.setSingleStep(1024)
        self.context.setSpecialValueText("model's maximum")
        self.context.setToolTip("The context of every configuration; the KV cache holds one sequence of it, so "
                                "a smaller context keeps KV memory down on a large model.")
        self.context.valueChanged.connect(self.changed)
        form.addRow("Context", self.context)
        return box

    def _configs_box(self) -> QGroupBox:
        box = QGroupBox("Configurations (2 to 6; the first is the reference)")
        lay = QVBoxLayout(box)
        self.configs = ConfigList(self.choices)
        self.configs.changed.connect(self.changed)
        lay.addWidget(self.configs)
        return box

    def _prompts_box(self) -> QGroupBox:
        box = QGroupBox("Prompts")
        lay = QVBoxLayout(box)
        self.source_group = QButtonGroup(self)
        self.sources: dict[str, QRadioButton] = {}
        row = QHBoxLayout()
        for key, text in (("bundled", "Bundled set"), ("typed", "Typed in"), ("file", "From a file")):
            radio = QRadioButton(text)
            radio.setObjectName(f"comparePrompts_{key}")
            self.source_group.addButton(radio)
            self.sources[key] = radio
            row.addWidget(radio)
            radio.toggled.connect(self._source_changed)
        row.addStretch(1)
        lay.addLayout(row)
        self.bundled = QListWidget()
        self.bundled.setObjectName("compareBundledPrompts")
        for name, text in zip(bundled_prompt_names(), bundled_prompt_texts()):
            item = QListWidgetItem(f"{name}: {_first_line(text)}")
            item.setData(Qt.ItemDataRole.UserRole, name)
            item.setToolTip(text[:600] + ("…" if len(text) > 600 else ""))
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked)
            self.bundled.addItem(item)
        self.bundled.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.bundled.setTextElideMode(Qt.TextElideMode.ElideRight)
        rows = self.bundled.sizeHintForRow(0) * self.bundled.count()
        self.bundled.setFixedHeight(rows + 2 * self.bundled.frameWidth() + 2)  # every prompt shown, no scrolling
        self.bundled.itemChanged.connect(lambda *_: self.changed.emit())
        lay.addWidget(self.bundled)
        self.typed = TextBox()  # Tab moves on (Ctrl+Tab types one): a keyboard user isn't held here
        self.typed.setObjectName("compareTypedPrompts")
        self.typed.setPlaceholderText("One prompt per block; a blank line starts the next prompt.")
        self.typed.setMaximumHeight(110)
        self.typed.textChanged.connect(self.changed)
        lay.addWidget(self.typed)
        file_row = QHBoxLayout()
        self.open_file = QPushButton("Open prompts file…")
        self.open_file.setObjectName("compareOpenPrompts")
        self.open_file.setToolTip("Plain text (blank lines separate prompts) or a JSON list of strings")
        self.open_file.clicked.connect(self._open_file)
        self.file_label = QLabel("No file opened")
        self.file_label.setObjectName("comparePromptsFile")
        self.file_label.setWordWrap(True)
        file_row.addWidget(self.open_file)
        file_row.addWidget(self.file_label, 1)
        self.file_row = QWidget()
        self.file_row.setLayout(file_row)
        file_row.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.file_row)
        return box

    def _run_box(self) -> QGroupBox:
        box = QGroupBox("Sampling and measurements")
        form = QFormLayout(box)
        self.max_tokens = QSpinBox()
        self.max_tokens.setObjectName("compareMaxTokens")
        self.max_tokens.setRange(1, 8192)
        self.max_tokens.setValue(DEFAULT_MAX_TOKENS)
        self.max_tokens.setToolTip("New tokens per prompt at most (an answer may end sooner)")
        self.max_tokens.valueChanged.connect(self.changed)
        form.addRow("Max tokens", self.max_tokens)
        sampling = QHBoxLayout()
        self.greedy = QRadioButton("Greedy")
        self.greedy.setObjectName("compareGreedy")
        self.greedy.setToolTip("Always the most likely token: outputs differ only where the configurations do")
        self.seeded = QRadioButton("One shared seed")
        self.seeded.setObjectName("compareSeeded")
        self.seeded.setToolTip("Sample every configuration with the same seed and temperature")
        self.greedy.setChecked(True)
        self.seed = QSpinBox()
        self.seed.setObjectName("compareSeed")
        self.seed.setRange(0, 2**31 - 1)
        self.temperature = QDoubleSpinBox()
        self.temperature.setObjectName("compareTemperature")
        self.temperature.setRange(0.05, 2.0)
        self.temperature.setSingleStep(0.05)
        self.temperature.setValue(SAMPLED_TEMPERATURE)
        self.temperature.setPrefix("T ")
        self.temperature.setToolTip("Temperature of the seeded sampling")
        for w in (self.greedy, self.seeded):
            sampling.addWidget(w)
            w.toggled.connect(self._sampling_changed)
        sampling.addStretch(1)
        form.addRow("Sampling", sampling)
        seed_row = QHBoxLayout()
        for spin in (self.seed, self.temperature):
            seed_row.addWidget(spin, 1)
            spin.valueChanged.connect(self.changed)
        form.addRow("Seed", seed_row)
        ppl = QHBoxLayout()
        self.perplexity = QCheckBox("Perplexity, first")
        self.perplexity.setObjectName("comparePerplexity")
        self.perplexity.setChecked(True)
        self.perplexity.setToolTip("Score the bundled evaluation text (lower is better)")
        self.eval_tokens = QSpinBox()
        self.eval_tokens.setObjectName("compareEvalTokens")
        self.eval_tokens.setRange(0, 1_000_000)
        self.eval_tokens.setSingleStep(1024)
        self.eval_tokens.setGroupSeparatorShown(True)
        self.eval_tokens.setSpecialValueText("whole text")
        self.eval_tokens.setSuffix(" tokens")
        self.eval_tokens.setValue(DEFAULT_EVAL_TOKENS)
        self.eval_tokens.setToolTip("Tokens of the bundled evaluation text to score. The whole text (~37,000 "
                                    "tokens; the lowest value) takes minutes per configuration on a CPU.")
        self.perplexity.toggled.connect(self.eval_tokens.setEnabled)
        self.perplexity.toggled.connect(self.changed)
        self.eval_tokens.valueChanged.connect(self.changed)
        ppl.addWidget(self.perplexity)
        ppl.addWidget(self.eval_tokens, 1)
        form.addRow("Quality", ppl)
        note = QLabel(f"Default {DEFAULT_EVAL_TOKENS:,} tokens: the whole text (~37,000) takes minutes per "
                      "configuration on a CPU.")
        note.setObjectName("compareEvalNote")
        note.setWordWrap(True)
        note.setEnabled(False)  # muted
        form.addRow("", note)
        self.side_by_side = QCheckBox("Side by side when they fit in memory")
        self.side_by_side.setObjectName("compareSideBySide")
        self.side_by_side.setToolTip(
            "Load the configurations that fit in memory together (checked before loading) and send each prompt to "
            "all of them at once, so their answers stream together; the rest run one after another. Their speeds "
            "then share the device, and their peak memory is the group's.")
        self.side_by_side.toggled.connect(self.changed)
        form.addRow("Run", self.side_by_side)
        self._sampling_changed()
        return box

    # -- reactions -----------------------------------------------------------------------
    def _source_changed(self, *_args) -> None:
        source = self.source()
        self.bundled.setVisible(source == "bundled")
        self.typed.setVisible(source == "typed")
        self.file_row.setVisible(source == "file")
        self.changed.emit()

    def _sampling_changed(self, *_args) -> None:
        seeded = self.seeded.isChecked()
        why = "greedy decoding picks the most likely token: no seed or temperature (choose One shared seed)"
        set_enabled(self.seed, seeded, why)
        set_enabled(self.temperature, seeded, why)
        self.changed.emit()

    def _device_changed(self, *_args) -> None:
        """Another device: the rows' choices are checked again for it (a CUDA-only backend
        greys out on the CPU)."""
        device = self.device.currentData() or "auto"
        if self._injected_choices is None:
            self.choices = machine_choices(device)
            self.configs.set_choices(self.choices)
        self.changed.emit()

    def _dialog_file(self, caption: str, name_filter: str) -> str | None:
        start = str(Path(self.file_path).parent) if self.file_path else str(Path.home())
        path, _ = QFileDialog.getOpenFileName(self, caption, start, name_filter)
        return path or None

    def _open_file(self) -> None:
        path = self.choose_file("Open a prompts file", "Prompts (*.txt *.md *.json);;All files (*)")
        if path:
            self.load_prompts_file(path)

    def load_prompts_file(self, path: str) -> bool:
        """Read a prompts file (``compare_prompts.read_prompts_file``) and use it; a file
        that can't be read is said under the setup. Returns whether it was read."""
        try:
            prompts = read_prompts_file(path)
        except HearthError as e:
            self.sources["file"].setChecked(True)
            self._show_problem(str(e))
            return False
        self.file_prompts, self.file_path = prompts, str(path)
        self.file_label.setText(f"{len(prompts)} prompt{'s' if len(prompts) != 1 else ''} from {Path(path).name}")
        self.file_label.setToolTip(str(path))
        self.sources["file"].setChecked(True)
        self.changed.emit()
        return True

    # -- the plan ------------------------------------------------------------------------
    def source(self) -> str:
        return next((key for key, radio in self.sources.items() if radio.isChecked()), "bundled")

    def model_ref(self) -> str | None:
        """What loads: the listed model's reference, or the text typed in."""
        idx = self.model.currentIndex()
        text = self.model.currentText().strip()
        if idx >= 0 and self.model.itemText(idx) == self.model.currentText():
            return self.model.itemData(idx) or text or None
        return text or None

    def set_models(self, models: Sequence[tuple[str, str]], current: str | None = None) -> None:
        """The picker's list: (reference, shown name) pairs; ``current`` (a reference)
        selected, added to the list if missing; else the selection stays."""
        keep = current or self.model_ref()
        self.model.blockSignals(True)
        self.model.clear()
        for ref, name in models:
            self.model.addItem(name, ref)
            self.model.setItemData(self.model.count() - 1, ref, Qt.ItemDataRole.ToolTipRole)
        self.model.blockSignals(False)
        if keep:
            self.set_model(keep)
        self.changed.emit()

    def set_model(self, ref: str) -> None:
        idx = self.model.findData(ref)
        if idx < 0:
            self.model.addItem(model_display_name(ref), ref)
            idx = self.model.count() - 1
            self.model.setItemData(idx, ref, Qt.ItemDataRole.ToolTipRole)
        self.model.setCurrentIndex(idx)

    def prompts(self) -> list[str]:
        """The prompts of the chosen source, or InvalidRequestError saying what to do."""
        source = self.source()
        if source == "bundled":
            texts = bundled_prompt_texts()
            chosen = [texts[i] for i in range(self.bundled.count())
                      if self.bundled.item(i).checkState() == Qt.CheckState.Checked]
            if not chosen:
                raise InvalidRequestError("Tick at least one bundled prompt, or type your own.")
            return chosen
        if source == "typed":
            text = self.typed.toPlainText().replace("\r\n", "\n")
            chosen = [block.strip("\n") for block in _BLANK_LINES.split(text) if block.strip()]
            if not chosen:
                raise InvalidRequestError("Type at least one prompt (a blank line separates two prompts).")
            return chosen
        if not self.file_prompts:
            raise InvalidRequestError("Open a prompts file, or pick the bundled set.")
        return list(self.file_prompts)

    def plan(self) -> ComparePlan:
        """The checked plan of the setup; InvalidRequestError (worded for this page)
        saying what to change."""
        configs = self.configs.configs()
        if len(configs) < MIN_CONFIGS:
            raise InvalidRequestError(f"A comparison needs at least {MIN_CONFIGS} configurations: add one (the "
                                      "first is the reference the others are measured against).")
        eval_tokens = self.eval_tokens.value() or None
        if 0 < self.context.value() < MIN_CHAT_CONTEXT:
            raise InvalidRequestError(f"A context of {self.context.value()} tokens can't hold a chat (its template "
                                      f"takes tokens of its own): pick {MIN_CHAT_CONTEXT} or more, or 0 for the "
                                      "model's maximum.")
        load = {"max_model_len": self.context.value()} if self.context.value() else {}
        plan = ComparePlan(configs=tuple(configs), prompts=tuple(self.prompts()), model=self.model_ref(),
                           max_tokens=self.max_tokens.value(),
                           seed=self.seed.value() if self.seeded.isChecked() else None,
                           temperature=self.temperature.value() if self.seeded.isChecked() else None,
                           perplexity=self.perplexity.isChecked(), eval_tokens=eval_tokens,
                           device=self.device.currentData() or "auto", load_options=load,
                           side_by_side=self.side_by_side.isChecked())
        try:
            return plan.checked()
        except InvalidRequestError as e:
            raise InvalidRequestError(page_error(e)) from None

    def validate(self) -> bool:
        """Check the setup now: ``problem`` and the label under the setup say what is wrong
        (both empty when nothing is). Returns whether a comparison can run."""
        try:
            self.plan()
        except HearthError as e:
            self._show_problem(str(e))
            return False
        self._show_problem(None)
        return True

    def _show_problem(self, message: str | None) -> None:
        self.problem = message
        self.error.setText(_sentence(message) if message else "")
        self.error.setVisible(bool(message))

    # -- settings ------------------------------------------------------------------------
    def save_settings(self) -> None:
        s = self.settings
        if s is None:
            return
        s.setValue("compare/model", self.model_ref() or "")
        s.setValue("compare/device", self.device.currentData() or "auto")
        s.setValue("compare/context", self.context.value())
        s.setValue("compare/configs", json.dumps([c.to_dict() for c in self.configs.configs()]))
        s.setValue("compare/source", self.source())
        unticked = [self.bundled.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.bundled.count())
                    if self.bundled.item(i).checkState() != Qt.CheckState.Checked]
        s.setValue("compare/unticked", json.dumps(unticked))
        s.setValue("compare/typed", self.typed.toPlainText())
        s.setValue("compare/prompts_file", self.file_path or "")
        s.setValue("compare/max_tokens", self.max_tokens.value())
        s.setValue("compare/seeded", self.seeded.isChecked())
        s.setValue("compare/seed", self.seed.value())
        s.setValue("compare/temperature", self.temperature.value())
        s.setValue("compare/perplexity", self.perplexity.isChecked())
        s.setValue("compare/eval_tokens", self.eval_tokens.value())
        s.setValue("compare/side_by_side", self.side_by_side.isChecked())

    def restore_settings(self) -> None:
        s = self.settings
        configs = _saved_configs(s.value("compare/configs") if s is not None else None)
        self.configs.set_configs(configs or DEFAULT_CONFIGS)
        source = str(s.value("compare/source", "bundled")) if s is not None else "bundled"
        self.sources[source if source in SOURCES else "bundled"].setChecked(True)
        self._source_changed()
        if s is None:
            return
        model = str(s.value("compare/model", "") or "")
        if model:
            self.set_model(model)
        device = self.device.findData(str(s.value("compare/device", "auto")))
        if device >= 0 and self.device.model().item(device).isEnabled():
            self.device.setCurrentIndex(device)
        self.context.setValue(_int(s.value("compare/context"), 0))
        unticked = set(_json_list(s.value("compare/unticked")))
        for i in range(self.bundled.count()):
            item = self.bundled.item(i)
            item.setCheckState(Qt.CheckState.Unchecked if item.data(Qt.ItemDataRole.UserRole) in unticked
                               else Qt.CheckState.Checked)
        self.typed.setPlainText(str(s.value("compare/typed", "") or ""))
        path = str(s.value("compare/prompts_file", "") or "")
        if path and Path(path).is_file():
            try:
                self.file_prompts, self.file_path = read_prompts_file(path), path
                self.file_label.setText(f"{len(self.file_prompts)} prompts from {Path(path).name}")
            except HearthError:
                pass  # said when the file source is picked and Run is pressed
        self.max_tokens.setValue(_int(s.value("compare/max_tokens"), DEFAULT_MAX_TOKENS))
        (self.seeded if s.value("compare/seeded", False) in (True, "true") else self.greedy).setChecked(True)
        self.seed.setValue(_int(s.value("compare/seed"), 0))
        try:
            self.temperature.setValue(float(s.value("compare/temperature", SAMPLED_TEMPERATURE)))
        except (TypeError, ValueError):
            pass
        self.perplexity.setChecked(s.value("compare/perplexity", True) in (True, "true"))
        self.eval_tokens.setValue(_int(s.value("compare/eval_tokens"), DEFAULT_EVAL_TOKENS))
        self.side_by_side.setChecked(s.value("compare/side_by_side", False) in (True, "true"))


def _first_line(text: str, limit: int = 60) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[:limit - 1] + "…"


def _sentence(message: str) -> str:
    message = message[:1].upper() + message[1:]
    return message if message.endswith((".", "!", "?")) else message + "."


def _int(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _json_list(value) -> list:
    try:
        data = json.loads(str(value)) if value else []
    except ValueError:
        return []
    return data if isinstance(data, list) else []


def _saved_configs(value) -> list[CompareConfig]:
    out = []
    for item in _json_list(value):
        try:
            out.append(CompareConfig.from_dict(item))
        except (KeyError, TypeError, AttributeError):
            continue
    return out
