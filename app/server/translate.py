"""From an OpenAI request to the engine's: the prompts as token ids (tokenized here, so the
context check can count them), and each choice's SamplingParams.

Tokenizing in the server rather than the engine lets it refuse, with a 400, a prompt
whose ``max_tokens`` would run past the context (the engine would stop it at the context's
end with ``length``, which a client can't tell from a short ``max_tokens``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import lru_cache

from app.server.errors import ApiError, param_of
from app.server.schemas import ChatCompletionRequest
from app.server.tool_calls import ToolSetup, chat_prompt_ids, tool_fields, tool_setup
from engine.api import InvalidRequestError, SamplingParams, StructuredOutput, check_text

#: The most choices one request may ask for (each is a request on the engine).
MAX_N = 64
#: stop strings per request (OpenAI's limit) and their length (the matcher's work grows
#: with the square of it: a 100 KB stop string cost gigabytes)
MAX_STOPS = 4
MAX_STOP_CHARS = 256
#: OpenAI's default max_tokens for /v1/completions (chat's default is the rest of the context).
COMPLETIONS_MAX_TOKENS = 16
#: How many seeds SamplingParams takes (0 .. 2**64 - 1): choice j of a seeded request uses seed + j.
SEED_SPAN = 2**64


@dataclass(frozen=True, slots=True)
class Job:
    """What the engine runs for one OpenAI request: ``n`` choices per prompt, choice
    ``p * n + j`` being prompt ``p``'s ``j``th (OpenAI's order for several prompts)."""

    prompts: list[list[int]]
    params: list[SamplingParams]  # one per choice
    n: int
    logprobs: bool = False  # the answer carries logprobs
    tools: ToolSetup | None = None  # chat: the tools in play (their calls are parsed out)
    echo: list[str] | None = None  # completions' echo: each prompt's text, put before its answers
    # completions' echo with max_tokens 0: each prompt echoed (and scored, with logprobs),
    # nothing generated; ``params`` (checked as usual) are never submitted
    score_only: bool = False


def not_supported(body, chat: bool) -> None:
    """Refuse parameters the server can't honour yet, when they ask for something."""
    asked = {}
    if not chat:
        # response_format is chat's: a completions request asking for one would get
        # unconstrained text without a word.
        fmt = getattr(body, "response_format", None)
        asked.update(response_format=isinstance(fmt, dict) and fmt.get("type", "text") != "text")
        asked.update(suffix=bool(body.suffix),
                     best_of=body.best_of is not None and body.best_of != (body.n or 1))
    for name, on in asked.items():
        if on:
            raise ApiError(400, f"'{name}' is not supported by Hearth's server yet: leave it out.", name,
                           "unsupported_parameter")
    if chat:
        refuse_ignored_chat_fields(extra_fields(body))
    refuse_vllm_extensions(extra_fields(body), takes_guided_json=chat)


def refuse_ignored_chat_fields(extra: dict) -> None:
    """A 400 for OpenAI chat fields outside the schema that ask for something this server
    would otherwise drop without a word: the deprecated ``functions`` / ``function_call``
    (the model never saw the functions, so never called one) and audio output."""
    if extra.get("functions"):
        raise ApiError(400, "'functions' (OpenAI's deprecated form of tools) is not read here: send them as "
                       "tools, each {\"type\": \"function\", \"function\": {\"name\", \"parameters\"...}}.",
                       "functions", "unsupported_parameter")
    if isinstance(extra.get("function_call"), dict):
        raise ApiError(400, "'function_call' (OpenAI's deprecated form of tool_choice) is not read here: send "
                       "tool_choice {\"type\": \"function\", \"function\": {\"name\": ...}} with the function "
                       "in tools.", "function_call", "unsupported_parameter")
    modalities = extra.get("modalities")
    if extra.get("audio") is not None or (isinstance(modalities, list) and any(m != "text" for m in modalities)):
        raise ApiError(400, "this server writes text only: leave out 'audio' and any modality but \"text\".",
                       "modalities", "unsupported_parameter")


def extra_fields(body) -> dict:
    """The request's fields beyond the ones its schema names (vLLM's and other extensions)."""
    return getattr(body, "model_extra", None) or {}


