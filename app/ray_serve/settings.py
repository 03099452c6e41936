"""The Ray Serve application's arguments (``serve run ... key=value`` or a config's
``args``) read into what the builder deploys: the engine's load options, the engine
deployment's Serve options (replicas, resources, the request router) and the ingress's
settings. Every bad value is one sentence that names it, before anything is deployed."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from ray.serve.config import RequestRouterConfig

from app.commands.serve import api_key_of
from app.server.limits import MAX_QUEUE
from app.server.listen import parse_origins
from engine.api import InvalidRequestError, config_from_options, load_config

#: Ray's prefix-aware router. Its public name (ray.serve.llm.request_router) imports
#: ray[llm], which pulls in vLLM; this module is the same class and needs only ray[serve].
PREFIX_ROUTER = "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router:PrefixCacheAffinityRouter"
#: Ray's prefix tree is pruned back to the second number of tokens (characters of routing
#: keys, ``app.ray_serve.calls``) once it holds more than the first.
PREFIX_TREE_TOKENS = (2_000_000, 1_600_000)

#: The application's own settings (every other argument is a load option, as ``hearth serve``'s flags).
SERVING_ARGS = {
    "num_replicas": "engine replicas (default 1)",
    "ingress_replicas": "replicas of the ingress: Hearth's HTTP side, tokenizing and streaming (default 1)",
    "num_cpus": "CPUs each engine replica reserves (default 1)",
    "num_gpus": "GPUs each engine replica reserves (default 1 when device is cuda, else 0)",
    "max_ongoing_requests": "requests Ray sends one engine replica at once (default 256; its scheduler "
                            "queues those past max_num_seqs)",
    "prefix_routing": "true (default): Ray's prefix-aware router; false: Ray's default (power of two choices)",
    "imbalanced_threshold": "queue-length gap past which prefix routing gives way to load (default 16)",
    "api_key": "clients must send 'Authorization: Bearer KEY' (every route but /health)",
    "api_key_file": "read the API key from this file's first line (on the node that builds the app)",
    "allowed_origins": "browser origins CORS lets in, separated by commas",
    "max_queue": f"answers that may wait before new requests get a 429 (default {MAX_QUEUE})",
}


@dataclass
class ServeSettings:
    """What ``app_builder`` deploys. ``load_options``: ``Engine.load``'s keywords with
    ``model``; ``engine_deployment``: the engine deployment's ``.options(...)``."""

    load_options: dict
    engine_deployment: dict
    api_key: str | None
    allowed_origins: tuple[str, ...]
    max_queue: int
    ingress_replicas: int = 1


def read_settings(args: dict[str, Any]) -> ServeSettings:
    """``args`` (values may be text, as ``serve run`` passes them) as ``ServeSettings``;
    raises ``InvalidRequestError`` for an unknown argument or a bad value."""
    args = dict(args)
    serving = {k: args.pop(k) for k in list(args) if k in SERVING_ARGS}
    options = {k: _typed(k, v) for k, v in args.items()}
    try:
        config_from_options(**options)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"{e} The application's own settings: {', '.join(SERVING_ARGS)}.") from None
    device = str(options.get("device", "auto"))
    actor = {"num_cpus": _number(serving, "num_cpus", 1.0),
             "num_gpus": _number(serving, "num_gpus", 1.0 if device.startswith("cuda") else 0.0)}
    engine = dict(num_replicas=int(_number(serving, "num_replicas", 1, least=1, whole=True)),
                  ray_actor_options=actor, health_check_period_s=10,
                  max_ongoing_requests=int(_number(serving, "max_ongoing_requests", 256, least=1, whole=True)))
    if _bool(serving.get("prefix_routing", True), "prefix_routing"):
        _check_prefix_router()
        engine["request_router_config"] = RequestRouterConfig(
            request_router_class=PREFIX_ROUTER, request_router_kwargs={
                "imbalanced_threshold": _number(serving, "imbalanced_threshold", 16.0),
                "do_eviction": True, "eviction_threshold_chars": PREFIX_TREE_TOKENS[0],
                "eviction_target_chars": PREFIX_TREE_TOKENS[1]})
    api_key = api_key_of(SimpleNamespace(api_key=_text(serving.get("api_key")),
                                         api_key_file=_text(serving.get("api_key_file"))))
    try:
        origins = parse_origins(str(serving.get("allowed_origins") or ""))
    except InvalidRequestError as e:
        raise InvalidRequestError(f"allowed_origins: {e}") from None
    return ServeSettings(load_options=options, engine_deployment=engine, api_key=api_key, allowed_origins=origins,
                         max_queue=int(_number(serving, "max_queue", MAX_QUEUE, least=1, whole=True)),
                         ingress_replicas=int(_number(serving, "ingress_replicas", 1, least=1, whole=True)))


_LOAD_TYPES = {name: str(p.annotation) for name, p in inspect.signature(load_config).parameters.items()}


def _typed(name: str, value: Any) -> Any:
    """A load option given as text as the type ``load_config`` takes: "true"/"false" for
    flags, digits for counts (the rest stays text: "16MiB", "cuda:0,cuda:1")."""
    if not isinstance(value, str) or name not in _LOAD_TYPES:
        return value
    kind = _LOAD_TYPES[name]
    if "bool" in kind:
        return _bool(value, name)
    if "int" in kind and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise InvalidRequestError(f"{name} must be true or false, got {value!r}.")


def _number(serving: dict, name: str, default: float, least: float = 0, whole: bool = False) -> float:
    value = serving.get(name, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or (whole and not number.is_integer()):
        raise InvalidRequestError(f"{name} must be a {'whole ' if whole else ''}number, got {value!r}.")
    if number < least:
        raise InvalidRequestError(f"{name} must be at least {least:g}, got {value!r}.")
    return number


def _check_prefix_router() -> None:
    """Ray's prefix-aware router sits on a private path (see ``PREFIX_ROUTER``): a Ray that
    moved it is refused with what to do, before anything is deployed."""
    import importlib.util

    import ray

    module = PREFIX_ROUTER.split(":")[0]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise InvalidRequestError(f"prefix_routing: Ray {ray.__version__} has no prefix-aware router where Hearth "
                                  f"looks for it ({module}; checked with Ray 2.60): set prefix_routing=false, or "
                                  "install ray[serve]==2.60.*.")
