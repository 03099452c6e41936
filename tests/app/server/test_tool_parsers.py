"""The tool-call parsers on their own: whole answers, and the same answers streamed one
character at a time or in random pieces (which must add up to the whole answer's result:
the same content, and calls with the same index, id, name and arguments' value), and how
a Hermes call's arguments stream in fragments."""

from __future__ import annotations

import itertools
import json

import pytest

from app.server.call_scanner import CallScanner
from app.server.tool_parsers import (Delta, HermesParser, Llama3JsonParser, Parsed, ToolCall, collect, parse,
                                     parser_name_for)


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def whole(cls, text: str) -> Parsed:
    return parse(cls(new_id=ids()), text)


def char_by_char(cls, text: str) -> Parsed:
    """What the answer streamed one character at a time adds up to: its content and the
    calls made (a call whose start went out before it broke is not one)."""
    parser = cls(new_id=ids())
    streamed = collect([d for ch in text for d in parser.feed(ch)] + parser.finish())
    calls = [c for i, c in enumerate(streamed.calls) if i in parser.made]
    return normal(Parsed(streamed.content, calls))


def deltas_of(cls, pieces: list[str]) -> list[Delta]:
    parser = cls(new_id=ids())
    return [d for piece in pieces for d in parser.feed(piece)] + parser.finish()


def normal(parsed: Parsed) -> Parsed:
    """``parsed`` with each call's arguments as ``json.dumps`` writes them (streamed
    arguments are the model's own text: the same value, maybe other spacing)."""
    return Parsed(parsed.content, [ToolCall(c.call_id, c.name, json.dumps(json.loads(c.arguments)))
                                   for c in parsed.calls])


def call(i: int, name: str, args: dict) -> ToolCall:
    return ToolCall(f"call_{i}", name, json.dumps(args))


HERMES = [
    # one call, no content (Qwen2.5's layout)
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     Parsed(None, [call(0, "get_weather", {"city": "Paris"})])),
    # two calls in one answer, text before them
    ('Let me check both.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
     '<tool_call>\n{"name": "b", "arguments": {"y": [1, 2]}}\n</tool_call>',
     Parsed("Let me check both.", [call(0, "a", {"x": 1}), call(1, "b", {"y": [1, 2]})])),
    # malformed JSON inside the tag: plain content, as written
    ('<tool_call>\n{"name": "a", "arguments": [1]}\n</tool_call>',
     Parsed('<tool_call>\n{"name": "a", "arguments": [1]}\n</tool_call>', [])),
    # a malformed call after text: its whitespace is given back too
    ('Sure.\n<tool_call>\n{"name": "a"\n</tool_call>\n',
     Parsed('Sure.\n<tool_call>\n{"name": "a"\n</tool_call>\n', [])),
    # no calls: the text as it is, whitespace and a '<' that starts no tag included
    ("  a < b <tool and\n", Parsed("  a < b <tool and\n", [])),
    # an answer cut inside a call (no closing tag): a call if its JSON is whole...
    ('<tool_call>{"name": "a", "arguments": {}}', Parsed(None, [call(0, "a", {})])),
    # ... else content
    ('<tool_call>{"name": "a", "argu', Parsed('<tool_call>{"name": "a", "argu', [])),
    # text after a call; arguments written as a JSON string
    ('<tool_call>{"name": "a", "arguments": "{\\"k\\": \\"v\\"}"}</tool_call>\n\nDone.',
     Parsed("Done.", [call(0, "a", {"k": "v"})])),
    # a call without a name is not a call
    ('<tool_call>{"arguments": {}}</tool_call>', Parsed('<tool_call>{"arguments": {}}</tool_call>', [])),
]

LLAMA = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', Parsed(None, [call(0, "get_weather",
                                                                                    {"city": "Paris"})])),
    ('<|python_tag|>{"name": "a", "parameters": {}}', Parsed(None, [call(0, "a", {})])),
    ('{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}',
     Parsed(None, [call(0, "a", {"x": 1}), call(1, "b", {})])),
    ('{"name": "a", "parameters": {', Parsed('{"name": "a", "parameters": {', [])),
    ('{"not": "a call"}', Parsed('{"not": "a call"}', [])),
    ("Paris is sunny today.", Parsed("Paris is sunny today.", [])),
    ("  <|python", Parsed("  <|python", [])),
]


