"""A request's prompt as token ids: the text checked, the chat rendered (trimmed to fit
with ``fit_context``), the result checked against the context and the KV cache. Runs on
the submitting thread, before the request reaches the engine's loop."""

from __future__ import annotations

from engine.context_fit import fit_messages
from engine.errors import InvalidRequestError
from engine.requests import Request
from engine.tokenizer import Tokenizer, check_text


def prompt_ids(r: Request, tokenizer: Tokenizer, max_model_len: int, vocab_size: int,
               kv_capacity: int) -> tuple[list[int], int]:
    """The request's prompt ids, checked against the context and the KV cache, and how
    many messages ``fit_context`` dropped to make them fit."""
    given = [x is not None for x in (r.prompt, r.messages, r.prompt_token_ids)]
    if sum(given) != 1:
        raise InvalidRequestError("give exactly one of prompt, messages or prompt_token_ids")
    if r.fit_context and r.messages is None:
        raise InvalidRequestError("fit_context trims a conversation: give messages, not a prompt")
    dropped = 0
    if r.messages is not None:
        if not r.messages:
            raise InvalidRequestError("messages is empty: send at least one message")
        if r.fit_context:
            ids, dropped = fit_messages(
                lambda msgs: tokenizer.apply_chat_template(msgs, system=r.system), r.messages,
                system=r.system, max_tokens=r.params.max_tokens, max_model_len=max_model_len)
        else:
            ids = tokenizer.apply_chat_template(r.messages, system=r.system)
    elif r.prompt is not None:
        if r.system:
            raise InvalidRequestError("a system prompt needs chat mode (messages / --chat)")
        if not r.prompt.strip():
            raise InvalidRequestError("the prompt is empty: type something to continue")
        ids = tokenizer.encode(r.prompt)
    else:
        ids = list(r.prompt_token_ids)
        vocab = vocab_size
        bad = [t for t in ids if not (0 <= t < vocab)]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    if not ids:
        raise InvalidRequestError("the prompt is empty after tokenization")
    if len(ids) >= max_model_len:
        raise InvalidRequestError(
            f"the prompt has {len(ids)} tokens but the context holds {max_model_len}: "
            "shorten the prompt or load the model with a longer context (--max-model-len).",
            options=("max_model_len",),
        )
    capacity = kv_capacity
    if len(ids) >= capacity:
        raise InvalidRequestError(
            f"the prompt has {len(ids)} tokens but the KV cache holds {capacity}: "
            "give the KV cache more memory (--kv-cache-memory) or shorten the prompt.",
            options=("kv_cache_memory",),
        )
    return ids, dropped


def check_request_text(r: Request) -> None:
    """Refuse text the tokenizer can't encode (lone surrogates: undecodable bytes from a
    terminal or a file), naming the field, before any of it is tokenized."""
    if isinstance(r.prompt, str):
        check_text(r.prompt, "the prompt")
    if isinstance(r.system, str):
        check_text(r.system, "the system prompt")
    if isinstance(r.messages, list):
        for i, m in enumerate(r.messages):
            if isinstance(m, dict):
                for key, value in m.items():
                    check_text(value, f"messages[{i}].{key}")
    for stop in getattr(r.params, "stop", None) or ():
        check_text(stop, f"the stop string {stop!r}")
