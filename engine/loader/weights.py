"""Reading safetensors checkpoints one tensor at a time.

Weights are never gathered into one big state dict: ``safe_open`` memory-maps each file,
so a tensor only costs memory once the caller copies it somewhere (e.g. to the GPU).
Only safetensors is read: pickle ``.bin`` checkpoints can run arbitrary code on load.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from engine.errors import ModelLoadError, UnsupportedModelError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Exceptions safetensors (and the OS under it) raise for unreadable or damaged files.
_READ_ERRORS = (SafetensorError, OSError, RuntimeError, ValueError)


def _corrupt(file: Path, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"cannot read weights file {file}: {exc}. The file is probably truncated or corrupt "
        "(e.g. an interrupted download); delete it and download or convert the model again."
    )


def _load_index(index: Path) -> dict[str, str]:
    """Return the index's ``weight_map`` (tensor name -> shard file name)."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"cannot read shard index {index}: {exc}. Delete it and download the model again."
        ) from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(
            f"shard index {index} has no 'weight_map' listing the tensors' shard files; "
            "it is damaged or not a safetensors index. Delete it and download the model again."
        )
    return {str(k): str(v) for k, v in weight_map.items()}


def weight_files(path: Path) -> list[Path]:
    """Return the safetensors files of a model, in a stable order.

    ``path`` is a model folder or a single ``.safetensors`` file. In a folder, a
    ``model.safetensors.index.json`` lists the shards (returned sorted by name, which is
    their natural ``-00001-of-0000N`` order); otherwise ``model.safetensors`` or, failing
    that, every ``*.safetensors`` file is used. Each listed shard must exist.

    Raises:
        UnsupportedModelError: only pickle (``.bin`` / ``.pt``) weights are present.
        ModelLoadError: no weights, an unreadable index, or a shard the index names is missing.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UnsupportedModelError(
                f"{path} is not a .safetensors file; Hearth reads weights only in safetensors format."
            )
        return [path]
    if not path.is_dir():
        raise ModelLoadError(f"no such model folder or weights file: {path}")

    index = path / INDEX_FILE
    if index.is_file():
        shards = sorted(set(_load_index(index).values()))
        files = [path / name for name in shards]
        for file in files:
            if not file.is_file():
                error = ModelLoadError(
                    f"weights shard {file.name} listed in {index} is missing from {path}. "
                    "The download is incomplete: download the model again."
                )
                error.missing_shard = file.name  # (a Hub repo that lacks it says so instead)
                raise error
        return files

    single = path / SINGLE_FILE
    if single.is_file():
        return [single]
    others = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if others:
        return others

    pickles = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
    if pickles:
        raise UnsupportedModelError(
            f"{path} only has PyTorch pickle weights ({', '.join(pickles[:3])}); Hearth loads only "
            "safetensors because pickle files can run code when opened. Use a safetensors version "
            "of this model (most Hub repos have one) or convert it with transformers' "
            "save_pretrained(..., safe_serialization=True)."
        )
    raise ModelLoadError(
        f"no weights in {path}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards. "
        "Check that the folder holds a complete Hugging Face model."
    )


def iter_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of a model, one at a time.

    Tensors are CPU tensors backed by a memory map of the file; nothing but the tensor
    asked for is read. Files come in :func:`weight_files` order, tensors in header order.

    Raises:
        ModelLoadError: a file is truncated or corrupt (names the file).
    """
    for file in weight_files(path):
        try:
            handle = safe_open(str(file), framework="pt")
            names = list(handle.keys())
        except _READ_ERRORS as exc:
            raise _corrupt(file, exc) from exc
        for name in names:
            try:
                tensor = handle.get_tensor(name)
            except _READ_ERRORS as exc:
                raise _corrupt(file, exc) from exc
            # yield outside the try: errors raised by the consumer are not ours to rename.
            yield name, tensor


def read_metadata(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Return ``{name: (shape, dtype)}`` for every tensor without reading tensor data.

    ``dtype`` is the safetensors name (``"BF16"``, ``"F32"``, ...). Useful to check shapes
    against a config and to estimate memory before loading anything.

    Raises:
        ModelLoadError: a file is truncated or corrupt (names the file).
    """
    meta: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    meta[name] = (tuple(int(d) for d in view.get_shape()), str(view.get_dtype()))
        except _READ_ERRORS as exc:
            raise _corrupt(file, exc) from exc
    return meta