def refuse_vllm_extensions(extra: dict, *, takes_guided_json: bool, guided_json_instead: str | None = None) -> None:
    """A 400 for the first of vLLM's extensions in ``extra`` that asks for something (absent,
    or its default, asks for nothing; ``takes_guided_json``: chat, where it is response_format's
    json_schema), saying what to do instead (``guided_json_instead`` for that one)."""
    for name, instead in VLLM_ONLY.items():
        value = extra.get(name)
        if value is None or (name == "guided_json" and takes_guided_json) or VLLM_DEFAULTS.get(name, _NO) == value:
            continue
        if name == "guided_json" and guided_json_instead:
            instead = guided_json_instead
        raise ApiError(400, f"'{name}' is one of vLLM's extensions, which Hearth's server doesn't follow: "
                       f"{instead}", name, "unsupported_parameter")


#: vLLM's request extensions a client may send expecting them to be honoured (each would be
#: ignored without a word, the output unconstrained or differently rendered), with what to do
#: instead; ``guided_json`` on chat is taken as response_format json_schema.
VLLM_ONLY = {
    "guided_json": "on completions there is no constrained output: use chat completions with response_format.",
    "guided_regex": "constrain the output with response_format json_schema (a string property's 'pattern').",
    "guided_choice": "constrain the output with response_format json_schema (an 'enum').",
    "guided_grammar": "constrain the output with response_format json_schema.",
    "structured_outputs": "use response_format json_schema.",
    "continue_final_message": "leave it out (the answer always starts a new assistant turn).",
    "add_generation_prompt": "leave it out (chat prompts always end with the assistant's turn opening).",
    "chat_template": "leave it out (the model's own chat template is used).",
    "chat_template_kwargs": "leave it out (the model's chat template is rendered with the messages and tools only).",
    # vLLM's sampling extensions (``stop_token_ids`` and ``ignore_eos`` are followed)
    "min_tokens": "leave it out (an answer may end at the end-of-text token or a stop string before that many).",
    "include_stop_str_in_output": "leave it out (a matched stop string is never part of the text, as with OpenAI).",
    "bad_words": "give the words' token ids a logit_bias of -100.",
    "use_beam_search": "leave it out (sampling or greedy decoding only).",
    "length_penalty": "leave it out (it weighs beams: there is no beam search).",
    "truncate_prompt_tokens": "shorten the prompt yourself (a prompt longer than the context is refused, not cut).",
    "echo": "leave it out on chat completions (completions take echo).",
}
#: (their defaults, which ask for nothing)
VLLM_DEFAULTS = {"continue_final_message": False, "add_generation_prompt": True, "chat_template_kwargs": {},
                 "min_tokens": 0, "include_stop_str_in_output": False, "bad_words": [], "use_beam_search": False,
                 "length_penalty": 1.0, "echo": False}
_NO = object()  # (no default)


MAX_TOP_LOGPROBS = 20


def top_logprobs(body, chat: bool) -> int | None:
    """How many most-likely tokens each step reports (None: no logprobs asked for)."""
    if chat:
        if body.top_logprobs is not None:
            if body.top_logprobs and not body.logprobs:  # (0 asks for nothing: vLLM takes it too)
                raise ApiError(400, "top_logprobs needs logprobs: true.", "top_logprobs")
            if not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
                raise ApiError(400, f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got "
                               f"{body.top_logprobs}.", "top_logprobs")
        return (body.top_logprobs or 0) if body.logprobs else None
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {body.logprobs}.",
                       "logprobs")
    return body.logprobs


def sampling(body, max_tokens: int = 1, seed: int | None = None, chat: bool = True) -> SamplingParams:
    """The request's SamplingParams (OpenAI's defaults where it says nothing); a bad
    value is a 400 naming the parameter."""
    def given(value, default):
        return default if value is None else value

    stop = body.stop
    stops = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    # OpenAI's limits: matching costs grow with the square of a stop string's length
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop may hold at most {MAX_STOPS} strings, got {len(stops)}.", "stop")
    if any(s == "" for s in stops):
        raise ApiError(400, "stop strings must be non-empty: leave the empty one out.", "stop")
    if any(isinstance(s, str) and len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"a stop string may be at most {MAX_STOP_CHARS} characters long.", "stop")
    try:
        for s in stops:
            check_text(s, "a stop string")
        return SamplingParams(
            max_tokens=max_tokens, temperature=given(body.temperature, 1.0), top_p=given(body.top_p, 1.0),
            top_k=given(body.top_k, 0), min_p=given(body.min_p, 0.0),
            repetition_penalty=given(body.repetition_penalty, 1.0),
            presence_penalty=given(body.presence_penalty, 0.0),
            frequency_penalty=given(body.frequency_penalty, 0.0), seed=seed, stop=stops,
            ignore_eos=given(body.ignore_eos, False), stop_token_ids=stop_token_ids(body),
            logprobs=top_logprobs(body, chat),
            logit_bias=logit_bias(body), structured=structured_output(body) if chat else None)
    except InvalidRequestError as e:
        raise ApiError(400, str(e), param_of(str(e))) from None


