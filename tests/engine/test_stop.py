"""StopStringMatcher tests."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import InvalidRequestError
from engine.stop import StopStringMatcher


def run(stops, deltas, include=False):
    """Feed deltas until stopped; return (emitted text, stopped, matcher)."""
    m = StopStringMatcher(tuple(stops), include_stop_str_in_output=include)
    out = []
    for d in deltas:
        text, stopped = m.feed(d)
        out.append(text)
        if stopped:
            return "".join(out), True, m
    out.append(m.flush())
    return "".join(out), False, m


def test_no_stops_passes_through():
    m = StopStringMatcher(())
    assert m.feed("abc") == ("abc", False)
    assert m.flush() == ""


def test_stop_in_one_delta():
    assert run(["STOP"], ["hello STOP world"])[:2] == ("hello ", True)


def test_stop_split_across_two_deltas():
    m = StopStringMatcher(("</s>",))
    assert m.feed("answer </") == ("answer ", False)  # "</" held back
    assert m.feed("s> trailing") == ("", True)
    assert m.matched == "</s>" and m.stopped
    assert m.feed("more") == ("", True)  # nothing after a stop


def test_stop_split_across_three_deltas():
    m = StopStringMatcher(("###END",))
    assert m.feed("x ##") == ("x ", False)
    assert m.feed("#E") == ("", False)
    assert m.feed("ND!") == ("", True)


def test_false_start_is_released():
    m = StopStringMatcher(("Help",))
    assert m.feed("Hel") == ("", False)
    assert m.feed("lo") == ("Hello", False)
    assert m.flush() == ""


def test_flush_returns_held_text():
    m = StopStringMatcher(("Help",))
    assert m.feed("say Hel") == ("say ", False)
    assert m.flush() == "Hel"
    assert m.flush() == ""
    assert not m.stopped and m.matched is None


def test_held_suffix_is_the_longest_possible_prefix():
    # "aab" could still grow into "aabc"; "ab" alone could too via the second stop.
    m = StopStringMatcher(("aabc", "abd"))
    assert m.feed("xaab") == ("x", False)
    assert m.feed("d") == ("a", True)  # "abd" completes at position 2


def test_earliest_match_wins():
    assert run(["world", "lo"], ["hello world"])[:2] == ("hel", True)
    assert run(["lo", "world"], ["hello world"])[:2] == ("hel", True)
    _, _, m = run(["world", "lo"], ["hel", "lo world"])
    assert m.matched == "lo"


def test_include_stop_str_in_output():
    text, stopped, _ = run(["END"], ["abc E", "ND def"], include=True)
    assert (text, stopped) == ("abc END", True)


def test_unicode_stops():
    assert run(["世界"], ["你好世", "界！"])[:2] == ("你好", True)
    assert run(["😀!"], ["ok 😀", "?", "😀", "! no"], include=True)[:2] == ("ok 😀?😀!", True)
    assert run(["é"], ["caf", "é au lait"])[:2] == ("caf", True)


def test_empty_stop_rejected():
    with pytest.raises(InvalidRequestError):
        StopStringMatcher(("ok", ""))


def reference(stops, text, include):
    """First position where any stop completes; ties -> earliest start."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < (best[0], best[1])):
            best = (i + len(s), i)
    if best is None:
        return text, False
    end, start = best
    return (text[:end] if include else text[:start]), True


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abc😀", max_size=25),
    stops=st.lists(st.text(alphabet="abc😀", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 25), max_size=8),
    include=st.booleans(),
)
def test_any_chunking_matches_reference(text, stops, cuts, include):
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    deltas = [text[a:b] for a, b in zip(points, points[1:])]
    m = StopStringMatcher(tuple(stops), include_stop_str_in_output=include)
    emitted = []
    stopped = False
    for d in deltas:
        out, stopped = m.feed(d)
        emitted.append(out)
        # Whatever was emitted so far is a prefix of the final answer: never too early.
        assert "".join(emitted) == reference(stops, text, include)[0][: len("".join(emitted))]
        if stopped:
            break
    if not stopped:
        emitted.append(m.flush())
    assert ("".join(emitted), stopped) == reference(stops, text, include)
