"""Tool calling on /v1/chat/completions: ``tools`` and ``tool_choice`` checked and rendered
through the model's chat template (transformers' ``apply_chat_template(tools=...)``),
assistant ``tool_calls`` and ``tool`` messages fed back to it, and the calls the model
writes parsed out of its answer (``app.server.tool_parsers``) into OpenAI's shapes, whole
or as stream deltas.

``tool_choice``:

- ``"auto"`` (the default with tools): the tools are in the prompt; the model may call them.
- ``"none"``: the tools are left out of the prompt and the answer is not parsed for calls
  (OpenAI: "the model will not call any tool").
- ``"required"`` or a named function: the answer is *made* to start a call by writing the
  call's opening into the prompt after the generation prompt (Hermes/Qwen:
  ``<tool_call>\\n{"name": "`` or, named, ``... "get_weather", "arguments":``; Llama 3.1:
  ``{"name": ...``), and the rest of it is held to a grammar (``forced_call_grammar``, the
  engine's structured output): one of the tools' names (``"required"``), then arguments
  valid under that tool's ``parameters`` JSON Schema, then the call's close, so the
  answer is always a call of a listed tool with valid arguments (as vLLM's guided
  decoding does). With ``"required"`` and parallel calls allowed, more calls may follow
  (Hermes). A tool whose schema the grammar engine can't enforce (``not``, ``if``/``then``,
  ``uniqueItems``...) has its arguments held to any JSON object; a model whose tokenizer
  the grammar engine can't read gets the opening only, as before grammars: the model's
  JSON may then fail to parse and come back as plain content with ``finish_reason``
  ``stop``, as a malformed call under ``auto`` does. Grammars are kept per tool set (an
  agent sends the same tools every turn); a tokenizer that holds ``<tool_call>`` as one
  special token gets that token taken where the tag is.

``parallel_tool_calls: false`` keeps only the first call of an answer that writes several.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass, field

from jinja2.exceptions import TemplateError

from app.server.errors import ApiError
from app.server.tool_parsers import PARSERS, Delta, ToolParser, parse, parser_name_for
from engine.api import MAX_SCHEMA_CHARS, InvalidRequestError, StructuredOutput, grammar_unavailable

log = logging.getLogger(__name__)

#: OpenAI's rule for function names.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: How a forced call opens, per parser: (any function, the named one's format).
_FORCED = {"hermes": ('<tool_call>\n{"name": "', '<tool_call>\n{{"name": {name}, "arguments":'),
           "llama3_json": ('{"name": "', '{{"name": {name}, "parameters":')}


@dataclass(frozen=True, slots=True)
class ToolSetup:
    """One chat request's tools: what the template renders, which parser reads the answer,
    and the text forced at the answer's start (``tool_choice`` required / named)."""

    tools: list[dict]
    parser: str
    prefix: str = ""
    names: frozenset[str] = field(default_factory=frozenset)
    parallel: bool = True  # parallel_tool_calls: false keeps only the answer's first call
    grammar: StructuredOutput | None = None  # what the answer after ``prefix`` is held to

    def new_parser(self) -> ToolParser:
        return PARSERS[self.parser]()


def _template_text(tokenizer) -> str:
    template = getattr(getattr(tokenizer, "hf_tokenizer", None), "chat_template", None) or ""
    if isinstance(template, dict):  # named templates (default, tool_use, ...)
        return "\n".join(str(t) for t in template.values())
    return str(template)