def stop_token_ids(body) -> tuple[int, ...]:
    """vLLM's ``stop_token_ids`` (an extension field): token ids that end the answer like the
    end-of-text token does (left out of the text)."""
    ids = extra_fields(body).get("stop_token_ids")
    if ids is None:
        return ()
    if not isinstance(ids, list) or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
        raise ApiError(400, f"stop_token_ids must be a list of token ids (integers >= 0), got {ids!r}.",
                       "stop_token_ids")
    return tuple(ids)


def logit_bias(body) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}`` as (id, bias) pairs; SamplingParams checks the
    count and the range, ``build_job`` the ids against the vocabulary."""
    pairs = []
    for key, value in (body.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit()):
            raise ApiError(400, f"logit_bias keys must be token ids (strings of digits), got {key!r}.", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ApiError(400, f"logit_bias values must be numbers from -100 to 100, got {value!r} for token "
                           f"{key}.", "logit_bias")
        pairs.append((int(key), value))
    return tuple(pairs)


def structured_output(body) -> StructuredOutput | None:
    """``response_format`` as the engine's constraint (None for text or none); a 400
    naming response_format when it is malformed or its schema can't be enforced."""
    fmt = body.response_format
    guided = extra_fields(body).get("guided_json")
    if guided is not None:  # vLLM's spelling of a JSON schema (its JSON text, or the schema itself)
        if fmt is not None and fmt.get("type", "text") != "text":
            raise ApiError(400, "give either response_format or guided_json, not both.", "guided_json")
        if isinstance(guided, str):
            try:
                guided = json.loads(guided)
            except ValueError as e:
                raise ApiError(400, f"guided_json is not JSON: {e}.", "guided_json") from None
            except RecursionError:
                raise ApiError(400, "guided_json is nested too deeply: simplify it.", "guided_json") from None
        if not isinstance(guided, dict):
            raise ApiError(400, "guided_json must be a JSON Schema (an object, or its JSON text).", "guided_json")
        fmt = {"type": "json_schema", "json_schema": {"name": "guided_json", "schema": guided}}
    kind = "text" if fmt is None else fmt.get("type")
    try:
        if kind == "text":
            return None
        if kind == "json_object":
            return _compiled("json_object", None)
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict):
                raise InvalidRequestError("response_format json_schema needs a 'json_schema' object with "
                                          "'name' and 'schema'.")
            name = spec.get("name")
            if name is not None and not (isinstance(name, str) and 0 < len(name) <= 64):
                raise InvalidRequestError("response_format's json_schema.name must be a string of 1 to 64 "
                                          "characters.")
            schema = spec.get("schema")
            try:
                text = None if schema is None else json.dumps(schema)
            except RecursionError:
                raise InvalidRequestError("response_format's schema is nested too deeply: simplify it.") from None
            return _compiled("json_schema", text)
        raise InvalidRequestError(f"response_format type must be text, json_object or json_schema, got {kind!r}.")
    except InvalidRequestError as e:
        if guided is not None:  # (said of response_format, which the client didn't send)
            raise ApiError(400, "guided_json: " + str(e).replace("response_format's ", "the "), "guided_json") from None
        raise ApiError(400, str(e), "response_format") from None


@lru_cache(maxsize=64)
def _compiled(kind: str, schema: str | None) -> StructuredOutput:
    """Compiled once per schema: clients send the same one again and again, and n > 1
    asks for it once per choice."""
    return StructuredOutput(kind, schema)