@pytest.mark.parametrize(("text", "expected"), HERMES)
def test_hermes(text, expected):
    assert whole(HermesParser, text) == expected
    assert char_by_char(HermesParser, text) == expected


@pytest.mark.parametrize(("text", "expected"), LLAMA)
def test_llama3_json(text, expected):
    assert whole(Llama3JsonParser, text) == expected
    assert char_by_char(Llama3JsonParser, text) == expected


def test_content_before_a_call_streams_before_the_call_is_written():
    parser = HermesParser(new_id=ids())
    assert collect(parser.feed("Checking the weather")).content == "Checking the weather"
    assert parser.feed(" <tool_") == []  # may be the start of a tag: held
    assert parser.feed('call>{"name": "a", ') == []  # inside a call: held until it closes
    deltas = parser.feed('"arguments": {}}</tool_call>')
    assert [(d.index, d.name, d.arguments) for d in deltas] == [(0, "a", None), (0, None, "{}")]
    assert parser.made == [0]


def test_llama_plain_text_streams_at_once():
    parser = Llama3JsonParser(new_id=ids())
    assert collect(parser.feed("Hello")).content == "Hello"


@pytest.mark.parametrize(("template", "name"), [
    ("{% for tool in tools %}{{ tool | tojson }}{% endfor %}<tool_call>", "hermes"),
    ('<|start_header_id|>ipython<|end_header_id|> "parameters": d<|eot_id|>', "llama3_json"),
    ("{{ '<|python_tag|>' }}", "llama3_json"),
    ("{% for m in messages %}{{ m.content }}{% endfor %}", None),
])
def test_parser_from_template(template, name):
    assert parser_name_for(template) == name


def test_json_nested_past_pythons_recursion_limit_is_content_not_a_crash():
    deep = "[" * 5000 + "]" * 5000
    hermes = f"<tool_call>\n{deep}\n</tool_call>"
    assert whole(HermesParser, hermes) == Parsed(hermes, [])
    llama = '{"name": "a", "parameters": ' + deep + "}"
    assert whole(Llama3JsonParser, llama) == Parsed(llama, [])


# -- Hermes arguments streamed in fragments --------------------------------------------------

def args_of(deltas: list[Delta], index: int = 0) -> list[str]:
    return [d.arguments for d in deltas if d.index == index and d.arguments is not None]


def test_arguments_stream_as_they_are_written():
    parser = HermesParser(new_id=ids())
    assert parser.feed('<tool_call>\n{"name": "get_weather", ') == []
    assert parser.feed('"arguments": ') == []  # no arguments yet: the start waits for them
    first = parser.feed('{"city": "Pa')
    assert [(d.index, d.call_id, d.name, d.arguments) for d in first] == [
        (0, "call_0", "get_weather", None), (0, None, None, '{"city": "Pa')]
    assert args_of(parser.feed('ris", "note": "a } and \\" and {"')) == ['ris", "note": "a } and \\" and {"']
    assert args_of(parser.feed("}")) == ["}"]  # the arguments' own closing brace
    assert parser.feed("}\n</tool") == []  # the call's brace and tag are never arguments
    assert parser.feed("_call>") == [] and parser.made == [0]
    assert parser.finish() == []


def test_arguments_before_the_name_are_held_until_it_comes():
    parser = HermesParser(new_id=ids())
    assert parser.feed('<tool_call>{"arguments": {"x": [1, {"y": 2}]}') == []
    deltas = parser.feed(', "name": "f"')
    assert [(d.name, d.arguments) for d in deltas] == [("f", None), (None, '{"x": [1, {"y": 2}]}')]
    assert parser.feed("}</tool_call>") == [] and parser.made == [0]


def test_string_arguments_and_missing_arguments_come_whole_at_the_end():
    parser = HermesParser(new_id=ids())
    assert parser.feed('<tool_call>{"name": "a", "arguments": "{\\"k\\": 1}"}') == []
    assert args_of(parser.feed("</tool_call>")) == ['{"k": 1}']
    assert args_of(parser.feed('<tool_call>{"name": "b"}</tool_call>'), 1) == ["{}"]


