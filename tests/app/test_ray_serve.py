"""Hearth on Ray Serve (``app.ray_serve``): a local Ray cluster of 2 CPUs, two engine
replicas of the tiny random-weight model behind Ray's HTTP proxy, talked to with the
official openai client; then everything shut down, no process left behind.

One module-scoped deployment (Ray and two replicas take ~a minute to start on 2 cores)."""

from __future__ import annotations

import re
import shutil
import tempfile
import time

import httpx
import psutil
import pytest

from app.server.listen import free_port
from tests.app.server.conftest import tiny_options

pytestmark = pytest.mark.slow

API_KEY = "sk-test-hearth-ray-0123456789"
GREEDY = {"temperature": 0, "max_tokens": 6}


@pytest.fixture(scope="module")
def ray_server(tiny_models):
    import ray
    from ray import serve

    from app.ray_serve import app_builder

    port = free_port()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    # Ray's sockets live under its temp folder and their paths may not pass 107 bytes: a short one.
    temp = tempfile.mkdtemp(prefix="hearth-ray-")
    # Ray keeps its auth token under ~/.ray, and RAY_ADDRESS would join another cluster
    env = pytest.MonkeyPatch()
    env.setenv("HOME", temp)
    env.delenv("RAY_ADDRESS", raising=False)
    started = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, _temp_dir=temp,
             log_to_driver=False)
    print(f"[ray] ray.init {time.monotonic() - started:.1f} s")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        print(f"[ray] serve.start {time.monotonic() - started:.1f} s")
        model = tiny_options(tiny_models["llama-tied"])
        serve.run(app_builder({**model, "num_replicas": "2", "num_cpus": "1", "api_key": API_KEY}),
                  name="hearth", route_prefix="/")
        print(f"[ray] cluster and 2 replicas up in {time.monotonic() - started:.1f} s")
        yield f"http://127.0.0.1:{port}", before
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        env.undo()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def base_url(ray_server) -> str:
    return ray_server[0]


@pytest.fixture(scope="module")
def client(base_url):
    import openai

    with openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


def metrics(base_url: str) -> str:
    r = httpx.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.text


def replica_answers(text: str) -> dict[str, float]:
    """``hearth_replica_answers_total`` by replica label."""
    return {m[1]: float(m[2]) for m in re.finditer(r'^hearth_replica_answers_total\{replica="([^"]+)"\} (\S+)$',
                                                    text, re.M)}


def gauge(text: str, name: str) -> float | None:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return None if m is None else float(m[1])


def test_health_and_models(base_url, client):
    health = httpx.get(f"{base_url}/health", timeout=30).json()
    assert health["status"] == "ok"
    models = client.models.list().data
    assert [m.id for m in models] == [health["model"]]
    assert models[0].model_extra["max_model_len"] == 256


def test_refusals_are_hearths(base_url):
    r = httpx.post(f"{base_url}/v1/chat/completions", json={"model": "x", "messages": []}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["message"]  # the key is checked at the ingress
    r = httpx.post(f"{base_url}/v1/chat/completions", json={"messages": "not a list"}, timeout=30,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_chat_streamed_and_not(client):
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]
    whole = client.chat.completions.create(model=model, messages=messages, **GREEDY)
    assert whole.object == "chat.completion" and whole.choices[0].message.content
    assert whole.usage.completion_tokens <= 6 and whole.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(model=model, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_streamed_and_not_reach_both_replicas(base_url, client):
    model = client.models.list().data[0].id
    before = replica_answers(metrics(base_url))
    # Prompts with nothing in common: the prefix router sends each new one to the replica it
    # has sent the fewest tokens so far, so the second replica's turn comes within a few.
    topics = ["an old fisherman by the sea", "qubits that are zero and one at once", "a recipe with flour and eggs",
              "the rings of Saturn", "a violin lesson in winter", "trains crossing the Alps at night",
              "a beekeeper's first honey", "the rules of chess", "a lighthouse in a storm", "maps drawn by hand"]
    served: dict[str, float] = {}
    for k, topic in enumerate(topics):
        prompt = f"{k}: write three sentences about {topic}, then a title."
        r = client.completions.create(model=model, prompt=prompt, **GREEDY)
        assert r.object == "text_completion" and r.usage.completion_tokens <= 6
        chunks = list(client.completions.create(model=model, prompt=prompt, stream=True, **GREEDY))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
        after = replica_answers(metrics(base_url))
        served = {rep: n - before.get(rep, 0) for rep, n in after.items() if n > before.get(rep, 0)}
        assert sum(served.values()) == 2 * (k + 1), served
        if len(served) == 2:
            break
    assert sorted(served) == ["0", "1"], f"every prompt went to one replica: {served}"


def test_a_repeated_prefix_goes_to_one_replica_and_hits_its_cache(base_url, client):
    model = client.models.list().data[0].id
    prefix = ("You are reading the manual of a lighthouse. Section four explains how the lamp is cleaned, how "
              "the lens is turned, and how the keeper records the weather every evening in the log book. ")
    before = replica_answers(metrics(base_url))
    cached = []
    for question in ("What is cleaned?", "What is turned?", "What is recorded?", "When is it recorded?",
                     "Who records it?"):
        r = client.completions.create(model=model, prompt=prefix + question, **GREEDY)
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
    after = replica_answers(metrics(base_url))
    served = {rep: after[rep] - before.get(rep, 0) for rep in after if after[rep] > before.get(rep, 0)}
    assert list(served.values()) == [5], f"one replica should answer all five: {served}"
    # The engine's prefix cache (16-token blocks) served the shared prefix after the first time.
    assert cached[0] == 0 and all(c >= 32 for c in cached[1:]), cached


def test_metrics_combine_the_replicas(base_url):
    deadline = time.monotonic() + 15
    while True:  # the replicas post their stats each second: up to a second behind
        text = metrics(base_url)
        per_replica = re.findall(r'^hearth_replica_kv_cache_usage_ratio\{replica="([^"]+)"\}', text, re.M)
        settled = sorted(per_replica) == ["0", "1"] and gauge(text, "hearth_num_requests_running") == 0
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sorted(per_replica) == ["0", "1"], text
    assert gauge(text, "hearth_num_requests_running") == 0, text
    # Summed over both replicas (16 MiB of KV cache each).
    total = gauge(text, "hearth_kv_cache_blocks_total")
    one = re.search(r'^hearth_replica_num_requests_running\{replica="0"\} (\S+)$', text, re.M)
    assert total is not None and total > 0 and one is not None
    assert gauge(text, "hearth_generation_tokens_total") > 0
    assert re.search(r'^hearth_requests_total\{endpoint="/v1/completions",status="200"\} ', text, re.M)


def test_shutdown_leaves_no_process(ray_server, client):
    # Last in the module: ends the deployment and Ray here and checks what is left.
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    deadline = time.monotonic() + 30
    _, before = ray_server

    def left():
        return [p for p in psutil.Process().children(recursive=True) if p.pid not in before]

    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left(), [(p.pid, p.name()) for p in left()]