def check_request(body, chat: bool) -> int:
    """Checks that need no tokenizer (done before any work); returns ``n``."""
    not_supported(body, chat)
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be an integer from 1 to {MAX_N}, got {n}.", "n")
    if not chat and isinstance(body.prompt, list) and not is_token_ids(body.prompt):
        # a batch of prompts: n answers each, and every answer is an engine request
        if len(body.prompt) * n > MAX_N:
            raise ApiError(400, f"{len(body.prompt)} prompts x n={n} asks for {len(body.prompt) * n} answers; "
                           f"one request may ask for at most {MAX_N}: send fewer prompts per request.", "prompt")
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, name, None)
        if value == 0 and not chat and body.echo:
            continue  # legacy OpenAI's (and vLLM's) way to score a prompt without generating
        if value is not None and value <= 0:
            how = "" if chat or value < 0 else (" (to score the prompt without generating, send echo: true with "
                                                "max_tokens 0, and logprobs for its tokens' log-probabilities)")
            raise ApiError(400, f"{name} must be a positive integer, got {value}: ask for at least 1 token{how}.",
                           name)
    if chat and not body.messages:
        raise ApiError(400, "messages is empty: send at least one message.", "messages")
    sampling(body, seed=body.seed, chat=chat)  # every sampling value checked before tokenizing
    return n


def is_token_ids(prompt: list) -> bool:
    """Whether a completions ``prompt`` list is one prompt's token ids (else a batch of
    prompts; an empty list counts as ids). The schema's union holds lists of one kind
    only, so the first item says which: no pass over a long prompt's ids."""
    return not prompt or isinstance(prompt[0], int)


def chat_messages(body: ChatCompletionRequest) -> list[dict]:
    """The messages as the chat template takes them: text content (parts joined)."""
    out = []
    for i, m in enumerate(body.messages):
        content = m.content
        extra = m.model_extra or {}
        if content is None and (m.role != "assistant" or not (m.tool_calls or extra.get("function_call")
                                                              or extra.get("refusal"))):
            # OpenAI refuses these too: content is required but for an assistant's calls
            what = "content or tool_calls" if m.role == "assistant" else "content"
            raise ApiError(400, f"messages[{i}] (role {m.role}) has no {what}: every message needs its "
                           "content (an empty string will do); only an assistant message with tool_calls "
                           "(or the older function_call, or a refusal) may leave it out.", f"messages.{i}.content")
        if isinstance(content, list):
            # (an assistant's calls with content [] read as content null: some clients send it)
            content = "" if not content and m.role == "assistant" and m.tool_calls else _parts_text(content, i, m.role)
        role = "system" if m.role == "developer" else m.role  # OpenAI's newer name for it
        out.append({"role": role, "content": content or "", **tool_fields(m, i)})
    return out


def _parts_text(parts: list, i: int, role: str) -> str:
    """A message's content parts as one text: text parts (an assistant's refusal parts too,
    as OpenAI sends them back); an empty list, a text part without its text, or any other
    kind of part is a 400 (as at OpenAI), not read as empty text."""
    if not parts:
        raise ApiError(400, f"messages[{i}].content is an empty list: send at least one part, or a string "
                       "(an empty string will do).", f"messages.{i}.content")
    texts = []
    for k, part in enumerate(parts):
        field = ("refusal" if part.type == "refusal" and role == "assistant"
                 else "text" if part.type == "text" else None)
        if field is None:
            raise ApiError(400, f"messages[{i}].content[{k}] is a {part.type!r} part: this server reads text "
                           "only ({\"type\": \"text\", \"text\": ...}).", f"messages.{i}.content.{k}")
        text = part.text if field == "text" else (part.model_extra or {}).get("refusal")
        if not isinstance(text, str):
            raise ApiError(400, f"messages[{i}].content[{k}] is a {part.type} part without its {field}: give it "
                           f'{{"type": "{part.type}", "{field}": ...}}.', f"messages.{i}.content.{k}.{field}")
        texts.append(text)
    return "".join(texts)


