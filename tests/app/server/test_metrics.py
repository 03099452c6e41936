"""``GET /metrics``: Prometheus text that prometheus_client's own parser reads, behind the
API key; the request and token counters move by exactly what the answers' usage says,
and the engine's gauges are there."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.app.server.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def scrape(live) -> dict[tuple[str, tuple], float]:
    r = httpx.get(f"{live.base_url}/metrics", headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_need_the_api_key(live):
    assert httpx.get(f"{live.base_url}/metrics", timeout=30).status_code == 401


def test_counters_move_by_what_the_answers_used(live, client, model_name):
    before = scrape(live)
    chat = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    streamed = list(client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=4, n=2,
                                              temperature=1.0, stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}))
    httpx.post(f"{live.base_url}/v1/completions", json={"prompt": "x", "max_tokens": 0}, headers=AUTH)  # a 400
    after = scrape(live)

    usage = streamed[-1].usage
    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("hearth_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert moved("hearth_requests_total", endpoint="/v1/completions", status="200") == 1
    assert moved("hearth_requests_total", endpoint="/v1/completions", status="400") == 1
    assert moved("hearth_requests_total", endpoint="/metrics", status="200") == 1  # the first scrape
    assert moved("hearth_prompt_tokens_total") == chat.usage.prompt_tokens + usage.prompt_tokens
    assert moved("hearth_generation_tokens_total") == 5 + 8 == chat.usage.completion_tokens + usage.completion_tokens
    assert moved("hearth_prompt_tokens_cached_total") == (chat.usage.prompt_tokens_details.cached_tokens
                                                         + usage.prompt_tokens_details.cached_tokens)
    assert moved("hearth_time_to_first_token_seconds_count") == 3  # one per choice
    assert moved("hearth_inter_token_latency_seconds_count") == 4 + 3 + 3  # the gaps between tokens
    assert moved("hearth_time_to_first_token_seconds_sum") > 0


def test_engine_gauges_at_scrape_time(live, host):
    samples = scrape(live)
    stats = host.engine.stats()
    assert value(samples, "hearth_num_requests_running") == 0 and value(samples, "hearth_num_requests_waiting") == 0
    assert value(samples, "hearth_kv_cache_blocks_total") == stats.kv_blocks_total > 0
    assert 0 <= value(samples, "hearth_kv_cache_usage_ratio") <= 1
    assert 0 <= value(samples, "hearth_prefix_cache_hit_rate") <= 1


def test_unknown_paths_share_one_label(live):
    for path in ("/nope", "/wp-admin", "/v1/zzz"):
        httpx.get(f"{live.base_url}{path}", headers=AUTH)
    samples = scrape(live)
    assert value(samples, "hearth_requests_total", endpoint="other", status="404") >= 3
    assert not any(dict(labels).get("endpoint") == "/nope" for _, labels in samples)


def test_inter_token_latency_is_timed_as_the_engine_made_the_tokens():
    """A loop that reads a burst late must not record gaps of zero: each token's gap is
    taken from when it left the engine (``AsyncRequestEvents.at``)."""
    from app.server.metrics import ServerMetrics
    from app.server.service import Choice
    from engine.api import TokenEvent

    metrics = ServerMetrics(host=None)
    choice = Choice(events=None, metrics=metrics)
    for at, ids in ((10.0, (1,)), (10.5, (2,)), (11.5, (3, 4))):
        choice.take(TokenEvent("r", "x", ids), at)
    total = metrics.registry.get_sample_value("hearth_inter_token_latency_seconds_sum")
    count = metrics.registry.get_sample_value("hearth_inter_token_latency_seconds_count")
    assert count == 3 and total == 0.5 + 0.5 + 0.5  # the last delivery: two tokens over 1 s
