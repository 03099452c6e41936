"""ModelSpec: everything Hearth's model code needs to know, read from config.json.

One spec covers the Llama family: Llama 2/3.x (llama3 rope scaling), Mistral,
Qwen2/2.5 (qkv bias), Qwen3 (per-head q/k RMSNorm), SmolLM2. Anything this module
rejects is a candidate for the transformers fallback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import HearthError, ModelLoadError, UnsupportedModelError
# The rotary layer's own settings type: layers never import models, models build on layers.
from engine.layers.rope_spec import SUPPORTED_ROPE_TYPES, RopeSpec

# model_type -> family defaults that config.json may leave implicit.
NATIVE_MODEL_TYPES = {
    "llama": {},
    "mistral": {},
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": True},
}


#: the config.json keys of ModelSpec's fields where the names differ
_CONFIG_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                "num_kv_heads": "num_key_value_heads"}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeSpec
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        # A broken config is a load error, not a reason to try the transformers fallback
        # (which would fail later, on something else: the weights, or a cache of 16 tokens).
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                key = _CONFIG_KEYS.get(name, name)
                raise ModelLoadError(f"config.json: {key} must be positive, it is {getattr(self, name)}: the "
                                     "model's config is damaged; download the model again or fix config.json.")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"config.json: num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads}): the model's config is damaged; download the model "
                "again or fix config.json."
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    @classmethod
    def from_config(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelSpec":
        """The spec of a config.json dict; UnsupportedModelError where Hearth doesn't run it
        natively, ModelLoadError where the config is damaged (a field missing, or a value of
        the wrong kind: ``"num_attention_heads": 0``, ``null`` or ``"64x"``)."""
        try:
            return cls._from_config(cfg, source)
        except HearthError:
            raise
        except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
            raise ModelLoadError(f"{source}: a field holds a value of the wrong kind ({type(e).__name__}: {e}): "
                                 "the model's config is damaged; download the model again or fix config.json.") from None

    @classmethod
    def _from_config(cls, cfg: dict[str, Any], source: str) -> "ModelSpec":
        model_type = cfg.get("model_type")
        if model_type not in NATIVE_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{source}: model_type {model_type!r} has no native Hearth implementation "
                f"(native: {', '.join(sorted(NATIVE_MODEL_TYPES))})."
            )
        defaults = NATIVE_MODEL_TYPES[model_type]

        def need(key: str):
            if key not in cfg:
                raise ModelLoadError(f"{source}: required field {key!r} is missing.")
            return cfg[key]

        hidden = int(need("hidden_size"))
        num_heads = int(need("num_attention_heads"))
        head_dim = cfg.get("head_dim") or hidden // num_heads
        rope = _rope_from_config(cfg, source)
        if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
            raise UnsupportedModelError(
                f"{source}: hidden_act {cfg.get('hidden_act')!r} is not supported natively (silu only)."
            )
        sliding = cfg.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            sliding = None
        if model_type == "qwen3" and cfg.get("layer_types") and any(
            t != "full_attention" for t in cfg["layer_types"]
        ):
            raise UnsupportedModelError(f"{source}: per-layer sliding windows are not supported natively.")
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rope=rope,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Llama's attention_bias covers q, k, v and o; Qwen2 has biases on q, k, v only.
            qkv_bias=defaults.get("qkv_bias", False) or attention_bias,
            o_bias=attention_bias and model_type in ("llama", "mistral"),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=defaults.get("qk_norm", False),
            sliding_window=int(sliding) if sliding else None,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        )


def read_config(path: Path) -> dict[str, Any]:
    f = Path(path) / "config.json"
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{f} is missing: a model folder needs its config.json.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{f} is not valid JSON ({e}); re-download the model.") from None


def _rope_from_config(cfg: dict[str, Any], source: str) -> RopeSpec:
    # transformers 5 writes rope_parameters (theta inside); 4.x writes rope_theta + rope_scaling.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{source}: rope scaling type {rtype!r} is not supported natively "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})."
        )
    return RopeSpec(
        theta=theta,
        type=rtype,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(params.get("original_max_position_embeddings", 8192)),
        partial_rotary_factor=float(cfg.get("partial_rotary_factor", 1.0)),
    )
