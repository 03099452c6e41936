"""What a runner keeps per request, keyed by request id, and sampling with it: shared by
the native and the transformers fallback runners."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.runner.grammar import RowGrammar, TokenVocabulary, grammar_masks
from engine.runner.io import RunnerInput, RunnerOutput, StepRow, launch_ahead_ok, needs_token_context
from engine.runner.sampler import NOT_A_NUMBER, Sampler, make_generator
from engine.sampling_params import SamplingParams


@dataclass(slots=True)
class KeptRequest:
    """A request's sampling state, from its ``NewRequest`` until a step lists it finished."""

    params: SamplingParams
    prompt_len: int
    generator: torch.Generator | None  # its own RNG when seeded (None: the shared one)
    launch_ahead: bool  # its decode steps may be launched ahead (io.launch_ahead_ok)
    needs_context: bool  # its rows must carry their token context (penalties)
    # prompt_len + max_tokens: once a decode step samples at position max_len - 2, the
    # request holds max_len tokens and ends by length.
    max_len: int
    grammar: RowGrammar | None = None  # its output's constraint (SamplingParams.structured)


class RequestStateMixin:
    """Per-request state (``_requests``: id -> KeptRequest) and the device sampler.

    A runner using it creates ``self._requests = {}``, ``self.sampler`` and ``self.logits_device``,
    and calls ``_update_requests`` first thing in ``execute``. Requests with structured
    outputs need ``token_vocabulary`` (the engine sets it after the load: the grammar
    engine's view of the tokenizer)."""

    sampler: Sampler
    logits_device: torch.device
    _requests: dict[str, KeptRequest]
    token_vocabulary: TokenVocabulary | None = None
    #: False on a tensor-parallel rank other than 0 (``engine.runner.tp_worker``): rank 0
    #: samples; this one runs the same steps for its collectives and keeps no RNG or grammar.
    samples = True

    def _update_requests(self, inp: RunnerInput) -> None:
        """Forget finished requests, then take in the new ones (a finished id may return)."""
        for rid in inp.finished:
            self._drop_request(rid)
        for new in inp.new_requests:
            p = new.params
            grammar = None
            if p.structured is not None and self.samples:
                if self.token_vocabulary is None:
                    raise ValueError(f"request {new.request_id!r} has structured output, but the runner "
                                     "was given no token vocabulary (token_vocabulary)")
                grammar = RowGrammar(self.token_vocabulary, p.structured.grammar, new.request_id)
            self._requests[new.request_id] = KeptRequest(
                p, new.prompt_len, make_generator(p.seed, self.logits_device) if self.samples else None,
                launch_ahead_ok(p),
                needs_token_context(p), new.prompt_len + p.max_tokens, grammar)

    def _drop_request(self, request_id: str) -> None:
        """Drop everything kept for a finished request (runners extend it)."""
        self._requests.pop(request_id, None)

    def sample(self, logits: torch.Tensor, rows: list[StepRow],
               kept: list[KeptRequest] | None = None) -> RunnerOutput:
        """Sample one token per row of ``logits`` for ``rows`` (the sampled rows, in order;
        ``kept``: their requests' state, when the caller has looked it up already)."""
        if not self.samples:
            return RunnerOutput([], None)
        if kept is None:
            kept = self._kept(rows)
        prompts, outputs = [], []
        for row, k in zip(rows, kept):
            ctx = row.context
            if ctx is None:
                if k.needs_context:
                    raise ValueError(f"request {row.request_id!r} uses penalties but its row "
                                     "carries no token context")
                prompts.append(())
                outputs.append(())
            else:
                prompts.append(ctx[:k.prompt_len])
                outputs.append(ctx[k.prompt_len:])
        allowed = grammar_masks([k.grammar for k in kept], logits.shape[1])
        res = self.sampler(logits, [k.params for k in kept], prompts, outputs,
                           [k.generator for k in kept], allowed)
        if allowed is not None:  # the sampled tokens move the grammars on (a row that broke ends)
            for i in allowed[1]:
                if res.token_ids[i] != NOT_A_NUMBER:
                    kept[i].grammar.advance(res.token_ids[i])
        return RunnerOutput(res.token_ids, res.logprobs)

    def _kept(self, rows: list[StepRow]) -> list[KeptRequest]:
        try:
            return [self._requests[row.request_id] for row in rows]
        except KeyError as e:
            raise ValueError(f"request {e.args[0]!r} was never announced to the runner "
                             "(RunnerInput.new_requests)") from None
