"""One registry of load choices (issue 13 item 4): the CLI flags of every command, ``hearth
bench``'s options, ``hearth doctor`` and ``engine.api.load_choices`` offer exactly its names.
A choice registered in the engine shows up in all of them, so none can keep a list of its own."""

from __future__ import annotations

import pytest

from app.cli import build_parser
from app.commands.load_options import CHOICE_FLAGS
from engine import choices
from engine.api import InvalidRequestError, choice_names, doctor_info, load_choices
from engine.bench import BenchOptions


@pytest.fixture
def extra_choices(monkeypatch):
    """Register one more choice of every kind but device (undone after the test)."""
    for kind in choices.KINDS:
        monkeypatch.setitem(choices._REGISTRY, kind, dict(choices._REGISTRY[kind]))
    for kind in ("dtype", "attention", "kv_cache_dtype", "quantization"):
        choices.register(choices.Choice(kind, f"test-{kind}", f"test {kind}", bytes_per_param=1,
                                        check=lambda _device: ["a test choice"]))
    return {kind: f"test-{kind}" for kind in ("dtype", "attention", "kv_cache_dtype", "quantization")}


def _flag_help(subparser, flag: str) -> str:
    return next(a.help for a in subparser._actions if flag in a.option_strings)


def test_every_commands_choice_flags_list_the_registry(extra_choices):
    sub = build_parser()._subparsers._group_actions[0].choices
    for command in ("generate", "chat", "bench"):
        for flag, (kind, _, _) in CHOICE_FLAGS.items():
            listed = _flag_help(sub[command], flag).split(":")[0].split(" | ")
            assert listed == list(choice_names(kind)), (command, flag)
            if kind != "device":
                assert extra_choices[kind] in listed


def test_doctor_and_load_choices_list_the_registry(extra_choices):
    info = doctor_info()
    table = load_choices("cpu")
    for kind, doctor_key, table_key in (("attention", "attention", "attention"),
                                        ("quantization", "quantization", "quantization"),
                                        ("dtype", "dtypes", "dtypes"),
                                        ("kv_cache_dtype", "kv_cache_dtypes", "kv_cache_dtypes")):
        assert list(info[doctor_key]) == list(choice_names(kind)), kind
        assert list(table[table_key]) == list(choice_names(kind)), kind
        assert info[doctor_key][extra_choices[kind]] == ["a test choice"]
    assert [d["id"] for d in table["devices"]][0] == "auto" and "cpu" in [d["id"] for d in table["devices"]]


def test_bench_options_take_the_registrys_names(extra_choices):
    opts = BenchOptions(shape="tiny", load={"attention": "test-attention", "kv_cache_dtype": "e4m3",
                                            "quantization": "test-quantization"})
    assert (opts.engine.attention, opts.engine.cache.kv_cache_dtype) == ("test-attention", "fp8")
    assert opts.engine.model.quantization == "test-quantization"
    with pytest.raises(InvalidRequestError, match="unknown attention backend 'nope'.*test-attention"):
        BenchOptions(shape="tiny", load={"attention": "nope"})
    with pytest.raises(InvalidRequestError, match="unknown load option 'colour'"):
        BenchOptions(shape="tiny", load={"colour": "red"})