def check_tools(tools) -> list[dict]:
    """``tools`` as OpenAI defines them (a list of ``{type: function, function: {name,
    description?, parameters?}}``, each name once), or a 400 naming the entry that is not."""
    out = []
    seen: dict[str, int] = {}  # each function's name -> its entry
    for i, tool in enumerate(tools or []):
        where = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ApiError(400, f"{where} must be {{'type': 'function', 'function': {{...}}}}: only function "
                           "tools are supported.", f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ApiError(400, f"{where}.function must be an object with a name (and parameters).",
                           f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ApiError(400, f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-', got "
                           f"{name!r}.", f"{where}.function.name")
        if name in seen:  # the model calls a function by its name: which one would run?
            raise ApiError(400, f"tools holds two functions named {name!r} (tools.{seen[name]} and {where}): "
                           "give each function its own name, or send it once.", "tools")
        seen[name] = i
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise ApiError(400, f"{where}.function.parameters must be a JSON Schema object.",
                           f"{where}.function.parameters")
        if "description" in fn and not isinstance(fn["description"], str):
            raise ApiError(400, f"{where}.function.description must be a string.", f"{where}.function.description")
        out.append({"type": "function", "function": fn})
    return out


def _choice(tool_choice, names: set[str]) -> str | None:
    """``tool_choice`` as "none" / "auto" / "required" or the named function's name."""
    if tool_choice is None:
        return "auto"
    if tool_choice in ("none", "auto", "required"):
        return tool_choice
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(name, str):
        raise ApiError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                       "{'name': ...}}.", "tool_choice")
    if name not in names:
        raise ApiError(400, f"tool_choice names the function {name!r}, which is not among tools "
                       f"({', '.join(sorted(names)) or 'none given'}).", "tool_choice")
    return name


def tool_setup(body, tokenizer, vocab_size: int) -> ToolSetup | None:
    """The request's tools, checked (None: no tools in play); a 400 for bad ``tools`` or
    ``tool_choice``, or a model whose chat template can't take tools. ``vocab_size``: the
    model's logits width (a forced call's grammar runs on it)."""
    tools = check_tools(body.tools)
    names = {t["function"]["name"] for t in tools}
    choice = _choice(body.tool_choice, names)
    if choice == "none" or not tools:
        if choice not in ("none", "auto"):
            raise ApiError(400, f"tool_choice {body.tool_choice!r} needs tools: send the functions to call.",
                           "tool_choice")
        return None
    parser = parser_name_for(_template_text(tokenizer))
    if parser is None:
        raise ApiError(400, "this model's chat template does not write tool calls in a format Hearth reads "
                       "(Hermes/Qwen '<tool_call>' JSON or Llama 3.1 JSON): leave out tools, or load a model "
                       "made for tool calling (Qwen2.5/Qwen3 Instruct, Llama 3.1 Instruct, Hermes).", "tools")
    prefix = ""
    if choice == "required":
        prefix = _FORCED[parser][0]
    elif choice != "auto":
        prefix = _FORCED[parser][1].format(name=json.dumps(choice))
    parallel = getattr(body, "parallel_tool_calls", None)  # a field OpenAI defines; kept as an extra
    if parallel is not None and not isinstance(parallel, bool):
        raise ApiError(400, "parallel_tool_calls must be true or false.", "parallel_tool_calls")
    parallel = parallel is not False
    grammar = None
    if prefix:
        problem = grammar_unavailable(tokenizer, vocab_size)
        if problem is None:
            grammar = forced_call_grammar(parser, tools, None if choice == "required" else choice, parallel,
                                          tag_ids(tokenizer))
        else:  # the opening alone, as for a schema the grammar can't enforce
            log.info("tool_choice: the call is forced by its opening only (no grammar): %s", problem)
    return ToolSetup(tools, parser, prefix, frozenset(names), parallel, grammar)


#: How a forced call goes on after its opening, per parser: between the name and the
#: arguments, and after the arguments (the close of the call).
_CALL_PARTS = {"hermes": ('", "arguments": ', "}\n</tool_call>"), "llama3_json": ('", "parameters": ', "}")}
#: Hermes's tags: a tokenizer may hold each as one special token, which a grammar's string
#: never matches (llguidance keeps special tokens out of text): the grammar takes its id too.
_TAGS = ("<tool_call>", "</tool_call>")
#: The largest forced-call grammar built (a request's tools' schemas, all of them); beyond
#: it, the opening alone. A tool's own schema is held to structured output's limit.
MAX_GRAMMAR_CHARS = 256 * 1024


def tag_ids(tokenizer) -> tuple[tuple[str, int], ...]:
    """The Hermes tags that ``tokenizer`` writes as one token each, with that token's id."""
    hf = getattr(tokenizer, "hf_tokenizer", None)
    out = []
    for tag in _TAGS:
        try:
            ids = hf.encode(tag, add_special_tokens=False) if hf is not None else []
        except Exception:  # noqa: BLE001 - an odd tokenizer: the tag as text only
            ids = []
        if len(ids) == 1:
            out.append((tag, int(ids[0])))
    return tuple(out)


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a Lark string literal: JSON's escapes are the dialect's


def _lark_text(text: str, tags: tuple[tuple[str, int], ...] = ()) -> str:
    """A Lark expression for ``text``, each of ``tags`` in it also taken as its token."""
    for tag, token in tags:
        if tag in text:
            parts = [_lark_text(p, tags) if p else None for p in text.split(tag)]
            either = f"({_lark_string(tag)} | <[{token}]>)"
            return " ".join(x for i, p in enumerate(parts) for x in ((either,) if i else ()) + ((p,) if p else ()))
    return _lark_string(text)


def _arguments_rule(schema: dict) -> str:
    """A tool's arguments rule: an instance of its ``parameters`` (``schema``), or any object
    where the grammar engine can't enforce that schema or it is too long (logged)."""
    schema_json = json.dumps(schema)  # (key order kept: llguidance holds properties to it)
    if len(schema_json) > MAX_SCHEMA_CHARS:
        log.info("tool_choice: a tool's parameters schema is %d characters long (structured output takes at "
                 "most %d): its arguments are held to any JSON object", len(schema_json), MAX_SCHEMA_CHARS)
        return StructuredOutput.json_rule({"type": "object"})
    return _checked_rule(schema_json)


@functools.lru_cache(maxsize=256)
def _checked_rule(schema_json: str) -> str:
    """``_arguments_rule`` for a schema of at most ``MAX_SCHEMA_CHARS``, compiled once per
    schema: an agent sends the same tools every turn."""
    rule = StructuredOutput.json_rule(json.loads(schema_json))
    try:
        StructuredOutput("lark", f"start: {rule}\n")
    except InvalidRequestError as e:
        log.info("tool_choice: a tool's parameters schema can't be enforced (%s): its arguments are held to any "
                 "JSON object", e)
        return StructuredOutput.json_rule({"type": "object"})
    return rule


def forced_call_grammar(parser: str, tools: list[dict], name: str | None, parallel: bool,
                        tags: tuple[tuple[str, int], ...] = ()) -> StructuredOutput | None:
    """The grammar (llguidance's Lark dialect) of the answer after a forced call's opening:
    for ``name``, a space, its arguments and the close; for ``"required"`` (``name`` None),
    one of the tools' names first, and with ``parallel`` (Hermes) more whole calls after it,
    and a last newline allowed. Arguments are an instance of the tool's ``parameters`` (any
    object when it has none, or one the grammar engine can't enforce), laid out as
    structured output lays JSON out, properties in the schema's order; ``tags``
    (``tag_ids``) are taken as their tokens too. None where the whole can't be built
    (logged): the opening alone then, as before grammars. Kept per tool set (at most
    ``MAX_GRAMMAR_CHARS`` of schemas: no more is built, nor kept)."""
    key = json.dumps([t["function"].get("parameters") for t in tools])
    if len(key) > MAX_GRAMMAR_CHARS:
        log.info("tool_choice: the call is forced by its opening only (no grammar): the tools' schemas are %d "
                 "characters long (at most %d are built)", len(key), MAX_GRAMMAR_CHARS)
        return None
    names = tuple(t["function"]["name"] for t in tools)
    return _forced_call_grammar(parser, names, key, name, parallel, tags)


@functools.lru_cache(maxsize=128)
def _forced_call_grammar(parser, names, schemas_json, name, parallel, tags) -> StructuredOutput | None:
    between, close = _CALL_PARTS[parser]
    tags = tags if parser == "hermes" else ()
    rules, alternatives = [], []
    for i, (tool_name, schema) in enumerate(zip(names, json.loads(schemas_json))):
        if name is not None and tool_name != name:
            continue
        rules.append(f"args{i}: " + _arguments_rule(schema or {"type": "object"}))
        head = _lark_string(" " if name is not None else tool_name + between)
        alternatives.append(f"{head} args{i} {_lark_text(close, tags)}")
    if parser == "hermes":
        # (one newline may end the answer: a model trained on these calls may write it)
        more = f"({_lark_text(chr(10) + _FORCED['hermes'][0], tags)} call)*" if name is None and parallel else ""
        start = f"start: call {more} {_lark_string(chr(10))}?\ncall: " + " | ".join(alternatives)
    else:
        start = "start: " + " | ".join(alternatives)
    text = start + "\n" + "\n".join(rules) + "\n"
    if len(text) > MAX_GRAMMAR_CHARS:
        log.info("tool_choice: the call is forced by its opening only (no grammar): the tools' schemas make a "
                 "grammar of %d characters (at most %d are built)", len(text), MAX_GRAMMAR_CHARS)
        return None
    try:
        return StructuredOutput("lark", text)
    except InvalidRequestError as e:
        log.info("tool_choice: the call is forced by its opening only (no grammar): %s", e)
        return None


def tool_fields(message, i: int) -> dict:
    """An assistant message's ``tool_calls`` (arguments decoded: chat templates write them
    as objects) and a tool message's ``tool_call_id``, as the chat template takes them."""
    out = {}
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    if not message.tool_calls:
        return out
    if message.role != "assistant":
        raise ApiError(400, f"messages[{i}] has tool_calls but is a {message.role} message: only assistant "
                       "messages make calls.", f"messages.{i}.tool_calls")
    calls = []
    for j, call in enumerate(message.tool_calls):
        where = f"messages.{i}.tool_calls.{j}"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(400, f"{where} must be {{'id', 'type': 'function', 'function': {{'name', "
                           "'arguments'}}}.", where)
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except (ValueError, RecursionError):
                raise ApiError(400, f"{where}.function.arguments is not valid JSON: send the arguments the "
                               "call was answered with, as a JSON object in a string.",
                               f"{where}.function.arguments") from None
        calls.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    out["tool_calls"] = calls
    return out


def chat_prompt_ids(tokenizer, messages: list[dict], setup: ToolSetup | None) -> list[int]:
    """The chat prompt's token ids: the tools rendered by the template, then the forced
    opening of a call (``tool_choice`` required / named)."""
    if setup is None:
        return tokenizer.apply_chat_template(messages)
    try:
        text = tokenizer.render_chat(messages, tools=setup.tools)
    except InvalidRequestError:
        raise  # said well already (the caller makes it a 400)
    except (TemplateError, TypeError, ValueError, RecursionError) as e:  # a template may trip on a client's odd values
        raise ApiError(400, f"the model's chat template refuses these messages or tools: {e}", "messages") from None
    return tokenizer.encode(text + setup.prefix, add_special_tokens=False)


def _call_json(call) -> dict:
    return {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def chat_message(text: str, reason: str, setup: ToolSetup | None) -> tuple[dict, str]:
    """A whole answer's ``message`` and its ``finish_reason`` (``tool_calls`` when the
    model ended after writing calls)."""
    if setup is None:
        return {"role": "assistant", "content": text, "refusal": None}, reason
    parsed = parse(setup.new_parser(), setup.prefix + text)
    calls = parsed.calls if setup.parallel else parsed.calls[:1]
    if not calls:
        return {"role": "assistant", "content": parsed.content or "", "refusal": None}, reason
    message = {"role": "assistant", "content": parsed.content, "refusal": None,
               "tool_calls": [_call_json(c) for c in calls]}
    return message, "tool_calls" if reason == "stop" else reason


class ToolStream:
    """One streamed choice's deltas (OpenAI's chat chunk ``delta``s): content as it is sure,
    and each call as its start (index, id, type, ``function.name``, empty arguments) then
    its arguments in fragments as they are written."""

    def __init__(self, setup: ToolSetup) -> None:
        self._parser = setup.new_parser()
        self._parallel = setup.parallel
        self._shown: set[int] = set()  # the calls given out (parallel_tool_calls false: one)
        self._early = self._parser.feed(setup.prefix)

    @property
    def called(self) -> bool:
        """A call given out ended well (``finish_reason`` ``tool_calls``, as for the whole answer)."""
        return any(i in self._shown for i in self._parser.made)

    @property
    def made(self) -> list[int]:
        """The calls given out that ended well."""
        return [i for i in self._parser.made if i in self._shown]

    @property
    def broken(self) -> list[int]:
        """The calls given out that broke after their start went out (they end as sent)."""
        return [i for i in self._parser.broken if i in self._shown]

    def feed(self, text: str) -> list[dict]:
        early, self._early = self._early, []
        return self._out(early + self._parser.feed(text))

    def finish(self) -> list[dict]:
        early, self._early = self._early, []
        return self._out(early + self._parser.finish())

    def _out(self, deltas: list[Delta]) -> list[dict]:
        return [_delta(d) for d in deltas if d.index is None or self._shows(d.index)]

    def _shows(self, index: int) -> bool:
        """parallel_tool_calls false: a call is given out while no call given out before it
        was made or may still be (a call that broke after its start went out doesn't count,
        as the whole answer doesn't count it), so the one call made is the whole answer's."""
        if index not in self._shown:
            parser = self._parser
            if not self._parallel and any(i not in parser.broken for i in self._shown):
                return False
            self._shown.add(index)
        return True


def _delta(d: Delta) -> dict:
    if d.content is not None:
        return {"content": d.content}
    if d.name is not None:
        return {"tool_calls": [{"index": d.index, "id": d.call_id, "type": "function",
                                "function": {"name": d.name, "arguments": ""}}]}
    return {"tool_calls": [{"index": d.index, "function": {"arguments": d.arguments}}]}
