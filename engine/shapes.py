"""Named model shapes for benchmarks (random weights, fixed seed): config.json dicts."""

from __future__ import annotations

from engine.errors import InvalidRequestError

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_theta": 500000.0}

SHAPES: dict[str, dict] = {
    "tiny": dict(model_type="llama", vocab_size=32000, hidden_size=128, intermediate_size=352,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=4096, tie_word_embeddings=True),
    "llama-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     max_position_embeddings=131072, tie_word_embeddings=True, rms_norm_eps=1e-5,
                     rope_scaling=_LLAMA3_ROPE, rope_theta=500000.0),
    "llama-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     max_position_embeddings=131072, tie_word_embeddings=False, rms_norm_eps=1e-5,
                     rope_scaling=_LLAMA3_ROPE, rope_theta=500000.0),
    # Llama 3 70B: about 141 GB in bf16, more than one H200 holds (split it: --devices, issue 19)
    "llama-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                      num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                      max_position_embeddings=131072, tie_word_embeddings=False, rms_norm_eps=1e-5,
                      rope_scaling=_LLAMA3_ROPE, rope_theta=500000.0),
    # Qwen3 0.6B: per-head q/k norms, head_dim 128 over hidden 1,024 (16 heads: q is 2,048 wide)
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960, tie_word_embeddings=True, rms_norm_eps=1e-6,
                       rope_theta=1000000.0),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, tie_word_embeddings=False, rms_norm_eps=1e-6,
                       rope_theta=1000000.0),
}


def shape_config(name: str) -> dict:
    if name not in SHAPES:
        raise InvalidRequestError(f"unknown shape {name!r}; choose one of: {', '.join(SHAPES)}")
    return dict(SHAPES[name])
