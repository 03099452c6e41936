"""POST /v1/responses through the official client: text in (a string, message items,
instructions), text out, whole and streamed as the API's typed events; the server is
stateless (previous_response_id / store: 400)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.app.server.conftest import API_KEY
from tests.app.server.scripted import scripted, tool_model  # noqa: F401  (fixtures)

CUT = {"temperature": 0, "max_output_tokens": 5, "extra_body": {"ignore_eos": True}}
EVENTS = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
          "response.output_text.delta", "response.output_text.done", "response.content_part.done",
          "response.output_item.done"]


def test_response_matches_chat(client, model_name):
    """The same prompt and sampling as a chat request: the same text and token counts."""
    chat = client.chat.completions.create(model=model_name, messages=[{"role": "system", "content": "Be kind."},
                                                                      {"role": "user", "content": "Hi there"}],
                                          temperature=0, max_tokens=5, extra_body={"ignore_eos": True})
    r = client.responses.create(model=model_name, instructions="Be kind.", input="Hi there", **CUT)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == model_name
    assert r.output_text == chat.choices[0].message.content
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == 5
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    # cut by max_output_tokens: OpenAI's incomplete status
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.max_output_tokens == 5 and r.instructions == "Be kind." and r.store is False


def test_message_items_and_text_parts(client, model_name):
    as_string = client.responses.create(model=model_name, input="Hi there", **CUT)
    items = client.responses.create(model=model_name, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Hi "}, {"type": "input_text", "text": "there"}]}],
        **CUT)
    assert items.output_text == as_string.output_text
    convo = client.responses.create(model=model_name, input=[
        {"role": "user", "content": "Hi"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
        {"role": "user", "content": "More"}], **CUT)
    assert convo.usage.input_tokens > as_string.usage.input_tokens


def test_stream_events_in_order_and_text_matches(client, model_name):
    whole = client.responses.create(model=model_name, input="Hi there", **CUT)
    events = list(client.responses.create(model=model_name, input="Hi there", stream=True, **CUT))
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 1
    assert kinds == EVENTS[:4] + ["response.output_text.delta"] * deltas + EVENTS[5:] + ["response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-1].response.output_text == whole.output_text
    assert events[-1].response.usage.output_tokens == 5
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1


def test_stream_helper_completes(scripted):
    """client.responses.stream: the SDK's own accumulation accepts the events."""
    engine, client = scripted
    engine.answers[:] = ["Hello from Hearth."]
    with client.responses.stream(model="scripted", input="Say hello") as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(texts) == final.output_text == "Hello from Hearth."
    assert final.status == "completed" and final.incomplete_details is None
    assert "Say hello" in engine.prompt_text()
    engine.answers[:] = ["Whole."]
    r = client.responses.create(model="scripted", input="Again", max_output_tokens=50)
    assert r.status == "completed" and r.output_text == "Whole." and r.usage.output_tokens > 0


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"store": True}, "store"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": 100000}, "max_output_tokens"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input.0.content.0"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input.0.call_id"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input.0"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input.0.arguments"),
    ({"tools": [{"type": "web_search"}]}, "tools.0"),
    ({"input": []}, "input"),
    ({"temperature": -1}, "temperature"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without include message.output_text.logprobs: none would come
    ({"top_logprobs": 21, "include": ["message.output_text.logprobs"]}, "top_logprobs"),
    ({"truncation": "middle"}, "truncation"),
])
def test_bad_requests_are_a_400_naming_the_parameter(client, model_name, kwargs, param):
    kwargs.setdefault("input", "Hi")
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=model_name, **kwargs)
    assert e.value.body["param"] == param, e.value.body
    if param in ("previous_response_id", "store"):
        assert "stateless" in e.value.body["message"]