def prompt_ids(body, chat: bool, tokenizer, tools: ToolSetup | None = None) -> list[list[int]]:
    """The prompts as token ids (chat: one, rendered with the model's template)."""
    try:
        if chat:  # (a template's refusal is an InvalidRequestError: engine.tokenizer.render_chat)
            return [chat_prompt_ids(tokenizer, chat_messages(body), tools)]
        prompt = body.prompt
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and is_token_ids(prompt):
            return [list(prompt)]
        else:
            prompts = list(prompt)
        if not prompts:
            raise ApiError(400, "prompt is empty: send some text.", "prompt")
        out = []
        for p in prompts:
            if isinstance(p, str):
                if not p:
                    raise ApiError(400, "prompt is empty: send some text.", "prompt")
                out.append(tokenizer.encode(p))
            else:
                out.append(list(p))
        return out
    except InvalidRequestError as e:
        raise ApiError(400, str(e), "messages" if chat else "prompt") from None


def build_job(body, chat: bool, tokenizer, max_model_len: int, vocab_size: int) -> Job:
    """The engine's work for ``body``, or a 400 saying what is wrong with it."""
    n = check_request(body, chat)
    tools = tool_setup(body, tokenizer, vocab_size) if chat else None
    guided = extra_fields(body).get("guided_json") is not None
    if tools is not None and tools.prefix and (guided or (body.response_format or {}).get("type", "text") != "text"):
        # The forced call's opening is in the prompt; a JSON grammar would start a new
        # document after it and never let the call close.
        name = "guided_json" if guided else "response_format"
        raise ApiError(400, f"{name} can't be combined with a tool_choice that forces a call "
                       "(required or a named function): drop one of them.", name)
    prompts = prompt_ids(body, chat, tokenizer, tools)
    asked = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
    score_only = asked == 0  # (check_request lets 0 through only with echo, on completions)
    params = []
    for ids in prompts:
        if not ids:
            raise ApiError(400, "the prompt is empty after tokenization.", "prompt")
        if min(ids) < 0 or max(ids) >= vocab_size:  # builtins, not a Python loop: prompts run long
            bad = [t for t in ids if not 0 <= t < vocab_size]
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1}).", "prompt")
        bad = [t for t, _ in logit_bias(body) if t >= vocab_size]
        if bad:
            raise ApiError(400, f"logit_bias names token id {bad[0]}, outside the vocabulary (0..{vocab_size - 1}).",
                           "logit_bias")
        room = max_model_len - len(ids)
        if room < 0 or (room == 0 and not score_only):  # (a prompt only scored may fill the context)
            raise ApiError(400, f"the prompt has {len(ids)} tokens but the model's context holds "
                           f"{max_model_len}: shorten it.", "messages" if chat else "prompt",
                           "context_length_exceeded")
        max_tokens = asked if asked is not None else (room if chat else min(COMPLETIONS_MAX_TOKENS, room))
        if max_tokens > room:
            name = "max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens"
            raise ApiError(400, f"the prompt has {len(ids)} tokens and {name} asks for {max_tokens} more, but "
                           f"the model's context holds {max_model_len} in all: ask for at most {room}, or "
                           "shorten the prompt.", name, "context_length_exceeded")
        for j in range(n):
            # Several choices of a seeded request differ (each its own seed), and the same
            # request gives the same choices again.
            seed = None if body.seed is None else (body.seed + j) % SEED_SPAN
            params.append(sampling(body, max(max_tokens, 1), seed, chat))
    if tools is not None:
        # Some models mark <tool_call> as a special token: decoded with special tokens
        # skipped, the tags would vanish and the call come back as bare JSON content. A
        # forced call's rest is held to its grammar (tool_calls.forced_call_grammar).
        extra = {} if tools.grammar is None else {"structured": tools.grammar}
        params = [dataclasses.replace(p, skip_special_tokens=False, **extra) for p in params]
    echo = echo_texts(body, prompts, tokenizer) if not chat else None
    return Job(prompts, params, n, logprobs=top_logprobs(body, chat) is not None, tools=tools, echo=echo,
               score_only=score_only)


def echo_texts(body, prompts: list[list[int]], tokenizer) -> list[str] | None:
    """Completions' ``echo``: each prompt's text, put before its answers (a token-id prompt
    decoded as the engine decodes its answers)."""
    if not body.echo:
        return None
    prompt = body.prompt
    single = isinstance(prompt, str) or is_token_ids(prompt)
    given = [prompt] if single else prompt
    return [p if isinstance(p, str) else tokenizer.decode(ids) for p, ids in zip(given, prompts)]
