"""Structured outputs (a grammar's mask during decoding) and logit_bias, through the engine
on the tiny random-weight model: greedy output that parses and validates, batches where
the constrained or biased row leaves the others' tokens alone, and bad requests."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from engine.api import Engine, InvalidRequestError, Request, SamplingParams, StructuredOutput
from tests.conftest import engine_device

PROMPT = [5, 6, 7, 8, 9]
SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]},
                   "n": {"type": "integer", "minimum": 0, "maximum": 9},
                   "ok": {"type": "boolean"}},
    "required": ["color", "n", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tiny_models):
    e = Engine.load(str(tiny_models["llama-tied"]), device=engine_device(), dtype="float32",
                    max_model_len=512, num_blocks=256)
    yield e
    e.shutdown()


def run(engine, ids=PROMPT, **params):
    params.setdefault("temperature", 0.0)
    return engine.submit(Request(prompt_token_ids=ids, params=SamplingParams(**params))).result()


def token_of(engine, text: str) -> int:
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, ids
    return ids[0]


def test_json_schema_output_parses_and_validates(engine):
    so = StructuredOutput("json_schema", json.dumps(SCHEMA))
    for prompt in (PROMPT, [100, 200, 300], [4000, 17, 9, 12000, 3]):
        c = run(engine, prompt, max_tokens=64, structured=so)
        assert c.finish_reason == "stop", c.text  # the grammar ended it, with EOS
        jsonschema.validate(json.loads(c.text), SCHEMA)
        assert c.token_ids[-1] in engine.tokenizer.eos_token_ids


@pytest.mark.parametrize("path", ["eager", "fallback"])
def test_every_decode_path_honours_the_schema(tiny_models, path):
    """On a CPU with AVX2 the module's engine decodes batch 1 by the C step; here a batch of
    two decodes eagerly, and the transformers fallback runner has its own loop."""
    e = Engine.load(str(tiny_models["llama-tied"]), device=engine_device(), dtype="float32",
                    max_model_len=256, num_blocks=64, force_fallback=path == "fallback")
    try:
        so = StructuredOutput("json_schema", json.dumps(SCHEMA))
        handles = [e.submit(Request(prompt_token_ids=p, params=SamplingParams(
            max_tokens=64, temperature=0.0, structured=so))) for p in (PROMPT, [100, 200, 300])]
        for h in handles:
            c = h.result()
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), SCHEMA)
    finally:
        e.shutdown()


def test_unconstrained_output_is_not_json(engine):
    """The check above can fail: this model's own greedy answer is not the schema's JSON."""
    c = run(engine, max_tokens=20)
    with pytest.raises((ValueError, jsonschema.ValidationError)):
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_grammar_ends_the_answer_even_with_ignore_eos(engine):
    so = StructuredOutput("json_schema", json.dumps({"enum": ["yes", "no"]}))
    c = run(engine, max_tokens=30, structured=so, ignore_eos=True)
    assert c.finish_reason == "stop"
    assert json.loads(c.text) in ("yes", "no")


def test_json_object_parses(engine):
    # Random weights would write one endless key: a bias towards "}" closes the object as
    # soon as the grammar allows (it also shows the bias and the mask working together).
    # ("{}" is one token of this vocabulary, "}" another: either closes it at once.)
    close = {token_of(engine, "}"): 100, token_of(engine, "{}"): 100}
    c = run(engine, max_tokens=16, structured=StructuredOutput("json_object"), logit_bias=close)
    assert c.finish_reason == "stop"
    assert json.loads(c.text) == {}
    # Unbiased it runs to the length limit, still inside one JSON object.
    c = run(engine, max_tokens=8, structured=StructuredOutput("json_object"))
    assert c.finish_reason == "length" and c.text.startswith("{")


def test_constrained_row_leaves_the_batch_alone(engine):
    """One constrained row among unconstrained ones (greedy and seeded sampling): theirs
    are the tokens they get alone, and the constrained one's is what it gets alone."""
    so = StructuredOutput("json_schema", json.dumps(SCHEMA))
    plain = [dict(max_tokens=12, ignore_eos=True),
             dict(max_tokens=12, ignore_eos=True, temperature=0.8, seed=3)]
    prompts = [[11, 12, 13, 14], [21, 22, 23]]
    solo = [run(engine, p, **kw).token_ids for p, kw in zip(prompts, plain)]
    constrained_solo = run(engine, max_tokens=64, structured=so).token_ids
    handles = [engine.submit(Request(prompt_token_ids=PROMPT,
                                     params=SamplingParams(max_tokens=64, temperature=0.0, structured=so)))]
    handles += [engine.submit(Request(prompt_token_ids=p, params=SamplingParams(**{"temperature": 0.0, **kw})))
                for p, kw in zip(prompts, plain)]
    out = [h.result().token_ids for h in handles]
    assert out[0] == constrained_solo
    assert out[1:] == solo


