"""``shape:<name>`` models: a named config (``engine.shapes``) with random weights.

Benchmarks need the exact layer sizes of real models (Llama-3.1-8B, ...) without
downloading them. ``Engine.load(model="shape:llama-8b")`` builds the native model from
``engine.shapes.shape_config`` and fills it with random weights drawn with a fixed seed.

Such a model has no tokenizer: its weights mean nothing, so text in and text out would be
noise anyway. Requests pass ``prompt_token_ids``; the generated ids come back and the
text of every token event is empty. ``TokenIdsOnlyTokenizer`` stands in for the real
tokenizer so the engine needs no special case: text prompts and chat messages are
rejected with a message that says what to do, and no id is ever an end-of-sequence.

A shape quantized with calibration (``--quant awq``/``gptq``) is written as a checkpoint
folder (``engine.quant.export``) whose config.json names the shape (``SHAPE_CONFIG_KEY``):
it has no tokenizer either, and loads as a shape (``shape_of_config``), so the bench and
``hearth compare`` feed it token ids as they do the shape itself.
"""

from __future__ import annotations

from typing import Any

from engine.errors import InvalidRequestError

SHAPE_PREFIX = "shape:"
#: Random weights are drawn with this seed, so every load of a shape is identical.
SHAPE_SEED = 0
#: config.json key of a checkpoint folder written from a shape: the shape's name.
SHAPE_CONFIG_KEY = "hearth_shape"
#: What ``ModelInfo.quant_detail`` adds for a calibrated shape, so that nobody reads
#: quality into its numbers: random weights calibrated on bytes, not on tokens.
SHAPE_CALIBRATION_NOTE = "random-weight shape: calibrated on the calibration text's bytes; speed only"


def is_shape_model(model: str | None) -> bool:
    """True for ``"shape:<name>"`` model names."""
    return model is not None and model.strip().startswith(SHAPE_PREFIX)


def shape_model_config(model: str, revision: str | None = None) -> tuple[str, dict[str, Any]]:
    """``"shape:llama-8b"`` -> (``"llama-8b"``, its config.json dict).

    Raises:
        InvalidRequestError: unknown shape name (the message lists the known ones), or a
            revision was given (shapes are not Hub repos).
    """
    from engine.shapes import shape_config

    name = model.strip()[len(SHAPE_PREFIX):].strip()
    if revision is not None:
        raise InvalidRequestError(
            f"a revision ('{revision}') only applies to Hub repos, not to the random-weight "
            f"shape {name!r}; drop the revision."
        )
    return name, shape_config(name)


def shape_of_config(cfg: dict[str, Any]) -> str | None:
    """The shape a checkpoint folder was written from (its config.json ``cfg``), or None
    for a real model."""
    shape = cfg.get(SHAPE_CONFIG_KEY)
    return shape if isinstance(shape, str) and shape else None


def byte_token_ids(text: str, vocab_size: int) -> list[int]:
    """Token ids for a model without a tokenizer: ``text``'s UTF-8 bytes modulo the
    vocabulary (about four per real token), the stand-in ``hearth compare`` uses for its
    prompts on a shape too."""
    return [b % vocab_size for b in text.encode("utf-8")]


class _EveryId:
    """A set that contains every token id (see ``TokenIdsOnlyTokenizer.special_token_ids``)."""

    __slots__ = ()

    def __contains__(self, item: object) -> bool:
        return True


class TokenIdsOnlyTokenizer:
    """The tokenizer of a model that has none: token ids in, token ids out, no text.

    Implements the parts of ``engine.tokenizer.Tokenizer`` the engine uses. Every id is
    reported as special, so the incremental detokenizer skips it at no cost and token
    events carry empty text; ``decode`` returns "" for the same reason.
    """

    def __init__(self, vocab_size: int, model_name: str) -> None:
        self._vocab_size = int(vocab_size)
        self._model_name = model_name

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """No end-of-sequence token: generation stops on length or stop_token_ids only."""
        return frozenset()

    @property
    def bos_token_id(self) -> None:
        return None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def __len__(self) -> int:
        return self._vocab_size

    @property
    def has_chat_template(self) -> bool:
        return False

    @property
    def special_token_ids(self) -> _EveryId:
        """Contains every id, so skip_special_tokens drops all output text (there is none)."""
        return _EveryId()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise InvalidRequestError(
            f"{self._model_name} has random weights and no tokenizer, so it cannot read text: "
            "give it one (--tokenizer DIR, a folder of tokenizer files) or send token ids instead "
            "(Request(prompt_token_ids=[...]))."
        )

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""

    def render_chat(self, messages, system: str | None = None, tools=None) -> str:
        raise InvalidRequestError(
            f"{self._model_name} has random weights and no tokenizer or chat template: "
            "give it a tokenizer (--tokenizer DIR, a folder of tokenizer files) or send token ids instead "
            "(Request(prompt_token_ids=[...]))."
        )

    def apply_chat_template(self, messages, system: str | None = None) -> list[int]:
        return self.encode(self.render_chat(messages, system))
