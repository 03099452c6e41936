"""Load options: model, quantization, attention backend, device, dtype, context, KV memory
and KV-cache precision.

Choices this machine can't use stay in the lists but are greyed out, with the engine's
reason (from each backend's ``available()``) as their tooltip and under the combo box,
so nobody wonders why "triton" or "int4" can't be picked. The same goes for the CUDA
graphs switch on a machine without a CUDA GPU, or with the CPU device chosen.

The Model field shows a readable name (a repo id, a file name) instead of a Hugging Face
cache path; the dialog still loads the exact reference it was given unless the user
types another one.
"""

from __future__ import annotations

from PySide6.QtCore import QSettings
from PySide6.QtGui import QStandardItemModel
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDialog, QDialogButtonBox, QFormLayout,
                               QLabel, QLineEdit, QSpinBox, QVBoxLayout)

from engine.api import load_choices, model_display_name, parse_bytes

_GRAPHS_TIP = ("CUDA graphs replay each decode step as one GPU launch: faster, for a little GPU memory. "
               "Tick this to run without them.")

WINDOW_TITLE = "Load model"
# The form's field labels, by Engine.load keyword (error messages name these fields too).
FIELD_LABELS = {"model": "Model", "quantization": "Quantization", "attention": "Attention backend",
                "device": "Device", "dtype": "Weights dtype", "max_model_len": "Context length",
                "kv_cache_memory": "KV-cache memory", "kv_cache_dtype": "KV-cache precision"}


def fill_choices(combo: QComboBox, entries: list[tuple[str, str, list[str]]]) -> None:
    """entries: (value, label, reasons); a non-empty reason list greys the item out."""
    combo.clear()
    model: QStandardItemModel = combo.model()
    for value, label, reasons in entries:
        combo.addItem(label + ("" if not reasons else "  (unavailable)"), value)
        item = model.item(combo.count() - 1)
        if reasons:
            item.setEnabled(False)
            item.setToolTip("; ".join(reasons))
        else:
            item.setToolTip("")


def select_choice(combo: QComboBox, value) -> None:
    idx = combo.findData(value)
    model: QStandardItemModel = combo.model()
    if idx < 0 or not model.item(idx).isEnabled():
        idx = next((i for i in range(combo.count()) if model.item(i).isEnabled()), 0)
    combo.setCurrentIndex(idx)


