"""Hub search and details through the real huggingface_hub client against the local fake Hub."""

from __future__ import annotations

import errno
import json
import math

import pytest

from app.services import hub
from app.services.hub import HubError
from tests.app.hub_fixtures import (AWQ_REPO, BIG, GATED, GGUF_REPO, GOOD_TOKEN, TINY, TINY_TENSORS, VISION,
                                    fake_hub, repo_files)

__all__ = ["fake_hub"]  # the fixture, imported for pytest


def test_search_lists_text_generation_models_by_downloads(fake_hub):
    results = hub.search_models("")
    ids = [m.repo_id for m in results]
    # The vision model has the most downloads but is not a text-generation model.
    assert VISION not in ids
    assert ids == [GGUF_REPO, TINY, AWQ_REPO, BIG, GATED]
    tiny = results[1]
    assert (tiny.downloads, tiny.likes, tiny.gated) == (500, 40, False)
    # The parameter count comes from the safetensors header, as the Hub computes it.
    assert tiny.num_params == sum(int(math.prod(s)) for s in TINY_TENSORS.values())
    assert tiny.last_modified.year == 2024 and tiny.last_modified.month == 5
    assert results[-1].gated is True
    assert results[0].num_params == 1_000_000  # a GGUF repo: from the Hub's gguf metadata


def test_search_sorts_and_filters(fake_hub):
    assert [m.repo_id for m in hub.search_models("", sort="likes")][:2] == [BIG, AWQ_REPO]
    assert [m.repo_id for m in hub.search_models("", sort="updated")][:2] == [AWQ_REPO, TINY]
    assert [m.repo_id for m in hub.search_models("TINY")] == [GGUF_REPO, TINY]  # case-insensitive substring
    assert [m.repo_id for m in hub.search_models("", fmt="GGUF")] == [GGUF_REPO]
    assert [m.repo_id for m in hub.search_models("", fmt="AWQ")] == [AWQ_REPO]
    assert [m.repo_id for m in hub.search_models("", size="> 35B")] == [BIG]
    assert BIG not in [m.repo_id for m in hub.search_models("", size="< 3B")]
    assert len(hub.search_models("", limit=2)) == 2
    assert [m.repo_id for m in hub.search_models("vision", task=None)] == [VISION]


def test_search_sends_the_hub_query_syntax(fake_hub):
    hub.search_models("chat", sort="updated", size="3B – 9B", fmt="GPTQ", limit=7)
    (entry,) = [e for e in fake_hub.log if e["path"] == "/api/models"]
    q = entry["query"]
    assert q["search"] == ["chat"] and q["sort"] == ["lastModified"] and q["limit"] == ["7"]
    assert q["num_parameters"] == ["min:3B,max:9B"] and q["filter"] == ["gptq"]
    assert q["pipeline_tag"] == ["text-generation"]
    assert {"downloads", "likes", "gated", "safetensors"} <= set(q["expand"])


def test_search_unknown_option():
    with pytest.raises(ValueError, match="unknown search option"):
        hub.search_models("x", sort="random")


def test_details_show_card_license_gated_params_and_files(fake_hub):
    d = hub.model_details(TINY)
    files = repo_files()[TINY]
    assert d.license == "apache-2.0"
    assert d.gated is False
    assert d.sha == fake_hub.repos[TINY].sha
    assert {f.path: f.size for f in d.files} == {name: len(data) for name, data in files.items()}
    assert d.num_params == sum(int(math.prod(s)) for s in TINY_TENSORS.values())
    assert d.params_by_dtype == {"F16": d.num_params}
    # Front matter, headings and the badge are gone; links keep their text.
    assert d.card_summary.startswith("A tiny chat model for tests, trained on nothing at all.")
    assert "license" not in d.card_summary and "#" not in d.card_summary and "badge" not in d.card_summary
    assert d.url == f"https://huggingface.co/{TINY}"
    assert d.safetensors_bytes == len(files["model.safetensors"])
    assert d.quant_format is None


