"""Help > About Hearth: the version, where the user's files live, and what the engine can
run here (devices, attention backends, quantization methods: what ``hearth doctor``
says), as selectable text with a button that copies it all for a bug report.

The engine's part comes from ``engine.api.doctor_info`` on a background thread (its first
call imports the backends' libraries: seconds), so the dialog opens at once and fills in.
"""

from __future__ import annotations

import html
import threading

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtGui import QGuiApplication, QIcon
from PySide6.QtWidgets import (QDialog, QDialogButtonBox, QHBoxLayout, QLabel, QPushButton, QTextBrowser,
                               QVBoxLayout)

from app.services.about import Location, about_text, data_locations, engine_summary
from app.services.version import hearth_version
from resources.icons import png_icon

_LABEL_WIDTH = 150  # px: "compressed-tensors" and "Downloaded models" fit
TAGLINE = "Run large language models locally on your own GPUs — fast, and see why."


class _EngineFacts(QObject):
    """Carries doctor_info's result from its thread to the dialog (a queued signal)."""

    ready = Signal(object)  # the engine summary, or an error message (str)


class AboutDialog(QDialog):
    """The About box. ``chat_db`` / ``settings_file``: the files the running app uses."""

    def __init__(self, parent=None, *, chat_db=None, settings_file: str | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("About Hearth")
        self.setObjectName("aboutDialog")
        self.locations: list[Location] = data_locations(chat_db=chat_db, settings_file=settings_file)
        self.engine: dict | None = None
        self.engine_problem: str | None = None

        icon = QLabel()
        icon.setPixmap(QIcon(str(png_icon(128))).pixmap(72, 72))
        icon.setAlignment(Qt.AlignmentFlag.AlignTop)
        title = QLabel("<span style='font-size:20pt; font-weight:600'>Hearth</span>")
        self.version_label = QLabel(f"Version {hearth_version()}")
        self.version_label.setObjectName("aboutVersion")
        self.version_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        tagline = QLabel(TAGLINE)
        tagline.setWordWrap(True)
        heading = QVBoxLayout()
        heading.setSpacing(2)
        for w in (title, self.version_label, tagline):
            heading.addWidget(w)
        heading.addStretch(1)
        top = QHBoxLayout()
        top.addWidget(icon)
        top.addSpacing(8)
        top.addLayout(heading, 1)

        # Selectable, scrollable, copyable: a read-only rich text view.
        self.details = QTextBrowser()
        self.details.setObjectName("aboutDetails")
        self.details.setOpenLinks(False)
        self.details.setMinimumSize(640, 380)

        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        self.copy_button = QPushButton("Copy details")
        self.copy_button.setObjectName("aboutCopy")
        self.copy_button.setToolTip("Copy the version, the folders and the engine's backends as text "
                                    "(for a bug report)")
        buttons.addButton(self.copy_button, QDialogButtonBox.ButtonRole.ActionRole)
        self.copy_button.clicked.connect(self.copy_details)
        buttons.rejected.connect(self.reject)

        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(self.details, 1)
        lay.addWidget(buttons)
        self.resize(760, 620)
        self._render()
        self._check_engine()

    # -- the engine's part, off the GUI thread -------------------------------------------
    def _check_engine(self) -> None:
        facts = _EngineFacts()  # no parent: it outlives the dialog if the check does
        facts.ready.connect(self._on_engine)
        self._facts = facts

        def run() -> None:
            try:
                from engine.api import doctor_info

                facts.ready.emit(engine_summary(doctor_info()))
            except Exception as exc:  # noqa: BLE001 - shown in the dialog; the rest stays useful
                facts.ready.emit(f"could not check the engine: {exc}")

        threading.Thread(target=run, name="hearth-about-doctor", daemon=True).start()

    def _on_engine(self, result) -> None:
        if isinstance(result, str):
            self.engine_problem = result
        else:
            self.engine = result
        self._render()

    @property
    def engine_checked(self) -> bool:
        return self.engine is not None or self.engine_problem is not None

    # -- text -----------------------------------------------------------------------------
    def details_text(self) -> str:
        """What "Copy details" copies."""
        return about_text(self.locations, self.engine)

    def copy_details(self) -> None:
        QGuiApplication.clipboard().setText(self.details_text())
        self.copy_button.setText("Copied")

    def _render(self) -> None:
        e = html.escape
        # One label column width throughout, so the sections' values line up.
        label = f"<td valign='top' width='{_LABEL_WIDTH}'><b>{{}}</b></td>"
        parts = ["<h3>Where your data lives</h3><table cellspacing='0' cellpadding='2'>"]
        for loc in self.locations:
            note = f"<br><span style='color:#8a8f98'>{e(loc.note)}</span>" if loc.note else ""
            parts.append(f"<tr>{label.format(e(loc.what))}<td valign='top'>{e(loc.path)}{note}</td></tr>")
        parts.append("</table>")
        if self.engine is None:
            parts.append(f"<h3>Engine</h3><p>{e(self.engine_problem or 'Checking what can run here…')}</p>")
        for title, rows in (self.engine or {}).items():
            parts.append(f"<h3>{e(title)}</h3><table cellspacing='0' cellpadding='2'>")
            for name, value in rows:
                parts.append(f"<tr>{label.format(e(name))}<td valign='top'>{e(value)}</td></tr>")
            parts.append("</table>")
        scroll = self.details.verticalScrollBar().value()
        self.details.setHtml("".join(parts))
        self.details.verticalScrollBar().setValue(scroll)
