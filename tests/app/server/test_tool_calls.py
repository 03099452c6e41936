"""Tool calling through the official openai client against a live server: the tools and
the fed-back calls and results rendered by the model's chat template (a Hermes/Qwen-style
fixture template), and the calls a (scripted) model writes parsed into ``tool_calls``,
whole and streamed."""

from __future__ import annotations

import json

import openai
import pytest

from tests.app.server.scripted import scripted, tool_model  # noqa: F401  (fixtures)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "Weather in Paris and the time?"}]
TWO_CALLS = ('I will look both up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
             '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
MALFORMED = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>'


def ask(client, engine, answer: str, **kwargs):
    engine.answers[:] = [answer]  # a refused request leaves none behind
    kwargs.setdefault("messages", ASK)
    kwargs.setdefault("tools", [WEATHER, TIME])
    return client.chat.completions.create(model="scripted", **kwargs)


def streamed(client, engine, answer: str, **kwargs):
    """The stream's chunks, and what its deltas add up to: (content, calls, finish)."""
    chunks = list(ask(client, engine, answer, stream=True, **kwargs))
    content, calls, finish = "", {}, None
    for chunk in chunks:
        (choice,) = chunk.choices
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            if tc.id is not None:  # a call's first delta: id, type and name, before any arguments
                assert tc.index not in calls and tc.type == "function" and tc.function.name
                calls[tc.index] = [tc.id, tc.function.name, tc.function.arguments or ""]
            else:
                calls[tc.index][2] += tc.function.arguments
        finish = choice.finish_reason or finish
    return chunks, content, [calls[i] for i in sorted(calls)], finish


def test_tools_and_fed_back_results_are_in_the_prompt(scripted):
    engine, client = scripted
    messages = [
        {"role": "system", "content": "Be brief."}, *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "Sunny, 21 C"},
    ]
    r = ask(client, engine, "It is sunny.", messages=messages)
    assert r.choices[0].message.content == "It is sunny." and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"
    prompt = engine.prompt_text()
    assert json.dumps(WEATHER["function"]["parameters"]) in prompt  # the tools, rendered by the template
    assert '"name": "get_time"' in prompt and "Be brief." in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert '<tool_response id="call_abc">\nSunny, 21 C\n</tool_response>' in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_tool_choice_none_leaves_the_tools_out(scripted):
    engine, client = scripted
    r = ask(client, engine, TWO_CALLS, tool_choice="none")
    assert "get_time" not in engine.prompt_text()
    assert r.choices[0].message.content == TWO_CALLS and r.choices[0].finish_reason == "stop"


def test_two_calls_in_one_answer(scripted):
    engine, client = scripted
    r = ask(client, engine, TWO_CALLS)
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will look both up."
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris"}, {}]
    assert all(c.type == "function" and c.id.startswith("call_") for c in calls)
    assert len({c.id for c in calls}) == 2


def test_two_calls_streamed(scripted):
    engine, client = scripted
    chunks, content, calls, finish = streamed(client, engine, TWO_CALLS)
    assert content == "I will look both up." and finish == "tool_calls"
    assert [(name, json.loads(args)) for _, name, args in calls] == [("get_weather", {"city": "Paris"}),
                                                                    ("get_time", {})]
    assert all(cid.startswith("call_") for cid, _, _ in calls)
    # the text before the calls streamed as content before any call
    first_call = next(i for i, c in enumerate(chunks) if c.choices[0].delta.tool_calls)
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:first_call]) == content
    # no chunk ever showed a piece of the tags
    assert all("<tool" not in (c.choices[0].delta.content or "") for c in chunks)


