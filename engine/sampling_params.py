"""Per-request sampling parameters (validated on construction)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from engine.errors import InvalidRequestError
from engine.structured import StructuredOutput

#: The largest seed a request may use: torch.Generator.manual_seed takes 64-bit unsigned
#: values (negative ones wrap around to the same streams, so they are refused as ambiguous).
MAX_SEED = 2**64 - 1
#: Temperatures below this decode greedily (vLLM's threshold too): dividing the logits by a
#: smaller one overflows float32 (a tiny temperature rounds to 0 there, or 30 / 1e-38 is inf),
#: the softmax turns into NaN and the draw picks token 0; the argmax is what such a
#: temperature means anyway.
GREEDY_TEMPERATURE = 1e-5
#: Fields that must be whole numbers (``None`` allowed for ``logprobs`` and ``seed``).
_INT_FIELDS = ("max_tokens", "top_k", "logprobs", "seed")
#: logit_bias: at most this many entries (OpenAI's limit), each in [-100, 100].
MAX_LOGIT_BIAS = 300
LOGIT_BIAS_RANGE = 100.0
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """How to pick each next token, and when to stop.

    ``temperature == 0`` (or below ``GREEDY_TEMPERATURE``) means greedy. ``top_k <= 0`` (or 0) disables top-k;
    ``top_p == 1`` disables nucleus sampling; ``min_p == 0`` disables min-p.
    Penalties follow the usual conventions: ``repetition_penalty`` (1 = off) divides
    positive / multiplies negative logits of every token already seen (prompt and output);
    ``presence_penalty`` and ``frequency_penalty`` (0 = off) are subtracted for tokens
    already generated, once and per occurrence respectively.
    ``seed`` makes the request's sampling reproducible whatever else is in the batch.
    ``logprobs`` = N returns the N most likely tokens' log-probabilities at each step
    (of the model's raw distribution) plus the chosen token's.
    ``logit_bias`` adds a bias in [-100, 100] to the logits of the token ids it names
    before penalties and sampling, greedy included (a dict ``{id: bias}`` or pairs; stored
    as sorted ``(id, bias)`` pairs); the engine checks the ids against the vocabulary.
    ``structured`` constrains the output to JSON or a JSON Schema during decoding
    (``engine.structured``); the request then ends with "stop" when the grammar is
    complete, ``ignore_eos`` or not (nothing may follow a complete answer).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: tuple[tuple[int, float], ...] = ()
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        # Accept lists for convenience but store tuples (frozen + hashable).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) for t in self.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be token ids (integers), got {self.stop_token_ids!r}.")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        for name in _INT_FIELDS:
            _check_integer(self, name)
        for name in _FLOAT_FIELDS:
            _check_number(self, name)
        if self.max_tokens <= 0:
            raise InvalidRequestError(
                f"max_tokens must be a positive integer, got {self.max_tokens!r}: "
                "ask for at least 1 new token."
            )
        # Comparisons are written so that nan fails them too (nan compares false to anything).
        if not self.temperature >= 0 or math.isinf(self.temperature):
            raise InvalidRequestError(
                f"temperature must be a finite number >= 0, got {self.temperature}: use 0 for greedy "
                "decoding, around 0.7 for varied text."
            )
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(
                f"top_p must be in (0, 1], got {self.top_p}: use 1 to disable nucleus sampling."
            )
        if self.top_k == -1:  # vLLM's and transformers' "disabled": the same as 0 here
            object.__setattr__(self, "top_k", 0)
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 or -1 disables it), got {self.top_k}.")
        if not (0.0 <= self.min_p <= 1.0):
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}.")
        if not self.repetition_penalty > 0 or math.isinf(self.repetition_penalty):
            raise InvalidRequestError(
                f"repetition_penalty must be a finite number > 0 (1 disables it), got {self.repetition_penalty}."
            )
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (-2.0 <= v <= 2.0):
                raise InvalidRequestError(f"{name} must be in [-2, 2] (0 disables it), got {v}.")
        if self.logprobs is not None and not (0 <= self.logprobs <= 20):
            raise InvalidRequestError(f"logprobs must be an integer in [0, 20], got {self.logprobs}.")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty.")
        object.__setattr__(self, "logit_bias", _checked_logit_bias(self.logit_bias))
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise InvalidRequestError(f"structured must be a StructuredOutput, got {self.structured!r}.")
        if self.seed is not None and not (0 <= self.seed <= MAX_SEED):
            raise InvalidRequestError(
                f"seed must be an integer from 0 to {MAX_SEED} (2**64 - 1), got {self.seed}: "
                "leave it out for a random seed."
            )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def _check_integer(params: SamplingParams, name: str) -> None:
    """A whole number (a bool is not one), stored as a plain ``int``; ``None`` where allowed."""
    value = getattr(params, name)
    if value is None and name in ("logprobs", "seed"):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        ranges = {"max_tokens": "a positive integer", "top_k": "an integer >= 0 (0 disables it)",
                  "logprobs": "an integer in [0, 20]", "seed": f"an integer from 0 to {MAX_SEED}"}
        raise InvalidRequestError(f"{name} must be {ranges[name]}, got {value!r}.")
    object.__setattr__(params, name, int(value))


def _check_number(params: SamplingParams, name: str) -> None:
    """A real number (ints welcome, a bool or a string is not one), stored as a ``float``."""
    value = getattr(params, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidRequestError(f"{name} must be a number, got {value!r}.")
    object.__setattr__(params, name, float(value))


def _checked_logit_bias(bias) -> tuple[tuple[int, float], ...]:
    """``bias`` (a dict or (id, bias) pairs) as sorted pairs, each checked."""
    items = list(bias.items()) if isinstance(bias, dict) else list(bias)
    if len(items) > MAX_LOGIT_BIAS:
        raise InvalidRequestError(f"logit_bias must have at most {MAX_LOGIT_BIAS} entries, got {len(items)}.")
    out: dict[int, float] = {}
    for item in items:
        try:
            token, value = item
        except (TypeError, ValueError):
            raise InvalidRequestError(f"logit_bias must map token ids to biases, got the entry {item!r}.") from None
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
            raise InvalidRequestError(f"logit_bias must map token ids (integers >= 0) to biases, got the key "
                                      f"{token!r}.")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE:
            raise InvalidRequestError(f"logit_bias must map token ids to biases from -100 to 100, got {value!r} "
                                      f"for token {token}.")
        if int(token) in out:
            raise InvalidRequestError(f"logit_bias must name each token once; token {token} appears twice.")
        out[int(token)] = float(value)
    return tuple(sorted(out.items()))
