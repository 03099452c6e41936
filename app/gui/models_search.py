"""The Hub half of the Models page: search bar, results, details, fit estimate, download.

Every Hub call runs on the page's ``TaskRunner``; typing restarts a short timer so a
search goes out when the user pauses, not on every key. The fit estimate needs the repo's
config.json and the free memory of each device. The devices are read as soon as the page
opens (``refresh_machine``), and again with each model's details, so changing the weights
dtype, context, KV-cache precision or device recomputes the estimate at once without the
network. Its choices are the load dialog's, from the engine's registry of load choices:
the same dtypes, quantizations greyed out with the engine's reason while it can't load
them, and the KV-cache dtypes.
"""

from __future__ import annotations

from functools import partial

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (QAbstractItemView, QComboBox, QFormLayout, QFrame, QGroupBox,
                               QHBoxLayout, QHeaderView, QLabel, QLineEdit, QListWidget, QListWidgetItem,
                               QPushButton, QScrollArea, QSpinBox, QSplitter, QTableWidget,
                               QTableWidgetItem, QVBoxLayout, QWidget)

from app.gui.load_dialog import fill_choices, select_choice
from app.gui.models_format import human_bytes, human_count
from app.services import fit, hub
from engine.api import SpecSummary, choice_names, get_choice

SEARCH_DELAY_MS = 350
SORT_LABELS = {"Most downloaded": "downloads", "Most liked": "likes", "Recently updated": "updated",
               "Trending": "trending"}


def _fetch_details(repo_id: str, token: str | None):
    """Details, model shape and memory targets, in one background call."""
    details = hub.model_details(repo_id, token=token)
    shape, notes = fit.load_shape(repo_id, revision=details.sha, token=token)
    return details, shape, notes, fit.memory_targets()


def _engine_quantizations() -> dict[str, list[str]]:
    """The registry's quantizations, each with the reasons it can't load them here."""
    from engine.api import list_choices  # its checks import torch: slow the first time, so apart

    return {c.name: list(c.reasons) for c in list_choices("quantization", "auto")}


