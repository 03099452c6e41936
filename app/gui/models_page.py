"""The Models page: find models on the Hub, download them, manage what is on disk.

Three tabs — Find (search, details, fit estimate, download), Downloads (progress, cancel,
retry) and Library (local models, size on disk, load, add, delete) — and the Hugging Face
token box below them. The page holds the Qt-free services (``app.services``) and runs
their blocking calls on a ``TaskRunner``; it never talks to the engine except through the
``loadRequested(model_ref)`` signal, which the main window turns into the load dialog.

Key widgets carry objectNames for tests and accessibility: ``modelSearch``,
``downloadButton``, ``loadButton`` (library), ``tokenEdit``, ``saveTokenButton``.
"""

from __future__ import annotations

from functools import partial

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QGroupBox, QHBoxLayout, QLabel, QLineEdit, QPushButton, QTabWidget, QVBoxLayout,
                               QWidget)

from app.gui.models_downloads import DownloadsPanel
from app.gui.models_library import LibraryPanel
from app.gui.models_search import SearchPanel
from app.gui.models_workers import DownloadEvents, TaskRunner
from app.services.downloads import DownloadManager
from app.services.library import Library
from app.services.token_store import TokenStore, mask

from engine.api import ModelInfo

TAB_FIND, TAB_DOWNLOADS, TAB_LIBRARY = 0, 1, 2


