"""OpenAI's response and stream-chunk shapes, filled from the engine's events, plus
Hearth's timings as an extra ``hearth`` field (SDKs keep unknown fields: in the openai
package, ``response.model_extra["hearth"]`` or ``response.hearth``)."""

from __future__ import annotations

import json

from app.server.tool_calls import ToolSetup, ToolStream, chat_message
from engine.api import FinishedEvent


def timings(fin: FinishedEvent) -> dict:
    """Hearth's timings of one choice: time to first token, decode speed, and the rest."""
    t = fin.timings
    return {"ttft_ms": round(t.ttft_ms, 3), "tokens_per_s": round(t.decode_tok_s, 3),
            "itl_ms": round(t.itl_ms, 3), "queue_ms": round(t.queue_ms, 3), "total_ms": round(t.total_ms, 3)}


def hearth_field(finishes: list[FinishedEvent]) -> dict:
    """The ``hearth`` field: the first choice's timings; with several choices, each one's."""
    out = timings(finishes[0])
    if len(finishes) > 1:
        out["choices"] = [timings(f) for f in finishes]
    return out


def usage(finishes: list[FinishedEvent], n: int) -> dict:
    """OpenAI's usage: each prompt counted once (its ``n`` choices share it), every choice's
    completion tokens, the prompt tokens the prefix cache served."""
    firsts = finishes[::n]
    prompt = sum(f.usage.prompt_tokens for f in firsts)
    completion = sum(f.usage.completion_tokens for f in finishes)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(f.usage.cached_prompt_tokens for f in firsts)}}


def response(chat: bool, rid: str, created: int, model: str, texts: list[str],
             finishes: list[FinishedEvent], n: int, logprobs: list[dict] | None = None,
             tools: ToolSetup | None = None) -> dict:
    """The whole answer of a non-streaming request (``logprobs``: each choice's, formatted;
    ``tools``: the chat's tools, whose calls are parsed out of the text)."""
    lps = logprobs or [None] * len(texts)
    if chat:
        choices = []
        for i, (text, f, lp) in enumerate(zip(texts, finishes, lps)):
            message, reason = chat_message(text, f.reason, tools)
            choices.append({"index": i, "message": message, "finish_reason": reason, "logprobs": lp})
    else:
        choices = [{"index": i, "text": text, "finish_reason": f.reason, "logprobs": lp}
                   for i, (text, f, lp) in enumerate(zip(texts, finishes, lps))]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "system_fingerprint": None, "choices": choices, "usage": usage(finishes, n),
            "hearth": hearth_field(finishes)}


class Chunks:
    """The stream's chunks of one request, as SSE ``data:`` lines. With ``tools`` each
    chat choice's text goes through a tool-call parser (``ToolStream``): content and call
    deltas as they become sure; with ``echo`` each completions choice opens with its prompt."""

    def __init__(self, chat: bool, rid: str, created: int, model: str, include_usage: bool,
                 logprobs=None, tools: ToolSetup | None = None, echo: list[str] | None = None, n: int = 1,
                 echo_logprobs: list[dict] | None = None) -> None:
        self.chat = chat
        self.logprobs = logprobs  # a Logprobs formatter, when the request asked for them
        self.tools = tools
        self._tool_streams: dict[int, ToolStream] = {}  # chat with tools: each choice's parser
        self._held_lps: dict[int, list] = {}  # logprobs of text the parser holds back
        self._echo, self._n = echo, n  # completions' echo: prompt p's text opens choices p*n..
        self._echo_lps = echo_logprobs  # ... with its tokens' logprobs, when asked for
        self._offsets: dict[int, int] = {}  # completions: each choice's text length so far
        self._head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                      "created": created, "model": model, "system_fingerprint": None}
        self.include_usage = include_usage
        # A token's chunk is the same object but its choices: the rest is encoded once.
        head = json.dumps({**self._head, "choices": None}, ensure_ascii=False)
        self._prefix = "data: " + head[:-len('null}')]
        self._suffix = (', "usage": null}' if include_usage else "}") + "\n\n"

    def _line(self, choices: list, **extra) -> bytes:
        if not extra:
            return (self._prefix + json.dumps(choices, ensure_ascii=False) + self._suffix).encode()
        body = {**self._head, "choices": choices, **extra}
        if self.include_usage and "usage" not in body:
            body["usage"] = None  # OpenAI's shape: null on every chunk but the last
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()

    def _choice(self, index: int, text: str | None, finish: str | None, role: bool = False,
                lps: list | None = None) -> dict:
        formatted = None
        if self.logprobs is not None and lps is not None:
            offset = self._offsets.get(index, 0)
            formatted = self.logprobs.format(lps, offset)
            self._offsets[index] = offset + len(text or "")
        if not self.chat:
            return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": formatted}
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": formatted}

    def opening(self, index: int) -> bytes | None:
        """Chat's first chunk of a choice says the role; completions' is the echoed prompt."""
        if self.chat:
            if self.tools is not None:
                self._tool_streams[index] = ToolStream(self.tools)
            return self._line([self._choice(index, None, None, role=True)])
        if self._echo:
            text = self._echo[index // self._n]
            choice = self._choice(index, text, None)
            if self._echo_lps is not None:
                choice["logprobs"] = self._echo_lps[index // self._n]
                self._offsets[index] = len(text)  # the answer's offsets follow the prompt's
            return self._line([choice])
        return None

    def text(self, index: int, text: str, lps: list | None = None) -> bytes | None:
        """The chunk(s) of new text (None: the tool-call parser holds it back for now)."""
        stream = self._tool_streams.get(index)
        if stream is None:
            return self._line([self._choice(index, text, None, lps=lps)])
        return self._deltas(index, stream.feed(text), lps)

    def finish(self, index: int, fin: FinishedEvent, lps: list | None = None) -> bytes:
        """The choice's last chunk (``lps``: logprobs of tokens that added no text, e.g. the EOS)."""
        stream = self._tool_streams.get(index)
        if stream is None:
            return self._line([self._choice(index, None, fin.reason, lps=lps)], hearth=timings(fin))
        rest = self._deltas(index, stream.finish(), lps) or b""
        reason = "tool_calls" if stream.called and fin.reason == "stop" else fin.reason
        return rest + self._line([self._choice(index, None, reason, lps=self._held_lps.pop(index, None))],
                                 hearth=timings(fin))

    def _deltas(self, index: int, deltas: list[dict], lps: list | None) -> bytes | None:
        """Chat chunks of a tool parser's deltas; logprobs go with the first one out."""
        held = self._held_lps.setdefault(index, [])
        held.extend(lps or ())
        if not deltas:
            return None
        lines = []
        for delta in deltas:
            lps, self._held_lps[index] = self._held_lps[index], []
            choice = self._choice(index, None, None, lps=lps)
            choice["delta"] = delta
            lines.append(self._line([choice]))
        return b"".join(lines)

    def usage(self, finishes: list[FinishedEvent], n: int) -> bytes:
        return self._line([], usage=usage(finishes, n), hearth=hearth_field(finishes))


DONE = b"data: [DONE]\n\n"
