"""Structured outputs: a request's answer constrained to JSON, or to a JSON Schema.

``StructuredOutput`` is the constraint as plain data (it rides on ``SamplingParams``, so it
crosses to the runner with the request): its kind, the schema's text, and the grammar the
runner's matcher follows, compiled and checked when it is built. A schema that is not
valid JSON Schema, or that uses a keyword the grammar engine can't enforce (``not``,
``if``/``then``, ``uniqueItems``, remote ``$ref``...), is an InvalidRequestError there,
before the request reaches the engine: "always matches the schema" is only promised for
what is enforced, so nothing is silently ignored.

The grammar engine is llguidance (pip ``llguidance``), chosen by measurement against
xgrammar 0.2.9 (``benchmarks/grammar_mask.py``; results in
``benchmarks/results/2026-12-02-i16-grammar-mask-cpu.json``: CPU, one thread, an
8-field object schema and a free-text one, each answer walked token by token, at
SmolLM2's 49k vocabulary and at a 128k one, Llama 3's size):

- per step, xgrammar's mask is faster: p50 5 us against llguidance's 35 us (49k) and 16
  against 80 us (128k) on the object, 9 against 12 and 18 against 31 us inside free
  text. Both are at most 2% of a decode step (12 ms for SmolLM2 on this CPU, 4.3 ms for
  the 8B in bf16 on an H200 at batch 1), and on a GPU the mask is filled while the step
  runs (``engine/runner/grammar.py``);
- per schema, llguidance compiles in 0.7-1.9 ms, xgrammar in 4-16 ms (49k) and 12-37 ms
  (128k) with its cache off. An API server sees a new schema per client, and the compile
  sits in the request's time to first token: xgrammar would add 2-6 times the 8B's 6 ms
  H200 TTFT for each new schema (its cache only helps repeats);
- llguidance refuses a schema keyword it can't enforce (``not``, ``if``/``then``,
  ``uniqueItems``...) with a message, which the 400 passes on; it is one abi3 wheel with
  no dependencies, where xgrammar adds a C++ FFI runtime and depends on torch and
  transformers (ours satisfy it: no second torch).

Preparing the tokenizer (llguidance's token trie) takes about 0.5 s at 49k and 2 s at
128k (xgrammar: 0.2 and 0.7 s): once per model, on the thread that submits its first
structured request.

Output layout is fixed: compact JSON with ``", "`` and ``": "`` separators and no other
whitespace. Free whitespace would let a model pad forever (a small or confused model
does), and one layout keeps answers reproducible.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from engine.errors import InvalidRequestError

#: The kinds a request may ask for (OpenAI's ``response_format.type`` values beyond "text"),
#: and "lark": a grammar in llguidance's Lark dialect (its ``%json`` rules take JSON Schemas),
#: which the API server builds itself (a tool call forced by ``tool_choice``), never a client.
KINDS = ("json_object", "json_schema", "lark")
#: How the JSON is laid out (see the module docstring).
JSON_LAYOUT = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
#: The largest schema text taken (compiling is linear in it, matching can be worse).
MAX_SCHEMA_CHARS = 64 * 1024


@dataclass(slots=True, frozen=True)
class StructuredOutput:
    """A constraint on a request's output: ``kind`` "json_object" (any JSON object) or
    "json_schema" (an instance of ``schema``, JSON text or a dict). ``grammar`` is derived:
    the grammar engine's compiled, checked form that the runner's matcher follows."""

    kind: str
    schema: str | None = None
    grammar: str = field(default="", compare=False, repr=False)

    @staticmethod
    def json_rule(schema: dict) -> str:
        """A Lark rule's body (``name: <this>``) for instances of the JSON Schema ``schema``,
        laid out as every structured answer's JSON is (``JSON_LAYOUT``)."""
        return "%json " + json.dumps({**schema, "x-guidance": dict(JSON_LAYOUT)})

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequestError(f"response_format type must be one of {', '.join(KINDS[:2])} "
                                      f"(or text, for no constraint), got {self.kind!r}.")
        schema = self.schema
        if self.kind == "lark":
            if not isinstance(schema, str) or not schema.strip():
                raise InvalidRequestError("a lark constraint needs its grammar's text.")
            object.__setattr__(self, "grammar", compile_lark(schema))
            return
        if self.kind == "json_object":
            if schema is not None:
                raise InvalidRequestError("response_format json_object takes no schema: use json_schema "
                                          "to give one.")
            parsed: object = {"type": "object"}
        else:
            if schema is None:
                raise InvalidRequestError("response_format json_schema needs a schema "
                                          "(json_schema.schema): give the JSON Schema the output must match.")
            if not isinstance(schema, str):
                try:
                    schema = json.dumps(schema)
                except (TypeError, ValueError, RecursionError) as e:
                    raise InvalidRequestError(f"response_format's schema is not JSON: {e}.") from None
                object.__setattr__(self, "schema", schema)
            if len(schema) > MAX_SCHEMA_CHARS:
                raise InvalidRequestError(f"response_format's schema is {len(schema)} characters long; at most "
                                          f"{MAX_SCHEMA_CHARS} are taken: simplify it.")
            try:
                parsed = json.loads(schema)
            except (ValueError, RecursionError) as e:
                raise InvalidRequestError(f"response_format's schema is not valid JSON: {e}.") from None
            if not isinstance(parsed, (dict, bool)):
                raise InvalidRequestError("response_format's schema must be a JSON Schema (a JSON object), got "
                                          f"a {type(parsed).__name__}.")
        object.__setattr__(self, "grammar", compile_json_schema(parsed))


def compile_lark(text: str) -> str:
    """The llguidance grammar of ``text`` (its Lark dialect), checked; InvalidRequestError
    saying why when it doesn't compile or can't be enforced (a ``%json`` schema's keyword)."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_lark(text)
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    except (ValueError, TypeError) as e:
        failed, messages = True, [str(e)]
    if failed:
        detail = "; ".join(m.strip().replace("\n", " ") for m in messages)[:500] or "it does not compile"
        raise InvalidRequestError(f"the grammar can't be enforced: {detail}.")
    return grammar


def compile_json_schema(schema: object) -> str:
    """The llguidance grammar for instances of ``schema`` (a parsed JSON Schema), checked;
    InvalidRequestError saying why when the engine can't enforce it."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_LAYOUT)
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    except (ValueError, TypeError) as e:
        failed, messages = True, [str(e)]
    if failed:
        detail = "; ".join(m.strip().replace("\n", " ") for m in messages)[:500] or "it does not compile"
        raise InvalidRequestError(
            f"response_format's schema can't be enforced: {detail}. Use standard JSON Schema (type, "
            "properties, required, items, enum, const, anyOf, pattern, minimum/maximum, local $ref); "
            "not, if/then/else, uniqueItems and remote $ref are not supported.")
    return grammar
