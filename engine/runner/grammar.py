"""Constrained decoding in the runner: each structured request's grammar matcher, the
allowed-token masks it gives, and applying them to the logits.

A request whose ``SamplingParams.structured`` is set gets an llguidance matcher when the
runner first hears of it (``RequestStateMixin``). Before each of its sampled steps the
matcher writes the tokens its grammar allows next into one row of a bitmask (32 tokens per
int32 word, on the host), the sampler sends the logits of every other token to -inf, and
the sampled token then advances the matcher. Once the grammar is complete only the
end-of-sequence tokens stay allowed, so the request ends with "stop" there. Everything is
per row: unconstrained rows of the same batch keep all their logits (their bitmask rows
are all ones and, when no row is constrained, no mask is made at all).

The matcher's state follows the request's tokens, not its KV cache: a preempted request
keeps it (its tokens stay; only K/V is recomputed), a finished one drops it.

The masks are computed on the host between steps. On a GPU the mask is copied to the
device and applied to the graph's logits after replay, like any sampler step;
``RequestStateMixin.sample`` fills the masks before anything waits for the device, so that
host work overlaps the step's kernels. Greedy constrained rows also take the pipelined
decode (``engine.runner.execute``): the step after this one is launched from this step's
masked argmax, still on the device, and keeps its logits; the host advances the grammar
with this step's token and fills the next mask while that step runs, and applies it to
those logits when the engine asks for the step.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable, Sequence

import numpy as np
import torch

log = logging.getLogger("hearth.runner")


class TokenVocabulary:
    """The grammar engine's view of the model's tokenizer, built on first use and kept.

    llguidance reads the tokenizer's byte-level vocabulary (``tokenizer.json``'s model) to
    know which bytes each token spells; building it takes a fraction of a second at a
    49k vocabulary, so a model that never sees a structured request never pays it.
    ``n_vocab`` is the logits' width (the model's vocabulary, which may be padded beyond
    the tokenizer's); ``eos_ids`` the tokens that end generation, the ones allowed once the
    grammar is complete."""

    def __init__(self, hf_tokenizer, n_vocab: int, eos_ids: Iterable[int]) -> None:
        self._hf = hf_tokenizer
        self.n_vocab = int(n_vocab)
        self.eos_ids = sorted(int(i) for i in eos_ids)
        self._built = None
        self._error: Exception | None = None  # a tokenizer llguidance can't read: remembered
        self._lock = threading.Lock()

    def get(self):
        """The llguidance ``LLTokenizer`` (built once, on the first call); a build that
        failed raises the same error again at once rather than retrying for seconds."""
        with self._lock:
            if self._error is not None:
                raise self._error
            if self._built is None:
                import llguidance.hf

                n_vocab = max(self.n_vocab, len(self._hf))
                try:
                    self._built = llguidance.hf.from_tokenizer(self._hf, n_vocab=n_vocab, eos_token=self.eos_ids)
                except Exception as e:
                    self._error = e
                    raise
            return self._built


_VOCABULARIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {width: vocabulary}
_VOCABULARIES_LOCK = threading.Lock()


def token_vocabulary(tokenizer, vocab_size: int) -> TokenVocabulary | None:
    """The grammar engine's view of ``tokenizer`` (built on first use), or None when
    structured output can't work: no Hugging Face tokenizer (benchmark shapes), or no
    end-of-sequence token to end a complete answer with. One per tokenizer and logits
    width, shared: the engine's structured requests and the server's forced tool calls
    (``grammar_unavailable``) build it, and meet a tokenizer it can't read, once."""
    hf = getattr(tokenizer, "hf_tokenizer", None)
    if hf is None or not getattr(hf, "backend_tokenizer", None) or not tokenizer.eos_token_ids:
        return None
    with _VOCABULARIES_LOCK:
        made = _VOCABULARIES.setdefault(tokenizer, {})
        if vocab_size not in made:
            made[vocab_size] = TokenVocabulary(hf, vocab_size, tokenizer.eos_token_ids)
        return made[vocab_size]


def vocabulary_problem(vocabulary: TokenVocabulary | None) -> str | None:
    """Why structured output can't run with ``vocabulary`` (``token_vocabulary``'s), or None
    when it can (its first call builds it)."""
    if vocabulary is None:
        return ("it needs the model's tokenizer with an end-of-sequence token, and this model has none (a "
                "benchmark shape, or a tokenizer without EOS)")
    try:
        vocabulary.get()
    except Exception as e:  # a tokenizer llguidance can't read
        return f"the grammar engine could not read the model's tokenizer ({type(e).__name__}: {e})"
    return None


def grammar_unavailable(tokenizer, vocab_size: int) -> str | None:
    """Why the grammar engine can't constrain answers written with ``tokenizer`` (a Hearth
    ``Tokenizer``) to ``vocab_size`` logits, or None when it can: what ``check_request``
    would refuse a structured request for, asked ahead by a front end that can do without a
    grammar (the server's forced tool calls). The engine's own view of the tokenizer where
    it is the engine's (``token_vocabulary``)."""
    return vocabulary_problem(token_vocabulary(tokenizer, vocab_size))