class SearchPanel(QWidget):
    """Search the Hub and show one model's details. Emits ``downloadRequested(repo_id,
    files)`` with ``files`` ``None`` (the model's own files) or ``[gguf_file]``."""

    downloadRequested = Signal(str, object)

    def __init__(self, runner, token_provider, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._runner = runner
        self._token = token_provider
        self.details = None
        self._shape = SpecSummary()
        self._shape_notes: tuple[str, ...] = ()
        self._targets: list[fit.MemoryTarget] = []
        self._quantizations: dict[str, list[str]] = {}
        self.searched = False

        self.search = QLineEdit()
        self.search.setObjectName("modelSearch")
        self.search.setPlaceholderText("Search text-generation models on the Hugging Face Hub…")
        self.search.setClearButtonEnabled(True)
        self.sort = self._combo("sortCombo", SORT_LABELS.items())
        self.size = self._combo("sizeFilter", ((f"Size: {k}", k) for k in hub.SIZE_FILTERS))
        self.format = self._combo("formatFilter", ((f"Format: {k}", k) for k in hub.FORMAT_FILTERS))
        bar = QHBoxLayout()
        bar.addWidget(self.search, 1)
        for w in (self.sort, self.size, self.format):
            bar.addWidget(w)

        self.results = QListWidget()
        self.results.setObjectName("searchResults")
        self.status = QLabel("")
        self.status.setObjectName("searchStatus")
        self.status.setWordWrap(True)
        self.status.setTextFormat(Qt.TextFormat.PlainText)
        left = QWidget()
        left_lay = QVBoxLayout(left)
        left_lay.setContentsMargins(0, 0, 0, 0)
        left_lay.addWidget(self.results, 1)
        left_lay.addWidget(self.status)

        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(left)
        split.addWidget(self._build_details())
        split.setStretchFactor(1, 1)
        split.setSizes([380, 720])
        lay = QVBoxLayout(self)
        lay.addLayout(bar)
        lay.addWidget(split, 1)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(SEARCH_DELAY_MS)
        self._timer.timeout.connect(self.search_now)
        self.search.textEdited.connect(lambda _text: self._timer.start())
        self.search.returnPressed.connect(self.search_now)
        for combo in (self.sort, self.size, self.format):
            combo.currentIndexChanged.connect(self.search_now)
        self.results.currentItemChanged.connect(self._on_result_selected)
        self.files.itemSelectionChanged.connect(self._on_file_selected)
        self.weights.currentIndexChanged.connect(self._update_fit)
        self.device.currentIndexChanged.connect(self._device_changed)
        self.context.valueChanged.connect(self._update_fit)
        self.kv_dtype.currentIndexChanged.connect(self._update_fit)
        self.download_button.clicked.connect(self._request_download)

    @staticmethod
    def _combo(name: str, items) -> QComboBox:
        combo = QComboBox()
        combo.setObjectName(name)
        for label, data in items:
            combo.addItem(label, data)
        return combo

    def _build_details(self) -> QWidget:
        self.title = QLabel("Pick a model to see its details.")
        self.title.setObjectName("detailsTitle")
        self.title.setTextFormat(Qt.TextFormat.RichText)
        self.title.setOpenExternalLinks(True)
        self.facts = QLabel("")
        self.facts.setObjectName("detailsFacts")
        self.facts.setWordWrap(True)
        self.facts.setTextFormat(Qt.TextFormat.PlainText)
        self.gated_notice = QLabel("")
        self.gated_notice.setObjectName("gatedNotice")
        self.gated_notice.setWordWrap(True)
        self.gated_notice.setTextFormat(Qt.TextFormat.RichText)
        self.gated_notice.setOpenExternalLinks(True)
        self.gated_notice.hide()
        self.card = QLabel("")
        self.card.setObjectName("cardSummary")
        self.card.setWordWrap(True)
        self.card.setTextFormat(Qt.TextFormat.PlainText)
        self.card.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.files = QTableWidget(0, 2)
        self.files.setObjectName("fileTable")
        self.files.setHorizontalHeaderLabels(["File", "Size"])
        self.files.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.files.verticalHeader().hide()
        self.files.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.files.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.files.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.files.setToolTip("Select a .gguf file to download just that quantization.")

        self.weights = QComboBox()
        self.weights.setObjectName("fitWeights")
        self.weights.setToolTip("The load dialog's weights dtype: auto is what the engine picks for the device.")
        self._fill_weights()
        self.context = QSpinBox()
        self.context.setObjectName("fitContext")
        self.context.setRange(0, 1 << 20)
        self.context.setSingleStep(1024)
        self.context.setSpecialValueText("model's maximum")  # 0, as the load dialog's default
        self.context.setValue(0)
        self.context.setSuffix(" tokens")
        self.kv_dtype = QComboBox()
        self.kv_dtype.setObjectName("fitKvDtype")
        self.kv_dtype.setToolTip("The load dialog's KV-cache precision: fp8 holds twice the context in the same memory.")
        fill_choices(self.kv_dtype, [(n, get_choice("kv_cache_dtype", n).label, [])
                                     for n in choice_names("kv_cache_dtype")])
        self.device = QComboBox()
        self.device.setObjectName("fitDevice")
        self.device.addItem("Reading free memory…", None)
        self.fit_result = QLabel("")
        self.fit_result.setObjectName("fitResult")
        self.fit_result.setWordWrap(True)
        self.fit_result.setTextFormat(Qt.TextFormat.PlainText)
        fit_box = QGroupBox("Will it fit?")
        form = QFormLayout(fit_box)
        form.addRow("Weights", self.weights)
        form.addRow("Context", self.context)
        form.addRow("KV cache", self.kv_dtype)
        form.addRow("Device", self.device)
        form.addRow(self.fit_result)

        self.download_button = QPushButton("Download")
        self.download_button.setObjectName("downloadButton")
        self.download_button.setEnabled(False)

        box = QWidget()
        lay = QVBoxLayout(box)
        lay.setContentsMargins(0, 0, 0, 0)
        for w in (self.title, self.facts, self.gated_notice, self.card):
            lay.addWidget(w)
        lay.addWidget(self.files, 1)
        lay.addWidget(fit_box)
        lay.addWidget(self.download_button)
        # The details scroll on their own, so a short window (640x480) still fits the page.
        area = QScrollArea()
        area.setObjectName("modelDetailsArea")
        area.setWidgetResizable(True)
        area.setFrameShape(QFrame.Shape.NoFrame)
        area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        area.setWidget(box)
        return area

    # ------------------------------------------------------------------ search

    def search_now(self) -> None:
        """Run the search for the current text and filters (newest search wins)."""
        self._timer.stop()
        self.searched = True
        query = self.search.text().strip()
        self.status.setText("Searching the Hub…")
        fn = partial(hub.search_models, query, sort=self.sort.currentData(), size=self.size.currentData(),
                     fmt=self.format.currentData(), token=self._token())
        self._runner.run("search", fn, self._on_results, self._on_search_error)

    def _on_results(self, results) -> None:
        self.results.clear()
        for m in results:
            facts = [f"↓ {m.downloads:,}", f"♥ {m.likes:,}"]
            if m.num_params:
                facts.append(f"{human_count(m.num_params)} params")
            if m.last_modified is not None:
                facts.append(f"updated {m.last_modified:%Y-%m-%d}")
            if m.gated:
                facts.append("gated")
            item = QListWidgetItem(f"{m.repo_id}\n{' · '.join(facts)}")
            item.setData(Qt.ItemDataRole.UserRole, m.repo_id)
            self.results.addItem(item)
        count = f"{len(results)} model" + ("" if len(results) == 1 else "s")
        self.status.setText(count if results else "No models match; try fewer words or filters.")

    def _on_search_error(self, exc: Exception) -> None:
        self.results.clear()
        self.status.setText(hub.describe_error(exc, None).message)

    # ------------------------------------------------------------------ details

    def result_ids(self) -> list[str]:
        return [self.results.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.results.count())]

    def _on_result_selected(self, item, _previous=None) -> None:
        if item is None:
            return
        repo_id = item.data(Qt.ItemDataRole.UserRole)
        self.details = None
        self.download_button.setEnabled(False)
        self.title.setText(f"<b>{repo_id}</b>")
        self.facts.setText("Loading details…")
        self.gated_notice.hide()
        self.card.setText("")
        self.files.setRowCount(0)
        self.fit_result.setText("")
        self._runner.run("details", partial(_fetch_details, repo_id, self._token()), self._on_details,
                         self._on_details_error)

    def _on_details(self, payload) -> None:
        d, self._shape, self._shape_notes, self._targets = payload
        self.details = d
        self.title.setText(f'<b>{d.repo_id}</b> · <a href="{d.url}">open on the Hub</a>')
        facts = [f"License: {d.license or 'not stated'}", f"Gated: {'yes' if d.gated else 'no'}",
                 f"Parameters: {human_count(d.num_params)}", f"Downloads: {d.downloads:,}", f"Likes: {d.likes:,}"]
        if d.last_modified is not None:
            facts.append(f"Updated: {d.last_modified:%Y-%m-%d}")
        if d.quant_format:
            facts.append(f"Format: {d.quant_format.upper()}")
        self.facts.setText(" · ".join(facts))
        if d.gated:
            self.gated_notice.setText(f'This model is gated: accept its terms at <a href="{d.url}">{d.url}</a> '
                                      "while logged in, then save an access token below.")
            self.gated_notice.show()
        self.card.setText(d.card_summary or "(no model card)")
        self.files.setRowCount(len(d.files))
        for row, f in enumerate(d.files):
            self.files.setItem(row, 0, QTableWidgetItem(f.path))
            size = QTableWidgetItem(human_bytes(f.size))
            size.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            self.files.setItem(row, 1, size)
        self._show_targets()
        self.weights.blockSignals(True)
        # Pre-quantized AWQ/GPTQ/fp8 weights: the files' size is what loads.
        select_choice(self.weights, fit.AS_PUBLISHED if d.quant_format in ("awq", "gptq", "fp8") else fit.AUTO)
        self.weights.blockSignals(False)
        most = self._shape.max_context
        self.context.setSpecialValueText(f"model's maximum ({most:,})" if most else "model's maximum")
        self._on_file_selected()

    def _on_details_error(self, exc: Exception) -> None:
        err = hub.describe_error(exc, None)
        self.facts.setText(err.message)

    # ------------------------------------------------------------------ files, fit, download

    def selected_file(self) -> str | None:
        rows = {i.row() for i in self.files.selectedItems()}
        if len(rows) != 1:
            return None
        return self.files.item(rows.pop(), 0).text()

    def _on_file_selected(self) -> None:
        d = self.details
        if d is None:
            return
        picked = self.selected_file()
        if picked and picked.endswith(".gguf"):
            self.download_button.setText(f"Download {picked}")
            self.download_button.setEnabled(True)
        elif d.safetensors_bytes:
            self.download_button.setText(f"Download model files ({human_bytes(d.safetensors_bytes)} of weights)")
            self.download_button.setEnabled(True)
        elif d.gguf_files:
            self.download_button.setText("Select a .gguf file above to download it")
            self.download_button.setEnabled(False)
        else:
            self.download_button.setText("No safetensors or GGUF weights to download")
            self.download_button.setEnabled(False)
        self._update_fit()

    # ------------------------------------------------------------------ the machine

    def refresh_machine(self) -> None:
        """Read the devices' free memory and what the engine can load, in the background,
        so the Device box is filled before any model is picked."""
        self._runner.run("machine", fit.memory_targets, self._targets_read, self._machine_failed)
        self._runner.run("quantizations", _engine_quantizations, self._quantizations_read, lambda _exc: None)

    def _targets_read(self, targets) -> None:
        self._targets = list(targets)
        self._show_targets()
        if self.details is None:
            self.fit_result.setText("Pick a model to see whether it fits on the device above.")
        self._update_fit()

    def _quantizations_read(self, quantizations) -> None:
        if quantizations != self._quantizations:
            self._quantizations = dict(quantizations)
            self._fill_weights()
            self._update_fit()

    def _machine_failed(self, exc: Exception) -> None:
        self.device.clear()
        self.device.addItem("Free memory unknown", None)
        self.fit_result.setText(f"Could not read the free memory of this machine ({type(exc).__name__}).")

    def _fill_weights(self) -> None:
        """Weights choices: the load dtypes, the engine's quantizations (greyed out with its
        reason while it can't load them) and the files' own size."""
        current = self.weights.currentData() or fit.AUTO
        entries = [(d, d, []) for d in choice_names("dtype")]
        # Quantizations that store weights differently (not "none"), once the engine said which can run.
        rates = fit.bytes_per_param()
        entries += [(q, q, reasons) for q, reasons in self._quantizations.items() if q in rates]
        entries.append((fit.AS_PUBLISHED, fit.AS_PUBLISHED, []))
        self.weights.blockSignals(True)
        fill_choices(self.weights, entries)
        select_choice(self.weights, current)
        self.weights.blockSignals(False)
        self._label_auto()

    def _label_auto(self) -> None:
        """Name what ``auto`` stands for on the chosen device: a GGUF file's own quantized
        weights where the engine keeps them there, else the dtype (float32 on the CPU)."""
        target = self._target()
        idx = self.weights.findData(fit.AUTO)
        if idx < 0:
            return
        gguf = self._gguf_file()
        if target is None:
            text = "auto"
        elif gguf is not None and fit.gguf_keeps_own(gguf, target):
            text = "auto (the GGUF file's own weights)"
        else:
            text = f"auto ({fit.load_dtype(fit.AUTO, target.device_type)} on this device)"
        self.weights.setItemText(idx, text)

    def _gguf_file(self) -> str | None:
        """The GGUF file the estimate is for: the one picked, else a GGUF-only repo's first."""
        d = self.details
        if d is None:
            return None
        picked = self.selected_file()
        if picked and picked.endswith(".gguf"):
            return picked
        return d.gguf_files[0].path if not d.safetensors_bytes and d.gguf_files else None

    def _show_targets(self) -> None:
        """Fill the Device box, keeping the device the user chose."""
        if not self._targets:
            return
        chosen = self.device.currentData()
        self.device.blockSignals(True)
        self.device.clear()
        for t in self._targets:
            self.device.addItem(f"{t.label}: {human_bytes(t.free_bytes)} free", t.key)
        idx = self.device.findData(chosen)
        self.device.setCurrentIndex(idx if idx >= 0 else 0)
        self.device.blockSignals(False)
        self._label_auto()

    def _target(self) -> fit.MemoryTarget | None:
        if not self._targets:
            return None
        return next((t for t in self._targets if t.key == self.device.currentData()), self._targets[0])

    def _device_changed(self, *_args) -> None:
        self._label_auto()
        self._update_fit()

    def _update_fit(self, *_args) -> None:
        d = self.details
        target = self._target()
        if d is None or target is None:
            return
        gguf = self._gguf_file()
        self._label_auto()  # a picked GGUF file changes what auto loads
        est = fit.estimate_for_details(d, self._shape, weights=self.weights.currentData() or fit.AUTO,
                                       context_len=self.context.value() or None, target=target, gguf_file=gguf,
                                       kv_cache_dtype=self.kv_dtype.currentData() or "auto",
                                       notes=self._shape_notes)
        prefix = f"{gguf}: " if gguf else ""
        self.fit_result.setText(prefix + est.summary())
        self.fit_result.setProperty("verdict", est.verdict)

    def _request_download(self) -> None:
        d = self.details
        if d is None:
            return
        picked = self.selected_file()
        files = [picked] if picked and picked.endswith(".gguf") else None
        self.downloadRequested.emit(d.repo_id, files)
