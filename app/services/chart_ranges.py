"""Axis ranges for live charts that read at a glance and change rarely. Qt-free.

Two rules, both chosen so an axis is redrawn (its ticks, labels and grid regenerated) only
when its range really has to move, not on every new point:

* values start at zero and end at a round ceiling (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6 or 8
  times a power of ten) above the data, so one TTFT point of 494.6 ms reads 0-600, not
  494.2-495.0, and an empty
  chart reads 0-100 ms rather than -400 to 400 with an SI multiplier;
* time runs from a multiple of a step below the oldest point to the next multiple above the
  newest, the step being a nice tenth of the span: a ten-minute window moves every 100 s.
"""

from __future__ import annotations

import math

NICE_FACTORS = (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)


def nice_ceiling(value: float) -> float:
    """The smallest round number (a NICE_FACTORS x 10^k) at or above ``value`` (1.0 for
    zero, negative, infinite or NaN)."""
    if not value > 0 or math.isinf(value):
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for factor in NICE_FACTORS:
        if value <= factor * power * (1 + 1e-9):
            return factor * power
    return 10.0 * power  # pragma: no cover - 10 x power always covers value


def value_range(values, empty_top: float, floor_top: float = 0.0,
                headroom: float = 0.08) -> tuple[float, float]:
    """(0, nice top) for the finite values given: the top clears the largest by
    ``headroom`` (so a point never sits on the frame) and is at least ``floor_top``;
    ``empty_top`` when there is no finite value."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return 0.0, nice_ceiling(max(empty_top, floor_top))
    top = max(max(finite) * (1 + headroom), floor_top)
    return 0.0, nice_ceiling(top)


def time_window(oldest: float | None, newest: float | None,
                min_span: float = 60.0) -> tuple[float, float]:
    """(left, right) in seconds for points recorded between ``oldest`` and ``newest``.

    The right edge is the next multiple of the step after ``newest`` (room for what comes
    next), the left the multiple at or below ``oldest``; the step is a nice tenth of the
    span, never under a second, and the window is at least ``min_span`` wide.
    """
    if oldest is None or newest is None:
        return 0.0, min_span
    span = max(newest - oldest, min_span)
    step = max(1.0, nice_ceiling(span / 10.0))
    left = math.floor(oldest / step) * step
    right = (math.floor(newest / step) + 1) * step
    if right - left < min_span:
        right = left + math.ceil(min_span / step) * step
    return left, right
