"""A pre-quantized checkpoint's quantization settings (``config.json``'s
``quantization_config``, or GPTQ's ``quantize_config.json``), parsed into one frozen
``CheckpointQuant``, with everything Hearth can't read refused up front, naming the field.
``quantization_config`` builds the dict ``hearth quantize`` writes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.errors import UnsupportedModelError

SUPPORTED_METHODS = ("awq", "gptq", "compressed-tensors", "fp8")
_WHAT_TO_DO = ("load the model's unquantized checkpoint and quantize it with --quant "
               "(int4, int8, awq or gptq) instead")


@dataclass(frozen=True, slots=True)
class CheckpointQuant:
    """How one checkpoint's linear weights are quantized.

    ``group_size`` None means per output channel (a config's -1): the group is the layer's
    whole input (``group_size_for``). ``tensor_names`` are the per-linear tensor suffixes a
    reader needs (``"qweight"`` for ``"...q_proj.qweight"``); ``optional_tensor_names`` may be
    present and are used when they are. ``not_converted`` lists the modules the checkpoint
    keeps in float (AWQ ``modules_to_not_convert``, compressed-tensors ``ignore``);
    ``skips`` matches a module name against it.
    """

    method: str  # "awq" | "gptq" | "compressed-tensors" | "fp8" (e4m3 weights, either layout)
    bits: int
    group_size: int | None
    sym: bool
    desc_act: bool  # inputs in act-order groups: GPTQ desc_act, compressed-tensors actorder "group"
    actorder: str | None  # compressed-tensors "group" | "weight"; GPTQ "group" when desc_act
    checkpoint_format: str  # "gemm" (AWQ), "gptq" | "gptq_v2", "pack-quantized", "float-quantized", "fp8"
    version: str | None  # AWQ's "version", the compressed-tensors version, else None
    not_converted: tuple[str, ...]
    tensor_names: tuple[str, ...]
    optional_tensor_names: tuple[str, ...] = ()
    lm_head: bool = False  # GPTQ's "lm_head": the output head is quantized too
    source: str = ""

    def group_size_for(self, in_features: int) -> int:
        """The group size of a layer with ``in_features`` inputs (per-channel: all of them)."""
        return in_features if self.group_size is None else self.group_size

    def skips(self, module_name: str) -> bool:
        """Whether ``module_name`` (e.g. "model.layers.0.mlp.gate") is kept in float.

        An entry "re:PATTERN" is a regular expression matched at the start of the name
        (compressed-tensors); any other entry matches a whole run of dotted name parts
        ("lm_head", "mlp.gate", "model.visual"), so "mlp.gate" does not match "mlp.gate_proj"."""
        dotted = f".{module_name}."
        for entry in self.not_converted:
            if entry.startswith("re:"):
                if re.match(entry[3:], module_name):
                    return True
            elif f".{entry}." in dotted:
                return True
        return False


def _refuse(source: str, field: str, problem: str, todo: str = _WHAT_TO_DO) -> UnsupportedModelError:
    where = f" in {source}" if source else ""
    return UnsupportedModelError(f"quantization_config{'.' + field if field else ''}{where}: {problem}; {todo}")


def _group(value: Any, source: str, field: str) -> int | None:
    if value is None or value == -1:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _refuse(source, field, f"group size {value!r} is not a positive integer or -1")
    return value


def _bits(value: Any, allowed: tuple[int, ...], source: str, field: str, method: str) -> int:
    if value not in allowed or isinstance(value, bool):
        ok = " or ".join(str(b) for b in allowed)
        raise _refuse(source, field, f"{value!r}-bit {method} weights are not supported ({ok})")
    return int(value)


def parse_quantization_config(cfg: Mapping[str, Any], source: str = "",
                              quantize_config: Mapping[str, Any] | None = None):
    """Parse a checkpoint's quantization settings.

    ``cfg`` is the checkpoint's config.json (its ``quantization_config`` is read) or that
    ``quantization_config`` dict itself; ``quantize_config`` is a GPTQ ``quantize_config.json``
    used when config.json has none. ``source`` names the checkpoint in messages. Returns a
    ``CheckpointQuant`` (a ``BnbCheckpoint`` for bitsandbytes:
    ``engine.quant.formats.bitsandbytes``), or None for an unquantized checkpoint; raises
    ``UnsupportedModelError`` naming the field for anything Hearth can't load.
    """
    if "quant_method" in cfg and "quantization_config" not in cfg:
        qc: Mapping[str, Any] | None = cfg
    else:
        qc = cfg.get("quantization_config")
    if qc is None and quantize_config is not None:
        qc = {"quant_method": "gptq", **quantize_config}
    if qc is None:
        return None
    if not isinstance(qc, Mapping):
        raise _refuse(source, "", f"expected an object, found {type(qc).__name__}")
    method = str(qc.get("quant_method", "")).lower().replace("_", "-")
    if method == "awq":
        return _parse_awq(qc, source)
    if method == "gptq":
        return _parse_gptq(qc, source)
    if method == "compressed-tensors":
        if qc.get("format") == "float-quantized":
            return _parse_ct_fp8(qc, source)
        return _parse_compressed_tensors(qc, source)
    if method == "fp8":
        return _parse_fp8(qc, source)
    if method == "bitsandbytes":
        from engine.quant.formats.bitsandbytes import parse_bitsandbytes

        return parse_bitsandbytes(qc, source)
    raise _refuse(source, "quant_method",
                  f"{qc.get('quant_method')!r} checkpoints are not supported (Hearth reads "
                  f"{', '.join(SUPPORTED_METHODS)} and bitsandbytes)")


def _parse_awq(qc: Mapping[str, Any], source: str) -> CheckpointQuant:
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise _refuse(source, "version",
                      f"AWQ {version!r} packing is not supported (only \"gemm\", the layout AutoAWQ "
                      f"and llm-compressor write by default)",
                      "use a GEMM-packed AWQ checkpoint, or " + _WHAT_TO_DO)
    backend = qc.get("backend")
    if backend not in (None, "autoawq"):
        raise _refuse(source, "backend", f"AWQ checkpoints packed by {backend!r} are not supported "
                      f"(only \"autoawq\")")
    if not qc.get("zero_point", True):
        raise _refuse(source, "zero_point", "AWQ checkpoints without zero points are not supported")
    bits = _bits(qc.get("bits", qc.get("w_bit", 4)), (4,), source, "bits", "AWQ")
    group = _group(qc.get("group_size", qc.get("q_group_size", 128)), source, "group_size")
    return CheckpointQuant(
        method="awq", bits=bits, group_size=group, sym=False, desc_act=False, actorder=None,
        checkpoint_format="gemm", version=version,
        not_converted=tuple(qc.get("modules_to_not_convert") or ()),
        tensor_names=("qweight", "qzeros", "scales"), source=source)


def _parse_gptq(qc: Mapping[str, Any], source: str) -> CheckpointQuant:
    fmt = qc.get("checkpoint_format", qc.get("format")) or "gptq"
    fmt = str(fmt).lower()
    if fmt not in ("gptq", "gptq_v2") or qc.get("is_marlin_format"):
        fmt = "marlin" if qc.get("is_marlin_format") else fmt
        raise _refuse(source, "checkpoint_format",
                      f"GPTQ {fmt!r} checkpoints are not supported (only \"gptq\" and \"gptq_v2\")")
    if qc.get("dynamic"):
        raise _refuse(source, "dynamic", "per-module GPTQ overrides are not supported")
    pack_dtype = qc.get("pack_dtype")
    if pack_dtype not in (None, "int32", "torch.int32"):
        raise _refuse(source, "pack_dtype", f"GPTQ weights packed in {pack_dtype!r} are not supported (int32)")
    bits = _bits(qc.get("bits", 4), (4, 8), source, "bits", "GPTQ")
    group = _group(qc.get("group_size", 128), source, "group_size")
    desc_act = bool(qc.get("desc_act", False))
    required = ("qweight", "qzeros", "scales") + (("g_idx",) if desc_act else ())
    return CheckpointQuant(
        method="gptq", bits=bits, group_size=group, sym=bool(qc.get("sym", True)), desc_act=desc_act,
        actorder="group" if desc_act else None, checkpoint_format=fmt, version=None,
        not_converted=tuple(qc.get("modules_to_not_convert") or ()),
        tensor_names=required, optional_tensor_names=() if desc_act else ("g_idx",),
        lm_head=bool(qc.get("lm_head", False)), source=source)


_CT_ACTORDER = {None: None, False: None, "weight": "weight", "static": "weight",
                True: "group", "group": "group", "dynamic": "group"}


def _ct_config_groups(qc: Mapping[str, Any], source: str, statuses: tuple[str, ...],
                      stored: str) -> Mapping[str, Any]:
    """A compressed-tensors config's ``config_groups``, after refusing what neither of its
    formats Hearth reads supports: a status other than ``statuses`` (the weights not stored
    ``stored``), KV-cache schemes, sparsity, transforms, no scheme at all."""
    status = qc.get("quantization_status", "compressed")
    if status not in statuses:
        raise _refuse(source, "quantization_status", f"{status!r}: the weights are not stored {stored}")
    for field in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if qc.get(field):
            raise _refuse(source, field, f"compressed-tensors {field.replace('_', ' ')} is not supported")
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, Mapping) or not groups:
        raise _refuse(source, "config_groups", "no quantization scheme found")
    for name, group in groups.items():
        if not isinstance(group, Mapping):
            raise _refuse(source, f"config_groups.{name}", f"expected an object, found {type(group).__name__}")
        for part in ("weights", "input_activations", "output_activations"):
            if group.get(part) is not None and not isinstance(group[part], Mapping):
                raise _refuse(source, f"config_groups.{name}.{part}",
                              f"expected an object or null, found {type(group[part]).__name__}")
    return groups


def _parse_compressed_tensors(qc: Mapping[str, Any], source: str) -> CheckpointQuant:
    fmt = qc.get("format")
    if fmt != "pack-quantized":
        raise _refuse(source, "format",
                      f"compressed-tensors {fmt!r} checkpoints are not supported (only "
                      f"\"pack-quantized\", the W4A16/W8A16 layout, and \"float-quantized\", FP8; "
                      f"\"marlin-24\", \"naive-quantized\" and \"int-quantized\" are not)")
    groups = _ct_config_groups(qc, source, ("compressed",), "compressed")
    schemes = []
    for name, group in groups.items():
        field = f"config_groups.{name}"
        if group.get("format") not in (None, "pack-quantized"):
            raise _refuse(source, f"{field}.format",
                          f"compressed-tensors {group.get('format')!r} layers are not supported "
                          f"(only \"pack-quantized\")")
        if group.get("input_activations") is not None:
            raise _refuse(source, f"{field}.input_activations",
                          "activation quantization (e.g. W8A8) is not supported, only weight-only "
                          "W4A16/W8A16")
        if group.get("output_activations") is not None:
            raise _refuse(source, f"{field}.output_activations", "output quantization is not supported")
        targets = group.get("targets") or []
        if "Linear" not in targets:
            raise _refuse(source, f"{field}.targets",
                          f"schemes that target {targets!r} instead of every \"Linear\" are not supported")
        schemes.append(_ct_weights(group.get("weights"), source, f"{field}.weights"))
    if any(s != schemes[0] for s in schemes[1:]):
        raise _refuse(source, "config_groups", "several different weight schemes are not supported")
    bits, group_size, sym, actorder = schemes[0]
    required = ("weight_packed", "weight_scale", "weight_shape")
    required += (() if sym else ("weight_zero_point",)) + (("weight_g_idx",) if actorder == "group" else ())
    return CheckpointQuant(
        method="compressed-tensors", bits=bits, group_size=group_size, sym=sym,
        desc_act=actorder == "group", actorder=actorder, checkpoint_format="pack-quantized",
        version=qc.get("version"), not_converted=tuple(qc.get("ignore") or ()),
        tensor_names=required,
        optional_tensor_names=("weight_zero_point",) if sym else (), source=source)


_FP8_TENSORS = ("weight_scale", "weight")  # the scale first: it marks a quantized layer (floats have "weight")


def _fp8(checkpoint_format: str, version, not_converted, source: str) -> CheckpointQuant:
    return CheckpointQuant(
        method="fp8", bits=8, group_size=None, sym=True, desc_act=False, actorder=None,
        checkpoint_format=checkpoint_format, version=version, not_converted=tuple(not_converted or ()),
        tensor_names=_FP8_TENSORS, optional_tensor_names=("input_scale",), source=source)


def _parse_fp8(qc: Mapping[str, Any], source: str) -> CheckpointQuant:
    """vLLM's / AutoFP8's ``quant_method: "fp8"``: e4m3 weights, a scale per tensor (or channel)."""
    if qc.get("weight_block_size"):
        raise _refuse(source, "weight_block_size",
                      f"block-wise fp8 scales {qc.get('weight_block_size')!r} are not supported (Hearth reads one "
                      "scale per tensor or per output channel)",
                      "load the model's bf16 checkpoint with --quant fp8 instead")
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise _refuse(source, "fmt", f"{fmt!r} fp8 weights are not supported (only e4m3)")
    if qc.get("kv_cache_scheme"):
        raise _refuse(source, "kv_cache_scheme", "fp8 KV-cache scales are not supported",
                      "use --kv-cache-dtype fp8 with the weights' checkpoint instead")
    ignored = tuple(qc.get("modules_to_not_convert") or ()) + tuple(qc.get("ignored_layers") or ())
    return _fp8("fp8", None, tuple(ignored), source)


def _parse_ct_fp8(qc: Mapping[str, Any], source: str) -> CheckpointQuant:
    """compressed-tensors ``float-quantized`` (llm-compressor FP8 / FP8_DYNAMIC): e4m3 weights
    per channel or tensor; activations per token (dynamic) or per tensor (static)."""
    groups = _ct_config_groups(qc, source, ("compressed", "frozen"), "quantized")
    for name, group in groups.items():
        field = f"config_groups.{name}"
        if "Linear" not in (group.get("targets") or []):
            raise _refuse(source, f"{field}.targets",
                          f"schemes that target {group.get('targets')!r} instead of every \"Linear\" are not "
                          "supported")
        w = group.get("weights")
        if not isinstance(w, Mapping) or w.get("type") != "float" or w.get("num_bits") != 8:
            raise _refuse(source, f"{field}.weights", "a float-quantized checkpoint needs 8-bit float weights")
        if w.get("strategy") not in ("channel", "tensor"):
            raise _refuse(source, f"{field}.weights.strategy",
                          f"{w.get('strategy')!r} fp8 scales are not supported (\"channel\" or \"tensor\")",
                          "load the model's bf16 checkpoint with --quant fp8 instead")
        if not w.get("symmetric", True) or w.get("dynamic"):
            raise _refuse(source, f"{field}.weights", "asymmetric or dynamic fp8 weights are not supported")
        a = group.get("input_activations")
        if a is not None and (a.get("type") != "float" or a.get("num_bits") != 8):
            raise _refuse(source, f"{field}.input_activations",
                          "only 8-bit float activations (or none) go with fp8 weights")
        if group.get("output_activations") is not None:
            raise _refuse(source, f"{field}.output_activations", "output quantization is not supported")
    return _fp8("float-quantized", qc.get("version"), qc.get("ignore"), source)


def _ct_weights(w: Any, source: str, field: str) -> tuple[int, int | None, bool, str | None]:
    if not isinstance(w, Mapping):
        raise _refuse(source, field, "no weight quantization given")
    if w.get("type", "int") != "int":
        raise _refuse(source, f"{field}.type", f"{w.get('type')!r} (floating-point) weights are not supported")
    bits = _bits(w.get("num_bits"), (4, 8), source, f"{field}.num_bits", "compressed-tensors")
    if w.get("dynamic"):
        raise _refuse(source, f"{field}.dynamic", "dynamic weight quantization is not supported")
    strategy = w.get("strategy")
    if strategy == "group":
        group = _group(w.get("group_size"), source, f"{field}.group_size")
        if group is None:
            raise _refuse(source, f"{field}.group_size", "strategy \"group\" needs a group size")
    elif strategy == "channel":
        group = None
    else:
        raise _refuse(source, f"{field}.strategy",
                      f"{strategy!r} quantization is not supported (\"group\" or \"channel\")")
    actorder = w.get("actorder")
    if actorder not in _CT_ACTORDER:
        raise _refuse(source, f"{field}.actorder", f"{actorder!r} is not a known activation ordering")
    return bits, group, bool(w.get("symmetric", True)), _CT_ACTORDER[actorder]


def quantization_config(method: str, bits: int, group_size: int | None, sym: bool, desc_act: bool = False,
                        *, not_converted: Sequence[str] = ("lm_head",), lm_head: bool = False,
                        gptq: dict | None = None) -> dict:
    """The ``quantization_config`` dict for config.json of a checkpoint Hearth writes with
    ``write_awq``/``write_gptq``/``write_compressed_tensors`` (what vLLM and transformers
    read). ``group_size`` None is per output channel; ``desc_act`` says the weights carry
    act-order group indices; ``not_converted`` names the modules left in float (AWQ and
    compressed-tensors record it; GPTQ records only ``lm_head``, whether the head is
    quantized). ``gptq``: the GPTQ run's ``damp_percent`` and ``true_sequential`` (a GPTQ
    layout records them only for weights GPTQ rounded: round-to-nearest or AWQ weights
    written in that layout were not)."""
    if method == "awq":
        if bits != 4 or desc_act:
            raise ValueError("AWQ checkpoints are 4-bit without act-order")
        return {"quant_method": "awq", "bits": 4, "group_size": -1 if group_size is None else group_size,
                "zero_point": True, "version": "gemm",
                "modules_to_not_convert": list(not_converted) or None}
    if method == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": -1 if group_size is None else group_size,
                "desc_act": desc_act, "sym": sym, "static_groups": False, **(gptq or {}),
                "lm_head": lm_head, "checkpoint_format": "gptq"}
    if method == "compressed-tensors":
        weights = {"num_bits": bits, "type": "int", "symmetric": sym,
                   "strategy": "channel" if group_size is None else "group", "group_size": group_size,
                   "block_structure": None, "dynamic": False, "actorder": "group" if desc_act else None,
                   "observer": "minmax", "observer_kwargs": {}}
        return {"quant_method": "compressed-tensors", "format": "pack-quantized",
                "quantization_status": "compressed", "global_compression_ratio": None,
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                              "input_activations": None, "output_activations": None,
                                              "format": "pack-quantized"}},
                "ignore": list(not_converted), "kv_cache_scheme": None}
    if method == "fp8":  # llm-compressor's FP8_DYNAMIC scheme, in compressed-tensors' float-quantized format
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "group_size": None,
                   "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
                   "observer_kwargs": {}}
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "group_size": None,
                "block_structure": None, "dynamic": True, "actorder": None, "observer": None,
                "observer_kwargs": {}}
        return {"quant_method": "compressed-tensors", "format": "float-quantized",
                "quantization_status": "compressed", "global_compression_ratio": None,
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                              "output_activations": None, "format": "float-quantized"}},
                "ignore": list(not_converted), "kv_cache_scheme": None}
    raise ValueError(f"unknown method {method!r} ({', '.join(SUPPORTED_METHODS)})")