class LoadDialog(QDialog):
    """Ask how to load ``model_ref``; ``options()`` gives the dict for ``EngineBridge.load``."""

    def __init__(self, model_ref: str, settings: QSettings, parent=None, choices: dict | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle(WINDOW_TITLE)
        self.setObjectName("loadDialog")
        self.settings = settings
        self.choices = choices if choices is not None else load_choices("auto")
        form = QFormLayout()
        # The exact reference loads; the field shows its name (a snapshot hash means nothing).
        self.model_ref = model_ref
        self.model = QLineEdit(model_display_name(model_ref))
        self.model.setObjectName("loadModel")
        self.model.setToolTip(model_ref)
        self._model_shown = self.model.text()
        form.addRow(FIELD_LABELS["model"], self.model)

        self.quantization = QComboBox()
        self.quantization.setObjectName("loadQuantization")
        fill_choices(self.quantization, [(n, "none (bf16 / fp16)" if n == "none" else n, r)
                                  for n, r in self.choices["quantization"].items()])
        select_choice(self.quantization, settings.value("load/quantization", "none"))
        form.addRow(FIELD_LABELS["quantization"], self.quantization)

        self.attention = QComboBox()
        self.attention.setObjectName("loadAttention")
        fill_choices(self.attention, [(n, n, r) for n, r in self.choices["attention"].items()])
        select_choice(self.attention, settings.value("load/attention", "") or default_attention(self.choices))
        form.addRow(FIELD_LABELS["attention"], self.attention)
        self.reasons = QLabel()
        self.reasons.setObjectName("loadReasons")
        self.reasons.setWordWrap(True)
        self.reasons.setEnabled(False)
        self.reasons.setText(self._unavailable_text())
        form.addRow("", self.reasons)

        self.device = QComboBox()
        self.device.setObjectName("loadDevice")
        fill_choices(self.device, [(d["id"], d["label"], []) for d in self.choices["devices"]])
        select_choice(self.device, settings.value("load/device", "auto"))
        form.addRow(FIELD_LABELS["device"], self.device)

        self.dtype = QComboBox()
        self.dtype.setObjectName("loadDtype")
        fill_choices(self.dtype, [(d, d, []) for d in self.choices["dtypes"]])
        select_choice(self.dtype, settings.value("load/dtype", "auto"))
        form.addRow(FIELD_LABELS["dtype"], self.dtype)

        self.context = QSpinBox()
        self.context.setObjectName("loadContext")
        self.context.setRange(0, 1 << 20)
        self.context.setSingleStep(1024)
        self.context.setSpecialValueText("model's maximum")
        self.context.setValue(int(settings.value("load/max_model_len", 0)))
        form.addRow(FIELD_LABELS["max_model_len"], self.context)

        self.kv_memory = QLineEdit(str(settings.value("load/kv_cache_memory", "")))
        self.kv_memory.setObjectName("loadKvMemory")
        self.kv_memory.setPlaceholderText("automatic (e.g. 4GiB)")
        form.addRow(FIELD_LABELS["kv_cache_memory"], self.kv_memory)

        self.kv_dtype = QComboBox()
        self.kv_dtype.setObjectName("loadKvDtype")
        labels = {"auto": "same as the weights", "fp8": "fp8 (e4m3): twice the context, slightly less exact"}
        fill_choices(self.kv_dtype, [(n, labels.get(n, n), r)
                              for n, r in self.choices.get("kv_cache_dtypes", {"auto": []}).items()])
        select_choice(self.kv_dtype, settings.value("load/kv_cache_dtype", "auto"))
        form.addRow(FIELD_LABELS["kv_cache_dtype"], self.kv_dtype)

        self.eager = QCheckBox("Run without CUDA graphs (slower; saves a little memory)")
        self.eager.setObjectName("loadEnforceEager")
        self.eager.setChecked(settings.value("load/enforce_eager", "false") in (True, "true"))
        form.addRow("", self.eager)
        self.device.currentIndexChanged.connect(self._update_graphs_switch)
        self._update_graphs_switch()

        self.error = QLabel()
        self.error.setObjectName("loadError")
        self.error.setWordWrap(True)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Load")
        buttons.accepted.connect(self._accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.error)
        lay.addWidget(buttons)
        # The word-wrapped reasons (many on a CPU-only machine) got a height measured for a
        # narrower dialog and lost their last lines; at this width they are laid out whole.
        self.setMinimumWidth(620)

    def _unavailable_text(self) -> str:
        """One line per reason, naming every choice it applies to ("int8, int4: ...")."""
        by_reason: dict[str, list[str]] = {}
        for kind in ("attention", "quantization", "kv_cache_dtypes"):
            for name, reasons in self.choices.get(kind, {}).items():
                if reasons:
                    label = f"{name} KV cache" if kind == "kv_cache_dtypes" else name
                    by_reason.setdefault("; ".join(reasons), []).append(label)
        return "\n".join(f"{', '.join(names)}: {why}" for why, names in by_reason.items())

    def graphs_reason(self) -> str | None:
        """Why CUDA graphs can't be used with the chosen device (None: they can)."""
        if not any(d["id"].startswith("cuda") for d in self.choices["devices"]):
            return "This machine has no CUDA GPU: models run on the CPU, which never uses CUDA graphs."
        if self.device.currentData() == "cpu":
            return "The CPU device never uses CUDA graphs: they are for CUDA GPUs."
        return None

    def _update_graphs_switch(self, *_args) -> None:
        reason = self.graphs_reason()
        self.eager.setEnabled(reason is None)
        self.eager.setToolTip(reason or _GRAPHS_TIP)

    def model_reference(self) -> str | None:
        """What loads: the reference the dialog was opened with, unless another was typed."""
        text = self.model.text().strip()
        if text == self._model_shown:
            return self.model_ref or None
        return text or None

    def options(self) -> dict:
        kv = self.kv_memory.text().strip()
        return {
            "model": self.model_reference(),
            "quantization": self.quantization.currentData(),
            "attention": self.attention.currentData(),
            "device": self.device.currentData(),
            "dtype": self.dtype.currentData(),
            "max_model_len": self.context.value() or None,
            "kv_cache_memory": kv or None,
            "kv_cache_dtype": self.kv_dtype.currentData(),
            "enforce_eager": self.eager.isChecked(),
        }

    def _accept(self) -> None:
        opts = self.options()
        if opts["kv_cache_memory"]:
            try:
                parse_bytes(opts["kv_cache_memory"])
            except Exception as e:
                self.error.setText(str(e))
                return
        save_load_options(self.settings, opts)
        self.accept()


def default_attention(choices: dict) -> str:
    """The fastest backend that runs here: triton on a CUDA GPU, else the torch reference."""
    usable = [n for n, r in choices["attention"].items() if not r]
    has_gpu = any(d["id"].startswith("cuda") for d in choices["devices"])
    order = ("triton", "flash-attn", "torch") if has_gpu else ("torch",)
    return next((n for n in order if n in usable), usable[0] if usable else "torch")


def save_load_options(settings: QSettings, opts: dict) -> None:
    defaults = {"quantization": "none", "attention": "", "device": "auto", "dtype": "auto",
                "kv_cache_dtype": "auto", "enforce_eager": False}
    for key, default in defaults.items():
        settings.setValue(f"load/{key}", opts.get(key, default))
    settings.setValue("load/max_model_len", opts.get("max_model_len") or 0)
    settings.setValue("load/kv_cache_memory", opts.get("kv_cache_memory") or "")
    settings.setValue("load/model", opts.get("model") or "default")


def saved_load_options(settings: QSettings) -> dict:
    """The last load options (what the app loads on start), validated against this machine."""
    choices = load_choices("auto")
    attention = settings.value("load/attention", "")
    usable = [n for n, r in choices["attention"].items() if not r]
    if attention not in usable:
        attention = default_attention(choices)
    quant = settings.value("load/quantization", "none")
    device = settings.value("load/device", "auto")
    kv_dtype = settings.value("load/kv_cache_dtype", "auto")
    if choices["kv_cache_dtypes"].get(kv_dtype, ["?"]) or (kv_dtype == "fp8" and attention == "flash-attn"):
        kv_dtype = "auto"  # a start-up load must not fail on a combination that can't run
    if device not in [d["id"] for d in choices["devices"]]:
        device = "auto"
    return {
        "model": settings.value("load/model", "default") or "default",
        "quantization": quant if not choices["quantization"].get(quant, ["?"]) else "none",
        "attention": attention,
        "device": device,
        "dtype": settings.value("load/dtype", "auto"),
        "max_model_len": int(settings.value("load/max_model_len", 0)) or None,
        "kv_cache_memory": settings.value("load/kv_cache_memory", "") or None,
        "kv_cache_dtype": kv_dtype,
        "enforce_eager": settings.value("load/enforce_eager", "false") in (True, "true"),
    }
