"""``fake_info``: a ``ModelInfo`` for test fakes that stand in for a loaded engine."""

from __future__ import annotations

from engine.api import ModelInfo


def fake_info(name: str = "acme/model", **fields) -> ModelInfo:
    """A ModelInfo of a model named ``name`` on the CPU; ``fields`` override the rest."""
    base = dict(name=name, ref=name, path=None, source="hub", model_type="llama", vocab_size=256,
                device="cpu", dtype="float32", attention="torch", max_model_len=256,
                implementation="native", kv_cache_dtype="float32", weight_bytes=0, kv_cache_bytes=0,
                num_kv_blocks=0, cuda_graphs=False)
    return ModelInfo(**{**base, **fields})