def test_several_calls_are_numbered_in_order():
    text = '<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n' * 3
    deltas = deltas_of(HermesParser, list(text))
    assert [(d.index, d.call_id, d.name) for d in deltas if d.name] == [(i, f"call_{i}", "a") for i in range(3)]
    assert all("".join(args_of(deltas, i)) == '{"x": 1}' for i in range(3))


@pytest.mark.parametrize(("text", "sent"), [
    # the call's object doesn't close: its arguments were whole
    ('<tool_call>\n{"name": "a", "arguments": {"x": 1}\n</tool_call>', '{"x": 1}'),
    # a syntax error inside the arguments: they stop before it
    ('<tool_call>{"name": "a", "arguments": {"x": tru}}</tool_call>', '{"x": tru'),
    ('<tool_call>{"name": "a", "arguments": {\'x\': 1}}</tool_call>', "{"),
    # cut off inside the arguments (max_tokens)
    ('<tool_call>{"name": "a", "arguments": {"x": "abc', '{"x": "abc'),
])
def test_a_call_broken_after_its_start_went_out_ends_as_sent(text, sent):
    """Not a call in the whole answer (content); streamed, its start and the valid part of
    its arguments went out before it broke: it ends there, not counted as made, and its
    block is content too, so the stream's content is the whole answer's."""
    assert whole(HermesParser, "Hi. " + text) == Parsed("Hi. " + text, [])
    parser = HermesParser(new_id=ids())
    deltas = [d for ch in "Hi. " + text for d in parser.feed(ch)] + parser.finish()
    assert [d.name for d in deltas if d.name] == ["a"] and "".join(args_of(deltas)) == sent
    assert collect(deltas).content == "Hi. " + text and parser.made == []


def test_a_key_written_twice_gives_the_call_anew():
    """json.loads keeps the last value of a key; the first streamed: the call is given
    again, with the value the whole answer has, as the next call."""
    text = '<tool_call>{"name": "a", "arguments": {"x": 1}, "arguments": {"y": 2}}</tool_call>'
    parser = HermesParser(new_id=ids())
    deltas = [d for ch in text for d in parser.feed(ch)] + parser.finish()
    assert [(d.index, d.name) for d in deltas if d.name] == [(0, "a"), (1, "a")] and parser.made == [1]
    assert args_of(deltas, 0) and "".join(args_of(deltas, 1)) == '{"y": 2}'
    assert collect(deltas).content is None and whole(HermesParser, text) == Parsed(None, [call(0, "a", {"y": 2})])


def test_a_call_broken_after_its_start_is_not_made_but_the_next_one_is():
    text = ('<tool_call>{"name": "a", "arguments": {"x": 1}</tool_call>'
            '<tool_call>{"name": "b", "arguments": {}}</tool_call>')
    parser = HermesParser(new_id=ids())
    deltas = [d for ch in text for d in parser.feed(ch)] + parser.finish()
    assert [(d.index, d.name) for d in deltas if d.name] == [(0, "a"), (1, "b")] and parser.made == [1]
    assert whole(HermesParser, text).calls == [call(0, "b", {})]  # the whole answer numbers it 0


# -- properties: any split of an answer streams to the whole answer's result -------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=4), max_leaves=12)
LAYOUT = st.sampled_from([{}, {"indent": 2}, {"separators": (",", ":")}, {"ensure_ascii": False},
                          {"separators": (" ,", " :  "), "indent": "\t"}])


@st.composite
def a_call(draw) -> tuple[str, str, dict]:
    name = draw(st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,12}", fullmatch=True))
    args = draw(st.dictionaries(st.text(max_size=6), JSON, max_size=4))
    a = json.dumps(args, **draw(LAYOUT))
    n = json.dumps(name)
    ws = draw(st.sampled_from(["", " ", "\n", " \n  "]))
    body = (f'{{{ws}"name":{ws}{n},{ws}"arguments":{ws}{a}{ws}}}' if draw(st.booleans())
            else f'{{"arguments": {a},{ws}"name": {n}}}')
    return f"<tool_call>{ws}{body}{ws}</tool_call>", name, args


