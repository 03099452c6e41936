"""``SpecSummary``: the numbers a memory estimate needs from a model's config.json.

The native ``ModelSpec`` is the one reading of config.json: where Hearth runs the model
natively the summary is that spec's numbers (``from_spec``); elsewhere (an architecture
the transformers fallback runs) it reads what the fallback's cache and weights will take,
multimodal configs through their ``text_config`` (``from_config``). The load's own
pre-flight (``check_model``) and the app's fit estimate (through ``engine.api``) both size
memory from it, so the two can't read a config differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import HearthError
from engine.models.spec import ModelSpec, read_config


@dataclass(frozen=True, slots=True)
class SpecSummary:
    """What a load of the model would size (``None`` where the config is silent).

    ``embedding_params``: the embedding plus an untied LM head (the weights a quantized load
    keeps in 16 bit; but int8/int4 store an untied head, ``head_params``, as int8). ``max_context``: the model's longest context. ``num_params``: the
    native spec's parameter count (``None`` off the native path: count the checkpoint).
    """

    num_layers: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    embedding_params: int = 0
    max_context: int | None = None
    model_type: str | None = None
    native: bool = False
    not_native_reason: str | None = None
    num_params: int | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    head_params: int = 0  # an untied LM head's weights (native models; 0 when tied)

    @property
    def has_kv_shape(self) -> bool:
        """Whether the KV cache's size per token is known."""
        return bool(self.num_layers and self.num_kv_heads and self.head_dim)

    def kv_bytes_per_token(self, bytes_per_value: int) -> int | None:
        """K and V of one token in every layer with ``bytes_per_value`` bytes a value (a
        KV-cache choice's ``bytes_per_value``, or the weights dtype's for ``auto``); None
        when the config doesn't say."""
        if not self.has_kv_shape:
            return None
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_value

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "SpecSummary":
        """The native spec's numbers."""
        embed = spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2)
        return cls(spec.num_layers, spec.num_kv_heads, spec.head_dim, embed, spec.max_position_embeddings,
                   spec.model_type, True, None, spec.num_params(), spec.vocab_size, spec.hidden_size,
                   0 if spec.tie_word_embeddings else spec.vocab_size * spec.hidden_size)

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "config.json") -> "SpecSummary":
        """Read a config.json dict: through ``ModelSpec`` where Hearth runs it natively,
        else as the transformers fallback would (``fallback``)."""
        try:
            return cls.from_spec(ModelSpec.from_config(config, source=source))
        except HearthError as e:  # unsupported, or a field the native spec needs is missing
            return cls.fallback(config, reason=str(e))

    @classmethod
    def fallback(cls, config: dict[str, Any], reason: str | None = None) -> "SpecSummary":
        """What the transformers fallback takes for a config Hearth doesn't run natively
        (GPT-2's ``n_layer``/``n_head``/``n_embd`` too; multimodal ones through ``text_config``)."""
        cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        layers = cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers")
        heads = cfg.get("num_attention_heads") or cfg.get("n_head")
        kv_heads = cfg.get("num_key_value_heads") or cfg.get("num_kv_heads") or heads
        hidden = cfg.get("hidden_size") or cfg.get("n_embd")
        head_dim = cfg.get("head_dim") or (hidden // heads if hidden and heads else None)
        vocab = cfg.get("vocab_size") or 0
        # Untied unless the config says otherwise: the bigger (safer) estimate.
        tied = bool(cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
        embed = (vocab * hidden * (1 if tied else 2)) if vocab and hidden else 0
        ctx = cfg.get("max_position_embeddings") or cfg.get("n_positions")
        return cls(_int(layers), _int(kv_heads), _int(head_dim), embed, _int(ctx),
                   config.get("model_type") or cfg.get("model_type"), False, reason, None, _int(vocab) or None,
                   _int(hidden), 0 if tied or not embed else embed // 2)


def model_summary(model: dict[str, Any] | str | Path) -> SpecSummary:
    """The summary of a config.json dict, or of a model folder's config.json (read once).

    Raises:
        ModelLoadError: the folder has no readable config.json.
    """
    if isinstance(model, dict):
        return SpecSummary.from_config(model)
    folder = Path(model)
    return SpecSummary.from_config(read_config(folder), source=str(folder / "config.json"))


def _int(value) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
