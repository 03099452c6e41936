"""Function tools on POST /v1/responses through the official client, over the scripted
engine (answers whose format matters): calls come back as ``function_call`` items, whole
and streamed as the Responses API's events, and go back in as ``function_call`` /
``function_call_output`` items; a forced call carries chat's grammar."""

from __future__ import annotations

import json

import openai
import pytest

from tests.app.server.scripted import scripted, tool_model  # noqa: F401  (fixtures)

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city now.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}
ASK = "Weather in Paris and the time?"
TWO_CALLS = ('I will look both up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
             '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
MALFORMED = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>'


def respond(client, engine, answer: str, **kwargs):
    engine.answers[:] = [answer]  # a refused request leaves none behind
    kwargs.setdefault("input", ASK)
    kwargs.setdefault("tools", [WEATHER, TIME])
    return client.responses.create(model="scripted", **kwargs)


def streamed(client, engine, answer: str, **kwargs):
    """The stream's events, and the output items they add up to."""
    events = list(respond(client, engine, answer, stream=True, **kwargs))
    items: dict[int, dict] = {}
    done: set[int] = set()
    for ev in events:
        if ev.type == "response.output_item.added":
            assert ev.output_index == len(items) and done == set(items)  # one after another
            items[ev.output_index] = {"type": ev.item.type, "text": "", "arguments": "", "id": ev.item.id,
                                      "name": getattr(ev.item, "name", None)}
        elif ev.type == "response.output_text.delta":
            items[ev.output_index]["text"] += ev.delta
        elif ev.type == "response.function_call_arguments.delta":
            assert items[ev.output_index]["id"] == ev.item_id
            items[ev.output_index]["arguments"] += ev.delta
        elif ev.type == "response.function_call_arguments.done":
            assert ev.arguments == items[ev.output_index]["arguments"]
        elif ev.type == "response.output_item.done":
            assert ev.output_index not in done
            done.add(ev.output_index)
            items[ev.output_index]["status"] = ev.item.status
    assert done == set(items)
    return events, [items[i] for i in sorted(items)]


def test_a_call_is_a_function_call_item_and_the_tools_are_in_the_prompt(scripted):
    engine, client = scripted
    r = respond(client, engine, TWO_CALLS)
    assert '"name": "get_weather"' in engine.prompt_text() and "The weather in a city now." in engine.prompt_text()
    message, weather, clock = r.output
    assert message.type == "message" and r.output_text == "I will look both up."
    assert [(c.type, c.name, json.loads(c.arguments), c.status) for c in (weather, clock)] == [
        ("function_call", "get_weather", {"city": "Paris"}, "completed"),
        ("function_call", "get_time", {}, "completed")]
    assert weather.call_id != clock.call_id and weather.id.startswith("fc_") and weather.call_id.startswith("call")
    assert r.status == "completed" and [t.name for t in r.tools] == ["get_weather", "get_time"]
    assert r.tool_choice == "auto" and r.parallel_tool_calls is True


def test_a_plain_answer_with_tools_is_one_message(scripted):
    engine, client = scripted
    r = respond(client, engine, "It is sunny.")
    (item,) = r.output
    assert item.type == "message" and r.output_text == "It is sunny."


def test_the_stream_gives_the_whole_answers_items(scripted):
    engine, client = scripted
    whole = respond(client, engine, TWO_CALLS)
    events, items = streamed(client, engine, TWO_CALLS)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    # the message closes before the first call opens; each call closes before the next
    assert kinds.index("response.output_text.done") < kinds.index("response.function_call_arguments.delta")
    assert [(i["type"], i["name"]) for i in items] == [("message", None), ("function_call", "get_weather"),
                                                       ("function_call", "get_time")]
    assert items[0]["text"] == whole.output_text
    assert [json.loads(i["arguments"]) for i in items[1:]] == [json.loads(c.arguments) for c in whole.output[1:]]
    final = events[-1].response
    assert [o.id for o in final.output] == [i["id"] for i in items]
    assert [o.status for o in final.output] == ["completed"] * 3
    assert sum(e.type == "response.output_item.done" for e in events) == 3


def test_a_broken_call_streamed_ends_incomplete_and_its_text_comes_as_text(scripted):
    """Its item closes (incomplete) before the text item opens, and the final response leaves
    it out, as the whole answer has no call: a client that runs every function_call in the
    output (or parses a strict tool's arguments) never meets its broken arguments."""
    engine, client = scripted
    events, items = streamed(client, engine, MALFORMED)
    assert [(i["type"], i["status"]) for i in items] == [("function_call", "incomplete"), ("message", "completed")]
    assert "get_weather" in items[1]["text"]
    final = events[-1].response
    assert events[-1].type == "response.completed" and [o.type for o in final.output] == ["message"]
    whole = respond(client, engine, MALFORMED)
    assert [o.type for o in whole.output] == ["message"] and "<tool_call>" in whole.output_text
    strict = {**WEATHER, "strict": True}
    engine.answers[:] = [MALFORMED]
    with client.responses.stream(model="scripted", input=ASK, tools=[strict]) as stream:
        for _ in stream:
            pass
        assert [o.type for o in stream.get_final_response().output] == ["message"]


def test_a_call_cut_by_max_output_tokens(scripted):
    """The first call whole, the second cut: the response is incomplete, with the text and the
    first call (whole and streamed alike); the cut call's text comes as text."""
    engine, client = scripted
    cut = dict(max_output_tokens=45)
    whole = respond(client, engine, TWO_CALLS, **cut)
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
    assert [(o.type, getattr(o, "name", None)) for o in whole.output] == [("message", None),
                                                                         ("function_call", "get_weather")]
    events, items = streamed(client, engine, TWO_CALLS, **cut)
    final = events[-1].response
    assert events[-1].type == "response.incomplete"
    assert [(o.type, getattr(o, "name", None)) for o in final.output if o.type == "function_call"] == [
        ("function_call", "get_weather")]
    assert json.loads(final.output[1].arguments) == json.loads(whole.output[1].arguments)


def test_calls_and_their_outputs_go_back_in_as_items(scripted):
    """The response's items sent back with the call's result: the prompt has the call as
    the assistant's and the result as a tool message, in order."""
    engine, client = scripted
    first = respond(client, engine, TWO_CALLS, parallel_tool_calls=False)
    assert [o.type for o in first.output] == ["message", "function_call"]  # the first call only
    call = first.output[1]
    items = [{"role": "user", "content": ASK}, *[o.model_dump(exclude_none=True) for o in first.output],
             {"type": "function_call_output", "call_id": call.call_id, "output": "18 C, sunny"}]
    r = respond(client, engine, "It is 18 C and sunny in Paris.", input=items)
    prompt = engine.prompt_text()
    turn = prompt.index("I will look both up.")
    assert turn < prompt.index('{"name": "get_weather", "arguments": {"city": "Paris"}}', turn) \
        < prompt.index(f'<tool_response id="{call.call_id}">\n18 C, sunny')
    assert prompt.count("<|im_start|>assistant") == 2  # the text and its call are one turn
    assert r.output_text == "It is 18 C and sunny in Paris."


def test_a_named_tool_choice_forces_that_call_under_its_grammar(scripted):
    engine, client = scripted
    r = respond(client, engine, ' {"city": "Oslo"}}\n</tool_call>',
                tool_choice={"type": "function", "name": "get_weather"})
    assert engine.prompt_text().endswith('<tool_call>\n{"name": "get_weather", "arguments":')
    assert engine.params[-1].structured.kind == "lark"
    (call,) = r.output
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Oslo"})
    assert r.tool_choice.name == "get_weather"
    respond(client, engine, 'get_time", "arguments": {}}\n</tool_call>', tool_choice="required")
    assert engine.params[-1].structured.kind == "lark"
    respond(client, engine, "Fine.", tool_choice="none")
    assert "get_weather" not in engine.prompt_text()


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"tools": [{"type": "function", "name": "bad name!", "parameters": {}}]}, "tools.0.name"),
    ({"tools": [{"type": "function", "name": "f", "parameters": []}]}, "tools.0.parameters"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, "tools.0"),
    ({"tools": [WEATHER, TIME, {**TIME, "description": "again"}]}, "tools"),  # a name twice
    ({"include": ["message.output_text.logprobs"]}, "include"),  # a call's tokens are in no output_text
    ({"tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tool_choice": {"type": "function", "name": "nonesuch"}}, "tool_choice"),
    ({"input": [{"type": "function_call", "call_id": "c1", "name": "get_time", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c2", "output": "1"}]}, "input.1.call_id"),
    ({"instructions": "Be brief.", "input": [
        {"role": "user", "content": "Hi"},
        {"type": "function_call", "call_id": "c1", "name": "get_time", "arguments": "{not json"}]},
     "input.1.arguments"),
])
def test_bad_tools_are_a_400_naming_the_responses_parameter(scripted, kwargs, param):
    engine, client = scripted
    with pytest.raises(openai.BadRequestError) as e:
        respond(client, engine, "x", **kwargs)
    assert e.value.body["param"] == param, e.value.body
    assert "'function': {" not in e.value.body["message"] and ".function." not in e.value.body["message"]
    if param == "tools":
        assert "'get_time'" in e.value.body["message"] and "tools.1 and tools.2" in e.value.body["message"]


def test_null_fields_of_a_typed_client_are_left_out(scripted):
    """The SDK's FunctionToolParam sends parameters / strict / description as null."""
    engine, client = scripted
    bare = {"type": "function", "name": "get_time", "parameters": None, "strict": None, "description": None}
    r = respond(client, engine, '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', tools=[bare])
    (call,) = r.output
    assert call.name == "get_time" and json.loads(call.arguments) == {}


def test_chat_errors_name_the_input_item_they_came_from():
    """Chat's checks speak of messages; instructions and joined calls shift their numbers, so
    the error names the Responses item instead."""
    from app.server.responses import Origins, ResponsesRequest, messages_of

    body = ResponsesRequest(instructions="Be brief.", input=[
        {"role": "user", "content": "Hi"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Looking."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_time", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "c2", "output": "sunny"}])
    origins = Origins()
    messages = messages_of(body, origins)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert [c["id"] for c in messages[2]["tool_calls"]] == ["c1", "c2"]
    assert origins.messages == ["instructions", "input.0", "input.1", "input.4"]
    assert origins.param("messages.2.tool_calls.1.function.arguments") == "input.3.arguments"
    assert origins.param("messages.2.content") == "input.1.content"
    assert origins.param("messages.3.content") == "input.4.content" and origins.param("messages") == "messages"
    assert origins.text("messages[1] has 'image_url' content") == "input.0 has 'image_url' content"