def test_a_long_call_streams_its_arguments_in_fragments(scripted):
    """The arguments stream as the model writes them, after the call's start; the SDK's
    stream helper adds them up to JSON that parses to the whole answer's arguments."""
    engine, client = scripted
    args = {"city": "Paris", "note": 'a "quoted" {brace}, a \\ and é ' * 3, "days": [1, 2.5, None],
            "opts": {"units": "metric", "deep": {"x": []}}}
    answer = f'Checking.\n<tool_call>\n{{"name": "get_weather", "arguments": {json.dumps(args)}}}\n</tool_call>'
    engine.answers[:] = [answer]
    with client.chat.completions.stream(model="scripted", messages=ASK, tools=[WEATHER, TIME]) as stream:
        events = [e for e in stream if e.type in ("tool_calls.function.arguments.delta", "content.delta")]
        final = stream.get_final_completion()
    fragments = [e.arguments_delta for e in events if e.type != "content.delta" and e.arguments_delta]
    assert len(fragments) > 1, fragments
    assert json.loads("".join(fragments)) == args
    assert all("</tool_call>" not in f and "<tool_call>" not in f for f in fragments)
    assert events[0].type == "content.delta"  # the text before the call streamed first
    (choice,) = final.choices
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == args
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    r = ask(client, engine, answer)  # the whole answer: the same call
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == args


def test_a_call_cut_inside_its_arguments_streams_as_far_as_written(scripted):
    """max_tokens cuts the call after its start went out: it ends as sent (arguments
    incomplete), the stream's content is the whole answer's, and finish_reason is length."""
    engine, client = scripted
    answer = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "note": "a long note"}}\n</tool_call>'
    r = ask(client, engine, answer, max_tokens=20)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"
    _, content, calls, finish = streamed(client, engine, answer, max_tokens=20)
    assert content == r.choices[0].message.content and finish == "length"
    assert [c[1] for c in calls] == ["get_weather"] and answer.startswith(
        '<tool_call>\n{"name": "get_weather", "arguments": ' + calls[0][2])


def test_malformed_call_comes_back_as_content(scripted):
    engine, client = scripted
    r = ask(client, engine, MALFORMED)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == MALFORMED
    # streamed, its start and arguments went out before it broke: the call ends as sent
    # (its arguments don't parse), the content is the whole answer's, finish_reason stop
    _, content, calls, finish = streamed(client, engine, MALFORMED)
    assert (content, finish) == (MALFORMED, "stop")
    assert [c[1:] for c in calls] == [["get_weather", '{"city": "Paris"\n']]
    # broken before its arguments began: nothing of it went out, it is content only
    early = '<tool_call>\n{"name": "get_weather" "arguments": {}}\n</tool_call>'
    _, content, calls, finish = streamed(client, engine, early)
    assert (content, calls, finish) == (early, [], "stop")


def test_plain_answer_with_tools_streams_unchanged(scripted):
    engine, client = scripted
    text = "No tool needed: 2 < 3 <b>bold</b>."
    _, content, calls, finish = streamed(client, engine, text)
    assert (content, calls, finish) == (text, [], "stop")


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_forces_that_call(scripted, stream):
    engine, client = scripted
    # The prompt ends with the call's opening: the model only writes its arguments.
    answer = '{"city": "Oslo"}}\n</tool_call>'
    choice = {"type": "function", "function": {"name": "get_weather"}}
    if stream:
        _, content, calls, finish = streamed(client, engine, answer, tool_choice=choice)
        assert content == "" and [c[1:] for c in calls] == [["get_weather", '{"city": "Oslo"}']]
    else:
        r = ask(client, engine, answer, tool_choice=choice)
        finish = r.choices[0].finish_reason
        (call,) = r.choices[0].message.tool_calls
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Oslo"})
        assert r.choices[0].message.content is None
    assert finish == "tool_calls"
    assert engine.prompt_text().endswith('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments":')


def test_required_tool_choice_opens_a_call(scripted):
    engine, client = scripted
    r = ask(client, engine, 'get_time", "arguments": {}}\n</tool_call>', tool_choice="required")
    assert engine.prompt_text().endswith('<|im_start|>assistant\n<tool_call>\n{"name": "')
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and r.choices[0].finish_reason == "tool_calls"


