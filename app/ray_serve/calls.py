"""What the ingress sends to an engine replica through Ray Serve, and the key its request
router matches prefixes on.

Ray's prefix-aware router (``PrefixCacheAffinityRouter``) reads a call's first argument
with a ``prompt`` (or ``messages``) attribute and matches it, character by character,
against the prompts each replica was sent before. Hearth's engine caches prefixes of
*tokens* (after the chat template), so the key is the prompt's token ids with one
character each: a shared character prefix is then exactly a shared token prefix, the
match rate counts tokens, and the router needs no tokenizer (one template, one
tokenization: the ingress's)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from engine.api import Request


def routing_key(token_ids: Sequence[int]) -> str:
    """The prompt's token ids as a string, one character per token (code point = id; a
    vocabulary is far below Unicode's 1.1 million code points)."""
    return "".join(map(chr, token_ids))


@dataclass(frozen=True)
class EngineCall:
    """One call to an engine replica. ``prompt``: the routing key of the prompt it reads
    (``routing_key``); ``request``: the engine request to run (``HearthEngine.generate``);
    ``ids``/``top``: a prompt to score (``HearthEngine.score_prompt``)."""

    prompt: str
    request: Request | None = None
    ids: list[int] = field(default_factory=list)
    top: int = 0
