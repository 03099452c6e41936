"""The Ray Serve application: ``app_builder(args)`` (``serve run app.ray_serve:app_builder
model=... num_replicas=2``, or ``import_path`` in a ``serve deploy`` config) and its ingress.

::

    HTTP ─▶ Ray's proxy ─▶ HearthIngress: Hearth's FastAPI app (app.server.create_app)
                                 │  DeploymentHandle + request router (prefix-aware)
                                 ▼
                   HearthEngine × N (one EngineHost each) ── stats ─▶ EngineStatsBoard

Why the engines sit behind an ingress instead of each replica serving HTTP itself: Ray's
proxy routes an HTTP request before anyone has read its body, so a router there can't see
the prompt. The ingress reads it (the same routes, checks, chat templates, streaming and
errors as ``hearth serve``), tokenizes it, and hands the engine request to a
``DeploymentHandle``, whose router *does* see it: Ray's ``PrefixCacheAffinityRouter``
(alpha) sends a prompt to the replica that was sent its longest prefix before (where the
engine's prefix cache most likely still holds it) when it matches at least a tenth of
the prompt, else to the replica sent the fewest tokens; unless the replicas' queues differ
by more than ``imbalanced_threshold`` (then the less busy of two, Ray's default policy).

Limits: the router remembers prompts it *sent*, not what each engine still caches (an
evicted prefix still attracts its prompts), and a chat template's long system prompt
counts as a shared prefix (the replicas that have seen it tie, and the queues decide).
With several ingress replicas (``ingress_replicas``) each has its own handle, but they
share Ray's prefix tree (one actor per deployment). The router is Ray's alpha API, taken
from a module path of Ray's own (``settings.PREFIX_ROUTER``; a test checks it is there).

``/metrics`` is the ingress's: the HTTP counters and latencies of the answers it served
(inter-token latency as the ingress receives the tokens, Ray's hop included), the engine
gauges summed over the replicas (posted each second, so up to a second old) and per
replica (``hearth_replica_*{replica}``); with several ingress replicas, each scrape
reaches one of them. Ray Serve's own metrics (Ray's metrics port) add the replicas'
queues and Serve's latencies."""

from __future__ import annotations

from typing import Any

from ray import serve

from app.ray_serve.engine_replica import EngineStatsBoard, HearthEngine
from app.ray_serve.remote_host import RayEngineHost, ReplicaMetrics
from app.ray_serve.settings import read_settings
from app.server import create_app
from app.server.limits import MAX_QUEUE


@serve.deployment
@serve.ingress()
class HearthIngress:
    """Hearth's FastAPI app over the engine replicas (``RayEngineHost``)."""

    async def __init__(self, engines, board, api_key: str | None = None, allowed_origins: tuple = (),
                       max_queue: int = MAX_QUEUE) -> None:
        self.host = await RayEngineHost.connect(engines, board)
        self._settings = dict(api_key=api_key, allowed_origins=allowed_origins, max_queue=max_queue)

    def __serve_build_asgi_app__(self):
        """Called by Serve once ``__init__`` has run: the app to serve (built here, not at
        import, because it needs the connected host)."""
        app = create_app(self.host, **self._settings)
        app.state.service.metrics.registry.register(ReplicaMetrics(self.host))
        return app

    def __del__(self) -> None:
        host = getattr(self, "host", None)
        if host is not None:
            host.shutdown()


def app_builder(args: dict[str, Any]):
    """The Ray Serve application for ``args``: the settings of ``settings.SERVING_ARGS`` and
    load options (``model``, ``device``, ``max_model_len``, ``kv_cache_memory``, ... as
    ``Engine.load`` takes them); values may be text, as ``serve run`` passes them. Raises
    ``InvalidRequestError`` naming a bad value before anything is deployed."""
    settings = read_settings(args)
    # (each replica posts every second: no access-log line for each)
    board = serve.deployment(EngineStatsBoard).options(num_replicas=1, ray_actor_options={"num_cpus": 0},
                                                       logging_config={"enable_access_log": False}).bind()
    engines = serve.deployment(HearthEngine).options(**settings.engine_deployment).bind(settings.load_options, board)
    # The ingress holds every stream for its whole answer: many at once, little CPU each.
    return HearthIngress.options(num_replicas=settings.ingress_replicas, ray_actor_options={"num_cpus": 0},
                                 max_ongoing_requests=4096).bind(
        engines, board, api_key=settings.api_key, allowed_origins=settings.allowed_origins,
        max_queue=settings.max_queue)
