"""Render Hearth's PNG icons from resources/icons/hearth.svg (run once after editing the SVG;
the PNGs are committed so installing needs no renderer):

    .venv/bin/python packaging/render_icons.py

Qt's own SVG renderer (QtSvg, part of PySide6-Essentials) draws them, offscreen.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtGui import QGuiApplication, QImage, QPainter  # noqa: E402
from PySide6.QtSvg import QSvgRenderer  # noqa: E402

from resources.icons import PNG_SIZES, icon_dir  # noqa: E402


def render(svg: Path, size: int, out: Path) -> None:
    renderer = QSvgRenderer(str(svg))
    if not renderer.isValid():
        raise SystemExit(f"{svg} is not a valid SVG")
    image = QImage(size, size, QImage.Format.Format_ARGB32)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    renderer.render(painter)
    painter.end()
    if not image.save(str(out), "PNG"):
        raise SystemExit(f"could not write {out}")


def main() -> None:
    app = QGuiApplication.instance() or QGuiApplication([])  # noqa: F841 (QImage fonts and pixmaps need it)
    folder = icon_dir()
    for size in PNG_SIZES:
        out = folder / f"hearth-{size}.png"
        render(folder / "hearth.svg", size, out)
        print(f"{out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
