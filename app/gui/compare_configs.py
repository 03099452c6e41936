"""The Compare page's configuration rows: 2 to 6 combinations of a quantization, an
attention backend and a KV-cache dtype, each picked from the engine's choices registry
(``engine.api.list_choices``), so a quantization registered there is offered here too.

Choices this machine can't run stay listed but greyed out, the engine's reason as their
tooltip (as in the Load model dialog). The first row is the reference the others are
measured against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QStandardItemModel
from PySide6.QtWidgets import QComboBox, QGridLayout, QLabel, QPushButton, QToolButton, QVBoxLayout, QWidget

from app.services.compare_plan import MAX_CONFIGS, CompareConfig
from engine.api import Choice

#: The kinds of choice a row picks, with their column titles and CompareConfig fields.
ROW_KINDS = (("quantization", "Quantization", "quant"), ("attention", "Attention", "attention"),
             ("kv_cache_dtype", "KV cache", "kv_dtype"))
#: What a new row offers first: the next of these not yet used (then the first usable choice).
PREFERRED_QUANTS = ("bf16", "int8", "int4", "fp8", "awq", "gptq", "fp8-gptq", "none", "fp16")
#: The rows a first visit shows: full precision against the two weight-only quantizations.
DEFAULT_CONFIGS = (CompareConfig("bf16"), CompareConfig("int8"), CompareConfig("int4"))


def fill_combo(combo: QComboBox, choices: Sequence[Choice]) -> None:
    """The choices by name (short: three combos share a row); the label as tooltip, and an
    unusable choice greyed out with the engine's reason instead."""
    current = combo.currentData()
    combo.blockSignals(True)
    combo.clear()
    model: QStandardItemModel = combo.model()
    for c in choices:
        combo.addItem(c.name + ("" if c.available else "  (unavailable)"), c.name)
        item = model.item(combo.count() - 1)
        item.setEnabled(c.available)
        item.setToolTip(c.label if c.available else f"{c.label}: {'; '.join(c.reasons)}")
    combo.blockSignals(False)
    if current is not None:
        select(combo, current)


def select(combo: QComboBox, name: str) -> bool:
    """Select ``name`` if listed and usable; False (selection unchanged) otherwise."""
    idx = combo.findData(name)
    if idx < 0 or not combo.model().item(idx).isEnabled():
        return False
    combo.setCurrentIndex(idx)
    return True


class ConfigRow(QWidget):
    """The widgets of one configuration (they live in the list's grid, not in this
    widget's own layout: it only owns them)."""

    def __init__(self, parent: QWidget) -> None:
        super().__init__(parent)
        self.number = QLabel()
        self.combos: dict[str, QComboBox] = {}
        for kind, title, _field in ROW_KINDS:
            combo = QComboBox()
            combo.setObjectName(f"compare_{kind}")
            combo.setAccessibleName(title)
            combo.setMinimumContentsLength(6)
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            self.combos[kind] = combo
        self.remove = QToolButton()
        self.remove.setText("✕")
        self.remove.setObjectName("compareRemoveConfig")
        self.remove.setToolTip("Remove this configuration")

    def widgets(self) -> list[QWidget]:
        return [self.number, *self.combos.values(), self.remove]

    def config(self) -> CompareConfig:
        values = {field: self.combos[kind].currentData() or "auto" for kind, _title, field in ROW_KINDS}
        return CompareConfig(**values)


