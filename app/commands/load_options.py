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
    "--quant": ("quantization", "auto", "weight quantization (also --quantization); auto: a GGUF file's own "
                "quantized weights, else none; `hearth doctor` shows which run here"),
}
# Other spellings of a choice flag (the issue's --quant and the older --quantization).
FLAG_ALIASES = {"--quant": ("--quantization",)}


def choice_help(kind: str, extra: str) -> str:
    """``"auto | torch | triton | flash-attn: <extra>"``: the registry's names first."""
    return f"{' | '.join(choice_names(kind))}: {extra}"


def add_choice_flags(group, extra_help: dict[str, str] | None = None) -> None:
    """Add the choice flags (default ``auto``, ``none`` for quantization) to ``group``;
    ``extra_help`` replaces a flag's explanation after the names."""
    for flag, (kind, default, extra) in CHOICE_FLAGS.items():
        group.add_argument(flag, *FLAG_ALIASES.get(flag, ()), default=default, metavar="NAME",
                           help=choice_help(kind, (extra_help or {}).get(flag, extra)))
    group.add_argument("--group-size", type=int, default=None, metavar="G",
                       help="int4's group of inputs sharing a scale: 32, 64, 128 or 256 (default: 128, or "
                            "the largest of 64/32 dividing every layer)")
    group.add_argument("--quant-head", action="store_true",
                       help="quantize the embedding and LM head too, in the method's own format (int8/int4; "
                            "the embedding and a tied head are kept in the model's dtype by default, since "
                            "they cost the most quality; an untied head becomes int8 per channel)")
    group.add_argument("--float-head", action="store_true",
                       help="keep an untied LM head in the model's dtype (int8/int4 make it int8 per "
                            "channel by default, fp8 e4m3: it is up to a fifth of a quantized decode step)")


def _not_empty(what: str):
    """An argparse type refusing an empty value (the engine reads "" as the flag left out,
    which on a command line hides a shell variable that came out empty)."""
    def check(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"is empty: give {what}, or leave the flag out")
        return text
    return check


def add_device_flags(group) -> None:
    """``--devices``, ``--split``, ``--split-ratio``: a load over several devices (engine.split)."""
    group.add_argument("--devices", default=None, metavar="LIST",
                       type=_not_empty("the devices, e.g. cuda:0,cuda:1"),
                       help="load over several devices, in order, e.g. cuda:0,cuda:1 or cuda:0,cpu (the CPU "
                            "last takes the layers the GPUs can't hold); `hearth doctor` lists the GPUs")
    group.add_argument("--split", default="layer", metavar="MODE",
                       help="layer (default): contiguous layer ranges per device, in one process; tensor: "
                            "tensor parallel, a slice of every layer on each device, a worker process for each "
                            "device after the first (NCCL between GPUs, gloo between CPU ranks); the heads and "
                            "MLP width must divide by the devices")
    group.add_argument("--split-ratio", default=None, metavar="SHARES",
                       type=_not_empty("one share per device, e.g. 0.6,0.4"),
                       help="the layer split's share per device, e.g. 0.6,0.4, or layer counts such as 31,1 "
                            "(default: by each device's free memory, the CPU only taking what the GPUs can't hold)")


def add_load_args(p: argparse.ArgumentParser) -> None:
    """The load flags of ``hearth generate`` and ``hearth chat``."""
    g = p.add_argument_group("model loading")
    g.add_argument("--model", default=None, help="default | Hub repo id | local folder | .gguf file")
    g.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    add_choice_flags(g)
    add_device_flags(g)
    g.add_argument("--enforce-eager", action="store_true", help="decode without CUDA graphs")
    g.add_argument("--max-model-len", type=int, default=None, help="context length in tokens")
    g.add_argument("--kv-cache-memory", default=None, help="KV cache size, e.g. 2GiB")
    g.add_argument("--max-num-seqs", type=int, default=64, help="requests a step runs at most (default 64)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N",
                   help="tokens a step reads at most: a longer prompt is read in chunks of N, and a Stop or "
                        "the other requests' next tokens wait at most one chunk (default 2048 on a GPU, 512 "
                        "on the CPU)")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="a local folder of tokenizer files to use instead of the model's own (gives a "
                        "random-weight shape:NAME text: its vocabulary becomes the tokenizer's)")


def options_from_args(args) -> dict:
    """The load options (``Engine.load``'s keywords, with ``model``) of ``add_load_args``'
    flags: what ``load_config`` and the engine host's ``load`` take."""
    return dict(
        model=args.model, revision=args.revision, device=args.device, dtype=args.dtype, attention=args.attention,
        max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=not args.no_prefix_caching,
        enforce_eager=args.enforce_eager,
        kv_cache_dtype=args.kv_cache_dtype, quantization=args.quant, quant_group_size=args.group_size,
        quant_head=args.quant_head, float_head=args.float_head, tokenizer=args.tokenizer, devices=args.devices,
        split=args.split, split_ratio=args.split_ratio)


def config_from_args(args) -> EngineConfig:
    """The one validated EngineConfig of ``add_load_args``' flags (InvalidRequestError for
    a bad value, before anything loads)."""
    options = options_from_args(args)
    return load_config(options.pop("model"), **options)
