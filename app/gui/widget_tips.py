"""Disabled controls say why: ``set_enabled(widget, enabled, why_not)``."""

from __future__ import annotations

from PySide6.QtWidgets import QWidget


def set_enabled(widget: QWidget, enabled: bool, why_not: str) -> None:
    """Enable ``widget``, or disable it with a tooltip that ends in why ("Off: ..."); its
    own tooltip (the one it had when first called here) comes first."""
    base = widget.property("baseToolTip")
    if base is None:
        base = widget.toolTip()
        widget.setProperty("baseToolTip", base)
    widget.setEnabled(enabled)
    note = "" if enabled else f"Off: {why_not}."
    widget.setToolTip("\n\n".join(t for t in (base, note) if t))
