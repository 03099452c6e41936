"""``POST /v1/responses``: OpenAI's Responses API, stateless — text in (``input`` as a
string or a list of message items, ``instructions``), text and function calls out, whole
or as the API's stream of typed events (``app.server.response_events``).

A Responses request becomes a chat request (``instructions`` as the system message, each
input item as a message) and runs through the same checks, chat template and engine as
/v1/chat/completions; its errors name the Responses parameters (``input``,
``max_output_tokens``). The server keeps nothing: ``previous_response_id`` and
``store: true`` are a 400 that says so (send the whole conversation in ``input``).

Function tools (``{"type": "function", "name", "parameters", ...}``, the Responses API's
flat shape) become chat's tools, with ``tool_choice`` (a named one is
``{"type": "function", "name": ...}``) and ``parallel_tool_calls``: the same parsers and,
for a forced call, the same grammar as chat (``app.server.tool_calls``). The answer's calls
are ``function_call`` output items (after a ``message`` item when the model also wrote
text); a client sends them back as ``function_call`` input items with their results as
``function_call_output`` items, which become the assistant's ``tool_calls`` and tool
messages. Hosted tools (web search, file search, computer use...) are a 400.

``include: ["message.output_text.logprobs"]`` (with ``top_logprobs`` 0 to 20) gives each
output_text part its tokens' ``logprobs`` (chat's entries: ``token``, ``logprob``, ``bytes``,
``top_logprobs``), and each streamed ``response.output_text.delta`` its own tokens'; not with
tools in play yet (a 400: a call's tokens belong to no output_text). ``truncation: "auto"``
leaves out the earliest turns (whole, up to a later user message) when the input and
``max_output_tokens`` overflow the context, as OpenAI drops items from the start.
"""

from __future__ import annotations

import re
import time
from typing import Any, Optional, Union

from fastapi import Request
from pydantic import ValidationError

from app.server.errors import ApiError, validation_message
from app.server.logprobs import Logprobs
from app.server.response_events import ResponseShapes, response_events, whole_output
from app.server.schemas import Bool, ChatCompletionRequest, Float, Int, Str, _Body
from app.server.service import OpenAIService, body_size, collect, failure
from app.server.stream import EventStream
from app.server.translate import extra_fields, refuse_vllm_extensions
from app.services.ids import unique_hex

STATELESS = ("this server is stateless: it keeps no responses, so {what}. Send the whole conversation in "
             "'input' (earlier answers as assistant messages) instead.")
#: Content part types that carry text (a client's own and a previous answer's, sent back).
TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
#: Chat parameter -> the Responses parameter it comes from (for error messages).
RENAMED = {"max_completion_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format"}
#: The ``include`` value that asks for each output_text token's logprobs.
LOGPROBS = "message.output_text.logprobs"
#: Hearth's sampling extensions, passed on as they are.
EXTRAS = ("top_k", "min_p", "repetition_penalty", "seed", "presence_penalty", "frequency_penalty", "ignore_eos",
          "stop_token_ids")


class ResponsesRequest(_Body):
    """The Responses API's request (the fields Hearth reads; others are kept and ignored)."""

    model: Optional[Str] = None
    input: Union[Str, list[Any]]
    instructions: Optional[Str] = None
    max_output_tokens: Optional[Int] = None
    temperature: Optional[Float] = None
    top_p: Optional[Float] = None
    stream: Optional[Bool] = None
    previous_response_id: Optional[Str] = None
    store: Optional[Bool] = None
    tools: Optional[list[Any]] = None
    tool_choice: Any = None
    parallel_tool_calls: Optional[Bool] = None
    text: Optional[dict[str, Any]] = None
    metadata: Optional[dict[str, Any]] = None
    user: Optional[Str] = None
    top_logprobs: Optional[Int] = None
    include: Optional[list[Str]] = None
    truncation: Optional[Str] = None


