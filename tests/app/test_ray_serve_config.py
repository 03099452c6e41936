"""The Ray Serve application's pieces that need no cluster: its arguments, the
``serve deploy`` config in packaging/ray, the prefix router it names, the routing key and
the replicas' combined stats. (tests/app/test_ray_serve.py deploys it.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from app.ray_serve.calls import routing_key
from app.ray_serve.engine_replica import combined
from app.ray_serve.settings import PREFIX_ROUTER, read_settings
from engine.api import EngineStats, InvalidRequestError

CONFIG = Path(__file__).parents[2] / "packaging" / "ray" / "serve_config.yaml"


def stats(**kw) -> EngineStats:
    base = dict(num_running=0, num_waiting=0, kv_blocks_total=100, kv_blocks_used=0, kv_blocks_free=100,
                block_size=16, prefix_cache_hit_rate=0.0, generation_tok_s=0.0, prompt_tok_s=0.0,
                num_preemptions=0, requests_finished=0)
    return EngineStats(**{**base, **kw})


def test_the_deploy_config_is_valid_for_serve_and_for_hearth(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(CONFIG.read_text())
    ServeDeploySchema.model_validate(config)  # Ray's own schema of `serve deploy` files
    (app,) = config["applications"]
    assert app["import_path"] == "app.ray_serve:app_builder"
    key = tmp_path / "api-key"
    key.write_text("sk-from-a-file\n")
    settings = read_settings({**app["args"], "api_key_file": str(key)})
    assert settings.api_key == "sk-from-a-file"
    assert settings.load_options["device"] == "cuda" and settings.load_options["max_model_len"] == 8192
    engine = settings.engine_deployment
    assert engine["num_replicas"] == 2 and engine["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1}
    assert engine["request_router_config"].request_router_class == PREFIX_ROUTER


def test_the_prefix_router_is_where_hearth_takes_it_from():
    import importlib

    from ray.serve.request_router import RequestRouter

    module, _, name = PREFIX_ROUTER.partition(":")
    router = getattr(importlib.import_module(module), name)
    assert issubclass(router, RequestRouter)


def test_text_arguments_are_typed_as_serve_run_passes_them():
    s = read_settings({"model": "/models/m", "num_replicas": "3", "max_model_len": "512", "num_cpus": "0.5",
                       "enable_prefix_caching": "false", "kv_cache_memory": "16MiB", "prefix_routing": "false",
                       "allowed_origins": "http://localhost:3000,https://a.example", "max_queue": "8"})
    assert s.load_options == {"model": "/models/m", "max_model_len": 512, "enable_prefix_caching": False,
                              "kv_cache_memory": "16MiB"}
    assert s.engine_deployment["num_replicas"] == 3
    assert s.engine_deployment["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0}  # no GPU off cuda
    assert "request_router_config" not in s.engine_deployment  # Ray's default router
    assert s.allowed_origins == ("http://localhost:3000", "https://a.example") and s.max_queue == 8
    assert s.api_key is None


@pytest.mark.parametrize("args, says", [
    ({"modle": "x"}, "unknown load option 'modle'"),
    ({"num_replica": "2"}, "num_replicas"),  # the settings are listed with the load options
    ({"num_replicas": "0"}, "num_replicas must be at least 1"),
    ({"num_replicas": "two"}, "num_replicas must be a whole number"),
    ({"prefix_routing": "maybe"}, "prefix_routing must be true or false"),
    ({"device": "tpu"}, "tpu"),
    ({"allowed_origins": "localhost:3000"}, "allowed_origins"),
])
def test_bad_arguments_are_refused_with_their_name(args, says):
    with pytest.raises(InvalidRequestError, match=says):
        read_settings(args)


def test_the_routing_key_keeps_token_prefixes():
    ids = [0, 1, 49151, 151_000, 55_296]  # 55296 = 0xD800: a lone surrogate is still one character
    key = routing_key(ids)
    assert len(key) == len(ids) and routing_key(ids + [7]).startswith(key)
    assert routing_key([1, 2]) != routing_key([2, 1]) and not routing_key([12]).startswith(routing_key([1]))


def test_combined_stats_add_up_and_weigh_the_hit_rate():
    a = stats(num_running=2, num_waiting=1, kv_blocks_used=30, kv_blocks_free=70, prefix_cache_hit_rate=0.9,
              requests_finished=3, generation_tok_s=10.0)
    b = stats(num_running=1, kv_blocks_used=10, kv_blocks_free=90, prefix_cache_hit_rate=0.1, requests_finished=1,
              generation_tok_s=5.0)
    c = combined([a, b])
    assert (c.num_running, c.num_waiting, c.kv_blocks_total, c.kv_blocks_used) == (3, 1, 200, 40)
    assert c.prefix_cache_hit_rate == pytest.approx((0.9 * 3 + 0.1 * 1) / 4)
    assert c.generation_tok_s == 15.0 and c.requests_finished == 4
    with pytest.raises(LookupError):
        combined([])


def test_a_ray_without_the_prefix_router_is_refused_with_what_to_do(monkeypatch):
    from app.ray_serve import settings

    monkeypatch.setattr(settings, "PREFIX_ROUTER", "ray.no_such_module.router:Router")
    with pytest.raises(InvalidRequestError, match=r"no prefix-aware router .* set prefix_routing=false"):
        read_settings({"model": "/models/m"})
    assert read_settings({"model": "/models/m", "prefix_routing": "false"})  # (and without it, no refusal)


def test_a_replica_whose_engine_can_answer_no_more_fails_its_health_check():
    """An engine that died in a replica (a tensor-parallel rank ended) stays loaded: Serve's
    health check must fail for it, so the replica is replaced instead of failing every
    request routed to it."""
    from types import SimpleNamespace

    from app.ray_serve.engine_replica import HearthEngine

    replica = HearthEngine.__new__(HearthEngine)  # (its __init__ loads a model)
    engine = SimpleNamespace(dead=None)
    replica._host = SimpleNamespace(model_info=object(), engine=engine, shutdown=lambda: True)
    replica.check_health()
    engine.dead = "tensor parallel: rank 1 (cuda:1) ended (killed by signal 9). Reload the model."
    with pytest.raises(RuntimeError, match=r"rank 1 \(cuda:1\) ended"):
        replica.check_health()
