"""The load flags of ``hearth generate``, ``hearth chat`` and ``hearth bench``, and the one
``EngineConfig`` the command line builds from them.

The choice flags (``--device``, ``--dtype``, ``--attention``, ``--kv-cache-dtype``,
``--quantization``) list the engine's choices registry in their help; their values are
checked by the engine's config (one message for a bad value, whichever front end sent it),
not by argparse, so a bad value is one ``hearth: error:`` line like every other refusal.
"""

from __future__ import annotations

import argparse

from engine.api import EngineConfig, choice_names, load_config

# flag -> (kind in the registry, default, what the help adds after the list of names)
CHOICE_FLAGS = {
    "--device": ("device", "auto", "or cuda:N"),
    "--dtype": ("dtype", "auto", "the weights dtype; auto: bfloat16 on a GPU, float32 on the CPU"),
    "--attention": ("attention", "auto", "auto: triton on a CUDA GPU; `hearth doctor` shows which run here"),
    "--kv-cache-dtype": ("kv_cache_dtype", "auto", "auto: the model's dtype; fp8: e4m3, half the memory per token"),
    "--quantization": ("quantization", "none", "weight quantization; `hearth doctor` shows which run here"),
}


# flag -> its other spellings (the name for the quantization choice is --quant)
FLAG_ALIASES = {"--quantization": ("--quant",)}


def choice_help(kind: str, extra: str) -> str:
    """``"auto | torch | triton | flash-attn: <extra>"``: the registry's names first."""
    return f"{' | '.join(choice_names(kind))}: {extra}"


def add_choice_flags(group, extra_help: dict[str, str] | None = None) -> None:
    """Add the choice flags (default ``auto``, ``none`` for quantization) to ``group``;
    ``extra_help`` replaces a flag's explanation after the names."""
    for flag, (kind, default, extra) in CHOICE_FLAGS.items():
        group.add_argument(flag, *FLAG_ALIASES.get(flag, ()), default=default, metavar="NAME",
                           help=choice_help(kind, (extra_help or {}).get(flag, extra)))


def add_load_args(p: argparse.ArgumentParser) -> None:
    """The load flags of ``hearth generate`` and ``hearth chat``."""
    g = p.add_argument_group("model loading")
    g.add_argument("--model", default=None, help="default | Hub repo id | local folder | .gguf file")
    g.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    add_choice_flags(g)
    g.add_argument("--enforce-eager", action="store_true", help="decode without CUDA graphs")
    g.add_argument("--max-model-len", type=int, default=None, help="context length in tokens")
    g.add_argument("--kv-cache-memory", default=None, help="KV cache size, e.g. 2GiB")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--no-prefix-caching", action="store_true")


def config_from_args(args) -> EngineConfig:
    """The one validated EngineConfig of ``add_load_args``' flags (InvalidRequestError for
    a bad value, before anything loads)."""
    return load_config(
        args.model, revision=args.revision, device=args.device, dtype=args.dtype, attention=args.attention,
        max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=not args.no_prefix_caching, enforce_eager=args.enforce_eager,
        kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization)