def test_logit_bias_forces_and_bans_under_greedy(engine):
    base = run(engine, max_tokens=6, ignore_eos=True).token_ids
    forced = 4242
    assert forced not in base
    assert run(engine, max_tokens=6, ignore_eos=True, logit_bias={forced: 100}).token_ids == [forced] * 6
    banned = run(engine, max_tokens=1, logit_bias={base[0]: -100}).token_ids
    assert banned[0] != base[0]
    # In a batch the biased rows change, the plain one does not.
    other = [31, 32, 33]
    other_alone = run(engine, other, max_tokens=6, ignore_eos=True).token_ids
    handles = [engine.submit(Request(prompt_token_ids=PROMPT, params=SamplingParams(
        max_tokens=6, temperature=0.0, ignore_eos=True, logit_bias={forced: 100}))),
        engine.submit(Request(prompt_token_ids=other, params=SamplingParams(
            max_tokens=6, temperature=0.0, ignore_eos=True)))]
    assert [h.result().token_ids for h in handles] == [[forced] * 6, other_alone]


def test_logit_bias_applies_to_sampling(engine):
    c = run(engine, max_tokens=5, ignore_eos=True, temperature=1.0, seed=1, logit_bias={77: 100})
    assert c.token_ids == [77] * 5


@pytest.mark.parametrize("schema, words", [
    ('{"type": "frobnicate"}', "frobnicate"),
    ('{"not": {"type": "string"}}', "not"),
    ('{"type": "array", "uniqueItems": true}', "uniqueItems"),
    ('{"type": "string", "pattern": "(a"}', "regex"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "a list"),
])
def test_bad_schemas_are_refused(schema, words):
    with pytest.raises(InvalidRequestError, match="response_format") as info:
        StructuredOutput("json_schema", schema)
    assert words in str(info.value)


def test_bad_structured_and_bias_requests(engine):
    with pytest.raises(InvalidRequestError, match="json_object, json_schema"):
        StructuredOutput("xml")
    with pytest.raises(InvalidRequestError, match="needs a schema"):
        StructuredOutput("json_schema")
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        SamplingParams(logit_bias={1: 101})
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        SamplingParams(logit_bias={-1: 1})
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        SamplingParams(logit_bias={float("nan"): 1})
    with pytest.raises(InvalidRequestError, match="at most 300"):
        SamplingParams(logit_bias={i: 1 for i in range(301)})
    with pytest.raises(InvalidRequestError, match=r"logit_bias must name token ids in the vocabulary"):
        run(engine, logit_bias={49152: 5})
    assert SamplingParams(logit_bias={3: 1, 1: -2}).logit_bias == ((1, -2.0), (3, 1.0))


def test_sampler_applies_mask_only_to_its_rows():
    """The sampler alone: a mask for row 1 of 3 leaves rows 0 and 2 bit-exact."""
    from engine.runner.sampler import Sampler

    logits = torch.randn(3, 100)
    mask = torch.zeros(1, 4, dtype=torch.int32)
    mask[0, 1] = 1 << 5  # only token 37
    params = [SamplingParams(temperature=0.0, logprobs=0)] * 3
    out = Sampler()(logits, params, [()] * 3, [()] * 3, [None] * 3, (mask, [1]))
    top = logits.argmax(dim=-1).tolist()
    assert out.token_ids == [top[0], 37, top[2]]
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[1].logprob == pytest.approx(raw[1, 37].item(), rel=1e-5)  # the model's own


