"""Refusals in OpenAI's error shape with OpenAI's status: bad JSON, wrong types and
out-of-range values (400, never 422 or 500), the API key (401), another model (404), a
body too large (413), a body that never arrives (408), no model loaded (503)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from app.server import create_app
from app.services.engine_host import EngineHost
from tests.app.server.conftest import API_KEY, LiveServer

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MESSAGES = [{"role": "user", "content": "Hi"}]


def post(live, path: str, body=None, headers=AUTH, **kw) -> httpx.Response:
    return httpx.post(f"{live.base_url}{path}", json=body, headers=headers, timeout=30, **kw)


def assert_error(r: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param != "any":
        assert error["param"] == param, error
    return error


BAD_CHAT = {
    "temperature-negative": ({"temperature": -0.5}, "temperature"),
    "temperature-a-string": ({"temperature": "0.5"}, "temperature"),
    "max-tokens-zero": ({"max_tokens": 0}, "max_tokens"),
    "max-tokens-negative": ({"max_tokens": -3}, "max_tokens"),
    "max-completion-tokens-zero": ({"max_completion_tokens": 0}, "max_completion_tokens"),
    "max-tokens-a-float": ({"max_tokens": 2.5}, "max_tokens"),
    "n-zero": ({"n": 0}, "n"),
    "n-a-bool": ({"n": True}, "n"),
    "top-p-zero": ({"top_p": 0}, "top_p"),
    "presence-penalty-out-of-range": ({"presence_penalty": 3}, "presence_penalty"),
    "stop-a-number": ({"stop": 5}, "stop"),
    "stop-empty-string": ({"stop": [""]}, "stop"),
    "seed-negative": ({"seed": -1}, "seed"),
    "stream-a-string": ({"stream": "yes"}, "stream"),
    "empty-messages": ({"messages": []}, "messages"),
    "messages-not-a-list": ({"messages": "hi"}, "messages"),
    "unknown-role": ({"messages": [{"role": "wizard", "content": "hi"}]}, "any"),
    # OpenAI refuses a message without content too (it rendered as an empty turn here)
    "user-message-without-content": ({"messages": [{"role": "user"}]}, "messages.0.content"),
    "assistant-without-content-or-calls": ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"},
                                                         {"role": "user", "content": "Again"}]}, "messages.1.content"),
    "system-content-null": ({"messages": [{"role": "system", "content": None}, {"role": "user", "content": "Hi"}]},
                            "messages.0.content"),
    "max-tokens-over-the-context": ({"max_tokens": 10_000}, "max_tokens"),
    "top-logprobs-without-logprobs": ({"top_logprobs": 2}, "top_logprobs"),
    "empty-stop": ({"stop": ["x", ""]}, "stop"),
    "top-logprobs-over-20": ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "five-stop-strings": ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    # the stop matcher's work grows with the square of a stop's length (100 KB cost gigabytes)
    "stop-string-too-long": ({"stop": "a" * 1_000}, "stop"),
    # OpenAI's deprecated functions were dropped without a word (the model never saw them)
    "legacy-functions": ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
    "legacy-function-call": ({"function_call": {"name": "f"}}, "function_call"),
    "audio-output": ({"modalities": ["text", "audio"]}, "modalities"),
    # content parts read as empty text before (OpenAI refuses them)
    "content-empty-list": ({"messages": [{"role": "user", "content": []}]}, "messages.0.content"),
    "text-part-without-text": ({"messages": [{"role": "user", "content": [{"type": "text"}]}]},
                               "messages.0.content.0.text"),
    "image-part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                   "messages.0.content.0"),
}


@pytest.mark.parametrize("name", BAD_CHAT)
def test_bad_chat_parameters_are_400(live, model_name, name):
    extra, param = BAD_CHAT[name]
    error = assert_error(post(live, "/v1/chat/completions", {"model": model_name, "messages": MESSAGES, **extra}),
                         400, param)
    assert error["type"] == "invalid_request_error"


def test_context_overflow_says_how_much_room_is_left(live, model_name):
    error = assert_error(post(live, "/v1/chat/completions", {"model": model_name, "messages": MESSAGES,
                                                             "max_tokens": 10_000}), 400)
    assert error["code"] == "context_length_exceeded" and "at most" in error["message"]
    long_prompt = "word " * 400  # over the 256-token context by itself
    error = assert_error(post(live, "/v1/completions", {"model": model_name, "prompt": long_prompt}), 400, "prompt")
    assert error["code"] == "context_length_exceeded"


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"", b'{"messages": [{"role": "user"'])
def test_bad_json_is_400(live, body):
    r = httpx.post(f"{live.base_url}/v1/chat/completions", content=body,
                   headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert_error(r, 400)


def test_a_body_not_utf8_is_a_400_that_says_so(live):
    body = '{"messages": [{"role": "user", "content": "caf\u00e9"}]}'.encode("latin-1")  # é as one byte
    error = assert_error(httpx.post(f"{live.base_url}/v1/chat/completions", content=body,
                                    headers={**AUTH, "Content-Type": "application/json"}, timeout=30), 400)
    assert "not valid UTF-8" in error["message"] and "error parsing" not in error["message"]


def test_a_body_nested_too_deeply_is_a_400_that_says_so(live):
    body = b'{"messages": ' + b"[" * 20000 + b"]" * 20000 + b"}"  # json.loads: RecursionError
    error = assert_error(httpx.post(f"{live.base_url}/v1/chat/completions", content=body,
                                    headers={**AUTH, "Content-Type": "application/json"}, timeout=30), 400)
    assert "nested too deeply" in error["message"] and "error parsing" not in error["message"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_json_without_its_content_type_is_a_400_that_names_the_header(live, model_name, content_type):
    """FastAPI reads a body as JSON only under a JSON Content-Type (a web page may POST
    text/plain to this machine without a CORS preflight): the error says which header to
    send, not "Input should be a valid dictionary"."""
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    for path, body in (("/v1/chat/completions", {"model": model_name, "messages": MESSAGES, "max_tokens": 1}),
                       ("/v1/responses", {"input": "Hi", "max_output_tokens": 1})):
        r = httpx.post(f"{live.base_url}{path}", content=json.dumps(body).encode(), headers=headers, timeout=30)
        error = assert_error(r, 400)
        assert "Content-Type: application/json" in error["message"] and "dictionary" not in error["message"]
        if content_type:
            assert repr(content_type) in error["message"]
    ok = httpx.post(f"{live.base_url}/v1/chat/completions", content=json.dumps(
        {"model": model_name, "messages": MESSAGES, "max_tokens": 1}).encode(),
        headers={**AUTH, "Content-Type": "application/json; charset=utf-8"}, timeout=60)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("body", [
    rb'{"messages": [{"role": "user", "content": "\ud800"}]}',  # a lone surrogate: JSON allows it
    rb'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
    rb'{"messages": [{"role": "user", "content": "Hi"}], "stop": ["\udfff"]}',
    rb'{"prompt": "\ud800 hi"}'])
def test_text_and_numbers_json_allows_but_the_model_cant_take_are_400(live, body):
    path = "/v1/completions" if b"prompt" in body else "/v1/chat/completions"
    r = httpx.post(f"{live.base_url}{path}", content=body, headers={**AUTH, "Content-Type": "application/json"},
                   timeout=30)
    assert_error(r, 400)


def test_bad_completion_prompts_are_400(live, model_name):
    for prompt in ("", [], [10**9], {"a": 1}):
        assert_error(post(live, "/v1/completions", {"model": model_name, "prompt": prompt}), 400)


def test_a_batch_of_prompts_may_not_ask_for_more_answers_than_n_allows(live, model_name):
    """12,000 prompts x n=64 in a 60 KB body once became 768,000 engine requests."""
    error = assert_error(post(live, "/v1/completions", {"model": model_name, "prompt": [[1]] * 5_000, "n": 64,
                                                        "max_tokens": 1}), 400, "prompt")
    assert "at most 64" in error["message"]
    assert post(live, "/v1/completions", {"model": model_name, "prompt": [[1], [2]], "n": 2,
                                          "max_tokens": 1}).status_code == 200


def test_a_chat_template_that_refuses_the_messages_is_400(live, host, model_name, monkeypatch):
    from jinja2.exceptions import TemplateError

    tokenizer = host.engine.tokenizer

    def refuse(*a, **k):
        raise TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")

    monkeypatch.setattr(tokenizer.hf_tokenizer, "apply_chat_template", refuse)  # (the template itself)
    error = assert_error(post(live, "/v1/chat/completions", {"model": model_name, "messages": MESSAGES}),
                         400, "messages")
    assert "roles must alternate" in error["message"]


def test_unknown_model_is_404_for_the_openai_client(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    assert e.value.body["param"] == "model" and "GET /v1/models" in e.value.body["message"]


def test_bad_request_reaches_the_openai_client_as_bad_request_error(client, model_name):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name, messages=MESSAGES, temperature=-1)
    assert "temperature" in e.value.message


def test_api_key_is_needed_everywhere_but_health(live, model_name):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/docs")):
            r = httpx.request(method, f"{live.base_url}{path}", headers=headers, timeout=30,
                              json={"messages": MESSAGES} if method == "POST" else None)
            error = assert_error(r, 401)
            assert API_KEY not in r.text and error["code"] == "invalid_api_key"
    # Refused before the body is read: bad JSON without the key is a 401 too.
    r = httpx.post(f"{live.base_url}/v1/completions", content=b"{oops", timeout=30)
    assert_error(r, 401)
    assert httpx.get(f"{live.base_url}/health", timeout=30).json() == {"status": "ok", "model": model_name}
    head = httpx.head(f"{live.base_url}/health", timeout=30)  # health checkers that send HEAD
    assert head.status_code == 200 and head.content == b""


def test_openai_client_with_a_wrong_key_gets_authentication_error(live):
    with openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="sk-wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            c.models.list()


def test_body_over_the_limit_is_413(live, model_name):
    big = {"model": model_name, "messages": [{"role": "user", "content": "x" * 70_000}]}
    assert_error(post(live, "/v1/chat/completions", big), 413)

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(20):
            yield b" " * 8192

    r = httpx.post(f"{live.base_url}/v1/chat/completions", content=chunked(),
                   headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert_error(r, 413)


def test_a_body_that_never_arrives_whole_is_408_not_a_held_connection(host):
    import json
    import socket

    with LiveServer(create_app(host, api_key=API_KEY, body_read_s=0.5)) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      + f"Authorization: Bearer {API_KEY}\r\nContent-Length: 1000\r\n\r\n".encode()
                      + b'{"messages": [')  # ... and nothing more
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                data = s.recv(65536)
                if not data:
                    break
                answer += data
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), head
        assert json.loads(body)["error"]["code"] == "request_timeout"


def test_unknown_route_is_404_in_openai_shape(live):
    r = httpx.get(f"{live.base_url}/v1/nothing-here", headers=AUTH, timeout=30)
    assert "/v1" in assert_error(r, 404)["message"]


def test_no_model_loaded_is_503_and_health_says_so():
    host = EngineHost()
    try:
        with LiveServer(create_app(host)) as server:  # no key set: none needed
            assert httpx.get(f"{server.base_url}/health", timeout=30).json()["status"] == "no_model"
            assert httpx.get(f"{server.base_url}/v1/models", timeout=30).json()["data"] == []
            for path, body in (("/v1/chat/completions", {"messages": MESSAGES}),
                               ("/v1/completions", {"prompt": "Hi"})):
                error = assert_error(httpx.post(f"{server.base_url}{path}", json=body, timeout=30), 503)
                assert error["code"] == "model_not_loaded"
    finally:
        assert host.shutdown()


def test_an_engine_whose_rank_ended_is_unhealthy_and_refuses_requests(tiny_models, monkeypatch):
    """A tensor-parallel rank that ended (a step raises EngineDeadError) ends the engine:
    the request in flight fails with the rank named, /health answers 503 with it (a checker
    restarts the server), and later requests are refused with it, not run."""
    from app.commands.serve import load_model
    from tests.engine.rank_ended import end_steps
    from tests.app.server.conftest import tiny_options

    why = "tensor parallel: rank 1 (cuda:1) ended (killed by signal 9). Reload the model."

    host = EngineHost()
    try:
        load_model(host, tiny_options(tiny_models["llama-tied"]))
        with LiveServer(create_app(host)) as server:
            assert httpx.get(f"{server.base_url}/health", timeout=30).json()["status"] == "ok"
            end_steps(monkeypatch, why)
            first = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3},
                               timeout=30)
            assert first.status_code >= 500 and "rank 1 (cuda:1) ended" in first.text, first.text
            health = httpx.get(f"{server.base_url}/health", timeout=30)
            assert health.status_code == 503, health.text
            assert health.json()["status"] == "error" and health.json()["error"] == why
            assert httpx.head(f"{server.base_url}/health", timeout=30).status_code == 503
            later = httpx.post(f"{server.base_url}/v1/chat/completions", json={"messages": MESSAGES}, timeout=30)
            assert later.status_code == 503 and "rank 1 (cuda:1) ended" in later.text, later.text
    finally:
        assert host.shutdown()


def test_a_request_refused_as_the_engine_died_is_a_503_not_a_bad_request():
    """A request that passed the dead-engine check just before the engine died is refused at
    its submit, before it started: that is the engine's state (503, try elsewhere or later),
    not the request's fault (400, don't retry); another refusal stays a 400."""
    from app.services.host_events import ended
    from app.server.service import Choice, failure

    why = "tensor parallel: rank 1 (cuda:1) ended (killed by signal 9). Reload the model."
    dead = Choice(events=None, engine_dead=lambda: why)
    dead.finish = ended("r1", "error", why)
    error = failure(dead)
    assert (error.status, error.code, error.message) == (503, "model_not_loaded", why)
    alive = Choice(events=None, engine_dead=lambda: None)
    alive.finish = ended("r2", "error", "the prompt is too long")
    assert failure(alive).status == 400


def test_cors_lets_in_only_the_allowed_origins(host):
    app = create_app(host, api_key=API_KEY, allowed_origins=["http://localhost:3000"])

    async def preflight(origin: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.options("/v1/chat/completions", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type,x-stainless-lang"})

    import asyncio

    ok = asyncio.run(preflight("http://localhost:3000"))
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "access-control-allow-origin" not in asyncio.run(preflight("http://evil.example")).headers


def test_without_a_key_only_requests_addressed_to_this_machine_are_answered(host):
    """DNS rebinding: a web page whose own domain re-resolves to 127.0.0.1 sends its Host
    name; without a key the server answers only loopback names."""
    from app.server.guard import loopback_host

    with LiveServer(create_app(host)) as server:
        assert httpx.get(f"{server.base_url}/v1/models", timeout=30).status_code == 200
        r = httpx.get(f"{server.base_url}/v1/models", headers={"Host": "attacker.example:8000"}, timeout=30)
        assert_error(r, 403)
        assert "--api-key" in r.json()["error"]["message"]
    for ok in (b"localhost:8000", b"127.0.0.1", b"127.1.2.3:80", b"[::1]:8000", b"LOCALHOST", b""):
        assert loopback_host(ok), ok
    for bad in (b"attacker.example", b"127.0.0.1.nip.io", b"10.0.0.1:8000", b"[::2]", b"localhost.evil.com"):
        assert not loopback_host(bad), bad


def test_an_assistant_message_may_leave_content_out_for_its_calls(live, model_name):
    """content is required, but not for an assistant's tool_calls, the older function_call,
    or a refusal (OpenAI's rule): those histories still run."""
    for extra in ({"tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                  {"function_call": {"name": "f", "arguments": "{}"}}, {"refusal": "I can't help with that."}):
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, **extra}]
        if "tool_calls" in extra:
            messages.append({"role": "tool", "tool_call_id": "c1", "content": "42"})
        messages.append({"role": "user", "content": "Go on"})
        r = post(live, "/v1/chat/completions", {"model": model_name, "messages": messages, "max_tokens": 2})
        assert r.status_code == 200, (extra, r.text)


def test_an_assistant_refusal_part_is_read_as_its_text(live, model_name):
    """OpenAI sends an assistant's refusal back as a content part {'type': 'refusal'}: read
    as that turn's text (it was refused as 'not text')."""
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]},
                {"role": "user", "content": [{"type": "text", "text": "Why?"}]}]
    r = httpx.post(f"{live.base_url}/v1/chat/completions", headers=AUTH, timeout=60,
                   json={"model": model_name, "messages": messages, "max_tokens": 2})
    assert r.status_code == 200, r.text
