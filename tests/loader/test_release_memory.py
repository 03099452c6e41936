"""Engine.shutdown frees the model's memory, even where something still holds the runner.

In the desktop app the first load leaves its whole call stack alive in a reference cycle
(a library imported lazily during the load keeps its caller's frame), and the app runs
the cyclic collector rarely and only on its GUI thread: dropping references was not
enough, RSS stayed at 1.4 GB after Unload. Here a reference to the runner stands in for
that cycle, with automatic collection off as in the app.
"""

from __future__ import annotations

import gc
import weakref

import psutil

from engine.api import Engine

KV_BYTES = 256 * 2**20


def test_shutdown_frees_weights_and_kv_cache_while_the_runner_is_still_referenced(tiny_models):
    process = psutil.Process()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        engine = Engine.load(str(tiny_models["llama-tied"]), device="cpu", dtype="float32",
                             attention="torch", max_model_len=256, enable_prefix_caching=False,
                             num_blocks=1)
        block_bytes = engine.model_info.kv_cache_bytes
        engine.shutdown()
        # The same model again with a large KV cache (num_blocks is exact, no memory probing).
        engine = Engine.load(str(tiny_models["llama-tied"]), device="cpu", dtype="float32",
                             attention="torch", max_model_len=256, num_blocks=KV_BYTES // block_bytes)
        assert engine.generate(["Hello"])[0].completion_tokens > 0
        runner = engine.runner  # held on purpose, like the leaked frames
        caches = [weakref.ref(t) for t in runner.kv_caches]
        weights = [weakref.ref(p) for p in runner.model.parameters()]
        loaded_rss = process.memory_info().rss

        engine.shutdown()

        assert runner is not None and engine.runner is None
        assert [r for r in caches if r() is not None] == []
        assert [r for r in weights if r() is not None] == []
        freed = loaded_rss - process.memory_info().rss
        assert freed > 0.75 * KV_BYTES, f"only {freed / 2**20:.0f} MiB of RSS returned after shutdown"
        engine.shutdown()  # a second shutdown is harmless
    finally:
        if was_enabled:
            gc.enable()