class ModelsPage(QWidget):
    """The Models page. ``bridge`` is any QObject with the EngineBridge signals (only
    ``modelLoaded`` / ``modelUnloaded`` are used, to mark the loaded model in the library).

    ``downloads``, ``library`` and ``token_store`` default to services on the user data
    folder; pass your own to share them or in tests. Call ``shutdown()`` before the app
    quits: running downloads stop and resume on the next start.
    """

    loadRequested = Signal(str)

    def __init__(self, bridge, parent: QWidget | None = None, *, downloads: DownloadManager | None = None,
                 library: Library | None = None, token_store: TokenStore | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("modelsPage")
        self.bridge = bridge
        self.token_store = token_store or TokenStore()
        # The token as last read or saved, for worker threads (never shown, never logged).
        self._token: str | None = None
        self.runner = TaskRunner(self)
        self.library = library or Library()
        self._owns_downloads = downloads is None
        # Started once the token is read, so a resumed gated download has it.
        self.downloads = downloads or DownloadManager(max_parallel=2, token_provider=self.current_token,
                                                      autostart=False)
        self.events = DownloadEvents(self.downloads, self)

        self.search_panel = SearchPanel(self.runner, self.current_token)
        self.downloads_panel = DownloadsPanel(self.downloads, self.events)
        self.library_panel = LibraryPanel(self.library, self.runner)
        self.tabs = QTabWidget()
        self.tabs.setObjectName("modelsTabs")
        self.tabs.addTab(self.search_panel, "Find on the Hub")
        self.tabs.addTab(self.downloads_panel, "Downloads")
        self.tabs.addTab(self.library_panel, "Library")

        lay = QVBoxLayout(self)
        lay.addWidget(self.tabs, 1)
        lay.addWidget(self._build_token_box())

        self.search_panel.downloadRequested.connect(self._start_download)
        self.downloads_panel.loadRequested.connect(self.loadRequested)
        self.downloads_panel.downloadFinished.connect(self._download_finished)
        self.library_panel.loadRequested.connect(self.loadRequested)
        self._select_after_refresh: str | None = None
        self.library_panel.refreshed.connect(self._after_library_refresh)
        for name, slot in (("modelLoaded", self._model_loaded), ("modelUnloaded", self._model_unloaded)):
            signal = getattr(bridge, name, None)
            if signal is not None:
                signal.connect(slot)
        self._shown = False
        self._closed = False
        self.runner.run("token-read", self.token_store.get, self._token_read, self._token_read_failed)

    # ------------------------------------------------------------------ public

    def current_token(self) -> str | None:
        """The saved Hugging Face token (``None``: huggingface_hub's own default)."""
        return self._token

    def shutdown(self) -> None:
        """Stop background work; unfinished downloads stay queued for the next start."""
        if self._closed:
            return
        self._closed = True
        self.events.detach()
        if self._owns_downloads:
            self.downloads.shutdown(wait=True, timeout=5.0)
        self.runner.shutdown()

    # ------------------------------------------------------------------ token

    def _build_token_box(self) -> QGroupBox:
        box = QGroupBox("Hugging Face token (for gated and private models)")
        self.token_edit = QLineEdit()
        self.token_edit.setObjectName("tokenEdit")
        self.token_edit.setEchoMode(QLineEdit.EchoMode.Password)
        self.token_edit.setPlaceholderText("hf_… (create one at huggingface.co/settings/tokens)")
        self.save_token_button = QPushButton("Save token")
        self.save_token_button.setObjectName("saveTokenButton")
        self.forget_token_button = QPushButton("Forget")
        self.forget_token_button.setObjectName("forgetTokenButton")
        self.token_status = QLabel("Reading saved token…")
        self.token_status.setObjectName("tokenStatus")
        self.token_status.setTextFormat(Qt.TextFormat.PlainText)
        row = QHBoxLayout(box)
        row.addWidget(self.token_edit, 1)
        row.addWidget(self.save_token_button)
        row.addWidget(self.forget_token_button)
        row.addWidget(self.token_status)
        self.save_token_button.clicked.connect(self._save_token)
        self.token_edit.returnPressed.connect(self._save_token)
        self.forget_token_button.clicked.connect(self._forget_token)
        return box

    def _token_read(self, token: str | None) -> None:
        self._token = token
        self._show_token_state()
        self._start_downloads()

    def _token_read_failed(self, exc: Exception) -> None:
        self.token_status.setText(f"Could not read the saved token ({type(exc).__name__}).")
        self._start_downloads()

    def _start_downloads(self) -> None:
        if self._owns_downloads and not self._closed:
            self.downloads.start()

    def _show_token_state(self) -> None:
        if self._token:
            self.token_status.setText(f"token saved ({mask(self._token)})")
        else:
            self.token_status.setText("No token saved: public models only.")
        self.forget_token_button.setEnabled(bool(self._token))

    def _save_token(self) -> None:
        token = self.token_edit.text().strip()
        self.token_edit.clear()  # the field never holds the token longer than needed
        if not token:
            self.token_status.setText("Paste a token first.")
            return
        self.token_status.setText("Saving…")

        def saved(where: str) -> None:
            self._token = token
            self._show_token_state()
            self.token_status.setToolTip("Stored in the OS keyring." if where.startswith("keyring")
                                         else "Stored in a file only your user account can read.")

        def failed(exc: Exception) -> None:
            self.token_status.setText(str(exc) if isinstance(exc, ValueError)
                                      else f"Could not save the token ({type(exc).__name__}).")

        # partial, not a lambda: a pool thread must never hold the last reference to a widget.
        self.runner.run("token", partial(self.token_store.set, token), saved, failed)

    def _forget_token(self) -> None:
        def forgotten(_none) -> None:
            self._token = None
            self._show_token_state()

        self.runner.run("token", self.token_store.clear, forgotten,
                        lambda exc: self.token_status.setText(f"Could not forget the token ({type(exc).__name__})."))

    # ------------------------------------------------------------------ downloads and library

    def _start_download(self, repo_id: str, files) -> None:
        self.downloads.enqueue(repo_id, files=files)
        self.tabs.setCurrentIndex(TAB_DOWNLOADS)

    def _download_finished(self, status) -> None:
        self._select_after_refresh = status.path
        self.library_panel.refresh()

    def _after_library_refresh(self) -> None:
        if self._select_after_refresh:
            self.library_panel.select_ref(self._select_after_refresh)
            self._select_after_refresh = None

    def _model_loaded(self, info: ModelInfo | None, _reloaded: bool = False) -> None:
        # What was asked for (ref: a .gguf file, "default") and where it loaded from (path:
        # for those, a converted folder): a library entry matching either is loaded.
        refs = (info.path, info.ref) if info is not None else ()
        self.library_panel.set_loaded(*(str(r) for r in refs if r))

    def _model_unloaded(self) -> None:
        self.library_panel.set_loaded(None)

    def showEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        super().showEvent(event)
        if not self._shown:
            # First look at the page: popular models and the local library, in the background.
            self._shown = True
            self.search_panel.refresh_machine()  # the fit estimate's Device box, before any pick
            if not self.search_panel.searched:
                self.search_panel.search_now()
            self.library_panel.refresh()
