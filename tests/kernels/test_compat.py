"""``hearth_kernels._compat.interpreting``: the one check of whether Triton's interpreter runs
the kernels. It must read ``TRITON_INTERPRET`` exactly as Triton does (any value Triton takes
as on, in any case), or a kernel would be launched with inline assembly or PDL into the
interpreter, or the TMA kinds left out of the CPU tests. Triton's own reading is the reference."""

from __future__ import annotations

import pytest

from hearth_kernels._compat import interpreting


@pytest.mark.parametrize("value", ["1", "0", "true", "True", "TRUE", "on", "ON", "yes", "y", "Y", "false", "off",
                                   "no", "", "2", " 1", "interpret"])
def test_interpreting_reads_the_variable_as_triton_does(monkeypatch, value):
    from triton import knobs

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreting() == bool(knobs.runtime.interpret), value


def test_interpreting_without_the_variable(monkeypatch):
    from triton import knobs

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert interpreting() is False and not knobs.runtime.interpret


def test_the_checks_that_depend_on_it(monkeypatch):
    """PDL's launch argument and the TMA kinds follow the same reading ("on" as well as "1")."""
    import torch

    from hearth_kernels.gemv import tma_available
    from hearth_kernels.pdl import pdl_wanted

    monkeypatch.setenv("TRITON_INTERPRET", "on")
    assert tma_available(torch.device("cpu")) and not pdl_wanted()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not tma_available(torch.device("cpu"))


def test_a_triton_before_its_knobs_took_1_alone(monkeypatch):
    """Triton before 3.4 (pyproject allows 3.2) read TRITON_INTERPRET == "1" only."""
    from hearth_kernels import _compat

    assert _compat._reads_words()  # the Triton the tests run (3.6)
    monkeypatch.setattr(_compat, "_reads_words", lambda: False)
    for value, on in (("1", True), ("true", False), ("on", False), ("0", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert interpreting() is on, value