@st.composite
def answer_and_splits(draw):
    calls = draw(st.lists(a_call(), min_size=1, max_size=3))
    text = draw(st.sampled_from(["", "Let me look.\n", "a < b {x} "])) + "\n".join(c[0] for c in calls)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
    return text, pieces, [(c[1], c[2]) for c in calls]


@settings(max_examples=150, deadline=None)
@given(answer_and_splits())
def test_any_split_streams_the_whole_answers_calls(case):
    text, pieces, expected = case
    result = whole(HermesParser, text)
    assert [(c.name, json.loads(c.arguments)) for c in result.calls] == expected
    for split in (pieces, list(text)):
        parser = HermesParser(new_id=ids())
        deltas = [d for piece in split for d in parser.feed(piece)] + parser.finish()
        assert normal(collect(deltas)) == normal(result) and parser.made == list(range(len(expected)))
        for i, (name, args) in enumerate(expected):
            mine = [d for d in deltas if d.index == i]
            assert mine[0].name == name and mine[0].call_id == f"call_{i}"  # the start comes first
            assert all(d.name is None and d.arguments for d in mine[1:])
            assert json.loads("".join(args_of(deltas, i))) == args


PIECES = st.sampled_from(['<tool_call>', '</tool_call>', '{', '}', '[', ']', '"name"', '"arguments"', ':', ',',
                          '"a"', '"}"', '1', ' ', '\n', 'x', '<', '"\\"', 'true', '-', ', "arguments": {"z": 0}',
                          ', "name": "b"', "'"])


@st.composite
def broken_answer(draw) -> str:
    """A well-formed answer with a few pieces cut out or put in, or cut short."""
    text, _, _ = draw(answer_and_splits())
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(text)))
        if draw(st.booleans()):
            text = text[:i] + draw(PIECES) + text[i:]
        else:
            text = text[:i] + text[i + draw(st.integers(1, 3)):]
    return text[:draw(st.integers(0, len(text)))] if draw(st.booleans()) else text


@settings(max_examples=400, deadline=None)
@given(st.lists(PIECES, max_size=30).map("".join) | broken_answer(), st.data())
def test_any_text_streams_the_whole_answers_content_and_calls(text, data):
    """Malformed calls included: the content is always the whole answer's; the calls made
    (ended well) are the whole answer's calls."""
    result = whole(HermesParser, text)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    parser = HermesParser(new_id=ids())
    split = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
    streamed = collect([d for piece in split for d in parser.feed(piece)] + parser.finish())
    assert streamed.content == result.content
    made = [c for i, c in enumerate(streamed.calls) if i in parser.made]
    assert [(c.name, json.loads(c.arguments)) for c in made] == [(c.name, json.loads(c.arguments))
                                                                 for c in result.calls]


@settings(max_examples=300, deadline=None)
@given(st.lists(PIECES | st.sampled_from(['NaN', '-Infinity', '1.5e-3', '01', '"\\u00e9"', '"\\x"', '"\t"', '2.']),
                max_size=20).map("".join))
def test_the_scanner_is_as_strict_as_json_loads(text):
    """What the scanner reads to the end of an object without fault is JSON that json.loads
    reads, and the other way round; what it clears is always a start of such JSON."""
    scan = CallScanner()
    for ch in text:
        scan.feed(ch)
    try:
        json.loads(text)
        valid = text.lstrip().startswith("{")
    except ValueError:
        valid = False
    assert (scan.closed and not scan.failed and not text[scan.pos:].strip(" \t\n\r")) == valid


@given(a_call())
def test_the_scanner_finds_the_name_and_the_arguments(case):
    text, name, args = case
    inner = text[len("<tool_call>"):-len("</tool_call>")]
    scan = CallScanner()
    scan.read(inner)
    assert scan.closed and not scan.failed and scan.name == name and scan.args_is_object
    assert json.loads(inner[scan.args_start:scan.args_end]) == args


# -- Llama 3.1 JSON calls stream the same way ---------------------------------------------------

def test_llama_parameters_stream_and_calls_are_made_at_the_end():
    parser = Llama3JsonParser(new_id=ids())
    assert parser.feed('<|python_tag|>{"name": "a", "parameters": {"x": "lo') == [
        Delta(index=0, call_id="call_0", name="a"), Delta(index=0, arguments='{"x": "lo')]
    assert args_of(parser.feed('ng"}}; {"name"')) == ['ng"}']
    assert parser.feed(': "b", "parameters": {}}') == [Delta(index=1, call_id="call_1", name="b"),
                                                      Delta(index=1, arguments="{}")]
    assert parser.made == [] and parser.finish() == [] and parser.made == [0, 1]