class ConfigList(QWidget):
    """The rows, an Add button, ``configs()``. ``changed`` on any edit."""

    changed = Signal()

    def __init__(self, choices: Mapping[str, Sequence[Choice]], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("compareConfigs")
        self.choices = choices
        self.rows: list[ConfigRow] = []
        self.grid = QGridLayout()
        self.grid.setContentsMargins(0, 0, 0, 0)
        self.grid.setHorizontalSpacing(4)
        for col, title in enumerate(("", *(t for _k, t, _f in ROW_KINDS))):
            head = QLabel(title)
            head.setEnabled(False)  # the muted text colour of the palette
            self.grid.addWidget(head, 0, col)
        for col in (1, 2, 3):
            self.grid.setColumnStretch(col, 1)
        self.add_button = QPushButton("Add configuration")
        self.add_button.setObjectName("compareAddConfig")
        self.add_button.clicked.connect(lambda: self.add_row())
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(self.grid)
        lay.addWidget(self.add_button, 0, Qt.AlignmentFlag.AlignLeft)

    def configs(self) -> list[CompareConfig]:
        return [row.config() for row in self.rows]

    def set_configs(self, configs: Sequence[CompareConfig]) -> None:
        """Rows for ``configs`` (at most ``MAX_CONFIGS``); a name not listed or not usable
        here falls back to a usable choice."""
        for row in list(self.rows):
            self._drop(row)
        for config in list(configs)[:MAX_CONFIGS]:
            self.add_row(config, notify=False)
        self._renumber()
        self.changed.emit()

    def set_choices(self, choices: Mapping[str, Sequence[Choice]]) -> None:
        """New choices (another device): each row keeps what it had where that is still usable."""
        self.choices = choices
        for row in self.rows:
            for kind, combo in row.combos.items():
                fill_combo(combo, choices.get(kind, ()))
                if combo.currentIndex() < 0 or not combo.model().item(combo.currentIndex()).isEnabled():
                    self._first_usable(combo)
        self.changed.emit()

    def add_row(self, config: CompareConfig | None = None, notify: bool = True) -> ConfigRow | None:
        """Add a configuration (default: the next preferred quantization not yet used)."""
        if len(self.rows) >= MAX_CONFIGS:
            return None
        row = ConfigRow(self)
        for kind, combo in row.combos.items():
            fill_combo(combo, self.choices.get(kind, ()))
        config = config or self._next_config()
        for kind, _title, field in ROW_KINDS:
            if not select(row.combos[kind], getattr(config, field)):
                self._first_usable(row.combos[kind], prefer="auto")
        r = len(self.rows) + 1
        for col, w in enumerate(row.widgets()):
            self.grid.addWidget(w, r, col)
        for combo in row.combos.values():
            combo.currentIndexChanged.connect(self.changed)
        row.remove.clicked.connect(lambda: self.remove_row(row))
        self.rows.append(row)
        if notify:
            self._renumber()
            self.changed.emit()
        return row

    def remove_row(self, row: ConfigRow) -> None:
        if row in self.rows:
            self._drop(row)
            self._renumber()
            self.changed.emit()

    def _drop(self, row: ConfigRow) -> None:
        self.rows.remove(row)
        for w in row.widgets():
            self.grid.removeWidget(w)
            w.deleteLater()
        row.deleteLater()

    def _renumber(self) -> None:
        # Rows move up after a removal: lay the grid out again in order.
        for r, row in enumerate(self.rows, start=1):
            for col, w in enumerate(row.widgets()):
                self.grid.addWidget(w, r, col)
            row.number.setText(f"{r}")
            row.number.setToolTip("the reference: the others' agreement is measured against it" if r == 1 else "")
            font = row.number.font()
            font.setBold(r == 1)
            row.number.setFont(font)
        self.add_button.setEnabled(len(self.rows) < MAX_CONFIGS)
        self.add_button.setToolTip("" if len(self.rows) < MAX_CONFIGS else
                                   f"A comparison runs at most {MAX_CONFIGS} configurations.")

    def _next_config(self) -> CompareConfig:
        """A configuration not in the list yet: the next preferred quantization, else
        another attention backend or KV dtype for one (the list may still hold it all,
        and then says so)."""
        used = set(self.configs())

        def usable(kind: str) -> list[str]:
            return [c.name for c in self.choices.get(kind, ()) if c.available] or ["auto"]

        quants = usable("quantization")
        ordered = [q for q in PREFERRED_QUANTS if q in quants] + [q for q in quants if q not in PREFERRED_QUANTS]
        for kv in usable("kv_cache_dtype"):
            for attention in usable("attention"):
                for quant in ordered:
                    config = CompareConfig(quant, attention, kv)
                    if config not in used:
                        return config
        return CompareConfig(ordered[0])

    @staticmethod
    def _first_usable(combo: QComboBox, prefer: str = "auto") -> None:
        if select(combo, prefer):
            return
        model = combo.model()
        for i in range(combo.count()):
            if model.item(i).isEnabled():
                combo.setCurrentIndex(i)
                return
