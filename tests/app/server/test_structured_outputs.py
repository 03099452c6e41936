"""response_format (json_object, json_schema, a pydantic model through the SDK's parse)
and logit_bias through the official openai client against the live server, on the tiny
random-weight model: its own answers are noise, so every JSON answer below is the
grammar's doing. Malformed or unenforceable formats and biases are 400s naming them."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from engine.api import Request, SamplingParams
from tests.app.server.conftest import API_KEY

MESSAGES = [{"role": "user", "content": "Describe a thing as JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]},
                   "size": {"type": "integer", "minimum": 1, "maximum": 5},
                   "round": {"type": "boolean"}},
    "required": ["color", "size", "round"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}


class Thing(BaseModel):
    color: Literal["red", "green", "blue"]
    size: int = Field(ge=1, le=5)
    round: bool


@pytest.fixture(autouse=True)
def _model(model_name):
    global MODEL
    MODEL = model_name


MODEL = ""


def chat(client, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 60)
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, **kw)


def token_id(host, text: str) -> int:
    ids = host.engine.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, ids
    return ids[0]


def test_json_schema_answer_validates(client):
    r = chat(client, response_format=JSON_SCHEMA)
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_without_response_format_the_answer_is_not_json(client):
    """So the test above can fail: this model's own answer is not the schema's JSON."""
    content = chat(client, max_tokens=20).choices[0].message.content
    with pytest.raises((ValueError, jsonschema.ValidationError)):
        jsonschema.validate(json.loads(content), SCHEMA)
    assert chat(client, max_tokens=20, response_format={"type": "text"}).choices[0].message.content == content


def test_json_schema_streamed_and_several_choices(client):
    stream = chat(client, response_format=JSON_SCHEMA, stream=True, n=2, temperature=0.9, seed=5)
    parts = {0: "", 1: ""}
    finish = {}
    for chunk in stream:
        for c in chunk.choices:
            parts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert finish == {0: "stop", 1: "stop"}
    for text in parts.values():
        jsonschema.validate(json.loads(text), SCHEMA)


def test_sdk_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Thing,
                                      temperature=0, max_tokens=60)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(msg.parsed, Thing), msg.content
    assert 1 <= msg.parsed.size <= 5


def test_json_object_with_a_bias_towards_closing(client, host):
    # "{}" is one token of this vocabulary, "}" another: either closes the object at once.
    bias = {str(token_id(host, "{}")): 100, str(token_id(host, "}")): 100}
    r = chat(client, response_format={"type": "json_object"}, logit_bias=bias, max_tokens=16)
    assert r.choices[0].finish_reason == "stop"
    assert json.loads(r.choices[0].message.content) == {}


def test_logit_bias_forces_and_bans(client, host):
    prompt = [11, 12, 13, 14]
    plain = host.engine.submit(Request(prompt_token_ids=prompt, params=SamplingParams(
        max_tokens=3, temperature=0, ignore_eos=True))).result().token_ids
    forced = 4242
    assert forced not in plain
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
                                  logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == host.engine.tokenizer.decode([forced] * 3)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == host.engine.tokenizer.decode(plain)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                                  logit_bias={str(plain[0]): -100}, logprobs=0)
    assert r.choices[0].text != host.engine.tokenizer.decode(plain[:1])
    r = chat(client, max_tokens=2, logit_bias={str(forced): 100})
    assert r.choices[0].message.content == host.engine.tokenizer.decode([forced] * 2)


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


BAD = {
    "unknown-type": ({"response_format": {"type": "xml"}}, "response_format"),
    "schema-missing": ({"response_format": {"type": "json_schema"}}, "response_format"),
    "schema-no-schema": ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
                         "response_format"),
    "schema-invalid-type": ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "frobnicate"}}}}, "response_format"),
    "schema-unenforceable": ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}}, "response_format"),
    "schema-bad-regex": ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "(a"}}}}, "response_format"),
    "schema-a-list": ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": [1, 2]}}}, "response_format"),
    "schema-too-deep": ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": _nested(300)}}}, "response_format"),
    "format-a-string": ({"response_format": "json"}, "response_format"),
    "bias-key-not-an-id": ({"logit_bias": {"hello": 1}}, "logit_bias"),
    "bias-out-of-range": ({"logit_bias": {"5": 101}}, "logit_bias"),
    "bias-a-string": ({"logit_bias": {"5": "up"}}, "logit_bias"),
    "bias-outside-the-vocab": ({"logit_bias": {"49152": 1}}, "logit_bias"),
    "bias-too-many": ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_formats_and_biases_are_400(live, name):
    extra, param = BAD[name]
    r = httpx.post(f"{live.base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"messages": MESSAGES, "max_tokens": 4, **extra}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["message"]


def test_bad_bias_on_completions_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, logit_bias={"1": -200})
    assert "logit_bias" in str(info.value)


def test_responses_text_format_json_schema_validates(client):
    r = client.responses.create(model=MODEL, input="Describe a thing as JSON.", temperature=0, max_output_tokens=60,
                                text={"format": {"type": "json_schema", "name": "thing", "schema": SCHEMA,
                                                 "strict": True}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), SCHEMA)
    assert r.text.format.type == "json_schema" and r.text.format.name == "thing"  # echoed as asked


@pytest.mark.parametrize("text", [{"format": "json"}, {"format": {"type": "xml"}}, "json"])
def test_a_responses_text_format_it_cannot_honour_is_a_400(live, text):
    r = httpx.post(f"{live.base_url}/v1/responses", json={"model": MODEL, "input": "Hi", "text": text},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] in ("text", "text.format")


def test_completions_with_a_response_format_is_a_400_not_ignored(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={"response_format": {
            "type": "json_object"}})
    assert e.value.body["param"] == "response_format"


@pytest.mark.parametrize("as_text", [False, True], ids=["schema", "json-text"])
def test_vllms_guided_json_on_chat_is_a_json_schema(client, as_text):
    """vLLM's ``guided_json`` (the schema, or its JSON text) constrains the answer like
    response_format json_schema; with response_format too it is a 400."""
    r = chat(client, extra_body={"guided_json": json.dumps(SCHEMA) if as_text else SCHEMA})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, response_format=JSON_SCHEMA, extra_body={"guided_json": SCHEMA})
    assert e.value.body["param"] == "guided_json"
    for bad in (5, "[" * 5000 + "]" * 5000, {"type": "nonsense-type"}):  # not a schema; too deep; unenforceable
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, extra_body={"guided_json": bad})
        assert e.value.body["param"] == "guided_json", e.value.body


@pytest.mark.parametrize("extra, param", [
    ({"guided_regex": "[a-z]+"}, "guided_regex"), ({"guided_choice": ["a", "b"]}, "guided_choice"),
    ({"continue_final_message": True}, "continue_final_message"),
    ({"chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs"),
    ({"min_tokens": 20}, "min_tokens"), ({"include_stop_str_in_output": True}, "include_stop_str_in_output"),
    ({"bad_words": ["Hello"]}, "bad_words"), ({"use_beam_search": True}, "use_beam_search"),
    ({"truncate_prompt_tokens": 5}, "truncate_prompt_tokens"), ({"echo": True}, "echo"),
])
def test_vllms_other_extensions_are_a_400_not_ignored(client, extra, param):
    """vLLM's extensions Hearth doesn't follow are refused naming them (the answer would
    otherwise be unconstrained or rendered otherwise without a word); their defaults pass."""
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, max_tokens=2, extra_body=extra)
    assert e.value.body["param"] == param and "vLLM" in e.value.body["message"]
    chat(client, max_tokens=2, extra_body={"continue_final_message": False, "add_generation_prompt": True,
                                           "chat_template_kwargs": {}, "min_tokens": 0, "bad_words": [],
                                           "include_stop_str_in_output": False, "use_beam_search": False})
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={"guided_json": SCHEMA})
    assert e.value.body["param"] == "guided_json"


def test_vllms_extensions_on_responses_are_a_400_too(client):
    for extra in ({"guided_json": SCHEMA}, {"guided_regex": "[a-z]+"}, {"chat_template_kwargs": {"x": 1}}):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, extra_body=extra)
        assert e.value.body["param"] == next(iter(extra)) and "vLLM" in e.value.body["message"]


def test_vllms_stop_token_ids_end_the_answer(client, host):
    """``stop_token_ids`` (vLLM's extension) is followed: a listed id ends the answer where
    it is sampled, as the end-of-text token does (left out of the text); anything but a list
    of ids is a 400 naming it."""
    free = chat(client, max_tokens=8, extra_body={"ignore_eos": True})
    ids = host.engine.tokenizer.encode(free.choices[0].message.content, add_special_tokens=False)
    assert free.usage.completion_tokens == 8 and free.choices[0].finish_reason == "length"
    # the first token that is new in the answer after its first (a random model repeats itself)
    at = next((i for i in range(1, len(ids)) if ids[i] not in ids[:i]), 0)
    r = chat(client, max_tokens=8, extra_body={"ignore_eos": True, "stop_token_ids": [ids[at]]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == at + 1
    assert r.choices[0].message.content == host.engine.tokenizer.decode(ids[:at])
    for bad in ("17", [1.5], [-1], [True]):
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, max_tokens=2, extra_body={"stop_token_ids": bad})
        assert e.value.body["param"] == "stop_token_ids", e.value.body
