"""Load options: model, quantization, attention backend, device, dtype, context, KV memory
and KV-cache precision.

Every list is the engine's registry of load choices (``engine.api.list_choices``): the
same names the CLI flags, ``hearth bench`` and ``hearth doctor`` use. Choices this machine
can't use stay in the lists but are greyed out, with the engine's reason (from each
backend's ``available()``) as their tooltip and under the combo box, so nobody wonders why
"triton" or "int4" can't be picked. The same goes for the CUDA graphs switch on a machine
without a CUDA GPU, or with the CPU device chosen. Accepting builds the one validated
``EngineConfig`` of the options (``config()``), so a bad value is explained here, not
after the load started.

The Model field shows a readable name (a repo id, a file name) instead of a Hugging Face
cache path; the dialog still loads the exact reference it was given unless the user
types another one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import threading

from PySide6.QtCore import QSettings, Signal
from PySide6.QtGui import QStandardItemModel
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDialog, QDialogButtonBox, QFormLayout,
                               QLabel, QLineEdit, QPushButton, QSpinBox, QVBoxLayout)

from app.gui.saved_values import saved_int
from app.gui.widget_tips import set_enabled
from engine.api import (CHOICE_KINDS, FLOAT_HEAD_METHODS, GROUPED_METHODS, QUANT_HEAD_METHODS, Choice, EngineConfig,
                        HearthError, ModelCheck, check_model, config_from_options, format_bytes, gpu_memory,
                        list_choices, model_display_name)

#: kind -> its choices on this machine (``engine.api.list_choices``), what the dialog lists.
ChoiceTable = Mapping[str, Sequence[Choice]]

_GRAPHS_TIP = ("CUDA graphs replay each decode step as one GPU launch: faster, for a little GPU memory. "
               "Tick this to run without them.")

WINDOW_TITLE = "Load model"
#: The shortest context the dialog loads (besides 0, the model's maximum): a chat template's
#: own tokens (a system prompt, role headers: 30-120 on common models) and an answer must fit
#: it, or every message is refused. (The command line takes any length: a raw prompt fits less.)
MIN_CHAT_CONTEXT = 256
# The form's field labels, by Engine.load keyword (error messages name these fields too).
FIELD_LABELS = {"model": "Model", "quantization": "Quantization", "quant_group_size": "Group size (int4, AWQ, GPTQ)", "attention": "Attention backend",
                "device": "Device", "dtype": "Weights dtype", "max_model_len": "Context length",
                "kv_cache_memory": "KV-cache memory", "kv_cache_dtype": "KV-cache precision",
                "devices": "Split over devices", "split": "Split mode", "split_ratio": "Split ratio"}

#: --split's modes as the dialog names them.
SPLIT_MODES = (("layer", "Layer split: layer ranges per device, one process"),
               ("tensor", "Tensor parallel: every layer across the devices, one process each"))


def fill_choices(combo: QComboBox, entries: list[tuple]) -> None:
    """entries: (value, label, reasons) or (value, label, reasons, caveats); a non-empty
    reason list greys the item out; caveats mark it "(slow here)" and are its tooltip."""
    combo.clear()
    model: QStandardItemModel = combo.model()
    for value, label, reasons, *more in entries:
        caveats = more[0] if more else []
        combo.addItem(label + ("  (unavailable)" if reasons else "  (slow here)" if caveats else ""), value)
        item = model.item(combo.count() - 1)
        if reasons:
            item.setEnabled(False)
            item.setToolTip("; ".join(reasons))
        else:
            item.setToolTip("; ".join(caveats))


def select_choice(combo: QComboBox, value) -> None:
    idx = combo.findData(value)
    model: QStandardItemModel = combo.model()
    if idx < 0 or not model.item(idx).isEnabled():
        idx = next((i for i in range(combo.count()) if model.item(i).isEnabled()), 0)
    combo.setCurrentIndex(idx)


def machine_choices(device: str = "auto") -> dict[str, tuple[Choice, ...]]:
    """Every kind of load choice as this machine sees it (imports torch: the checks)."""
    return {kind: list_choices(kind, device) for kind in CHOICE_KINDS}


def _entries(choices: Sequence[Choice]) -> list[tuple[str, str, list[str], list[str]]]:
    return [(c.name, c.label, list(c.reasons), list(c.caveats)) for c in choices]


class LoadDialog(QDialog):
    """Ask how to load ``model_ref``; ``options()`` gives the dict for ``EngineBridge.load``
    (the load options: ``Engine.load``'s keywords), ``config()`` the validated EngineConfig."""

    #: (the options' per-device estimate, as text) from the thread that sized it
    splitFitReady = Signal(str)

    def __init__(self, model_ref: str, settings: QSettings, parent=None, choices: ChoiceTable | None = None,
                 gpus: list[dict] | None = None, model_check: Callable[..., ModelCheck] | None = None) -> None:
        """``model_check``: how the per-device estimate sizes a load (default
        ``engine.api.check_model``: the load's own plan, without loading)."""
        super().__init__(parent)
        self._model_check = model_check or check_model
        self.setWindowTitle(WINDOW_TITLE)
        self.setObjectName("loadDialog")
        self.settings = settings
        self.choices = choices if choices is not None else machine_choices("auto")
        form = QFormLayout()
        # The exact reference loads; the field shows its name (a snapshot hash means nothing).
        self.model_ref = model_ref
        self.model = QLineEdit(model_display_name(model_ref))
        self.model.setObjectName("loadModel")
        self.model.setToolTip(model_ref)
        self._model_shown = self.model.text()
        form.addRow(FIELD_LABELS["model"], self.model)

        # "load/quant": the key of releases with quantization; the older "load/quantization"
        # only ever held "none" (nothing else could load), which must not pin a GGUF to floats.
        self.quantization = self._combo("loadQuantization", "quantization", "load/quant", "auto")
        form.addRow(FIELD_LABELS["quantization"], self.quantization)
        self.group_size = QComboBox()
        self.group_size.setObjectName("loadGroupSize")
        for label, value in GROUP_SIZES:
            self.group_size.addItem(label, value)
        saved_group = saved_int(settings, "load/quant_group_size", 0)
        self.group_size.setCurrentIndex(max(0, self.group_size.findData(saved_group or None)))
        self.group_size.setToolTip("int4, AWQ and GPTQ: how many weights share one scale. Smaller groups are "
                                   "more exact and a little larger; auto takes 128, or the largest that fits the "
                                   "model. A checkpoint quantized already has its own groups: leave this on auto for it.")
        form.addRow(FIELD_LABELS["quant_group_size"], self.group_size)
        self.quant_head = QCheckBox("Quantize the embedding and head too (smaller, less exact)")
        self.quant_head.setObjectName("loadQuantHead")
        self.quant_head.setToolTip("By default the token embedding and a tied output head stay in the model's dtype: "
                                   "quantizing them saves memory but costs more quality than other layers (a small "
                                   "model's tied embedding most). This quantizes them with the chosen method too.")
        self.quant_head.setChecked(settings.value("load/quant_head", "false") in (True, "true"))
        form.addRow("", self.quant_head)
        self.float_head = QCheckBox("Keep a separate output head in full precision (slower)")
        self.float_head.setObjectName("loadFloatHead")
        self.float_head.setToolTip("int8 and int4 store a model's separate output head (Llama 3, larger Qwen) "
                                   "as int8 by default: it is up to a fifth of a quantized decode step.")
        self.float_head.setChecked(settings.value("load/float_head", "false") in (True, "true")
                                   and not self.quant_head.isChecked())
        form.addRow("", self.float_head)
        # one or the other: the head quantized in the method's format, or kept float
        self.quant_head.toggled.connect(lambda on: on and self.float_head.setChecked(False))
        self.float_head.toggled.connect(lambda on: on and self.quant_head.setChecked(False))
        self.quantization.currentIndexChanged.connect(self._update_quant_fields)
        self._update_quant_fields()
        self.attention = self._combo("loadAttention", "attention", "load/attention", "auto")
        form.addRow(FIELD_LABELS["attention"], self.attention)
        self.reasons = QLabel()
        self.reasons.setObjectName("loadReasons")
        self.reasons.setWordWrap(True)
        self.reasons.setEnabled(False)
        self.reasons.setText(self._unavailable_text())
        form.addRow("", self.reasons)
        self.device = self._combo("loadDevice", "device", "load/device", "auto")
        form.addRow(FIELD_LABELS["device"], self.device)
        # A layer split (--devices / --split-ratio): contiguous layer ranges per device.
        self.devices = QLineEdit(str(settings.value("load/devices", "") or ""))
        self.devices.setObjectName("loadDevices")
        self.devices.setPlaceholderText("one device (above); or a list, e.g. cuda:0,cuda:1 or cuda:0,cpu")
        self.devices.setToolTip("Contiguous layer ranges on each device, in order, sized by free memory. The CPU "
                                "last takes the layers the GPUs can't hold (slower: each token reads its layers "
                                "from RAM).")
        form.addRow(FIELD_LABELS["devices"], self.devices)
        self.split_mode = QComboBox()
        self.split_mode.setObjectName("loadSplitMode")
        for value, label in SPLIT_MODES:
            self.split_mode.addItem(label, value)
        saved_mode = str(settings.value("load/split", "layer") or "layer")
        self.split_mode.setCurrentIndex(max(0, self.split_mode.findData(saved_mode)))
        self.split_mode.setToolTip("Layer split: each device runs its own layers in turn (any devices, the CPU "
                                   "last included). Tensor parallel: each GPU holds a slice of every layer and "
                                   "they meet in an all-reduce twice per layer (GPUs of one kind, fast links).")
        form.addRow(FIELD_LABELS["split"], self.split_mode)
        self.split_mode.currentIndexChanged.connect(self._update_device_fields)
        self.split_ratio = QLineEdit(str(settings.value("load/split_ratio", "") or ""))
        self.split_ratio.setObjectName("loadSplitRatio")
        self.split_ratio.setPlaceholderText("by free memory (or one share per device, e.g. 0.6,0.4)")
        form.addRow(FIELD_LABELS["split_ratio"], self.split_ratio)
        self.gpu_list = QLabel(gpu_summary(gpus if gpus is not None else gpu_memory()))
        self.gpu_list.setObjectName("loadGpuList")
        self.gpu_list.setWordWrap(True)
        self.gpu_list.setEnabled(False)
        form.addRow("", self.gpu_list)
        # What each device would hold of this model with these options, and whether it fits.
        self.split_fit = QPushButton("Estimate per device")
        self.split_fit.setObjectName("loadSplitFit")
        self.split_fit.setToolTip("Size the load over the devices above as it would run (each device's layers "
                                  "or slice, weights and one full context of KV cache) against each one's free "
                                  "memory, without loading it.")
        self.split_fit.clicked.connect(self.estimate_split)
        self.split_fit_result = QLabel()
        self.split_fit_result.setObjectName("loadSplitFitResult")
        self.split_fit_result.setWordWrap(False)  # one line per device (its details in the tooltip)
        self.splitFitReady.connect(self._show_split_fit)
        form.addRow(self.split_fit, self.split_fit_result)
        self.devices.textChanged.connect(self._update_device_fields)
        self._update_device_fields()
        self.dtype = self._combo("loadDtype", "dtype", "load/dtype", "auto")
        form.addRow(FIELD_LABELS["dtype"], self.dtype)

        self.context = QSpinBox()
        self.context.setObjectName("loadContext")
        self.context.setRange(0, 1 << 20)
        self.context.setSingleStep(1024)
        self.context.setSpecialValueText("model's maximum")
        self.context.setToolTip(f"Tokens a chat can hold, the prompt and the answer together: at least "
                                f"{MIN_CHAT_CONTEXT}, or 0 for the model's maximum. Less context, less memory.")
        self.context.setValue(saved_int(settings, "load/max_model_len", 0))
        form.addRow(FIELD_LABELS["max_model_len"], self.context)

        self.kv_memory = QLineEdit(str(settings.value("load/kv_cache_memory", "")))
        self.kv_memory.setObjectName("loadKvMemory")
        self.kv_memory.setPlaceholderText("automatic (e.g. 4GiB)")
        form.addRow(FIELD_LABELS["kv_cache_memory"], self.kv_memory)

        self.kv_dtype = self._combo("loadKvDtype", "kv_cache_dtype", "load/kv_cache_dtype", "auto")
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

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        super().resizeEvent(event)
        # The form gives a wrapped label the height of its size hint's width, not of the
        # width it has: narrower than that (the window made narrower by hand) the reasons lost
        # their last lines. They keep the height their width needs, and the dialog grows to it.
        need = self.reasons.heightForWidth(self.reasons.width())
        if need > 0 and need != self.reasons.minimumHeight():
            self.reasons.setMinimumHeight(need)

    def _combo(self, name: str, kind: str, key: str, default: str) -> QComboBox:
        """A combo box of ``kind``'s choices, the saved one selected (else ``default``, else
        the first usable one)."""
        combo = QComboBox()
        combo.setObjectName(name)
        fill_choices(combo, _entries(self.choices.get(kind, ())))
        select_choice(combo, self.settings.value(key, default) or default)
        return combo

    def _unavailable_text(self) -> str:
        """One line per reason, naming every choice it applies to ("int8, int4: ...")."""
        by_reason: dict[str, list[str]] = {}
        for kind in ("attention", "quantization", "kv_cache_dtype"):
            for c in self.choices.get(kind, ()):
                if c.reasons:
                    label = f"{c.name} KV cache" if kind == "kv_cache_dtype" else c.name
                    by_reason.setdefault("; ".join(c.reasons), []).append(label)
        return "\n".join(f"{', '.join(names)}: {why}" for why, names in by_reason.items())

    def _update_quant_fields(self, *_args) -> None:
        """Group size only means something for int4, AWQ and GPTQ quantizing here (as the
        command line's --group-size), the head options for int4 / int8 (/ fp8: its untied head)."""
        method = self.quantization.currentData()
        label = self.quantization.currentText().split(" (")[0] or str(method)
        set_enabled(self.group_size, method in GROUPED_METHODS,
                f"only int4, AWQ and GPTQ quantize in groups here ({label} is picked)")
        set_enabled(self.quant_head, method in QUANT_HEAD_METHODS,
                f"only int8 and int4 quantize the embedding and head ({label} is picked)")
        set_enabled(self.float_head, method in FLOAT_HEAD_METHODS,
                f"only int8, int4 and fp8 change a separate output head ({label} is picked)")

    def _update_device_fields(self, *_args) -> None:
        """A device list replaces the single device; a ratio only means something with one."""
        split = bool(self.devices.text().strip())
        no_list = "type a device list above (Split over devices) first"
        set_enabled(self.device, not split, "the device list below (Split over devices) replaces it")
        set_enabled(self.split_mode, split, no_list)
        if hasattr(self, "split_fit"):
            set_enabled(self.split_fit, split, no_list)
            self.split_fit_result.clear()  # an estimate of other options
        set_enabled(self.split_ratio, split and self.split_mode.currentData() == "layer",
                no_list if not split else "tensor parallel splits every layer evenly: no ratio")

    def estimate_split(self) -> threading.Thread | None:
        """Size the chosen split on a worker thread (finding the model may read the disk or
        the Hub); its per-device lines replace the result label when done."""
        try:
            opts = self.options()
            config_from_options(**opts)  # a bad field is said at once, in the same words as on accept
        except HearthError as e:
            self._show_split_fit(str(e))
            return None
        self.split_fit_result.setText("estimating...")
        model = opts.pop("model")

        def work() -> None:
            try:
                text = split_fit_text(self._model_check(model, **opts))
            except HearthError as e:
                text = str(e)
            except Exception as e:  # noqa: BLE001 - said in the dialog, never raised on a worker thread
                text = f"could not estimate: {type(e).__name__}: {e}"
            try:
                self.splitFitReady.emit(text)
            except RuntimeError:  # the dialog closed meanwhile
                pass

        thread = threading.Thread(target=work, name="hearth-split-fit", daemon=True)
        thread.start()
        return thread

    def _show_split_fit(self, text: str) -> None:
        """The estimate's lines, all of them in view (the form would squeeze a wrapped label)."""
        lines = text.split("\n\n", 1)  # the lines, then their details (the tooltip)
        self.split_fit_result.setWordWrap(len(lines) == 1)  # a message rather than the devices' lines
        self.split_fit_result.setText(lines[0])
        self.split_fit_result.setToolTip(lines[1] if len(lines) > 1 else "")
        self.adjustSize()

    def graphs_reason(self) -> str | None:
        """Why CUDA graphs can't be used with the chosen device (None: they can)."""
        if not _has_gpu(self.choices):
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
        """The load options (``Engine.load``'s keywords, ``model`` included)."""
        kv = self.kv_memory.text().strip()
        return {
            "model": self.model_reference(),
            "quantization": self.quantization.currentData(),
            "quant_group_size": self.group_size.currentData() if self.group_size.isEnabled() else None,
            "quant_head": self.quant_head.isChecked() and self.quant_head.isEnabled(),
            "float_head": self.float_head.isChecked() and self.float_head.isEnabled(),
            "attention": self.attention.currentData(),
            "device": self.device.currentData(),
            "dtype": self.dtype.currentData(),
            "max_model_len": self.context.value() or None,
            "kv_cache_memory": kv or None,
            "kv_cache_dtype": self.kv_dtype.currentData(),
            "enforce_eager": self.eager.isChecked(),
            **self._split_options(),
        }

    def _split_options(self) -> dict:
        devices = self.devices.text().strip()
        if not devices:
            return {}
        # The device list names the first device itself.
        mode = self.split_mode.currentData()
        return {"device": "auto", "devices": devices, "split": mode,
                "split_ratio": (self.split_ratio.text().strip() or None) if mode == "layer" else None}

    def config(self) -> EngineConfig:
        """The one validated EngineConfig of the options; raises InvalidRequestError."""
        return config_from_options(**self.options())

    def _accept(self) -> None:
        try:
            self.config()  # every field checked by the engine's own rules, before the load
        except HearthError as e:
            self.error.setText(str(e))
            return
        context = self.context.value()
        if 0 < context < MIN_CHAT_CONTEXT:
            self.error.setText(f"{FIELD_LABELS['max_model_len']}: {context} tokens can't hold a chat: the model's "
                               f"chat template takes tokens of its own before the answer. Pick {MIN_CHAT_CONTEXT} "
                               "or more, or 0 for the model's maximum.")
            self.context.setFocus()
            return
        self.accept()  # (the window saves the options once the load has succeeded)


# int4 group sizes the dialog offers (None: auto).
GROUP_SIZES = (("auto", None), ("32", 32), ("64", 64), ("128", 128), ("256", 256))
# Options saved under another key than load/<option>.
_SETTING_KEYS = {"quantization": "load/quant"}


def _has_gpu(choices: ChoiceTable) -> bool:
    return any(c.name.startswith("cuda") and c.available for c in choices.get("device", ()))


def save_load_options(settings: QSettings, opts: dict) -> None:
    defaults = {"quantization": "auto", "attention": "auto", "device": "auto", "dtype": "auto",
                "kv_cache_dtype": "auto", "enforce_eager": False, "quant_head": False, "float_head": False}
    for key, default in defaults.items():
        settings.setValue(_SETTING_KEYS.get(key, f"load/{key}"), opts.get(key, default))
    settings.setValue("load/quant_group_size", opts.get("quant_group_size") or 0)
    settings.setValue("load/max_model_len", opts.get("max_model_len") or 0)
    settings.setValue("load/kv_cache_memory", opts.get("kv_cache_memory") or "")
    settings.setValue("load/model", opts.get("model") or "default")
    settings.setValue("load/devices", opts.get("devices") or "")
    settings.setValue("load/split_ratio", opts.get("split_ratio") or "")
    settings.setValue("load/split", opts.get("split") or "layer")


def split_fit_text(check: ModelCheck) -> str:
    """One line per device of a split load's check: what it holds, whether it fits and what
    it takes against its free memory (CPU entries share the RAM); then, after a blank line,
    each one's weights and KV cache."""
    lines, details = [], []
    for share in check.devices:
        need, free = share.need_bytes, share.free_bytes
        if share.device == "cpu":
            need = sum(s.need_bytes for s in check.devices if s.device == "cpu")
        verdict = "won't fit" if need > free else "tight" if need > 0.9 * free else "fits"
        lines.append(f"{share.device} ({share.holds}): {verdict}, {format_bytes(share.need_bytes)} of "
                     f"{format_bytes(share.free_bytes)} free")
        details.append(f"{share.device}: weights {format_bytes(share.weights_bytes)}, KV cache "
                       f"{format_bytes(share.kv_cache_bytes)} (one full context)")
    if not lines:
        return "one device: nothing to split"
    # (the dialog shows the lines, the details as their tooltip)
    return "\n".join(lines) + "\n\n" + "\n".join(details)


def gpu_summary(gpus: list[dict]) -> str:
    """One line per GPU with its free memory (the device picker's list)."""
    if not gpus:
        return "No CUDA GPU here: cpu,cpu tries either split mode on the CPU."
    return "\n".join(f"cuda:{g['index']} — {g['name']}: {format_bytes(g['free_bytes'])} free of "
                     f"{format_bytes(g['total_bytes'])}" for g in gpus)


def saved_load_options(settings: QSettings, choices: ChoiceTable | None = None) -> dict:
    """The last load options (what the app loads on start), validated against this machine:
    a saved choice that can't run here (or no longer exists) falls back to the default."""
    choices = choices if choices is not None else machine_choices("auto")

    def usable(kind: str, key: str, default: str) -> str:
        value = settings.value(key, default) or default
        ok = {c.name for c in choices.get(kind, ()) if c.available}
        return value if value in ok else default

    attention = usable("attention", "load/attention", "auto")
    kv_dtype = usable("kv_cache_dtype", "load/kv_cache_dtype", "auto")
    if kv_dtype == "fp8" and attention == "flash-attn":
        kv_dtype = "auto"  # a start-up load must not fail on a combination that can't run
    quantization = usable("quantization", "load/quant", "auto")
    # (a saved method that can't run here falls back to auto: the flags of the method go with it,
    # as the dialog's own fields are off for the methods they don't apply to)
    quant_head = settings.value("load/quant_head", "false") in (True, "true") and quantization in QUANT_HEAD_METHODS
    group_size = saved_int(settings, "load/quant_group_size", 0) or None
    return {
        "model": settings.value("load/model", "default") or "default",
        "quantization": quantization,
        "quant_group_size": group_size if quantization in GROUPED_METHODS else None,
        "quant_head": quant_head,
        "float_head": (settings.value("load/float_head", "false") in (True, "true") and not quant_head
                       and quantization in FLOAT_HEAD_METHODS),
        "attention": attention,
        "device": usable("device", "load/device", "auto"),
        "dtype": usable("dtype", "load/dtype", "auto"),
        "max_model_len": saved_int(settings, "load/max_model_len", 0) or None,
        "kv_cache_memory": settings.value("load/kv_cache_memory", "") or None,
        "kv_cache_dtype": kv_dtype,
        "enforce_eager": settings.value("load/enforce_eager", "false") in (True, "true"),
        **_saved_split(settings, choices),
    }


def _saved_split(settings: QSettings, choices: ChoiceTable) -> dict:
    """The saved layer split, if every device it names is here (a start-up load must not
    fail on a GPU that left)."""
    devices = str(settings.value("load/devices", "") or "").strip()
    if not devices:
        return {}
    here = {c.name for c in choices.get("device", ()) if c.available} | {"cpu"}
    named = [d.strip().lower() for d in devices.split(",")]
    if not all(d in here or (d == "cuda" and "cuda:0" in here) for d in named):
        return {}
    mode = str(settings.value("load/split", "layer") or "layer")
    mode = mode if mode in ("layer", "tensor") else "layer"
    ratio = str(settings.value("load/split_ratio", "") or "") or None
    return {"device": "auto", "devices": devices, "split": mode, "split_ratio": ratio if mode == "layer" else None}
