"""A comparison's plan is checked up front with errors that say what to do; the bundled
prompt set and prompts files."""

from __future__ import annotations

import json

import pytest

from app.services.compare_plan import MAX_CONFIGS, CompareConfig, ComparePlan
from app.services.compare_prompts import bundled_prompt_names, bundled_prompt_texts, read_prompts_file
from engine.api import InvalidRequestError


def plan(*quants, **kw) -> ComparePlan:
    kw.setdefault("prompts", ("Hello",))
    return ComparePlan(configs=tuple(q if isinstance(q, CompareConfig) else CompareConfig(q) for q in quants), **kw)


def test_checked_plan_has_canonical_names_and_labels():
    p = plan(CompareConfig("bfloat16"), CompareConfig("int4", "torch", "e4m3")).checked()
    assert [c.quant for c in p.configs] == ["bf16", "int4"]
    assert p.configs[1].kv_dtype == "fp8"
    assert p.labels == ["bf16", "int4 · torch · kv fp8"]
    assert p.sampling().temperature == 0.0  # greedy by default
    sampled = plan("int8", seed=7).checked().sampling()
    assert sampled.seed == 7 and sampled.temperature > 0


@pytest.mark.parametrize("build, mention", [
    (lambda: plan(), "at least one configuration"),
    (lambda: plan(*[CompareConfig("int4", "auto", kv) for kv in ("auto", "fp8")],
                  *[CompareConfig(q) for q in ("none", "bf16", "fp16", "int8", "gptq")]), f"at most {MAX_CONFIGS}"),
    (lambda: plan("int3"), "unknown quantization 'int3'; choose one of"),
    (lambda: plan(CompareConfig("int8", attention="warp")), "unknown attention backend 'warp'"),
    (lambda: plan(CompareConfig("int8", kv_dtype="int2")), "kv_cache_dtype must be one of"),
    (lambda: plan("int8", "bf16", "int8"), "configuration 3 (int8) is the same as configuration 1"),
    (lambda: plan("bf16", "bfloat16"), "is the same as configuration 1"),  # an alias is no new configuration
    (lambda: plan("int8", prompts=()), "at least one prompt"),
    (lambda: plan("int8", prompts=("fine", "  \n")), "prompt 2 is empty"),
    (lambda: plan("int8", prompts="one string"), "not one string"),
    (lambda: plan("int8", prompts=("caf\udce9",)), "prompt 1 is not valid UTF-8"),
    (lambda: plan("int8", max_tokens=0), "max_tokens must be a positive"),
    (lambda: plan("int8", eval_tokens=1), "eval_tokens must be at least 2"),
    (lambda: plan("int8", seed=-1), "seed"),
    (lambda: plan("int8", load_options={"quantization": "int4"}), "set by quant"),
    (lambda: plan("int8", load_options={"max_model_length": 64}), "did you mean 'max_model_len'"),
    (lambda: plan("int8", device="tpu"), "device must be"),
])
def test_a_bad_plan_is_refused_before_anything_loads(build, mention):
    with pytest.raises(InvalidRequestError) as info:
        build().checked()
    assert mention in str(info.value)


def test_choices_that_cannot_run_here_are_not_refused_up_front():
    # A configuration that can't run on this machine records why when it runs; the
    # others go on (the "not available here" column), so the plan accepts it.
    plan("int8", "fp8").checked()


def test_plan_round_trips_through_its_json_form():
    p = plan("int8", CompareConfig("int4", "torch"), seed=3, eval_tokens=100,
             load_options={"max_model_len": 256}).checked()
    assert ComparePlan.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_bundled_prompt_set_has_the_five_everyday_tasks():
    names = bundled_prompt_names()
    texts = bundled_prompt_texts()
    assert names == ["fact", "summary", "code", "translation", "recall"]
    assert all(t.strip() for t in texts)
    recall = texts[names.index("recall")]
    assert "4127" in recall and len(recall) > 4000  # the fact to recall, in a long passage
    plan("int8", prompts=tuple(texts)).checked()


def test_text_prompts_file_has_one_prompt_per_blank_line_separated_block(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffFirst prompt\non two lines\n\n\n  \nSecond\r\n\r\nThird\n".encode())
    assert read_prompts_file(path) == ["First prompt\non two lines", "Second", "Third"]
    # files joined with cat, each with its byte-order mark: a mark that starts a line is not text
    path.write_bytes("\ufeffOne\n\n\ufeffTwo\n\n\ufeff\n\nThree \ufeff kept\n".encode())
    assert read_prompts_file(path) == ["One", "Two", "Three \ufeff kept"]


def test_json_prompts_file_takes_strings_or_the_bundled_form(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(["a", "b\n\nc"]), encoding="utf-8")
    assert read_prompts_file(path) == ["a", "b\n\nc"]
    path.write_text(json.dumps({"prompts": [{"name": "x", "prompt": "hi"}]}), encoding="utf-8")
    assert read_prompts_file(path) == ["hi"]


@pytest.mark.parametrize("name, data, mention", [
    ("missing.txt", None, "cannot read the prompts file"),
    ("empty.txt", b"\n  \n\n", "has no prompts"),
    ("latin1.txt", b"caf\xe9", "not valid UTF-8"),
    ("bad.json", b"[1, 2", "not valid JSON"),
    ("dict.json", b'{"a": 1}', "holds a JSON dict"),
    ("numbers.json", b'["ok", 3]', "item 2"),
    ("blank.json", b'["ok", " "]', "item 2"),
])
def test_bad_prompts_file_says_what_is_wrong(tmp_path, name, data, mention):
    path = tmp_path / name
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(InvalidRequestError) as info:
        read_prompts_file(path)
    assert mention in str(info.value) and str(path) in str(info.value)