def check_request(params, vocab_size: int, vocabulary: TokenVocabulary | None) -> None:
    """What SamplingParams can't check alone: logit_bias's ids against the vocabulary, and
    that structured output has a tokenizer to work with. Called on the submitting thread,
    so the grammar engine's view of the tokenizer is built there for the first structured
    request (a fraction of a second), not on the engine's loop between two steps."""
    from engine.errors import InvalidRequestError

    bad = [t for t, _ in params.logit_bias if t >= vocab_size]
    if bad:
        raise InvalidRequestError(f"logit_bias must name token ids in the vocabulary (0..{vocab_size - 1}), "
                                  f"got {bad[0]}.")
    if params.structured is None:
        return
    what, drop = (("response_format", "drop response_format") if params.structured.kind != "lark" else
                  ("a tool_choice that forces a call (its grammar)", "use tool_choice auto"))
    why = vocabulary_problem(vocabulary)
    if why is not None:
        raise InvalidRequestError(f"{what} can't be used with this model: {why}; {drop}.")


class RowGrammar:
    """One request's matcher (see the module docstring)."""

    __slots__ = ("matcher", "request_id", "eos_ids", "words", "_warned")

    def __init__(self, vocabulary: TokenVocabulary, grammar: str, request_id: str) -> None:
        import llguidance

        tokenizer = vocabulary.get()
        self.matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        self.words = (tokenizer.vocab_size + 31) // 32  # the int32 words its mask fills
        self.request_id = request_id
        self.eos_ids = vocabulary.eos_ids
        self._warned = False

    def fill(self, mask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into ``mask[row]`` (an int32 host bitmask)."""
        from llguidance.torch import fill_next_token_bitmask

        if not self.matcher.is_error():
            fill_next_token_bitmask(self.matcher, mask, row)
        if self.matcher.is_error():
            # Never expected (every sampled token was allowed), but a matcher in error
            # allows nothing: allow only the end, so the request stops rather than run on
            # unconstrained or on garbage.
            if not self._warned:
                self._warned = True
                log.warning("grammar of request %s failed: %s; ending it", self.request_id,
                            self.matcher.get_error())
            mask[row].zero_()
            for t in self.eos_ids:
                mask[row, t // 32] |= _bit(t % 32)

    def advance(self, token: int) -> None:
        """Take the sampled ``token`` (an allowed one: the mask saw to it)."""
        self.matcher.consume_token(int(token))


def _bit(i: int) -> int:
    """Bit ``i`` of an int32 word, as a Python int torch stores without overflow."""
    return (1 << i) - (1 << 32 if i == 31 else 0)


def grammar_masks(grammars: Sequence[RowGrammar | None], vocab: int) -> tuple[torch.Tensor, list[int]] | None:
    """(an int32 [k, ceil(vocab / 32) or wider] host bitmask, the k rows with a grammar it is for)
    for a batch, or None when no row has a grammar."""
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return None
    # A tokenizer with more tokens than the logits (rare) fills a wider mask; the extra
    # bits are never applied.
    words = max([(vocab + 31) // 32] + [grammars[i].words for i in rows])
    mask = torch.full((len(rows), words), -1, dtype=torch.int32)
    for j, i in enumerate(rows):
        grammars[i].fill(mask, j)
    return mask, rows


#: float32's largest value: -FLT_MAX added twice overflows to exactly -inf.
_FLT_MAX = float(np.finfo(np.float32).max)


def apply_token_bitmask(logits: torch.Tensor, mask: torch.Tensor, rows: Sequence[int] | None = None) -> None:
    """Set ``logits[rows[j], t]`` (float32) to -inf where bit ``t`` of ``mask[j]`` is clear
    (bit ``t % 32`` of word ``t // 32``: llguidance's and xgrammar's layout), in place;
    ``rows`` defaults to all of them. ``mask`` is on the host; this runs on any device.

    The bits are unpacked on the host (numpy, ~20 us at 49k tokens) and applied by
    arithmetic, not by a select: each logit gets 0 (allowed: it stays bit-exact) or
    -FLT_MAX (refused) added twice, which overflows to exactly -inf. torch's masked_fill
    of a 49k-wide row took 60-250 us on the CPU here, a branch per element; the adds are
    vectorised (benchmarks/grammar_mask.py times the whole step)."""
    n, vocab = logits.shape
    rows = list(range(n)) if rows is None else list(rows)
    if mask.shape[0] != len(rows):
        raise ValueError(f"the mask has {mask.shape[0]} rows for {len(rows)} logit rows")
    bits = np.unpackbits(mask.numpy().view(np.uint8), axis=-1, bitorder="little")[:, :vocab]
    if bits.shape[1] < vocab:
        raise ValueError(f"the mask covers {bits.shape[1]} tokens, the logits {vocab}")
    bias = torch.from_numpy(bits).to(logits.device, non_blocking=True).to(torch.float32)
    bias.sub_(1).mul_(_FLT_MAX)
    if len(rows) == n:
        logits.add_(bias).add_(bias)
    else:
        idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
        logits[idx] = logits[idx].add_(bias).add_(bias)
