"""Hearth's application icon: a scalable SVG and PNGs rendered from it
(packaging/render_icons.py), for the window and the freedesktop icon theme."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

#: The PNG sizes shipped (square, pixels); the hicolor theme's folders are ``<n>x<n>``.
PNG_SIZES = (32, 48, 64, 128, 256)
#: The icon's name in the icon theme and the .desktop file's ``Icon=``.
ICON_NAME = "hearth"


def icon_dir() -> Path:
    """The folder with ``hearth.svg`` and ``hearth-<size>.png`` (package data: plain files in
    a source tree, a wheel install or an editable one)."""
    return Path(str(files("resources").joinpath("icons")))


def svg_icon() -> Path:
    return icon_dir() / f"{ICON_NAME}.svg"


def png_icon(size: int) -> Path:
    if size not in PNG_SIZES:
        raise ValueError(f"no {size}px icon: the sizes are {PNG_SIZES}")
    return icon_dir() / f"{ICON_NAME}-{size}.png"
