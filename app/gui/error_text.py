"""Engine messages worded for the desktop app: a load setting is named by its field in
the Load model dialog, never by a command-line flag the GUI user has no way to pass.

The engine names settings by flag in parentheses, "(--max-model-len)", and lists the
``Engine.load`` keywords it named in ``HearthError.options`` (``FinishedEvent.error_options``
for a request that failed mid-way); the CLI prints the message as it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from app.gui.load_dialog import FIELD_LABELS, WINDOW_TITLE
from engine.api import HearthError, option_flag


def _field(keyword: str) -> str | None:
    label = FIELD_LABELS.get(keyword)
    return f"“{label}” in the {WINDOW_TITLE} dialog" if label else None


def gui_error_text(message: str, options: Iterable[str] = ()) -> str:
    """``message`` with each option's flag replaced by its dialog field.

    "(--max-model-len)" becomes "(“Context length” in the Load model dialog)"; a value after
    the flag, "(--device cpu)", goes with it. A setting the dialog has no field for (the
    number of requests run at once) loses its parenthesis: the words before it still say
    what to do.
    """
    for keyword in options:
        flag = re.escape(option_flag(keyword))
        field = _field(keyword)
        in_parens = re.compile(rf" ?\({flag}(?: [^)]*)?\)")
        message = in_parens.sub(f" ({field})" if field else "", message)
        if field:
            message = re.sub(rf"{flag}(?![\w-])", field, message)
    return message


def gui_error(error: HearthError) -> str:
    """The text of an engine error, worded for the desktop app."""
    return gui_error_text(str(error), getattr(error, "options", ()))
