"""The tool-call parsers on their own: whole answers, and the same answers streamed one
character at a time (which must add up to exactly the whole answer's result)."""

from __future__ import annotations

import itertools
import json

import pytest

from app.server.tool_parsers import (HermesParser, Llama3JsonParser, Parsed, ToolCall, collect, parse,
                                     parser_name_for)


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def whole(cls, text: str) -> Parsed:
    return parse(cls(new_id=ids()), text)


def char_by_char(cls, text: str) -> Parsed:
    parser = cls(new_id=ids())
    deltas = [d for ch in text for d in parser.feed(ch)] + parser.finish()
    return collect(deltas)


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
    ('<tool_call>\n{"name": "a", "arguments": {"x": 1}\n</tool_call>',
     Parsed('<tool_call>\n{"name": "a", "arguments": {"x": 1}\n</tool_call>', [])),
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
