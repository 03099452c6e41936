"""Per-parameter weight loaders: each parameter knows how to fill itself from checkpoint tensors.

A module sets ``param.weight_loader`` on the parameters it owns (``set_weight_loader``):
a callable ``loader(param, tensor, shard_id)`` that copies one checkpoint tensor into the
parameter, or into the part of it that ``shard_id`` names. A fused projection loads its
q/k/v or gate/up shards at its own offsets; a quantized module's ``qweight`` and
``scales``, or a tensor-parallel shard, will bring loaders of their own. A parameter
without one takes the checkpoint tensor whole (``default_weight_loader``).

Which checkpoint tensor goes to which parameter is declared by the modules too: a module
whose ``checkpoint_shards`` maps checkpoint module names to shard ids (``{"q_proj": "q",
...}``) receives, for each of its parameters, those modules' tensors of the same name
(``q_proj.weight`` -> ``qkv_proj.weight``, shard ``"q"``). ``load_checkpoint`` streams a
checkpoint through these loaders and checks that every parameter and shard was covered.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from engine.errors import ModelLoadError, UnsupportedModelError

WeightLoader = Callable[[nn.Parameter, torch.Tensor, Hashable], None]


class WeightShapeError(ValueError):
    """A checkpoint tensor doesn't have the shape of the parameter (part) it should fill."""

    def __init__(self, got: tuple[int, ...], expected: tuple[int, ...]) -> None:
        super().__init__(f"shape {got}, expected {expected}")
        self.got, self.expected = got, expected


def _copy(dest: torch.Tensor, tensor: torch.Tensor) -> None:
    if tuple(dest.shape) != tuple(tensor.shape):
        raise WeightShapeError(tuple(tensor.shape), tuple(dest.shape))
    dest.copy_(tensor)


def default_weight_loader(param: nn.Parameter, tensor: torch.Tensor, shard_id: Hashable = None) -> None:
    """Copy ``tensor`` into the whole of ``param`` (same shape; cast to its dtype)."""
    if shard_id is not None:
        raise ValueError(f"this parameter has no shards, got shard {shard_id!r}")
    _copy(param.data, tensor)


def row_shard_loader(param: nn.Parameter, tensor: torch.Tensor, shard_id: Hashable, *,
                     offsets: dict[Hashable, tuple[int, int]]) -> None:
    """Copy ``tensor`` into rows ``[start, start + size)`` of ``param``, where ``offsets``
    maps the shard id to ``(start, size)`` (a fused projection's stacked outputs)."""
    start, size = offsets[shard_id]
    _copy(param.data.narrow(0, start, size), tensor)


def set_weight_loader(param: nn.Parameter, loader: WeightLoader) -> None:
    """Give ``param`` its loader. Keep the loader free of references to the module (a plain
    function or a ``partial`` of data): a parameter that referenced its module would be
    kept alive by a reference cycle after the model is released."""
    param.weight_loader = loader


def row_shards(offsets: dict[Hashable, tuple[int, int]]) -> WeightLoader:
    """A loader for parameters stacked from shards along their first axis."""
    return partial(row_shard_loader, offsets=dict(offsets))


@dataclass(frozen=True, slots=True)
class Target:
    """Where one checkpoint tensor goes: parameter ``param`` (named ``param_name`` in the
    model), shard ``shard_id`` of it (None: the whole parameter). A module that loads some
    checkpoint tensors itself (a quantized linear: ``checkpoint_params``, turned into its
    own parameters by ``module.load_part(key, tensor, shard_id)``) is the target instead."""

    param_name: str
    param: nn.Parameter | None
    shard_id: Hashable
    module: nn.Module | None = None
    key: str = ""


def checkpoint_targets(model: nn.Module) -> tuple[dict[str, Target], set[str]]:
    """(checkpoint tensor name -> Target, in the model's order; names that are aliases of
    a parameter already listed, such as a tied head's weight, which a checkpoint may or
    may not store again)."""
    targets: dict[str, Target] = {}
    aliases: set[str] = set()
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        shards = getattr(module, "checkpoint_shards", None)
        parent, _, _ = module_name.rpartition(".")
        own = getattr(module, "checkpoint_params", None)
        if own is not None:  # the module loads these checkpoint tensors itself
            for key in own:
                for ckpt_module, shard_id in (shards or {None: None}).items():
                    if ckpt_module is None:
                        name = f"{module_name}.{key}" if module_name else key
                    else:
                        name = f"{parent}.{ckpt_module}.{key}" if parent else f"{ckpt_module}.{key}"
                    targets[name] = Target(f"{module_name}.{key}", None, shard_id, module, key)
        for pname, param in module.named_parameters(recurse=False, remove_duplicate=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if id(param) in seen:
                aliases.add(full)
                continue
            seen.add(id(param))
            if pname in getattr(module, "filled_by_parts", ()):
                continue  # filled by the module's load_part
            if not shards:
                targets[full] = Target(full, param, None)
                continue
            for ckpt_module, shard_id in shards.items():
                name = f"{parent}.{ckpt_module}.{pname}" if parent else f"{ckpt_module}.{pname}"
                targets[name] = Target(full, param, shard_id)
    return targets, aliases


def load_checkpoint(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], *, source: str,
                    what: str, skip: Callable[[str], bool] = lambda name: False) -> None:
    """Stream ``(name, tensor)`` pairs into ``model``'s parameters through their loaders.

    Every parameter (every shard of a fused one) must be covered; a tensor no parameter
    takes, or of the wrong shape, is a ModelLoadError naming it. ``skip(name)``: checkpoint
    tensors the model doesn't use (RoPE's saved inverse frequencies). ``what`` names the
    model in errors ("a llama model").
    """
    targets, aliases = checkpoint_targets(model)
    loaded: set[str] = set()
    with torch.no_grad():
        for name, tensor in weights:
            target = targets.get(name)
            if target is None:
                if name in aliases or skip(name):
                    continue  # some tied checkpoints store the shared matrix twice
                raise ModelLoadError(
                    f"{source}: unexpected tensor {name!r} for {what} with this config; the "
                    "checkpoint and config.json don't match.")
            try:
                if target.module is not None:
                    target.module.load_part(target.key, tensor, target.shard_id)
                else:
                    loader = getattr(target.param, "weight_loader", default_weight_loader)
                    loader(target.param, tensor, target.shard_id)
            except WeightShapeError as e:
                raise ModelLoadError(
                    f"{source}: tensor {name!r} has shape {e.got}, expected {e.expected} from "
                    "config.json; the checkpoint and config don't match.") from None
            except ValueError as e:  # a quantized layer's tensors that don't make a weight
                raise ModelLoadError(f"{source}: tensor {name!r}: {e}.") from None
            except UnsupportedModelError as e:  # a pre-quantized layer's tensors its format can't read
                raise UnsupportedModelError(
                    f"{source}: layer {name.rpartition('.')[0]!r}: {e}. The checkpoint may be damaged or written "
                    "by a tool Hearth doesn't read: download it again, or load the model's unquantized "
                    "original.") from None
            loaded.add(name)
    optional = set()
    for module in model.modules():
        finish = getattr(module, "finish_loading", None)
        if finish is not None:
            try:
                finish()
            except ValueError as e:
                raise ModelLoadError(f"{source}: {e}.") from None
            optional.update(getattr(module.source, "optional", ()))
    missing = [name for name, t in targets.items() if name not in loaded and not (t.module and t.key in optional)]
    if missing:
        raise ModelLoadError(
            f"{source}: {len(missing)} tensors are missing from the checkpoint (first: {missing[0]}); "
            "the download may be incomplete — re-download the model.")