def test_llama_answer_broken_after_a_call_went_out_is_content():
    text = '{"name": "a", "parameters": {"x": 1}} and then some words'
    parser = Llama3JsonParser(new_id=ids())
    deltas = [d for ch in text for d in parser.feed(ch)] + parser.finish()
    assert "".join(args_of(deltas)) == '{"x": 1}' and parser.made == []
    assert collect(deltas).content == text == whole(Llama3JsonParser, text).content


@pytest.mark.parametrize("text", ['{"name": "a", "parameters": {"x": 1}, "parameters": {"y": 2}}',
                                  '{"name": "a", "arguments": {"x": 1}, "parameters": {"y": 2}}'])
def test_llama_call_not_the_one_streamed_is_given_anew(text):
    parser = Llama3JsonParser(new_id=ids())
    deltas = [d for ch in text for d in parser.feed(ch)] + parser.finish()
    assert [(d.index, d.name) for d in deltas if d.name] == [(0, "a"), (1, "a")] and parser.made == [1]
    assert "".join(args_of(deltas, 1)) == '{"y": 2}' and collect(deltas).content is None


@st.composite
def llama_answer(draw):
    calls = draw(st.lists(a_call(), min_size=1, max_size=3))
    bodies = []
    for _, name, args in calls:
        key = draw(st.sampled_from(["parameters", "arguments"]))
        a = json.dumps(args, **draw(LAYOUT))
        bodies.append(f'{{"name": {json.dumps(name)}, "{key}": {a}}}' if draw(st.booleans())
                      else f'{{"{key}": {a}, "name": {json.dumps(name)}}}')
    text = draw(st.sampled_from(["", " ", "<|python_tag|>"])) + draw(st.sampled_from(["; ", ";", "\n"])).join(bodies)
    return text, [(c[1], c[2]) for c in calls]


@settings(max_examples=150, deadline=None)
@given(llama_answer() | broken_answer().map(lambda t: (t.replace("<tool_call>", "").replace("</tool_call>", ";"),
                                                       None)), st.data())
def test_llama_any_split_streams_the_whole_answers_result(case, data):
    text, expected = case
    result = whole(Llama3JsonParser, text)
    if expected is not None:
        assert [(c.name, json.loads(c.arguments)) for c in result.calls] == expected
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
    for split in ([text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])], list(text)):
        parser = Llama3JsonParser(new_id=ids())
        deltas = [d for piece in split for d in parser.feed(piece)] + parser.finish()
        streamed = collect(deltas)
        assert streamed.content == result.content
        made = [c for i, c in enumerate(streamed.calls) if i in parser.made]
        assert [(c.name, json.loads(c.arguments)) for c in made] == [(c.name, json.loads(c.arguments))
                                                                     for c in result.calls]
        if expected is not None:  # well-formed: exactly the whole answer's calls, indices and ids
            assert normal(streamed) == normal(result)


@pytest.mark.parametrize(("parser", "text", "names"), [
    ("llama3_json", '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}', ["a"]),
    ("hermes", '<tool_call>{"name": "a", "arguments": {"x": 1}</tool_call>\n'
               '<tool_call>{"name": "b", "arguments": {}}</tool_call><tool_call>{"name": "c"}</tool_call>', ["a", "b"]),
])
def test_parallel_tool_calls_false_streams_the_whole_answers_one_call(parser, text, names):
    """Streamed, the calls given out are the first one made and any that broke before it."""
    from app.server.tool_calls import ToolSetup, ToolStream, chat_message

    setup = ToolSetup([], parser, parallel=False)
    stream = ToolStream(setup)
    deltas = [d for ch in text for d in stream.feed(ch)] + stream.finish()
    starts = [tc["function"]["name"] for d in deltas for tc in d.get("tool_calls", []) if "id" in tc]
    assert starts == names and stream.called
    message, _ = chat_message(text, "stop", setup)
    assert [c["function"]["name"] for c in message["tool_calls"]] == names[-1:]
