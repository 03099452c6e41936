"""Tokenizer wrapper and streaming (incremental) detokenization.

``Tokenizer`` wraps a Hugging Face tokenizer loaded from a local folder and adds what the
engine needs: the full set of end-of-sequence ids, chat-template rendering that reports a
clear error when the model has no template, and thread safety.

``IncrementalDetokenizer`` turns a stream of token ids into a stream of text deltas whose
concatenation equals decoding all the ids at once, without ever emitting half of a
multi-byte character (one left incomplete at the end is dropped, not shown as U+FFFD).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from engine.errors import InvalidRequestError, ModelLoadError

# What a lossy UTF-8 decode yields for an incomplete (or invalid) byte sequence.
_REPLACEMENT = "\ufffd"

# Prompt tokens kept as left context for the first output tokens. Sentencepiece-style
# decoders strip the leading space of the first token in a window, so the first output
# token must not be first in its window; a few tokens is plenty of context for that.
_PROMPT_CONTEXT_TOKENS = 5


def check_text(text: str, what: str = "the prompt") -> None:
    """Raise InvalidRequestError when ``text`` can't be encoded as UTF-8: it holds lone
    surrogates. Python turns bytes that aren't valid UTF-8 into such surrogates when it
    reads them from a terminal or argv (``surrogateescape``), and JSON can spell them out;
    the tokenizer would fail on them with a TypeError. ``what`` names the text for the user."""
    if not isinstance(text, str):
        return  # type errors are reported where the type is checked
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(f"{what} is not valid UTF-8 text: {describe_bad_text(text, e.start)}.") from None


def describe_bad_text(text: str, index: int) -> str:
    """What is wrong at ``text[index]`` (a lone surrogate), for an error message: the
    undecodable byte a ``surrogateescape`` surrogate stands for, and where it is."""
    ch = ord(text[index])
    line = text.count("\n", 0, index) + 1
    col = index - (text.rfind("\n", 0, index) + 1) + 1
    where = f"character {col}" if line == 1 else f"line {line}, character {col}"
    if 0xDC80 <= ch <= 0xDCFF:
        what = f"the byte 0x{ch - 0xDC00:02X} at {where} is not part of a UTF-8 character"
    else:
        what = f"a lone surrogate U+{ch:04X} at {where} is not a character"
    return f"{what}; save or type the text as UTF-8 (check the terminal's or the file's encoding)"


class Tokenizer:
    """A thread-safe wrapper around a Hugging Face tokenizer.

    Build it with :meth:`from_pretrained` (local folders only) or wrap an already loaded
    tokenizer with ``Tokenizer(hf_tokenizer, generation_eos_ids=...)``.
    """

    def __init__(self, hf_tokenizer: Any, generation_eos_ids: Iterable[int] = ()) -> None:
        self._tok = hf_tokenizer
        # HF fast tokenizers are Rust objects behind a RefCell: concurrent calls from
        # several threads can fail with "Already borrowed", so every call takes this lock.
        self._lock = threading.Lock()
        eos: set[int] = set(int(i) for i in generation_eos_ids)
        tok_eos = getattr(hf_tokenizer, "eos_token_id", None)
        if tok_eos is not None:
            eos.add(int(tok_eos))
        self._eos_token_ids = frozenset(eos)
        # Ids that ``decode(..., skip_special_tokens=True)`` drops: the named special tokens
        # plus every added token flagged special (chat markers such as <|im_start|>).
        special = set(int(i) for i in getattr(hf_tokenizer, "all_special_ids", ()) or ())
        added = getattr(hf_tokenizer, "added_tokens_decoder", None) or {}
        special.update(int(i) for i, tok in added.items() if getattr(tok, "special", False))
        self._special_ids = frozenset(special)
        self._token_bytes = None  # built on first use (logprobs' raw bytes)

    def __getstate__(self) -> dict:
        """Pickled without its lock (``hearth serve`` sends the tokenizer from the engine's
        process to the server's); the copy gets a lock of its own."""
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> Tokenizer:
        """Load the tokenizer stored in the local folder ``path`` (never the network).

        The end-of-sequence ids also include those of ``generation_config.json`` in the
        same folder, when present, since chat models often list several there.
        Extra keyword arguments go to ``AutoTokenizer.from_pretrained``.
        """
        from transformers import AutoTokenizer

        folder = Path(path)
        if not folder.is_dir():
            raise ModelLoadError(
                f"Tokenizer folder {str(folder)!r} does not exist: pass the path of a local "
                "model folder that contains tokenizer files (tokenizer.json, ...)."
            )
        try:
            hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)
        except Exception as e:  # transformers raises many types; present one clear error
            raise ModelLoadError(
                f"Could not load a tokenizer from {str(folder)!r}: {e}. Check that the folder "
                "holds the tokenizer files of the model (tokenizer.json or tokenizer.model "
                "plus tokenizer_config.json)."
            ) from e
        return cls(hf, generation_eos_ids=_read_generation_eos_ids(folder))

    # ------------------------------------------------------------------ properties

    @property
    def hf_tokenizer(self) -> Any:
        """The wrapped Hugging Face tokenizer (not thread-safe on its own)."""
        return self._tok

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every token id that ends generation (tokenizer + generation config)."""
        return self._eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        """The beginning-of-sequence id, or None when the tokenizer has none."""
        bos = getattr(self._tok, "bos_token_id", None)
        return None if bos is None else int(bos)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return len(self._tok)

    @property
    def has_chat_template(self) -> bool:
        """Whether the tokenizer ships a chat template."""
        return bool(getattr(self._tok, "chat_template", None))

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids that decoding with ``skip_special_tokens=True`` leaves out."""
        return self._special_ids

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (with BOS etc. when ``add_special_tokens``)."""
        if not isinstance(text, str):
            raise InvalidRequestError(
                f"prompt must be a string, got {type(text).__name__}: pass text, or token ids "
                "through the token-id prompt field."
            )
        check_text(text)
        with self._lock:
            return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``.

        Tokenization-space cleanup is always off: it rewrites text across token
        boundaries, which streaming cannot reproduce, and the engine wants both to agree.
        """
        with self._lock:
            return self._tok.decode(
                list(ids),
                skip_special_tokens=skip_special_tokens,
                clean_up_tokenization_spaces=False,
            )

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (``engine.token_bytes``): a token holding part of a
        multi-byte character gives those bytes, where ``decode`` gives U+FFFD."""
        with self._lock:
            if self._token_bytes is None:
                from engine.token_bytes import TokenBytes

                self._token_bytes = TokenBytes(self._tok, self._special_ids)
            return self._token_bytes(token_id)

    # ------------------------------------------------------------------ chat

    def render_chat(self, messages: list[dict[str, Any]], system: str | None = None,
                    tools: list[dict[str, Any]] | None = None) -> str:
        """The chat prompt as text, ending with the assistant's generation prompt;
        ``tools``: function definitions (OpenAI's JSON-schema shape) the template renders."""
        if not self.has_chat_template:
            raise InvalidRequestError(
                "This model's tokenizer has no chat template, so chat messages cannot be "
                "formatted: send a raw text prompt instead (use completion mode, not chat)."
            )
        from jinja2.exceptions import TemplateError, TemplateSyntaxError

        msgs = _with_system(messages, system)
        try:
            return self._render(msgs, tools)
        except TemplateSyntaxError as e:
            raise InvalidRequestError(
                f"this model's chat template is not valid Jinja ({e}): fix the chat_template in its "
                "tokenizer_config.json (or chat_template.jinja), or send a raw text prompt instead "
                "(completion mode).") from None
        except TemplateError as e:
            # A template that takes no system role (Mistral Instruct v0.1/v0.2 raise "roles must
            # alternate"): the system text goes first in the first user message, as LM Studio
            # and Ollama do; anything else the template refuses is the request's problem.
            folded = _system_folded(msgs)
            if folded is not None:
                try:
                    return self._render(folded, tools)
                except TemplateError:
                    pass
            raise InvalidRequestError(
                f"this model's chat template refuses these messages: {e}. Change what it names (most templates "
                "want user and assistant turns alternating, starting with the user's), or send a raw text prompt "
                "instead (completion mode).") from None

    def _render(self, msgs: list[dict[str, Any]], tools) -> str:
        with self._lock:
            return self._tok.apply_chat_template(msgs, tools=tools or None, tokenize=False,
                                                 add_generation_prompt=True)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], system: str | None = None
    ) -> list[int]:
        """Token ids of the chat prompt (generation prompt added).

        ``system`` is prepended as a system message unless ``messages`` already starts with
        one. Raises InvalidRequestError when the tokenizer has no chat template.
        """
        text = self.render_chat(messages, system)
        # The template writes BOS and role markers itself; adding special tokens again
        # would duplicate BOS.
        return self.encode(text, add_special_tokens=False)