def test_raw_stream_is_event_and_data_lines(live, model_name):
    with httpx.stream("POST", f"{live.base_url}/v1/responses", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"input": "Hi", "stream": True, "max_output_tokens": 2}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        blocks = r.read().decode().strip().split("\n\n")
    assert blocks[0].startswith("event: response.created\ndata: {")
    assert all(b.split("\n")[0].startswith("event: ") and b.split("\n")[1].startswith("data: ") for b in blocks)
    metrics = httpx.get(f"{live.base_url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    assert 'hearth_requests_total{endpoint="/v1/responses",status="200"}' in metrics


@pytest.mark.parametrize("body", [
    {"input": 5}, {"input": [5]}, {"input": [{"role": "user"}]}, {"input": [{"role": "user", "content": [5]}]},
    {"input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]},
    {"input": [{"role": "tool", "content": "x"}]}, {"input": "x", "text": "plain"},
    {"input": "x", "instructions": 5}, {"input": "x", "top_k": "5"}, {"input": "\ud800"},
    {"input": "x", "max_output_tokens": "5"}, {}, {"input": "x", "stream": "yes"},
])
def test_odd_requests_are_a_400_never_a_500(live, body):
    r = httpx.post(f"{live.base_url}/v1/responses", content=json.dumps(body),  # ASCII: a lone surrogate escaped
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"], r.text


def test_a_failure_mid_stream_is_raised_by_the_sdk(scripted):
    engine, client = scripted
    engine.answers[:] = [("Half an ans", "the engine failed: out of memory")]
    seen = []
    with pytest.raises(openai.APIError, match="out of memory"):
        for event in client.responses.create(model="scripted", input="Hi", stream=True):
            seen.append(event.type)
    assert seen[:4] == EVENTS[:4] and "response.output_text.delta" in seen and "response.completed" not in seen
    engine.answers[:] = [("Half", "the engine failed: out of memory")]
    with pytest.raises(openai.InternalServerError):
        client.responses.create(model="scripted", input="Hi")


LOGPROBS = {"include": ["message.output_text.logprobs"], "top_logprobs": 3}


def test_output_text_logprobs_whole_and_streamed(client, model_name):
    """include message.output_text.logprobs: each output_text token's logprob, bytes and top
    alternatives, as chat gives them for the same prompt; streamed, each delta carries its
    tokens', and the done events the whole part's."""
    chat = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi there"}],
                                          temperature=0, max_tokens=5, logprobs=True, top_logprobs=3,
                                          extra_body={"ignore_eos": True}).choices[0].logprobs.content
    r = client.responses.create(model=model_name, input="Hi there", **CUT, **LOGPROBS)
    part = r.output[0].content[0]
    assert len(part.logprobs) == 5 and "".join(lp.token for lp in part.logprobs) == part.text
    assert [(lp.token, lp.bytes, round(lp.logprob, 4)) for lp in part.logprobs] == \
        [(c.token, c.bytes, round(c.logprob, 4)) for c in chat]
    for lp in part.logprobs:
        assert len(lp.top_logprobs) == 3 and lp.top_logprobs[0].token == lp.token  # greedy: the top one
        assert all(t.bytes == list(t.token.encode()) and t.logprob <= 0 for t in lp.top_logprobs)
    assert r.top_logprobs == 3
    events = list(client.responses.create(model=model_name, input="Hi there", stream=True, **CUT, **LOGPROBS))
    deltas = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    final = events[-1].response.output[0].content[0]
    assert [lp.token for lp in deltas] == [lp.token for lp in done.logprobs] == [lp.token for lp in part.logprobs]
    assert [lp.token for lp in final.logprobs] == [lp.token for lp in part.logprobs]
    # without include: none
    plain = client.responses.create(model=model_name, input="Hi there", **CUT)
    assert plain.output[0].content[0].logprobs == []


def test_truncation_auto_drops_the_earliest_turns(client, model_name):
    """The context holds 256 tokens: four long turns don't fit; truncation "auto" leaves out
    the earliest turn(s) (whole, up to a user message), as OpenAI drops items from the start."""
    long = "word " * 80
    items = [{"role": "user", "content": long}, {"role": "assistant", "content": long},
             {"role": "user", "content": long}, {"role": "assistant", "content": long},
             {"role": "user", "content": "Hi there"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=model_name, input=items, **CUT)
    assert e.value.body["code"] == "context_length_exceeded"
    r = client.responses.create(model=model_name, input=items, truncation="auto", **CUT)
    kept = client.responses.create(model=model_name, input=items[2:], **CUT)
    assert r.truncation == "auto" and r.usage.input_tokens == kept.usage.input_tokens
    assert r.output_text == kept.output_text
    # a system / developer message that opens the input stays (the model's instructions)
    system = {"role": "developer", "content": "Answer in one word."}
    cut = client.responses.create(model=model_name, input=[system, *items], truncation="auto", **CUT)
    whole = client.responses.create(model=model_name, input=[system, *items[2:]], **CUT)
    assert cut.usage.input_tokens == whole.usage.input_tokens and cut.output_text == whole.output_text
    # input that fits is left whole
    short = client.responses.create(model=model_name, input=items[2:], truncation="auto", **CUT)
    assert short.usage.input_tokens == kept.usage.input_tokens
    with pytest.raises(openai.BadRequestError) as e:  # the last turn alone is too long: said so
        client.responses.create(model=model_name, input=[*items[:4], {"role": "user", "content": long * 4}],
                                truncation="auto", **CUT)
    assert e.value.body["code"] == "context_length_exceeded" and "truncation" in e.value.body["message"]
