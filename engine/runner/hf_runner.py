"""Transformers fallback for architectures without a native Hearth implementation.

Same scheduler, same sampler, same events; the model is transformers' own, each request
keeps a transformers ``DynamicCache`` (no paging, no prefix caching). The block manager
still accounts for the tokens so memory stays bounded and preemption works (a preempted
request simply drops its cache and is recomputed). Slower than native: labelled as
"transformers-fallback" in doctor, stats and events.
"""

from __future__ import annotations

import torch

from engine.errors import LoadCancelledError, ModelLoadError, OutOfMemoryError, UnsupportedModelError
from engine.runner.io import RunnerInput, RunnerOutput
from engine.runner.request_state import KeptRequest, RequestStateMixin
from engine.runner.sampler import Sampler
from engine.runner.scoring import FallbackScoreMixin


class HFRunner(RequestStateMixin, FallbackScoreMixin):
    graphs = None  # no CUDA-graph decode (see graphs_reason)

    def graphs_reason(self) -> str:
        return "the transformers fallback runs eagerly"

    def gemv_reason(self) -> str:
        return "the transformers fallback uses its own layers"

    def attention_warmup_tokens(self, max_tokens: int) -> int:
        return 0  # transformers' own attention: nothing of ours to prepare

    def warm_attention(self, max_tokens: int, should_stop=None) -> int:
        return 0

    def __init__(self, model, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.device = device
        self.logits_device = device
        self.dtype = dtype
        self.sampler = Sampler()
        self._caches: dict[str, object] = {}  # request id -> its transformers DynamicCache
        self._requests: dict[str, KeptRequest] = {}  # request id -> its params and RNG
        self.kv_caches = []
        self.num_blocks = 0
        self.load_info: dict = {}  # what create measured (weight_bytes, kv_cache_bytes, ...)

    @classmethod
    def create(cls, config, weights, *, device: torch.device, dtype: torch.dtype, max_model_len: int,
               rank: int = 0, world_size: int = 1, progress=None, should_stop=None) -> "HFRunner":
        """``ModelRunner.create``'s counterpart for the transformers fallback: read the model
        in ``weights`` (a folder) with transformers (``load``), then size and account for
        the KV pool. ``should_stop`` is asked after the read and between the steps; a cancel
        or failure frees the model before it propagates."""
        from engine.errors import stop_check
        from engine.runner.lifecycle import empty_device_cache, log, release_runner
        from engine.runner.memory import size_kv_cache

        if (rank, world_size) != (0, 1):
            raise UnsupportedModelError("the transformers fallback runs a model on one device only")
        say = progress or log.info
        runner = cls.load(weights, device, dtype, should_stop=should_stop)
        try:
            size_kv_cache(runner, config, device, runner.kv_block_bytes(config.cache.block_size), max_model_len,
                          runner.load_info, say, stop_check(should_stop))
            runner.load_info["cuda_graphs"] = False
            runner.load_info["cuda_graphs_off"] = runner.graphs_reason()
        except BaseException:
            release_runner(runner)
            empty_device_cache(device)
            raise
        return runner

    @classmethod
    def load(cls, path, device: torch.device, dtype: torch.dtype, should_stop=None) -> "HFRunner":
        """Build the model with transformers and move it to ``device``. transformers reads
        the weights in one call that can't be interrupted: ``should_stop`` is asked after it,
        before the model is moved (on a GPU, a copy as long as the read), and True frees the
        model and raises LoadCancelledError."""
        from transformers import AutoModelForCausalLM

        _import_bitsandbytes_first(path)
        try:
            model, loading = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                                  output_loading_info=True)
        except ValueError as e:
            raise UnsupportedModelError(
                f"{path}: transformers can't build this model either ({e}); it is not supported."
            ) from None
        except OSError as e:
            raise ModelLoadError(f"{path}: could not read the model ({e}); re-download it.") from None
        from engine.runner.lifecycle import release_module

        # transformers fills the parameters the checkpoint lacks with random values and goes
        # on (a config.json naming another architecture than the weights, a partial
        # checkpoint): the answers would be noise, so refuse. (Buffers are rebuilt, not read.)
        params = {name for name, _ in model.named_parameters()}
        missing = sorted(k for k in (loading or {}).get("missing_keys", ()) if k in params)
        if missing:
            release_module(model)
            arch = getattr(model.config, "model_type", "?")
            raise ModelLoadError(
                f"{path}: the weights don't match config.json's architecture ('{arch}'): "
                f"{len(missing)} of the model's {len(params)} weight tensors are not in the checkpoint "
                f"(e.g. {', '.join(missing[:3])}), and transformers would fill them with random values. "
                "Check that config.json belongs to these weights, or download the model again.") from None
        if should_stop is not None and should_stop():
            release_module(model)  # its tensors go now, whoever still references the module
            raise LoadCancelledError("loading cancelled")
        try:
            model = model.to(device)
        except torch.OutOfMemoryError:
            release_module(model)  # what was moved and what wasn't, both go now
            if device.type == "cuda":
                torch.cuda.empty_cache()
            raise OutOfMemoryError(
                f"the model doesn't fit in the free memory of {device}: load it on the CPU (--device cpu), "
                "pick a smaller model, or free memory.", options=("device",)) from None
        return cls(model.eval(), device, dtype)

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def kv_block_bytes(self, block_size: int) -> int:
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 1)
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1)
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 1)
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        return 2 * layers * kv_heads * head_dim * self.dtype.itemsize * block_size

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks  # accounting only: caches grow per request

    @torch.inference_mode()
    def execute(self, inp: RunnerInput) -> RunnerOutput:
        """Run each row through transformers on its request's own cache, then sample the
        rows with ``sample=True`` (in row order). Block tables are not used: the engine's
        block manager only accounts for the tokens."""
        from transformers import DynamicCache

        self._update_requests(inp)
        self._kept(inp.rows)  # every row's request is known, before any cache is made
        for rid in inp.preempted:  # recomputed from its first token when it comes back
            self._caches.pop(rid, None)
        logits_rows, sampled = [], []
        for row in inp.rows:
            rid, start, n = row.request_id, row.start, len(row.token_ids)
            if start == 0 or rid not in self._caches:
                # New, or preempted and recomputed: start from an empty cache.
                self._caches[rid] = DynamicCache()
                if start != 0:
                    raise RuntimeError("fallback cache lost for a partially computed sequence")
            ids = torch.tensor([row.token_ids], device=self.device)
            pos = torch.arange(start, start + n, device=self.device)[None]
            res = self.model(input_ids=ids, position_ids=pos, past_key_values=self._caches[rid],
                             use_cache=True, logits_to_keep=1)
            if row.sample:
                logits_rows.append(res.logits[0, -1])
                sampled.append(row)
        if not sampled:
            return RunnerOutput([], None)
        return self.sample(torch.stack(logits_rows), sampled)

    def _drop_request(self, request_id: str) -> None:
        self._caches.pop(request_id, None)
        super()._drop_request(request_id)


def _import_bitsandbytes_first(path) -> None:
    """A checkpoint that transformers quantizes with bitsandbytes: bitsandbytes is imported
    Hearth's way first (``engine.quant.bnb.import_bitsandbytes``: nothing fetched from the
    Hub as it imports), so transformers' own import of it finds it done. Nothing to do for
    other checkpoints, or where bitsandbytes isn't installed (transformers says so)."""
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(quant, dict) and quant.get("quant_method") == "bitsandbytes":
        from engine.quant.bnb import import_bitsandbytes

        try:
            import_bitsandbytes()
        except ImportError:
            pass
