"""The deployment files against a live server (the package's tiny model behind real HTTP):
every metric and label that the Grafana dashboard and the autoscaler's adapter rule query is
in its ``/metrics``, and the container's health check passes on it and fails without it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.server import create_app
from app.services.engine_host import EngineHost
from tests.app.server.conftest import API_KEY, LiveServer
from tests.packaging.deploy_queries import DOCKER, TARGET_LABELS, deployment_queries, missing_from, needs_of


def labels_by_sample(live) -> dict[str, set[str]]:
    """Sample name (``_bucket``, ``_total``... as Prometheus stores them) -> the label names of its samples."""
    r = httpx.get(f"{live.base_url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 200
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def test_every_queried_metric_is_served(live, client, model_name):
    # One answer, one error and one refusal first: the histograms have observations and
    # hearth_requests_total has 2xx and 4xx series, as on a server in use.
    client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi"}],
                                   max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    httpx.post(f"{live.base_url}/v1/completions", json={"prompt": "x", "max_tokens": 0},
               headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    labels_of = labels_by_sample(live)
    assert labels_of["hearth_time_to_first_token_seconds_bucket"] == {"le"}  # the parse reads what it should

    queries = deployment_queries()
    assert len(queries) >= 10
    problems = [p for q, where in queries for p in missing_from(needs_of(q, where), labels_of)]
    assert not problems, "\n".join(problems)


def test_the_dashboard_shows_what_the_issue_asks_for():
    """TTFT and inter-token-latency percentiles, tokens/s, running and waiting requests,
    KV-cache use, prefix-cache hits, errors by status: each is some panel's query."""
    queries = [q for q, where in deployment_queries() if where.startswith("hearth.json")]
    def some(pred) -> bool:
        return any(pred(q) for q in queries)
    for hist in ("hearth_time_to_first_token_seconds", "hearth_inter_token_latency_seconds"):
        assert some(lambda q: q.startswith("histogram_quantile(0.99") and f"{hist}_bucket" in q), hist
        assert some(lambda q: q.startswith("histogram_quantile(0.5") and f"{hist}_bucket" in q), hist
    assert some(lambda q: "rate(hearth_generation_tokens_total[" in q)
    assert some(lambda q: "hearth_num_requests_running" in q) and some(lambda q: "hearth_num_requests_waiting" in q)
    assert some(lambda q: "hearth_kv_cache_usage_ratio" in q)
    assert some(lambda q: "hearth_prefix_cache_hit_rate" in q or "hearth_prompt_tokens_cached_total" in q)
    errors = [needs_of(q, "") for q in queries if 'status=~"[45].."' in q]
    assert any(("status", frozenset({"hearth_requests_total"})) in n.grouped for n in errors)


def test_a_query_of_a_metric_the_server_lacks_is_caught(live):
    labels_of = labels_by_sample(live)
    assert missing_from(needs_of("sum(rate(hearth_generated_tokens_total[5m]))", "typo"), labels_of)
    assert missing_from(needs_of('sum by (code) (rate(hearth_requests_total{code="500"}[5m]))', "label"),
                        labels_of) == ["label: hearth_requests_total has no label 'code'",
                                       "label: grouped by 'code', which none of ['hearth_requests_total'] has"]
    assert not TARGET_LABELS & {"le", "status"}  # the server's own labels are never assumed


def healthcheck(port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "HEARTH_PORT": str(port)}
    return subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], env=env, capture_output=True,
                          text=True, timeout=30)


def test_container_healthcheck_passes_on_the_server(live):
    done = healthcheck(live.port)
    assert done.returncode == 0, done.stderr


def test_container_healthcheck_fails_where_nothing_answers():
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = healthcheck(port)
    assert done.returncode == 1 and f"127.0.0.1:{port}/health" in done.stderr


def test_container_healthcheck_fails_while_no_model_is_loaded():
    host = EngineHost()
    try:
        with LiveServer(create_app(host)) as server:
            done = healthcheck(server.port)
    finally:
        host.shutdown()
    assert done.returncode == 1 and "no model loaded" in done.stderr


def test_container_healthcheck_fails_while_the_model_loads():
    from app.server.listen import bind
    from app.server.loading import LoadingResponder

    sock = bind("127.0.0.1", 0)
    try:
        with LoadingResponder(sock, "org/model"):
            done = healthcheck(sock.getsockname()[1])
    finally:
        sock.close()
    assert done.returncode == 1 and "HTTP 503, status 'loading'" in done.stderr, done.stderr


def test_container_healthcheck_says_why_the_model_can_answer_no_more():
    import http.server
    import json
    import threading

    why = "tensor parallel: rank 1 (cuda:1) ended (killed by signal 9). Reload the model."

    class Dead(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # what /health answers once Engine.dead is set
            body = json.dumps({"status": "error", "model": "m", "error": why}).encode()
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Dead)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = healthcheck(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 1 and f"HTTP 503, status 'error': {why}" in done.stderr, done.stderr
