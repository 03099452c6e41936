"""The numbers a comparison computes itself: token agreement with the reference, the words
where an output diverges from the reference's (for highlighting), means over prompts, and
the peak memory of one configuration's run. Qt-free, torch-free.
"""

from __future__ import annotations

import difflib
import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from engine.api import peak_device_memory_bytes, reset_peak_device_memory


# -- agreement ---------------------------------------------------------------------------
def agreement(reference: Sequence[int], other: Sequence[int]) -> float:
    """Token agreement over the whole output, in [0, 1]: the positions where both outputs
    have the same token id, over the longer output's length (a token one output has and
    the other lacks counts as a difference, so an output that runs on past the reference's
    end, or stops before it, agrees less). Two empty outputs agree fully (1.0); an output
    agrees with itself fully."""
    longest = max(len(reference), len(other))
    if longest == 0:
        return 1.0
    return sum(1 for a, b in zip(reference, other) if a == b) / longest


def prefix_agreement(reference: Sequence[int], other: Sequence[int]) -> float:
    """Agreement before the first divergence, in [0, 1]: the tokens the two outputs share
    from the start until they first differ, over the longer output's length. Never more
    than ``agreement``."""
    longest = max(len(reference), len(other))
    if longest == 0:
        return 1.0
    same = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        same += 1
    return same / longest


def mean(values: Iterable[float | None]) -> float | None:
    """The mean of the values that aren't None; None if there are none."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


# -- word-level divergence -------------------------------------------------------------
_WORD = re.compile(r"\S+")


@dataclass(frozen=True, slots=True)
class WordDiff:
    """One run of words where an output differs from the reference, as character offsets
    into both texts (end exclusive). ``kind``: "replace" (different words on both sides),
    "insert" (words only the output has: ``ref_start == ref_end``, where they would go in
    the reference) or "delete" (words only the reference has: ``out_start == out_end``,
    where they are missing from the output)."""

    kind: str
    ref_start: int
    ref_end: int
    out_start: int
    out_end: int


def _words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    matches = list(_WORD.finditer(text))
    return [m.group() for m in matches], [m.span() for m in matches]


def word_diff(reference: str, output: str) -> list[WordDiff]:
    """Where ``output`` differs from ``reference``, word by word (words are runs of
    non-space characters; spacing and line breaks alone are no difference), as a minimal
    set of runs by ``difflib.SequenceMatcher``. Empty when the words are the same."""
    ref_words, ref_spans = _words(reference)
    out_words, out_spans = _words(output)
    matcher = difflib.SequenceMatcher(None, ref_words, out_words, autojunk=False)
    diffs = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        diffs.append(WordDiff(tag, *_char_range(ref_spans, i1, i2, len(reference)),
                              *_char_range(out_spans, j1, j2, len(output))))
    return diffs


def divergent_spans(reference: str, output: str) -> list[tuple[int, int]]:
    """The character spans ``(start, end)`` of ``output`` to highlight: its words that the
    reference doesn't have at that place (replaced or inserted words), in order. Words
    only the reference has leave no span in ``output`` (see ``word_diff`` for those)."""
    return [(d.out_start, d.out_end) for d in word_diff(reference, output) if d.out_end > d.out_start]


def first_divergence(reference: str, output: str) -> int | None:
    """The character offset in ``output`` where its words first differ from the
    reference's (``len(output)`` when it stops early); None when the words are the same."""
    diffs = word_diff(reference, output)
    return diffs[0].out_start if diffs else None


def _char_range(spans: list[tuple[int, int]], first: int, last: int, text_len: int) -> tuple[int, int]:
    """Characters of words ``first:last``; an empty run sits where word ``first`` starts
    (or at the end of the text)."""
    if first < last:
        return spans[first][0], spans[last - 1][1]
    at = spans[first][0] if first < len(spans) else (spans[-1][1] if spans else text_len)
    return at, at


# -- peak memory -------------------------------------------------------------------------
#: How often the fallback sampler reads the process's RSS.
RSS_SAMPLE_SECONDS = 0.02


class PeakMemoryMeter:
    """The peak memory of one span of work (one configuration: load to shutdown).

    On a CUDA device: torch's peak allocated bytes on it (``engine.api``'s
    ``peak_device_memory_bytes``, reset at ``start``): weights, KV pool, activations and
    CUDA graphs' pools, not the CUDA context or the allocator's unused cache.

    On the CPU: the process's peak resident memory (everything: Python, torch, the model).
    ``ru_maxrss`` can't be reset, so the span's peak comes from Linux's own high-water mark
    ``VmHWM`` in /proc/self/status, reset at ``start`` by writing 5 to
    /proc/self/clear_refs; where that can't be done (not Linux, or not allowed), a thread
    samples the RSS every ``RSS_SAMPLE_SECONDS`` (psutil) and keeps the largest, which can
    miss a spike shorter than that. ``source`` says which was used.
    """

    def __init__(self) -> None:
        self._hwm = False
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled = 0
        self.source = ""

    def start(self) -> None:
        reset_peak_device_memory()
        self._hwm = _reset_hwm()
        if not self._hwm:
            self._sampled = _rss()
            self._stop.clear()
            self._sampler = threading.Thread(target=self._sample, name="hearth-compare-rss", daemon=True)
            self._sampler.start()

    def stop(self, device: str | None) -> int | None:
        """The span's peak on ``device`` (the device the configuration ran on: "cpu",
        "cuda:0"; None when unknown, e.g. the load failed before choosing one: the CUDA
        peak if there is one, else the process's). Sets ``source``."""
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self._sampler = None
        if device is None or device.startswith("cuda"):
            peak = peak_device_memory_bytes(device or "cuda")
            if peak is not None:
                self.source = "cuda max allocated"
                return peak
            if device is not None:
                return None
        if self._hwm:
            peak = _status_kib("VmHWM")
            if peak is not None:
                self.source = "process peak RSS (VmHWM)"
                return peak
        self.source = f"process RSS sampled every {RSS_SAMPLE_SECONDS * 1000:.0f} ms"
        return max(self._sampled, _rss()) or None

    def _sample(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_SECONDS):
            self._sampled = max(self._sampled, _rss())


def _reset_hwm() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux 4.0+); False where it can't."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _status_kib(key: str) -> int | None:
    """A ``kB`` line of /proc/self/status, in bytes."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _rss() -> int:
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except Exception:  # psutil missing or the process table unreadable: no sample
        return 0
