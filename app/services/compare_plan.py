"""What a comparison runs: ``CompareConfig`` (one quantization x attention backend x
KV-cache dtype) and ``ComparePlan`` (the model, 1-6 configurations, the prompts, how to
sample and what to measure), checked up front by ``ComparePlan.checked``.

Qt-free; names of choices come from the engine's one registry (``engine.api``), so a
quantization registered there (the next part of issue 14's) is a comparison choice too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from engine.api import (FLOAT_HEAD_METHODS, GROUPED_METHODS, QUANT_HEAD_METHODS, EngineConfig, InvalidRequestError,
                        SamplingParams, check_text, config_from_options, get_choice)

#: The most configurations one comparison runs (the issue's 2..6 in the GUI; the CLI takes 1..6).
MAX_CONFIGS = 6
#: The most prompts one comparison sends to every configuration.
MAX_PROMPTS = 20
#: Sampling temperature of a seeded (non-greedy) comparison unless the plan says otherwise.
SAMPLED_TEMPERATURE = 0.7
#: Load options every comparison uses unless the plan's ``load_options`` set them: one
#: sequence at a time (prompts run alone, so TTFT is one request's; the KV pool is then one
#: full-context sequence for every configuration, not whatever memory is left, so KV and
#: peak memory compare) and no prefix cache (each prompt's TTFT is its whole prefill).
DEFAULT_LOAD_OPTIONS: Mapping[str, Any] = MappingProxyType({"max_num_seqs": 1, "enable_prefix_caching": False})
#: Load options for some quantizations only: each configuration of another gets them left out
#: (``--group-size 64`` compares int4 in groups of 64 with bf16 and int8 as they are).
_FOR_METHODS = {"quant_group_size": GROUPED_METHODS, "quant_head": QUANT_HEAD_METHODS,
                "float_head": FLOAT_HEAD_METHODS}
_FLAGS = {"quant_group_size": "--group-size", "quant_head": "--quant-head", "float_head": "--float-head"}
#: Load options that a configuration sets, or the plan's own field: not in ``load_options``.
_PER_CONFIG = {"quantization": "quant", "attention": "attention", "kv_cache_dtype": "kv_dtype",
               "device": "the plan's device"}


@dataclass(frozen=True, slots=True)
class CompareConfig:
    """One configuration: a quantization, an attention backend and a KV-cache dtype, each
    a name (or alias) of the engine's choices registry; ``auto`` lets the load pick."""

    quant: str
    attention: str = "auto"
    kv_dtype: str = "auto"

    @property
    def label(self) -> str:
        """A short label for a column or a table row: the quantization, then the attention
        backend and the KV dtype where they aren't ``auto`` ("int4", "int8 · torch",
        "bf16 · triton · kv fp8")."""
        parts = [self.quant]
        if self.attention != "auto":
            parts.append(self.attention)
        if self.kv_dtype != "auto":
            parts.append(f"kv {self.kv_dtype}")
        return " · ".join(parts)

    def checked(self) -> "CompareConfig":
        """This configuration with canonical names (``bf16`` stays ``bf16``, ``bfloat16``
        becomes ``bf16``; ``e4m3`` becomes ``fp8``). Raises InvalidRequestError for a name
        the registry doesn't know (its message lists the names). Whether a choice can run
        on this machine is not checked here: a configuration that can't records why when
        it runs, and the others go on."""
        return CompareConfig(get_choice("quantization", self.quant).name,
                             get_choice("attention", self.attention).name,
                             get_choice("kv_cache_dtype", self.kv_dtype).name)

    def to_dict(self) -> dict[str, str]:
        return {"quant": self.quant, "attention": self.attention, "kv_dtype": self.kv_dtype}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CompareConfig":
        return cls(str(data["quant"]), str(data.get("attention", "auto")), str(data.get("kv_dtype", "auto")))


