"""The transformers baseline (``--baseline hf``): same weights, same inputs, same process.

transformers runs its eager ``generate`` with SDPA attention and greedy decoding, EOS
ignored (the generation config has no EOS, so every request runs to its length).

- decode: one ``generate`` with ``max_new_tokens=1`` gives the first token's time; a full
  ``generate`` follows. Decode tok/s = batch * (new - 1) / (full time - first-token time).
- prefill: one forward over the prompt, logits of the last position only, median of
  repeats.
- throughput: static batches of 64 (left-padded, sorted by total length); useful output
  tokens (each request's own length) / wall time. Its KV waste is what a padded static
  batch allocates beyond each request's tokens (padding, and the steps after a request's
  own length), averaged over decode steps like Hearth's.
"""

from __future__ import annotations

import gc
import inspect
import statistics
import time

import torch

from engine.bench.workload import TimedRequest

STATIC_BATCH = 64


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HFBaseline:
    """A transformers ``AutoModelForCausalLM`` in eval mode on ``device``."""

    def __init__(self, model, device: torch.device) -> None:
        self.model = model
        self.device = device
        # Older architectures have no logits_to_keep; they compute every position's logits.
        self._last_logit_only = ({"logits_to_keep": 1}
                                 if "logits_to_keep" in inspect.signature(model.forward).parameters else {})
        cfg = model.generation_config
        # No EOS: generation always runs to max_new_tokens, exactly like ignore_eos. (Setting
        # min_new_tokens instead would mask the EOS logit and change greedy choices.)
        cfg.eos_token_id = None
        cfg.pad_token_id = 0
        cfg.do_sample = False
        for name in ("temperature", "top_p", "top_k"):  # silence "unused sampling flag" warnings
            if hasattr(cfg, name):
                setattr(cfg, name, None)

    @classmethod
    def from_shape(cls, config: dict, device: torch.device, dtype: torch.dtype, seed: int) -> "HFBaseline":
        """A random-weight model of a shape config (``engine.shapes``), seeded.

        Weights are normal(0, 1/sqrt(hidden)): unit-gain layers. With the usual 0.02 a
        random model's greedy output repeats one token, so Hearth and transformers would
        "agree" whatever attention computed; at unit gain the tokens depend on the context.
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = dict(config)
        cfg.setdefault("initializer_range", cfg["hidden_size"] ** -0.5)
        hf_cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
        return cls(model.eval(), device)

    @classmethod
    def from_folder(cls, path, device: torch.device, dtype: torch.dtype) -> "HFBaseline":
        """A checkpoint folder (as resolved for Hearth, so both read the same weights)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
        return cls(model.to(device).eval(), device)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def cpu_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights, on the CPU (so the GPU copy can be freed before Hearth loads)."""
        return {k: v.detach().to("cpu") for k, v in self.model.state_dict().items()}

    def close(self) -> None:
        """Free the model (and the GPU memory it held)."""
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- measurements ------------------------------------------------------------------
    @torch.inference_mode()
    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, new: int) -> tuple[float, torch.Tensor]:
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False)
        _sync(self.device)
        return time.perf_counter() - t0, out[:, ids.shape[1]:]

    def decode(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, list[list[int]]]:
        """Equal-length prompts -> (decode tok/s for the batch, first-token ms, greedy ids)."""
        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)
        first_s, _ = self._generate(ids, mask, 1)
        full_s, out = self._generate(ids, mask, new_tokens)
        rate = len(prompts) * (new_tokens - 1) / max(full_s - first_s, 1e-9)
        return rate, first_s * 1e3, out.tolist()

    @torch.inference_mode()
    def prefill_ms(self, prompt: list[int]) -> float:
        """One forward over ``prompt`` (KV cache built, last logit only), in ms."""
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        _sync(self.device)
        t0 = time.perf_counter()
        self.model(input_ids=ids, **self._last_logit_only)
        _sync(self.device)
        return (time.perf_counter() - t0) * 1e3

    def throughput(self, requests: list[TimedRequest]) -> tuple[float, float]:
        """Static padded batches -> (useful output tok/s, KV waste %)."""
        order = sorted(requests, key=lambda q: len(q.prompt) + q.output_len)
        batches = [order[i:i + STATIC_BATCH] for i in range(0, len(order), STATIC_BATCH)]
        self._generate(*self._padded(batches[0][:2]), 2)  # warm-up
        wall, useful, wastes = 0.0, 0, []
        for b in batches:
            ids, mask = self._padded(b)
            new = max(q.output_len for q in b)
            seconds, _ = self._generate(ids, mask, new)
            wall += seconds
            useful += sum(q.output_len for q in b)
            wastes.extend(_static_waste(b))
        return useful / wall, 100.0 * statistics.fmean(wastes)

    def _padded(self, batch: list[TimedRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(q.prompt) for q in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, q in enumerate(batch):  # left padding: generation continues every row's end
            ids[row, width - len(q.prompt):] = torch.tensor(q.prompt)
            mask[row, width - len(q.prompt):] = 1
        return ids.to(self.device), mask.to(self.device)


def _static_waste(batch: list[TimedRequest]) -> list[float]:
    """Per decode step of one padded batch: the share of cache slots holding no useful token."""
    width = max(len(q.prompt) for q in batch)
    new = max(q.output_len for q in batch)
    out = []
    for step in range(1, new + 1):
        allocated = len(batch) * (width + step)
        used = sum(len(q.prompt) + min(step, q.output_len) for q in batch)
        out.append((allocated - used) / allocated)
    return out
