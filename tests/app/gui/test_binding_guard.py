"""The Qt binding must not drop references to None/True/False, or the guard must pin them.

PySide6 6.12.0 on Python 3.11 lost one reference to None per void Qt call and one to True
per signal emit, which aborted the app ("none_dealloc") a few seconds into a chart redraw
loop. These tests measure the installed binding directly, and check in child processes
(so this process's singletons stay untouched) that the guard's pin really stops an abort
that happens without it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from app.gui import binding_guard

needs_mortal_singletons = pytest.mark.skipif(
    sys.version_info >= (3, 12) or sys.implementation.name != "cpython",
    reason="None/True/False are immortal from Python 3.12 on: nothing to lose or pin")


def test_the_installed_binding_keeps_its_references_or_is_guarded(qapp):
    """Fails on PySide6 6.12.0 + Python 3.11 unless the guard has pinned the singletons."""
    binding_guard.install()
    lost = binding_guard.singleton_refs_lost()
    assert lost < binding_guard.PROBE_CALLS // 2 or binding_guard.singletons_pinned(), (
        f"the Qt binding lost {lost} references to None/True in {binding_guard.PROBE_CALLS} calls "
        "and nothing pinned them: the app would abort (see app/gui/binding_guard.py)")


def test_a_sound_probe_loses_nothing():
    assert binding_guard.singleton_refs_lost(lambda: None) == 0


# A stand-in for the faulty binding: each call gives back one reference to None it never took.
LEAKY = textwrap.dedent("""
    import ctypes, sys
    sys.path.insert(0, {root!r})
    from app.gui import binding_guard

    def leaky():
        ctypes.pythonapi.Py_DecRef(ctypes.py_object(None))

    calls = sys.getrefcount(None) + 10_000  # more than None has to give
    {action}
    for _ in range(calls):
        leaky()
    print("survived", flush=True)
""")


def _run(action: str) -> subprocess.CompletedProcess:
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[3])
    code = LEAKY.format(root=root, action=action)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@needs_mortal_singletons
def test_without_the_guard_a_leaking_binding_aborts():
    """The failure the guard exists for (and proof the next test can fail)."""
    proc = _run("pass")
    assert proc.returncode != 0 and "survived" not in proc.stdout
    assert "none_dealloc" in proc.stderr


@needs_mortal_singletons
def test_the_guard_detects_a_leaking_binding_and_pins_the_singletons():
    proc = _run("message = binding_guard.install(leaky)\n"
                "assert message and 'drops references' in message, message\n"
                "assert binding_guard.singletons_pinned()")
    assert proc.returncode == 0, proc.stderr
    assert "survived" in proc.stdout