def _system_folded(msgs: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """``msgs`` with a leading system message's text put before the first user message's
    (None: no leading system message followed by a user one, both text)."""
    if (len(msgs) < 2 or msgs[0].get("role") != "system" or msgs[1].get("role") != "user"
            or not isinstance(msgs[0].get("content"), str) or not isinstance(msgs[1].get("content"), str)):
        return None
    system, user = msgs[0]["content"], msgs[1]["content"]
    text = f"{system}\n\n{user}" if system else user
    return [{**msgs[1], "content": text}, *msgs[2:]]


def _with_system(messages: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise InvalidRequestError(
            "messages must be a list of {'role': ..., 'content': ...} dicts."
        )
    if not messages:
        raise InvalidRequestError("messages is empty: send at least one user message.")
    for i, m in enumerate(messages):
        if "role" not in m or "content" not in m:
            raise InvalidRequestError(
                f"every message needs 'role' and 'content' keys, got {sorted(m)}."
            )
        for key, value in m.items():  # named here: the rendered prompt's position is no help
            check_text(value, f"messages[{i}].{key}")
    if system is not None:
        check_text(system, "the system prompt")
    if system is not None and messages[0].get("role") != "system":
        return [{"role": "system", "content": system}, *messages]
    return list(messages)


def _read_generation_eos_ids(folder: Path) -> list[int]:
    """eos_token_id of generation_config.json (int or list); without that file, config.json's
    (where transformers' generation takes it from then: a model may list several there); []
    if neither has one."""
    path = folder / "generation_config.json"
    if not path.is_file():
        try:
            cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):  # (the model's loader reports a bad config.json)
            return []
        eos = cfg.get("eos_token_id") if isinstance(cfg, dict) else None
        if isinstance(eos, int) and not isinstance(eos, bool):
            return [eos]
        if isinstance(eos, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
            return list(eos)
        return []
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"{str(path)!r} is not valid JSON ({e}): fix or delete the file."
        ) from e
    eos = cfg.get("eos_token_id") if isinstance(cfg, dict) else None
    if eos is None:
        return []
    if isinstance(eos, int):
        return [eos]
    if isinstance(eos, list) and all(isinstance(i, int) for i in eos):
        return list(eos)
    raise ModelLoadError(
        f"eos_token_id in {str(path)!r} must be an integer or a list of integers, got "
        f"{eos!r}: fix the file."
    )


class IncrementalDetokenizer:
    """Streams text deltas for one sequence, one token at a time.

    Each :meth:`push` decodes only a short window: the tokens of the previous delta (left
    context, so sentencepiece-style leading spaces and byte-level merges come out right)
    plus the tokens not yet emitted, and returns the text beyond the context. Text that
    ends in U+FFFD (a multi-byte character still incomplete) is held back until the next
    tokens complete it; :meth:`flush` releases whatever is still held at the end, except a
    trailing incomplete character: output cut mid-character (max tokens, a stop token)
    ends before it, never in U+FFFD.

    Invariant: ``"".join(deltas) + flush() == tokenizer.decode(output_ids).rstrip("\ufffd")``
    whenever the prompt is empty, and for any prompt with byte-level tokenizers (with a prompt, a
    sentencepiece leading space of the first output token is kept, as it should be in a
    stream, while decoding the output alone would drop it). One exception: sentencepiece
    byte fallback turns a whole run of byte tokens into U+FFFD, retroactively, when any
    byte in it is invalid; a stream cannot take back text it emitted, so for such invalid
    output only the valid characters are promised to match.
    """

    __slots__ = (
        "_tok",
        "_skip_special",
        "_special",
        "_ids",
        "_prefix_offset",
        "_read_offset",
    )

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tok = tokenizer
        self._skip_special = skip_special_tokens
        self._special = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        # Skipped special tokens never enter the window: decode would drop them anyway,
        # and keeping them could make a window start with a real token after a dropped one
        # (losing its leading space) or grow the window without emitting anything.
        context = [int(t) for t in prompt_token_ids if int(t) not in self._special]
        context = context[-_PROMPT_CONTEXT_TOKENS:]
        self._ids: list[int] = context
        # ids[prefix_offset:read_offset] was already emitted (or is prompt context);
        # ids[read_offset:] is pending.
        self._prefix_offset = 0
        self._read_offset = len(context)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the new text it completes (maybe "")."""
        token_id = int(token_id)
        if token_id in self._special:
            return ""
        self._ids.append(token_id)
        prefix_text, new_text = self._decode_window()
        if new_text.endswith(_REPLACEMENT) or len(new_text) <= len(prefix_text):
            # Incomplete character, or nothing visible yet: wait for more tokens.
            return ""
        delta = new_text[len(prefix_text):]
        self._advance()
        return delta

    def flush(self) -> str:
        """Release held-back text at the end of generation.

        Trailing U+FFFD is dropped: after decoding, an incomplete last character (the
        output was cut inside it) can't be told from an invalid byte or a literal U+FFFD,
        and none of them is text a user wants at the end of an answer.
        """
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text, new_text = self._decode_window()
        self._advance()
        return new_text[len(prefix_text):].rstrip(_REPLACEMENT)

    def _decode_window(self) -> tuple[str, str]:
        window = self._ids[self._prefix_offset:]
        n_prefix = self._read_offset - self._prefix_offset
        # Special tokens were filtered on entry, so decoding need not skip any; when the
        # caller keeps specials, they are decoded as text as decode() would.
        prefix_text = self._tok.decode(window[:n_prefix], skip_special_tokens=self._skip_special)
        new_text = self._tok.decode(window, skip_special_tokens=self._skip_special)
        return prefix_text, new_text

    def _advance(self) -> None:
        # The emitted tokens become the next window's left context; older ones are
        # dropped from the list so memory and work per push stay constant.
        start = self._read_offset
        end = len(self._ids)
        del self._ids[:start]
        self._prefix_offset = 0
        self._read_offset = end - start