@dataclass(frozen=True, slots=True)
class ComparePlan:
    """A comparison: every configuration runs the same prompts on the same model.

    - ``configs``: 1..``MAX_CONFIGS``, no two alike; the first is the reference.
    - ``prompts``: 1..``MAX_PROMPTS`` texts, each sent alone as the user's message (the
      model's chat template applied where it has one, see ``chat``).
    - ``max_tokens``: new tokens per prompt at most (an answer may end sooner, at EOS).
    - ``seed``: None: greedy decoding; an int: sampled at ``temperature`` (default
      ``SAMPLED_TEMPERATURE``) with this one seed, the same for every configuration.
    - ``perplexity``: score the bundled evaluation text (``Engine.perplexity``), at most
      its first ``eval_tokens`` tokens (None: the whole text, ~37k SmolLM2 tokens).
    - ``device``: where every configuration loads (auto, cpu, cuda, cuda:N).
    - ``load_options``: other ``Engine.load`` keywords for every configuration (dtype,
      max_model_len, kv_cache_memory, enforce_eager, quant_group_size, quant_head,
      revision, ...); ``DEFAULT_LOAD_OPTIONS`` fill the ones left out. Not quantization,
      attention, kv_cache_dtype or device: those are the configuration's or the plan's.
    - ``chat``: None: the chat template where the model has one, else the raw text; True
      / False force it.
    - ``warmup``: one short untimed request after each load, so the first prompt's TTFT
      doesn't carry one-off start-up work (kernel compilation, autotuning).
    - ``side_by_side``: load the configurations that fit in memory together (checked
      before anything loads, ``compare_fit``; run by ``compare_group``) and send each
      prompt to all of them at once, so their answers stream together; the rest run one
      after another. Their speeds then share the device (each result's ``ran_with``).
    """

    configs: tuple[CompareConfig, ...]
    prompts: tuple[str, ...]
    model: str | None = None
    max_tokens: int = 128
    seed: int | None = None
    temperature: float | None = None
    perplexity: bool = True
    eval_tokens: int | None = None
    device: str = "auto"
    load_options: Mapping[str, Any] = field(default_factory=dict)
    chat: bool | None = None
    warmup: bool = True
    side_by_side: bool = False

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.configs]

    def sampling(self) -> SamplingParams:
        """The sampling of every prompt: greedy, or seeded at the plan's temperature."""
        if self.seed is None:
            return SamplingParams(max_tokens=self.max_tokens, temperature=0.0)
        temperature = SAMPLED_TEMPERATURE if self.temperature is None else self.temperature
        return SamplingParams(max_tokens=self.max_tokens, temperature=temperature, seed=self.seed)

    def options(self) -> dict[str, Any]:
        """The load options every configuration shares (defaults filled in)."""
        return {**DEFAULT_LOAD_OPTIONS, **self.load_options, "device": self.device}

    def engine_config(self, config: CompareConfig) -> EngineConfig:
        """The validated ``EngineConfig`` that loads ``config`` (InvalidRequestError for
        a bad load option). A load option for some quantizations only (the int4 group size,
        the head's) goes to the configurations it applies to."""
        options = self.options()
        for name, methods in _FOR_METHODS.items():
            if options.get(name) and config.quant not in methods:
                del options[name]
        return config_from_options(self.model, quantization=config.quant, attention=config.attention,
                                   kv_cache_dtype=config.kv_dtype, **options)

    def checked(self) -> "ComparePlan":
        """This plan with canonical names, or InvalidRequestError saying what to change:
        no configuration or more than ``MAX_CONFIGS``, a name the registry doesn't know, two
        configurations alike, no prompt or a blank one, a bad max_tokens / seed /
        temperature / eval_tokens, or a bad load option. Nothing loads."""
        if not self.configs:
            raise InvalidRequestError("a comparison needs at least one configuration: give a quantization "
                                      "(--quants int8,int4).")
        if len(self.configs) > MAX_CONFIGS:
            raise InvalidRequestError(f"{len(self.configs)} configurations are too many: a comparison runs at "
                                      f"most {MAX_CONFIGS}; drop some.")
        configs = []
        for number, config in enumerate(self.configs, start=1):
            if not isinstance(config, CompareConfig):
                raise InvalidRequestError(f"configuration {number} is a {type(config).__name__}, not a CompareConfig")
            try:
                config = config.checked()
            except InvalidRequestError as e:
                raise InvalidRequestError(f"configuration {number} ({config.label}): {e}", options=e.options) from None
            if config in configs:
                first = configs.index(config) + 1
                raise InvalidRequestError(f"configuration {number} ({config.label}) is the same as configuration "
                                          f"{first}: each must differ in quantization, attention or KV dtype.")
            configs.append(config)
        prompts = _checked_prompts(self.prompts)
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be a positive whole number, got {self.max_tokens!r}.")
        if self.eval_tokens is not None and (not isinstance(self.eval_tokens, int) or isinstance(self.eval_tokens, bool)
                                             or self.eval_tokens < 2):
            raise InvalidRequestError(f"eval_tokens must be at least 2 (perplexity scores the tokens after the "
                                      f"first), got {self.eval_tokens!r}; leave it out to score the whole text.")
        if not isinstance(self.side_by_side, bool):
            raise InvalidRequestError(f"side_by_side must be true or false, got {self.side_by_side!r}.")
        misplaced = [name for name in self.load_options if name in _PER_CONFIG]
        if misplaced:
            raise InvalidRequestError(f"the load option {misplaced[0]!r} is set by {_PER_CONFIG[misplaced[0]]}, "
                                      "not by the plan's load_options.")
        for name, methods in _FOR_METHODS.items():
            if self.load_options.get(name) and not any(c.quant in methods for c in configs):
                raise InvalidRequestError(f"{_FLAGS[name]} applies to {', '.join(methods)}: none of the "
                                          "configurations is one; drop it or add one.", options=(name,))
        plan = replace(self, configs=tuple(configs), prompts=prompts, load_options=dict(self.load_options))
        plan.sampling()  # a bad seed or temperature: SamplingParams says what is accepted
        for config in configs:  # a bad load option or device, before anything loads
            plan.engine_config(config)
        return plan

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (saved comparisons): every field."""
        return {"model": self.model, "configs": [c.to_dict() for c in self.configs], "prompts": list(self.prompts),
                "max_tokens": self.max_tokens, "seed": self.seed, "temperature": self.temperature,
                "perplexity": self.perplexity, "eval_tokens": self.eval_tokens, "device": self.device,
                "load_options": dict(self.load_options), "chat": self.chat, "warmup": self.warmup,
                "side_by_side": self.side_by_side}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ComparePlan":
        """Read ``to_dict``'s form (not checked: a saved plan is shown, not rerun blindly)."""
        known = set(cls.__dataclass_fields__) - {"configs", "prompts"}
        values = {k: v for k, v in data.items() if k in known}
        return cls(configs=tuple(CompareConfig.from_dict(c) for c in data["configs"]),
                   prompts=tuple(str(p) for p in data["prompts"]), **values)


def _checked_prompts(prompts) -> tuple[str, ...]:
    if isinstance(prompts, str):
        raise InvalidRequestError("prompts must be a list of texts, not one string: wrap it in a list.")
    prompts = tuple(prompts or ())
    if not prompts:
        raise InvalidRequestError("a comparison needs at least one prompt: type one, pick the bundled set, "
                                  "or give a prompts file (--prompts FILE).")
    if len(prompts) > MAX_PROMPTS:
        raise InvalidRequestError(f"{len(prompts)} prompts are too many: a comparison sends at most {MAX_PROMPTS} "
                                  "to every configuration; keep the ones that matter.")
    for number, prompt in enumerate(prompts, start=1):
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequestError(f"prompt {number} is empty: give it some text or remove it.")
        check_text(prompt, f"prompt {number}")
    return prompts