def test_a_call_cut_by_max_tokens_is_content_with_length(scripted):
    engine, client = scripted
    r = ask(client, engine, TWO_CALLS, max_tokens=12)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls is None
    assert TWO_CALLS.startswith(r.choices[0].message.content)


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "tools.0.function.parameters"),
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [WEATHER, TIME, {**WEATHER, "function": {"name": "get_weather"}}]}, "tools"),  # a name twice
    ({"tool_choice": "always"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tool_choice": "required", "extra_body": {"guided_json": {"type": "object"}}}, "guided_json"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages.1.tool_calls.0.function.arguments"),
])
def test_bad_tools_are_a_400_naming_the_parameter(scripted, kwargs, param):
    engine, client = scripted
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, engine, "unused", **kwargs)
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body


def test_a_function_name_twice_is_a_400_naming_it(scripted):
    """Which of two same-named functions would a call run? OpenAI refuses them too."""
    engine, client = scripted
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, engine, "unused", tools=[WEATHER, TIME, WEATHER])
    assert "'get_weather'" in e.value.body["message"] and "tools.0 and tools.2" in e.value.body["message"]


def test_a_template_without_tools_is_a_400(client, model_name):
    """The main fixture model's template (SmolLM2's) writes no tool calls."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name, messages=ASK, tools=[WEATHER], max_tokens=2)
    assert e.value.body["param"] == "tools" and "tool" in e.value.body["message"]
    # tool_choice "none" needs nothing of the template
    r = client.chat.completions.create(model=model_name, messages=ASK, tools=[WEATHER], tool_choice="none",
                                       max_tokens=2)
    assert r.choices[0].message.tool_calls is None


@pytest.mark.parametrize("extra", [
    {"tools": [None]}, {"tools": [{"type": "function", "function": {"name": "f", "description": 5}}]},
    {"tool_choice": 5}, {"tool_choice": ["auto"]}, {"tool_choice": {"type": "function", "function": "f"}},
    {"messages": [{"role": "user", "content": "hi", "tool_calls": [{"function": {"name": "f"}}]}]},
    {"messages": [{"role": "assistant", "content": "x", "tool_calls": [5]}]},
    {"messages": [{"role": "assistant", "content": "x", "tool_calls": "f"}]},
    {"messages": [{"role": "tool", "content": "x", "tool_call_id": 5}]},
    {"tools": [{"type": "function", "function": {"name": "f", "description": "\ud800"}}]},
])
def test_odd_tool_values_are_a_400_never_a_500(scripted, extra):
    import httpx

    _, client = scripted
    body = {"messages": ASK, "tools": [WEATHER], "max_tokens": 4, **extra}
    r = httpx.post(f"{client.base_url}chat/completions", content=json.dumps(body),  # ASCII: surrogates escaped
                   headers={"Authorization": f"Bearer {client.api_key}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"], r.text


def test_odd_but_valid_fed_back_values_are_answered(scripted):
    engine, client = scripted
    r = ask(client, engine, "ok", messages=[*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "12:00"}]}])
    assert r.choices[0].message.content == "ok"
    assert '{"name": "get_time", "arguments": {}}' in engine.prompt_text()
    assert "12:00" in engine.prompt_text()
    # an assistant's calls with content [] (some clients send it): read as no content, not a 400
    r = ask(client, engine, "ok", messages=[*ASK, {"role": "assistant", "content": [], "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"}])
    assert r.choices[0].message.content == "ok" and "12:00" in engine.prompt_text()


def test_parallel_tool_calls_false_keeps_the_first_call(scripted):
    engine, client = scripted
    r = ask(client, engine, TWO_CALLS, parallel_tool_calls=False)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather"]
    _, content, calls, finish = streamed(client, engine, TWO_CALLS, parallel_tool_calls=False)
    assert [c[1] for c in calls] == ["get_weather"] and finish == "tool_calls"
    with pytest.raises(openai.BadRequestError):
        ask(client, engine, TWO_CALLS, extra_body={"parallel_tool_calls": "no"})
    # a call broken after its start went out is not the first call made: the next one is
    answer = MALFORMED + "\n" + TWO_CALLS.split("\n", 1)[1]
    r = ask(client, engine, answer, parallel_tool_calls=False)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather"]
    _, content, calls, finish = streamed(client, engine, answer, parallel_tool_calls=False)
    assert [(c[1], c[2]) for c in calls] == [("get_weather", '{"city": "Paris"\n'),
                                             ("get_weather", '{"city": "Paris"}')]
    assert finish == "tool_calls" and content == r.choices[0].message.content


@pytest.fixture(scope="module")
def real_tool_client(tiny_models, tool_model, tmp_path_factory):
    """The real engine on a tiny random-weight model whose tokenizer has the tool template."""
    import shutil

    from app.server import create_app
    from app.commands.serve import load_model
    from app.services.engine_host import EngineHost
    from tests.app.server.conftest import API_KEY, LiveServer, tiny_options

    folder = tmp_path_factory.mktemp("tiny-tools") / "model"
    shutil.copytree(tiny_models["llama-tied"], folder)
    shutil.copy(tool_model / "chat_template.jinja", folder / "chat_template.jinja")
    host = EngineHost()
    load_model(host, tiny_options(folder))
    try:
        with LiveServer(create_app(host, api_key=API_KEY)) as live:
            with openai.OpenAI(base_url=f"{live.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
                yield host, c
    finally:
        assert host.shutdown()


def test_the_real_engine_answers_a_forced_call(real_tool_client):
    """The whole rendered prompt (tools, the forced opening) reaches the engine; a random
    model's continuation is a call if it happens to parse, else content that begins with
    the forced opening."""
    host, client = real_tool_client
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=host.model_info.name, messages=ASK, tools=[WEATHER, TIME],
                                       tool_choice=choice, temperature=0, max_tokens=6)
    tok = host.engine.tokenizer
    text = tok.render_chat(ASK, tools=[WEATHER, TIME]) + '<tool_call>\n{"name": "get_weather", "arguments":'
    assert r.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))
    message = r.choices[0].message
    if message.tool_calls is None:
        assert message.content.startswith('<tool_call>\n{"name": "get_weather", "arguments":')
        assert r.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model=host.model_info.name, messages=ASK, tools=[WEATHER, TIME],
                                                 tool_choice=choice, temperature=0, max_tokens=6, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == (message.content or "")


def test_deeply_nested_tool_values_are_a_400_not_a_500(scripted):
    """JSON nested past Python's recursion limit (a 200 KB body) in a fed-back call's
    arguments or a tool's parameters: a 400, never a 500. Sent as raw text: the client's
    own JSON encoder would hit the limit first."""
    import httpx

    engine, client = scripted
    deep = "[" * 100_000 + "]" * 100_000
    fed_back = json.dumps({"model": "scripted", "tools": [WEATHER], "messages": [*ASK, {
        "role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "get_weather", "arguments": deep}}]}]})
    nested = '{"type": "object", "properties": {"x": ' * 600 + '{"type": "object"}' + "}}" * 600
    deep_tool = ('{"model": "scripted", "messages": ' + json.dumps(ASK) + ', "tools": [{"type": "function", '
                 '"function": {"name": "deep", "parameters": ' + nested + "}}]}")
    for body in (fed_back, deep_tool):
        engine.answers[:] = ["unused"]
        r = httpx.post(f"{client.base_url}chat/completions", content=body.encode(), timeout=60,
                       headers={"Authorization": f"Bearer {client.api_key}", "Content-Type": "application/json"})
        assert r.status_code == 400, r.text[:300]


def test_tool_requests_keep_special_tokens_so_tags_marked_special_survive(scripted):
    """Some models' tokenizers mark <tool_call> special: decoded with special tokens skipped,
    the tags would vanish and the call come back as bare JSON."""
    engine, client = scripted
    ask(client, engine, "Plain.")
    assert engine.params[-1].skip_special_tokens is False
    ask(client, engine, "Plain.", tool_choice="none")
    assert engine.params[-1].skip_special_tokens is True


# --- a forced call's grammar (tool_calls.forced_call_grammar) ---------------------------------

CITY = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                                          "required": ["city"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}


def _matcher(tool_model, grammar):
    import llguidance
    import llguidance.hf
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tool_model))
    return hf, llguidance.LLMatcher(llguidance.hf.from_tokenizer(hf), grammar.grammar, log_level=0)


def _accepts(tool_model, grammar, text: str) -> bool:
    """Whether the grammar takes ``text`` whole and is then complete."""
    hf, m = _matcher(tool_model, grammar)
    ids = hf.encode(text, add_special_tokens=False)
    return m.validate_tokens(ids) == len(ids) and m.consume_tokens(ids) and m.is_accepting()


@pytest.mark.parametrize(("name", "parallel", "text", "ok"), [
    ("get_weather", True, ' {"city": "Paris"}}\n</tool_call>', True),
    ("get_weather", True, ' {"city": "Rome"}}\n</tool_call>', False),  # not in the schema's enum
    ("get_weather", True, ' {}}\n</tool_call>', False),  # a required argument missing
    ("get_weather", True, ' {"city": "Paris"}}', False),  # the call not closed
    (None, False, 'get_time", "arguments": {}}\n</tool_call>', True),
    (None, False, 'get_clock", "arguments": {}}\n</tool_call>', False),  # no such tool
    (None, True, 'get_time", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": '
                 '{"city": "Oslo"}}\n</tool_call>', True),  # a second call, parallel calls allowed
    (None, False, 'get_time", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": '
                  '{"city": "Oslo"}}\n</tool_call>', False),  # ... and not
])
def test_the_forced_call_grammar_takes_valid_calls_of_listed_tools_only(tool_model, name, parallel, text, ok):
    from app.server.tool_calls import forced_call_grammar

    grammar = forced_call_grammar("hermes", [CITY, CLOCK], name, parallel)
    assert grammar.kind == "lark"
    assert _accepts(tool_model, grammar, text) is ok


def test_llama3_json_calls_close_with_the_object(tool_model):
    from app.server.tool_calls import forced_call_grammar

    grammar = forced_call_grammar("llama3_json", [CITY, CLOCK], None, True)
    assert _accepts(tool_model, grammar, 'get_weather", "parameters": {"city": "Oslo"}}')
    assert not _accepts(tool_model, grammar, 'get_weather", "arguments": {"city": "Oslo"}}')


def test_forced_calls_carry_their_grammar_and_a_schema_it_cant_enforce_takes_any_object(scripted, tool_model,
                                                                                         caplog):
    from app.server import tool_calls

    tool_calls._checked_rule.cache_clear()  # its log says it once per schema, in the process
    tool_calls._forced_call_grammar.cache_clear()
    engine, client = scripted
    ask(client, engine, '{"city": "Oslo"}}\n</tool_call>', tool_choice={"type": "function", "function": {
        "name": "get_weather"}})
    assert engine.params[-1].structured.kind == "lark"
    ask(client, engine, 'Hello.')  # auto: no grammar
    assert engine.params[-1].structured is None
    # "not" can't be enforced: that tool's arguments are any object; the names and the close still hold
    odd = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"not": {"type": "number"}}}}}}
    with caplog.at_level("INFO", logger="app.server.tool_calls"):
        r = ask(client, engine, 'get_weather", "arguments": {"town": 3}}\n</tool_call>', tools=[odd, CLOCK],
                tool_choice="required")
    grammar = engine.params[-1].structured
    assert grammar.kind == "lark" and "can't be enforced" in caplog.text
    assert _accepts(tool_model, grammar, 'get_weather", "arguments": {"town": 3}}\n</tool_call>')
    assert not _accepts(tool_model, grammar, 'get_weather", "arguments": [3]}\n</tool_call>')
    assert not _accepts(tool_model, grammar, 'get_time", "arguments": {"town": 3}}\n</tool_call>')
    assert not _accepts(tool_model, grammar, 'get_clock", "arguments": {}}\n</tool_call>')
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_forced_call_grammars_are_kept_per_tool_set_and_held_to_a_size():
    from app.server import tool_calls

    first = tool_calls.forced_call_grammar("hermes", [CITY, CLOCK], None, True)
    assert tool_calls.forced_call_grammar("hermes", [json.loads(json.dumps(CITY)), CLOCK], None, True) is first
    assert tool_calls.forced_call_grammar("hermes", [CITY, CLOCK], None, False) is not first

    def wide(name, fields):
        return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {
            f"field_{i}_{'x' * 40}": {"type": "string", "description": "y" * 200} for i in range(fields)}}}}

    # a schema past structured output's limit: that tool's arguments are any object
    grammar = tool_calls.forced_call_grammar("hermes", [wide("wide", 300), CLOCK], None, True)
    assert len(json.dumps(wide("wide", 300))) > tool_calls.MAX_SCHEMA_CHARS and "field_0" not in grammar.schema
    # tools whose schemas make a grammar past MAX_GRAMMAR_CHARS: the opening alone
    many = [wide(f"wide{k}", 200) for k in range(6)]
    assert tool_calls.forced_call_grammar("hermes", many[:2], None, True) is not None
    assert tool_calls.forced_call_grammar("hermes", many, None, True) is None


@pytest.mark.parametrize(("text", "ok"), [
    (' {"city": "Paris"}}\n</tool_call>', True),
    (' {"city": "Paris"}}\n</tool_call>\n', True),  # one newline may end the answer
    (' {"city":"Paris"}}\n</tool_call>', False),  # the JSON layout is structured output's
    (' {"city": "Paris"}}\n</tool_call>\n\n', False),
])
def test_the_layout_of_a_forced_call(tool_model, text, ok):
    from app.server.tool_calls import forced_call_grammar

    assert _accepts(tool_model, forced_call_grammar("hermes", [CITY, CLOCK], "get_weather", True), text) is ok


def test_arguments_follow_the_schemas_property_order(tool_model):
    """The grammar engine holds properties to the schema's order: the tools' own order (the
    one the prompt shows), never a sorted one."""
    from app.server.tool_calls import forced_call_grammar

    tool = {"type": "function", "function": {"name": "book", "parameters": {
        "type": "object", "properties": {"zeta": {"type": "string"}, "alpha": {"type": "string"}},
        "required": ["zeta", "alpha"], "additionalProperties": False}}}
    grammar = forced_call_grammar("hermes", [tool], "book", True)
    assert _accepts(tool_model, grammar, ' {"zeta": "a", "alpha": "b"}}\n</tool_call>')
    assert not _accepts(tool_model, grammar, ' {"alpha": "b", "zeta": "a"}}\n</tool_call>')


def test_tags_held_as_special_tokens_are_taken_as_their_tokens(tool_model):
    """A tokenizer that holds the tags as special tokens: a grammar's string never matches a
    special token (llguidance), so without the ids the model could only spell the close in
    pieces, and a second call could never open with its tag token."""
    import llguidance
    import llguidance.hf
    from transformers import AutoTokenizer

    from app.server.tool_calls import forced_call_grammar, tag_ids
    from engine.tokenizer import Tokenizer

    hf = AutoTokenizer.from_pretrained(str(tool_model))
    hf.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    tags = tag_ids(Tokenizer(hf))
    assert [t for t, _ in tags] == ["<tool_call>", "</tool_call>"]
    open_id, close_id = (i for _, i in tags)
    vocabulary = llguidance.hf.from_tokenizer(hf)
    text = hf.encode('get_time", "arguments": {}}\n', add_special_tokens=False)
    second = hf.encode('\n{"name": "get_time", "arguments": {}}\n', add_special_tokens=False)
    answer = text + [close_id] + hf.encode("\n", add_special_tokens=False) + [open_id] + second + [close_id]
    spelled = text + hf.encode("</", add_special_tokens=False) + hf.encode("tool_call>", add_special_tokens=False)

    def accepts(grammar, ids):
        m = llguidance.LLMatcher(vocabulary, grammar.grammar, log_level=0)
        return m.validate_tokens(ids) == len(ids) and m.consume_tokens(ids) and m.is_accepting()

    with_ids = forced_call_grammar("hermes", [CITY, CLOCK], None, True, tags)
    assert accepts(with_ids, answer) and accepts(with_ids, spelled)
    assert not accepts(forced_call_grammar("hermes", [CITY, CLOCK], None, True), answer)


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_a_random_model_made_to_call_writes_a_valid_call(real_tool_client, choice):
    """The real engine on random weights, held to the grammar: the answer is a call of a
    listed tool with arguments valid under its schema, whole and streamed alike."""
    host, client = real_tool_client
    kwargs = dict(model=host.model_info.name, messages=ASK, tools=[CITY, CLOCK], tool_choice=choice, temperature=0,
                  max_tokens=40, parallel_tool_calls=False)
    r = client.chat.completions.create(**kwargs)
    (call,) = r.choices[0].message.tool_calls
    args = json.loads(call.function.arguments)
    assert (call.function.name, args) in [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"}),
                                           ("get_time", {})]
    if choice != "required":
        assert call.function.name == "get_weather"
    assert r.choices[0].finish_reason == "tool_calls"
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed_args = "".join(tc.function.arguments or "" for c in chunks for tc in (c.choices[0].delta.tool_calls or []))
    assert json.loads(streamed_args) == args


def test_a_tokenizer_the_grammar_engine_cant_read_keeps_the_opening_only(tool_model, monkeypatch, caplog):
    """A forced call on a model whose tokenizer llguidance can't read is still answered,
    held by its opening alone (the engine would refuse a grammar for it), and says why."""
    import llguidance.hf
    from transformers import AutoTokenizer

    from app.server.schemas import ChatCompletionRequest
    from app.server.tool_calls import tool_setup
    from engine.api import grammar_unavailable
    from engine.tokenizer import Tokenizer

    body = ChatCompletionRequest(model="m", messages=ASK, tools=[CITY, CLOCK], tool_choice="required")
    readable = Tokenizer(AutoTokenizer.from_pretrained(str(tool_model)))
    width = readable.vocab_size
    assert grammar_unavailable(readable, width) is None
    assert tool_setup(body, readable, width).grammar.kind == "lark"

    def unreadable(*args, **kwargs):
        raise ValueError("no byte-level vocabulary")

    monkeypatch.setattr(llguidance.hf, "from_tokenizer", unreadable)
    odd = Tokenizer(AutoTokenizer.from_pretrained(str(tool_model)))
    with caplog.at_level("INFO", logger="app.server.tool_calls"):
        setup = tool_setup(body, odd, width)
    assert setup.prefix and setup.grammar is None
    assert "no byte-level vocabulary" in grammar_unavailable(odd, width) and "opening only" in caplog.text
    assert grammar_unavailable(readable, width) is None  # remembered per tokenizer


def test_the_responses_api_forces_a_valid_call_too(real_tool_client):
    """/v1/responses on the real engine: the same grammar, the call a function_call item."""
    host, client = real_tool_client
    flat = [{"type": "function", **t["function"]} for t in (CITY, CLOCK)]
    r = client.responses.create(model=host.model_info.name, input=ASK[0]["content"], tools=flat,
                                tool_choice="required", temperature=0, max_output_tokens=40, parallel_tool_calls=False)
    (call,) = r.output
    assert call.type == "function_call" and call.status == "completed"
    from engine.runner.grammar import token_vocabulary  # the server asked the engine's own, built once

    engine = host.engine
    assert token_vocabulary(engine.tokenizer, host.model_info.vocab_size) is engine.runner.token_vocabulary
    assert (call.name, json.loads(call.arguments)) in [("get_weather", {"city": "Paris"}),
                                                       ("get_weather", {"city": "Oslo"}), ("get_time", {})]