def _text_of(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or a list of input_text parts.", where)
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise ApiError(400, f"{where}.{k} is a {kind!r} part: this server reads text only "
                           "({'type': 'input_text', 'text': ...}).", f"{where}.{k}")
        texts.append(part["text"])
    return "".join(texts)


def _call_item(item: dict, where: str) -> dict:
    """A ``function_call`` input item (a call the model made, sent back) as a chat tool call."""
    for key in ("call_id", "name", "arguments"):
        if not isinstance(item.get(key), str):
            raise ApiError(400, f"{where}.{key} must be a string: send the function_call item as the response "
                           "gave it ({'type': 'function_call', 'call_id', 'name', 'arguments'}).", f"{where}.{key}")
    return {"id": item["call_id"], "type": "function", "function": {"name": item["name"],
                                                                    "arguments": item["arguments"]}}


def _output_item(item: dict, where: str, calls: set[str]) -> dict:
    """A ``function_call_output`` input item (a call's result) as a chat tool message."""
    if not isinstance(item.get("call_id"), str):
        raise ApiError(400, f"{where}.call_id must be a string: the call_id of the function_call it answers.",
                       f"{where}.call_id")
    if item["call_id"] not in calls:
        raise ApiError(400, f"{where} answers the call {item['call_id']!r}, but no function_call item before it "
                       "has that call_id: send the call (as the response gave it) before its output.",
                       f"{where}.call_id")
    return {"role": "tool", "tool_call_id": item["call_id"], "content": _text_of(item.get("output"),
                                                                                 f"{where}.output")}


class Origins:
    """Where each chat message (and each of its tool calls) came from in the Responses
    request: ``instructions``, ``input``, or ``input.N``, so that a chat check's error names
    the item the client sent."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.calls: dict[tuple[int, int], str] = {}

    def param(self, param: str) -> str:
        """``messages.M...`` (``messages.M.tool_calls.K.function...``) as the Responses path."""
        match = re.match(r"messages\.(\d+)(\.tool_calls\.(\d+)(\.function)?)?", param)
        if match is None or int(match[1]) >= len(self.messages):
            return param
        m = int(match[1])
        if match[3] is not None and (m, int(match[3])) in self.calls:
            return self.calls[(m, int(match[3]))] + param[match.end():]
        return self.messages[m] + param[len(f"messages.{m}"):]

    def text(self, message: str) -> str:
        """``messages[M]`` and ``messages.M...`` paths in an error's text as the Responses item."""
        message = re.sub(r"messages\[(\d+)\]", lambda g: self.messages[int(g[1])] if int(g[1]) < len(self.messages)
                         else g[0], message)
        return re.sub(r"messages\.\d+(?:\.[A-Za-z_0-9]+)*", lambda g: self.param(g[0]), message)


def messages_of(body: ResponsesRequest, origins: Origins | None = None, skip: int = 0) -> list[dict]:
    """``instructions`` and ``input`` as chat messages; a 400 for what isn't text or a
    function call / its output. Calls that follow an assistant message (or each other) join
    its ``tool_calls``, as the Responses API splits one assistant turn into items.
    ``origins`` records where each message came from. ``skip``: input items left out from
    the start (``truncation: "auto"``), with the outputs of the calls among them."""
    origins = origins if origins is not None else Origins()
    messages = [] if body.instructions is None else [{"role": "system", "content": body.instructions}]
    origins.messages[:] = ["instructions"] * len(messages)
    if isinstance(body.input, str):
        origins.messages.append("input")
        return messages + [{"role": "user", "content": body.input}]
    calls: set[str] = set()
    dropped: set[str] = set()  # the calls of the items skipped
    leading = _leading_instructions(body.input)  # never skipped: the model's instructions
    for i, item in enumerate(body.input):
        where = f"input.{i}"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if leading <= i < skip:
            if kind == "function_call" and isinstance(item.get("call_id"), str):
                dropped.add(item["call_id"])
            continue
        if kind == "function_call_output" and item.get("call_id") in dropped and item.get("call_id") not in calls:
            continue  # its call was cut: the output alone would answer nothing
        if kind == "function_call":
            call = _call_item(item, where)
            calls.add(call["id"])
            if not (messages and messages[-1]["role"] == "assistant"):
                messages.append({"role": "assistant", "content": None})
                origins.messages.append(where)
            made = messages[-1].setdefault("tool_calls", [])
            origins.calls[(len(messages) - 1, len(made))] = where
            made.append(call)
            continue
        if kind == "function_call_output":
            messages.append(_output_item(item, where, calls))
            origins.messages.append(where)
            continue
        if kind != "message":
            raise ApiError(400, f"{where} is a {kind!r} item: this server takes message, function_call and "
                           "function_call_output items ({'role': 'user', 'content': ...}).", where)
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise ApiError(400, f"{where}.role must be user, assistant, system or developer, got {role!r}.",
                           f"{where}.role")
        messages.append({"role": role, "content": _text_of(item.get("content"), f"{where}.content")})
        origins.messages.append(where)
    if len(messages) == (body.instructions is not None):
        raise ApiError(400, "input is empty: send some text, or at least one message.", "input")
    return messages


def _refuse(body: ResponsesRequest) -> None:
    refuse_vllm_extensions(extra_fields(body), takes_guided_json=False,
                           guided_json_instead="give a JSON Schema as text.format instead.")
    if body.previous_response_id is not None:
        raise ApiError(400, STATELESS.format(what="previous_response_id can't name an earlier one"),
                       "previous_response_id", "unsupported_parameter")
    if body.store:
        raise ApiError(400, STATELESS.format(what="store must be false (or left out)"), "store",
                       "unsupported_parameter")
    text_format(body)  # a bad one: a 400 now, before anything else
    if body.truncation not in (None, "auto", "disabled"):
        raise ApiError(400, f"truncation must be 'auto' or 'disabled', got {body.truncation!r}.", "truncation")
    if body.top_logprobs and LOGPROBS not in (body.include or ()):
        raise ApiError(400, f"top_logprobs needs include: ['{LOGPROBS}'] (the logprobs come only when included).",
                       "top_logprobs")
    if body.max_output_tokens is not None and body.max_output_tokens <= 0:
        raise ApiError(400, f"max_output_tokens must be a positive integer, got {body.max_output_tokens}.",
                       "max_output_tokens")


def text_format(body: ResponsesRequest) -> dict | None:
    """``text.format`` as chat's ``response_format`` (None: plain text). The Responses API
    flattens json_schema's fields (``{"type": "json_schema", "name", "schema", "strict"}``)
    where chat nests them under ``json_schema``."""
    text = body.text if body.text is not None else {}
    if not isinstance(text, dict):
        raise ApiError(400, "text must be an object, e.g. {\"format\": {\"type\": \"json_object\"}}.", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type", "text"), str):
        raise ApiError(400, "text.format must be an object with a type: text, json_object or json_schema.",
                       "text.format")
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict", "description")
                                                       if k in fmt}}
    raise ApiError(400, f"text.format type must be text, json_object or json_schema, got {kind!r}.", "text.format")