def test_details_of_gguf_awq_and_gated_repos(fake_hub):
    g = hub.model_details(GGUF_REPO)
    assert g.quant_format == "gguf" and g.license == "mit"
    assert [f.path for f in g.gguf_files] == ["tiny-chat.Q4_K_M.gguf", "tiny-chat.Q8_0.gguf"]
    assert hub.model_details(AWQ_REPO).quant_format == "awq"
    from dataclasses import replace

    # llm-compressor's FP8 checkpoints are named so (RedHatAI/...-FP8-dynamic): shown as published
    assert replace(hub.model_details(TINY), repo_id="acme/tiny-chat-FP8-dynamic").quant_format == "fp8"
    gated = hub.model_details(GATED)
    # Details and the card stay readable without a token; only the files are gated.
    assert gated.gated is True and gated.license == "llama3"
    assert gated.card_summary == "Accept the terms first."


def test_fetch_config_reads_the_file_without_caching_it(fake_hub):
    cfg = hub.fetch_config(TINY)
    assert cfg == json.loads(repo_files()[TINY]["config.json"])
    assert not fake_hub.cache.exists() or not any(fake_hub.cache.iterdir())


def test_gated_config_needs_a_token(fake_hub):
    with pytest.raises(HubError) as info:
        hub.fetch_config(GATED)
    assert info.value.kind == "gated"
    assert info.value.url == f"https://huggingface.co/{GATED}"
    assert f"https://huggingface.co/{GATED}" in info.value.message
    assert hub.fetch_config(GATED, token=GOOD_TOKEN)["num_hidden_layers"] == 2
    with pytest.raises(HubError, match="not been granted access") as info:
        hub.fetch_config(GATED, token="hf_someone_else")
    assert info.value.kind == "gated"


def test_unknown_repo_is_not_found(fake_hub):
    with pytest.raises(HubError, match="'nobody/nothing' was not found on the Hub") as info:
        hub.model_details("nobody/nothing")
    assert info.value.kind == "not_found"


def test_rejected_token_is_401(fake_hub):
    fake_hub.valid_tokens = {GOOD_TOKEN}
    with pytest.raises(HubError, match="rejected the access token") as info:
        hub.search_models("tiny", token="hf_revoked0000")
    assert info.value.kind == "unauthorized"
    assert "hf_revoked0000" not in info.value.message  # never echo a token
    assert hub.search_models("tiny", token=GOOD_TOKEN)


def test_offline_when_the_hub_is_unreachable(fake_hub):
    fake_hub.stop()
    with pytest.raises(HubError, match="could not be reached.*check the network") as info:
        hub.search_models("tiny")
    assert info.value.kind == "offline"
    with pytest.raises(HubError) as info:
        hub.model_details(TINY)
    assert info.value.kind == "offline"


@pytest.mark.parametrize("how", ["constants", "env"])
def test_offline_mode(fake_hub, monkeypatch, how):
    from huggingface_hub import constants

    if how == "constants":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:  # set after huggingface_hub was imported: still honoured
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for call in (lambda: hub.model_details(TINY), lambda: hub.search_models("tiny"),
                 lambda: hub.fetch_config(TINY)):
        with pytest.raises(HubError, match="HF_HUB_OFFLINE") as info:
            call()
        assert info.value.kind == "offline"
    assert fake_hub.requests == []


def test_disk_full_maps_to_its_own_message():
    err = hub.describe_error(OSError(errno.ENOSPC, "No space left on device"), TINY)
    assert err.kind == "disk_full" and "free some space" in err.message


def test_card_summary_keeps_prose_only():
    md = "---\nlicense: mit\n---\n# Title\n\n<p align=center>logo</p>\n\n| a | b |\n|---|---|\n\n" \
         "First *para*\ncontinues here.\n\n```\ncode\n```\n\nSecond [link](http://x) para.\n"
    assert hub.card_summary(md) == "First para continues here.\n\nSecond link para."
    long = hub.card_summary("word " * 400, max_chars=50)
    assert len(long) == 50 and long.endswith("…")