@pytest.mark.parametrize("which", ["smollm2", "sentencepiece"])
def test_grammar_walk_decodes_to_valid_json(which, smol_tok, tiny_tok):
    """The grammar engine's view of each kind of tokenizer agrees with the tokenizer's own
    decoding: SmolLM2's byte-level BPE (read from the bundled GGUF) and a sentencepiece-
    style one (metaspace, byte fallback tokens). A seeded random walk over the allowed
    tokens until only EOS is left decodes to JSON that validates."""
    from engine.runner.grammar import RowGrammar, TokenVocabulary, apply_token_bitmask, grammar_masks

    tok = smol_tok if which == "smollm2" else tiny_tok
    vocab = len(tok.hf_tokenizer)
    grammar = RowGrammar(TokenVocabulary(tok.hf_tokenizer, vocab, tok.eos_token_ids),
                         StructuredOutput("json_schema", json.dumps(SCHEMA)).grammar, "walk")
    gen = torch.Generator().manual_seed(0)
    ids = []
    for _ in range(200):
        mask, _rows = grammar_masks([grammar], vocab)
        logits = torch.zeros(1, vocab)
        apply_token_bitmask(logits, mask)
        allowed = torch.isfinite(logits[0]).nonzero()[:, 0]
        if set(allowed.tolist()) <= tok.eos_token_ids:
            break
        t = int(allowed[torch.randint(len(allowed), (1,), generator=gen)])
        if t in tok.eos_token_ids:
            break
        ids.append(t)
        grammar.advance(t)
    else:
        pytest.fail("the walk never reached the end of the grammar")
    jsonschema.validate(json.loads(tok.decode(ids)), SCHEMA)


def test_grammar_state_survives_preemption(tiny_models, engine):
    """Six constrained requests in a KV cache too small for them all: preempted ones are
    recomputed, and their matchers (which follow the tokens, not the cache) carry on: the
    tokens are those each request gets alone."""
    long_string = {"type": "object", "properties": {"s": {"type": "string", "minLength": 500}},
                   "required": ["s"]}
    params = SamplingParams(max_tokens=40, temperature=0.0,
                            structured=StructuredOutput("json_schema", json.dumps(long_string)))
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 49152, (30 + 7 * i,), generator=g).tolist() for i in range(6)]
    ref = [run(engine, p, max_tokens=40, structured=params.structured).token_ids for p in prompts]
    tight = Engine.load(str(tiny_models["llama-tied"]), device=engine_device(), dtype="float32",
                        max_model_len=128, num_blocks=12)
    try:
        got = [h.result().token_ids for h in [tight.submit(Request(prompt_token_ids=p, params=params))
                                              for p in prompts]]
        assert tight.stats().num_preemptions > 0
        assert got == ref
        assert all(tight.tokenizer.decode(t).startswith('{"s": "') for t in got)
    finally:
        tight.shutdown()


def test_a_lark_grammar_is_the_servers_own_kind_and_is_checked():
    """"lark" (the API server's forced tool calls) compiles its text; a broken grammar or a
    %json schema it can't enforce is refused with why; response_format's message names only
    the kinds a client may send."""
    from engine.api import InvalidRequestError, StructuredOutput

    ok = StructuredOutput("lark", 'start: "a" args\nargs: ' + StructuredOutput.json_rule({"type": "object"}) + "\n")
    assert ok.grammar and '"whitespace_flexible": false' in ok.schema
    with pytest.raises(InvalidRequestError, match="can't be enforced"):
        StructuredOutput("lark", "start: undefined_rule\n")
    with pytest.raises(InvalidRequestError, match="can't be enforced"):
        StructuredOutput("lark", "start: " + StructuredOutput.json_rule({"not": {"type": "string"}}) + "\n")
    with pytest.raises(InvalidRequestError, match="needs its grammar"):
        StructuredOutput("lark", "")
    with pytest.raises(InvalidRequestError, match=r"one of json_object, json_schema \(or text"):
        StructuredOutput("regex", "a+")
