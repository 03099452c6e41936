"""Start the desktop app: ``hearth`` (no subcommand) or ``hearth gui``."""

from __future__ import annotations

import os
import sys


def _no_display_reason() -> str | None:
    """Why no window can open here (Linux without X11/Wayland), or None."""
    if not sys.platform.startswith("linux"):
        return None
    if os.environ.get("QT_QPA_PLATFORM", "").split(":")[0] in ("offscreen", "minimal", "vnc", "eglfs"):
        return None
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    return ("no display found (DISPLAY and WAYLAND_DISPLAY are unset): run Hearth on a desktop, "
            "under Xvfb (xvfb-run hearth), or use `hearth chat` in the terminal.")


#: Theme choices (the View > Theme menu; saved as the key): label shown for each.
THEMES = {"system": "System", "light": "Light", "dark": "Dark"}


def dark_palette():
    """Hearth's dark palette (for Fusion)."""
    from PySide6.QtGui import QColor, QPalette

    p = QPalette()
    roles = QPalette.ColorRole
    for role, colour in ((roles.Window, "#202124"), (roles.WindowText, "#e8eaed"),
                         (roles.Base, "#17181a"), (roles.AlternateBase, "#2a2b2e"),
                         (roles.Text, "#e8eaed"), (roles.Button, "#2d2e31"),
                         (roles.ButtonText, "#e8eaed"), (roles.Highlight, "#3b78e7"),
                         (roles.HighlightedText, "#ffffff"), (roles.ToolTipBase, "#2d2e31"),
                         (roles.ToolTipText, "#e8eaed"), (roles.Link, "#8ab4f8"),
                         (roles.PlaceholderText, "#9aa0a6")):
        p.setColor(role, QColor(colour))
    for role in (roles.WindowText, roles.Text, roles.ButtonText):
        p.setColor(QPalette.ColorGroup.Disabled, role, QColor("#80868b"))
    return p


class _Theme:
    """The app's chosen scheme; with "system" it follows the system's light/dark setting live."""

    def __init__(self, app) -> None:
        self.app = app
        self.choice = "system"
        app.setStyle("Fusion")
        self.light = app.style().standardPalette()
        app.styleHints().colorSchemeChanged.connect(self._system_changed)

    def apply(self, choice: str) -> None:
        from PySide6.QtCore import Qt

        self.choice = choice if choice in THEMES else "system"
        if self.choice == "system":
            dark = self.app.styleHints().colorScheme() == Qt.ColorScheme.Dark
        else:
            dark = self.choice == "dark"
        self.app.setPalette(dark_palette() if dark else self.light)

    def _system_changed(self, scheme) -> None:
        from PySide6.QtCore import Qt

        if self.choice == "system":
            self.app.setPalette(dark_palette() if scheme == Qt.ColorScheme.Dark else self.light)


_theme: _Theme | None = None  # one QApplication per process, one theme


def apply_theme(app, choice: str = "system") -> None:
    """Fusion style with Hearth's light or dark palette: ``choice`` is "light", "dark", or
    "system" (follow the system's setting, also when it changes while the app runs)."""
    global _theme
    if _theme is None or _theme.app is not app:
        _theme = _Theme(app)
    _theme.apply(choice)


def apply_system_theme(app) -> None:
    """Fusion style with a palette that follows the system's light/dark setting, live."""
    apply_theme(app, "system")


def run_gui(argv: list[str] | None = None, quit_after_start: bool = False) -> int:
    """Open the main window and run until it closes. ``quit_after_start``: close it as
    soon as it is shown (``hearth gui --quit-after-start``: does the app start here?).

    Nothing the user's files hold stops the window from opening: a damaged, read-only or
    full chat history opens anyway (``ChatStore.open``) and the chat page says how."""
    reason = _no_display_reason()
    if reason:
        print(f"hearth: {reason}", file=sys.stderr)
        return 2
    from PySide6.QtWidgets import QApplication

    from app.gui.main_window import MainWindow

    app = QApplication.instance() or QApplication(argv or sys.argv[:1])
    from app.gui import binding_guard

    binding_guard.install()  # before any redraw: a binding that drops references would abort
    app.setApplicationName("Hearth")  # also the window's WM_CLASS: the .desktop file's StartupWMClass
    app.setOrganizationName("Hearth")
    # The launcher entry's ID (hearth desktop-entry): Wayland shells match the window to it.
    app.setDesktopFileName("hearth")
    from PySide6.QtGui import QIcon

    from resources.icons import svg_icon

    app.setWindowIcon(QIcon(str(svg_icon())))
    apply_system_theme(app)  # the window applies the saved View > Theme choice
    from app.gui.gc_guard import GuiThreadGC

    gc_guard = GuiThreadGC(app)  # noqa: F841 (lives as long as the app)
    window = MainWindow()
    window.show()
    if quit_after_start:
        from PySide6.QtCore import QTimer

        QTimer.singleShot(0, window.close)  # once the event loop has shown the window
    return app.exec()