def chat_tools(body: ResponsesRequest) -> dict:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` in chat's shapes (chat checks
    them further); a 400 for a tool that isn't a function."""
    out: dict = {}
    if body.tools is not None:
        if not isinstance(body.tools, list):
            raise ApiError(400, "tools must be a list of function tools.", "tools")
        tools = []
        for i, tool in enumerate(body.tools):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ApiError(400, f"tools.{i} is a {kind!r} tool: this server calls functions only "
                               "({'type': 'function', 'name': ..., 'parameters': {...}}); hosted tools (web_search, "
                               "file_search, computer use...) are not available here.", f"tools.{i}",
                               "unsupported_parameter")
            # (the SDK's typed params send parameters, strict... as null when not given)
            tools.append({"type": "function", "function": {
                k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}})
        out["tools"] = tools
    choice = body.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise ApiError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'name': "
                           "...}.", "tool_choice")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        out["tool_choice"] = choice
    if body.parallel_tool_calls is not None:
        out["parallel_tool_calls"] = body.parallel_tool_calls
    return out


def wants_logprobs(body: ResponsesRequest) -> bool:
    """Whether the answer's output_text parts carry their tokens' logprobs."""
    return LOGPROBS in (body.include or ())


def chat_request(body: ResponsesRequest, origins: Origins | None = None, skip: int = 0) -> ChatCompletionRequest:
    """The chat request a Responses request runs as (``origins``: where its messages came
    from; ``skip``: input items left out from the start)."""
    _refuse(body)
    extra = {k: v for k, v in extra_fields(body).items() if k in EXTRAS}
    if wants_logprobs(body):
        extra.update(logprobs=True, top_logprobs=body.top_logprobs or 0)
    extra.update(chat_tools(body))
    fmt = text_format(body)
    if fmt is not None:
        extra["response_format"] = fmt
    try:
        return ChatCompletionRequest(model=body.model, messages=messages_of(body, origins, skip),
                                     temperature=body.temperature, top_p=body.top_p,
                                     max_completion_tokens=body.max_output_tokens, **extra)
    except ValidationError as e:
        message, param = validation_message(list(e.errors()))
        raise ApiError(400, message, param) from None


#: chat's nested tool fields (``tools.0.function.name``) -> the Responses API's flat ones
_TOOL_FIELD = re.compile(r"(tools\.\d+)\.function(?=\.|\b)")


def _renamed(e: ApiError, origins: Origins) -> ApiError:
    """A chat check's error, naming the Responses parameter (a message: the item it came from)."""
    message, param = origins.text(e.message), e.param
    if param is not None:
        param = origins.param(param)
    for chat, responses in RENAMED.items():
        message = message.replace(chat, responses)
        if param is not None and (param == chat or param.startswith(chat + ".")):
            param = responses + param[len(chat):]
    message = _TOOL_FIELD.sub(r"\1", message.replace("{'type': 'function', 'function': {'name': ...}}",
                                                       "{'type': 'function', 'name': ...}"))
    if param is not None:
        param = _TOOL_FIELD.sub(r"\1", param)
    return ApiError(e.status, message, param, e.code, e.headers)


async def _prepare(service: OpenAIService, body: ResponsesRequest, body_bytes: int, skip: int = 0):
    """The model's name, the engine's work and the tokenizer (``service.prepare``) for the
    request with its first ``skip`` input items left out; its errors name the Responses
    parameters."""
    origins = Origins()
    try:
        chat = chat_request(body, origins, skip)
        return await service.prepare(chat, chat=True, body_bytes=body_bytes)
    except ApiError as e:
        raise _renamed(e, origins) from None


def _cut_points(body: ResponsesRequest) -> list[int]:
    """Where ``truncation: "auto"`` may start the input: at each later user message (the
    conversation's earlier turns dropped whole, so a chat template that wants turns to
    alternate still gets them so)."""
    if isinstance(body.input, str):
        return []
    first = _leading_instructions(body.input)  # system / developer items at the start stay
    return [i for i, item in enumerate(body.input) if i > first and isinstance(item, dict)
            and item.get("type", "message") == "message" and item.get("role") == "user"]


def _leading_instructions(items: list) -> int:
    """How many system / developer messages open ``items`` (truncation keeps them)."""
    n = 0
    for item in items:
        if not (isinstance(item, dict) and item.get("type", "message") == "message"
                and item.get("role") in ("system", "developer")):
            break
        n += 1
    return n


async def _prepare_truncated(service: OpenAIService, body: ResponsesRequest, body_bytes: int):
    """``service.prepare`` for the request; with ``truncation: "auto"``, when the input
    (and max_output_tokens) overflow the context, the fewest earliest turns left out that
    make it fit (OpenAI drops items from the start too); ``instructions`` always stay."""
    try:
        return await _prepare(service, body, body_bytes)
    except ApiError as e:
        if body.truncation != "auto" or e.code != "context_length_exceeded":
            raise
        cuts, error = _cut_points(body), e
    lo, hi, best = 0, len(cuts) - 1, None  # the prompt shrinks as more is cut: a binary search
    while lo <= hi:
        mid = (lo + hi) // 2
        try:
            best = await _prepare(service, body, body_bytes, skip=cuts[mid]), mid
            hi = mid - 1
        except ApiError as e:
            if e.code != "context_length_exceeded":
                raise
            error, lo = e, mid + 1
    if best is None:
        raise ApiError(error.status, error.message + " (truncation 'auto' leaves out earlier turns only: the last "
                       "user message and what follows it, with the instructions, don't fit by themselves.)",
                       error.param, error.code)
    return best[0]


async def create_response(service: OpenAIService, body: ResponsesRequest, request: Request):
    model, job, tokenizer = await _prepare_truncated(service, body, body_size(request))
    logprobs = None
    if wants_logprobs(body):
        if job.tools is not None:
            raise ApiError(400, f"include '{LOGPROBS}' can't be combined with tools yet (a call's tokens belong to "
                           "no output_text): leave out one of them, or set tool_choice 'none'.", "include",
                           "unsupported_parameter")
        logprobs = Logprobs(True, tokenizer)
    shapes = ResponseShapes(f"resp_{unique_hex(32)}", int(time.time()), model, body, job.tools, logprobs)
    (choice,) = choices = service.submit(job)
    if body.stream:
        return EventStream(response_events(service, choice, shapes), on_close=lambda: service.done(choices))
    try:
        answered = await collect(choices, request)
    finally:
        service.done(choices)
    if not answered:
        raise ApiError(400, "the client closed the connection.")
    error = failure(choice)
    if error is not None:
        raise error
    return shapes.response(whole_output(shapes, choice.text, choice.finish, choice.logprobs), choice.finish)
