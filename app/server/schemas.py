"""The request bodies of the OpenAI routes (OpenAI's published shapes), as pydantic
models: they validate what a client sends and document it in the OpenAPI schema.

Numbers and flags are strict (``"0.5"`` is not a temperature, ``true`` is not a count):
OpenAI refuses them too, and a silent conversion would hide a client's bug. Unknown
fields are kept and ignored, since many clients send their own extras. Parameters the
server can't honour yet are refused by ``app.server.translate`` when they ask for
something (``logprobs: true``), and accepted when they ask for nothing (``tools: []``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Strict

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # strict floats take ints too (JSON's 1 is a number)
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Body):
    type: Str
    text: Optional[Str] = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[Str, list[TextPart], None] = None
    name: Optional[Str] = None
    tool_calls: Optional[list[Any]] = None  # an assistant's calls, fed back (app.server.tool_calls)
    tool_call_id: Optional[Str] = None  # a tool message: the call it answers


class StreamOptions(_Body):
    include_usage: Optional[Bool] = None


class _Sampling(_Body):
    """What chat and completions requests share."""

    model: Optional[Str] = None  # optional here: the loaded model answers (LM Studio does the same)
    max_tokens: Optional[Int] = None
    temperature: Optional[Float] = None
    top_p: Optional[Float] = None
    n: Optional[Int] = None
    seed: Optional[Int] = None
    stop: Union[Str, list[Str], None] = None
    stream: Optional[Bool] = None
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[Float] = None
    frequency_penalty: Optional[Float] = None
    user: Optional[Str] = None
    logit_bias: Optional[dict[str, Any]] = None
    # Hearth's extensions (vLLM and llama.cpp spell them the same):
    top_k: Optional[Int] = None
    min_p: Optional[Float] = None
    repetition_penalty: Optional[Float] = None
    ignore_eos: Optional[Bool] = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[Int] = None
    logprobs: Optional[Bool] = None
    top_logprobs: Optional[Int] = None
    tools: Optional[list[Any]] = None
    tool_choice: Any = None
    response_format: Optional[dict[str, Any]] = None


class CompletionRequest(_Sampling):
    prompt: Union[Str, list[Str], list[Int], list[list[Int]]]
    echo: Optional[Bool] = None
    logprobs: Optional[Int] = None
    suffix: Optional[Str] = None
    best_of: Optional[Int] = None
