"""Layer split in one process (issue 18, ``--devices cuda:0,cpu --split layer``): each
device holds a contiguous range of the decoder layers, their KV cache and their own kernel
choices; the hidden states hop from one device to the next.

The model code knows nothing of it. Bring-up places the model's tensors by module name
(``Placement.device_of``), applies each device's kernel plan (Triton on a GPU, the torch
reference on the CPU), and puts a forward pre-hook (``_Hop``) on the first layer of each
device's range that moves what the layer is called with (the hidden states, the residual,
the positions, the step's attention metadata) to that device and hands it that device's
RoPE tables. The embedding sits on the first device, the final norm and LM head on the
last GPU (``engine.split.head_device_index``; the last device when there is none: a
partial offload's CPU layers hand the hidden states back), a tied embedding with the head
(one matrix); logits and sampling are on the head's device.

Which layers go where is ``engine.split.plan_layer_split``'s plan: by a ratio given, or by
what each device can hold (its free memory, within the load's memory fraction on a GPU)
with each layer costing its weights plus one full context of its KV cache. CPU devices take
only what the GPUs can't (partial offload).

Decode steps replay CUDA graphs per GPU segment, the CPU's layers eagerly between them
(``engine.runner.split_graphs``); prompts and mixed steps run eagerly.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from engine.config import EngineConfig
from engine.device import available_ram_bytes, free_memory_bytes, gib
from engine.errors import OutOfMemoryError
from engine.layers.attention import AttentionMetadata
from engine.layers.modules import module_bytes
from engine.layers.rotary import RotaryEmbedding
from engine.memory_plan import kv_headroom
from engine.split import LayerSplit, head_device_index, plan_layer_split

log = logging.getLogger("hearth.loader")

_LAYER = re.compile(r"^model\.layers\.(\d+)(?:\.|$)")


@dataclass(slots=True)
class Placement:
    """Where each part of a split model lives: ``layer_devices[i]`` holds layer ``i``,
    ``embed`` the embedding (the step's input ids), ``head`` the final norm and the LM
    head (the logits); ``attention``: the attention backend each device runs."""

    split: LayerSplit
    layer_devices: tuple[torch.device, ...]
    embed: torch.device
    head: torch.device
    attention: dict[torch.device, str]
    hops: list["_Hop"] = field(default_factory=list)

    @property
    def devices(self) -> list[torch.device]:
        """The distinct devices, in layer order (``cpu,cpu`` is one)."""
        out: list[torch.device] = []
        for d in (self.embed, *self.layer_devices, self.head):
            if d not in out:
                out.append(d)
        return out

    def device_of(self, name: str) -> torch.device:
        """The device of the model's submodule ``name`` ("model.layers.3.mlp", "lm_head")."""
        m = _LAYER.match(name)
        if m is not None:
            return self.layer_devices[int(m.group(1))]
        if name.startswith(("model.norm", "lm_head")):
            return self.head
        if name.startswith("rotary"):
            return self.layer_devices[0]
        return self.embed  # the embedding, and the containers (which hold no tensors)

    def layers_on(self, device: torch.device) -> int:
        return sum(d == device for d in self.layer_devices)

    def describe(self, weights: dict[torch.device, int] | None = None) -> str:
        """"cuda:0: layers 0-27 (triton), cpu: layers 28-31 (torch)"; with ``weights``
        (device -> bytes), each device's weights too (once per device)."""
        parts, said = [], set()
        for d, r in zip(self.split.devices, self.split.ranges):
            dev = torch.device(d)
            size = f", {gib(weights[dev])} of weights" if weights and dev not in said else ""
            said.add(dev)
            parts.append(f"{d}: layers {r.start}-{r.stop - 1} ({self.attention[dev]}{size})")
        return ", ".join(parts)

    def info(self) -> dict[str, Any]:
        """The JSON form ``ModelInfo.layer_split`` carries."""
        return {
            "devices": list(self.split.devices),
            "layers": [[r.start, r.stop] for r in self.split.ranges],
            "attention": [self.attention[torch.device(d)] for d in self.split.devices],
            "embedding": str(self.embed),
            "head": str(self.head),
        }


def plan_placement(model: nn.Module, config: EngineConfig, *, kv_token_bytes: int, max_model_len: int,
                   attention: dict[str, str], gpu_memory: Callable[[str], tuple[int, int]] | None = None) -> Placement:
    """The placement of ``model`` (built and transformed on the meta device) over
    ``config.model.devices``. ``kv_token_bytes``: one token's K/V over all layers;
    ``attention``: the backend for each device type ("cuda", "cpu"); ``gpu_memory``: as
    ``device_room`` takes it.

    Raises:
        InvalidRequestError: the devices can't hold the model (by how much), or fewer
            layers than devices.
    """
    from engine.runner.bring_up import load_bytes

    mc = config.model
    names = mc.devices
    spec = model.spec
    layers = model.model.layers
    worst_type = "cuda" if any(d != "cpu" for d in names) else "cpu"
    kv_per_layer = kv_token_bytes // spec.num_layers * max_model_len  # one full context
    layer_bytes = max(load_bytes(layer, worst_type) for layer in layers) + kv_per_layer
    tied = spec.tie_word_embeddings
    embed_bytes = module_bytes(model.model.embed_tokens)
    tail = module_bytes(model.model.norm) + (embed_bytes if tied else load_bytes(model.lm_head, worst_type))
    first, last = (0, tail) if tied else (embed_bytes, tail)
    room = None if mc.split_ratio is not None else device_room(names, config.cache.memory_fraction, gpu_memory)
    split = plan_layer_split(names, spec.num_layers, layer_bytes, first, last, room=room, ratio=mc.split_ratio)
    devices = tuple(torch.device(d) for d in names)
    layer_devices = tuple(torch.device(split.device_of(i)) for i in range(spec.num_layers))
    head = devices[head_device_index(names)]
    embed = head if tied else devices[0]
    return Placement(split, layer_devices, embed, head,
                     {d: attention["cuda" if d.type == "cuda" else "cpu"] for d in devices})


def expected_speed(model: nn.Module, placement: Placement, need: dict[torch.device, int]) -> float:
    """``engine.split.expected_decode_tok_s`` of the weights each device holds (``need``;
    an untied embedding less: a token reads one row of it), each device's read bandwidth
    measured now."""
    from engine.split import expected_decode_tok_s

    read = dict(need)
    if not model.spec.tie_word_embeddings:
        read[placement.embed] -= module_bytes(model.model.embed_tokens)
    return expected_decode_tok_s({str(d): n for d, n in read.items()}, {str(d): read_bandwidth(d) for d in read})


def read_bandwidth(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """Bytes per second ``device`` reads, measured: the best of a few sums over ``nbytes``
    (a fraction of a second; the CPU's with torch's threads, as its layers will run)."""
    import time

    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        x.sum()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    del x
    return nbytes / best


def device_room(names: tuple[str, ...], memory_fraction: float,
                gpu_memory: Callable[[str], tuple[int, int]] | None = None) -> tuple[int, ...]:
    """Bytes each device of a split may fill with weights and KV cache: a GPU's free
    memory within ``memory_fraction`` of it, less the headroom an explicit KV size must
    leave (activations, the runtime); the CPU's available RAM less that headroom, shared
    by the ``cpu`` entries. ``gpu_memory``: a GPU's (free, total) by name (default: torch's,
    which makes a CUDA context on it)."""
    out = []
    cpus = sum(n == "cpu" for n in names)
    for name in names:
        if name == "cpu":
            free = available_ram_bytes()
            total = free_memory_bytes(torch.device("cpu"))[1]
            out.append(max(0, free - kv_headroom(total)) // cpus)
        else:
            free, total = gpu_memory(name) if gpu_memory is not None else free_memory_bytes(torch.device(name))
            out.append(max(0, min(free, int(total * memory_fraction)) - kv_headroom(total)))
    return tuple(out)


def weight_bytes_per_device(model: nn.Module, placement: Placement) -> dict[torch.device, int]:
    """Bytes of weights each device will hold (``model`` on the meta device), with the
    float copies a GPU's kernels need beside quantized weights."""
    from engine.runner.bring_up import load_bytes

    need: dict[torch.device, int] = dict.fromkeys(placement.devices, 0)
    seen: set[int] = set()  # a tied head's matrix is the embedding's: counted once
    for name, module in model.named_modules():
        for t in (*module._parameters.values(), *module._buffers.values()):
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                need[placement.device_of(name)] += t.numel() * t.element_size()
    for i, layer in enumerate(model.model.layers):
        d = placement.layer_devices[i]
        if d.type == "cuda":
            need[d] += load_bytes(layer, "cuda") - module_bytes(layer)
    return need


def _memory_of(d: torch.device) -> str:
    """What "free memory" means on ``d`` in a message: "RAM" or "GPU cuda:1"."""
    return "RAM" if d.type == "cpu" else f"GPU {d}"


def check_split_fits(need: dict[torch.device, int], ratio: bool) -> None:
    """Refuse a placement whose weights (``need``: device -> bytes) don't fit a device's
    free memory, naming the device, before anything is allocated (``ratio``: the layers
    were placed by --split-ratio)."""
    for d, n in need.items():
        free, _ = free_memory_bytes(d)
        if n > free:
            where = _memory_of(d)
            what = ("give it a smaller share (--split-ratio), or leave the ratio out to size the split by free "
                    "memory" if ratio else "free memory there, add a device, or pick a smaller quantization")
            raise OutOfMemoryError(f"the layers placed on {d} need {gib(n)} but the {where} has {gib(free)} "
                                   f"free: {what}.", options=("split_ratio",) if ratio else ("devices",))


def materialize_placed_model(model: nn.Module, placement: Placement) -> None:
    """``LlamaForCausalLM.materialize`` for a split: every tensor on its module's device,
    RoPE's tables on the first layer's."""
    from engine.layers.modules import materialize_placed

    materialize_placed(model, placement.device_of)
    model.rotary.build(placement.layer_devices[0], model.dtype)


def install_hops(model: nn.Module, placement: Placement, plans: dict[torch.device, Any]) -> None:
    """Put a ``_Hop`` on every layer (after the kernel plan, so that each hop's RoPE is
    its device's kernel): the model's loop hands every layer the first device's
    positions, metadata and RoPE; each layer gets its own device's instead (moved once
    per step and device), and the hidden states follow at a range's first layer."""
    remove_hops(placement)
    rotaries = {placement.layer_devices[0]: model.rotary}
    movers: dict[torch.device, _Mover] = {}
    for layer, device in zip(model.model.layers, placement.layer_devices):
        if device not in rotaries:
            rope = RotaryEmbedding(model.rotary.head_dim, model.rotary.rope, model.rotary.max_positions)
            rope.build(device, model.dtype)
            rotaries[device] = rope.choose_kernels(plans[device])
        mover = movers.setdefault(device, _Mover(device, rotaries[device]))
        hop = _Hop(mover)
        hop.handle = layer.register_forward_pre_hook(hop)
        placement.hops.append(hop)
    if placement.head != placement.layer_devices[-1]:  # back from a partial offload's CPU layers
        hop = _NormHop(placement.head)
        hop.handle = model.model.norm.register_forward_pre_hook(hop)
        placement.hops.append(hop)


def remove_hops(placement: Placement) -> None:
    """Take the hooks off (and drop their per-device RoPE tables and cached metadata)."""
    for hop in placement.hops:
        if hop.handle is not None:
            hop.handle.remove()
    placement.hops.clear()


class _Mover:
    """One device's view of a step: the positions and metadata moved there (once per
    step: the first layer of the device's range moves them, the others reuse them), its
    RoPE tables, and the CUDA device made current for the kernels that launch on it."""

    def __init__(self, device: torch.device, rotary: nn.Module) -> None:
        self.device = device
        self.rotary = rotary
        self.cuda = device.type == "cuda"
        self._from: tuple | None = None
        self._to: tuple | None = None

    def __call__(self, positions: torch.Tensor, meta: AttentionMetadata) -> tuple:
        if self.cuda and torch.cuda.current_device() != self.device.index:
            torch.cuda.set_device(self.device)  # Triton launches on the current device
        if self._from is None or self._from[0] is not positions or self._from[1] is not meta:
            self._from = (positions, meta)
            self._to = (positions.to(self.device), metadata_on(meta, self.device))
        return self._to


class _Hop:
    """A forward pre-hook on a layer: its device's positions, metadata and RoPE, and the
    hidden states and residual moved there (a no-op after the first layer of a range)."""

    def __init__(self, mover: _Mover) -> None:
        self.mover = mover
        self.handle = None

    def __call__(self, module, args):
        positions, x, residual, cache, meta, _ = args
        d = self.mover.device
        pos, moved = self.mover(positions, meta)
        return (pos, x.to(d), None if residual is None else residual.to(d), cache, moved, self.mover.rotary)


class _NormHop:
    """A forward pre-hook on the final norm when it sits on another device than the last
    layer (the LM head's GPU after CPU layers): moves the hidden states and residual there."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.handle = None

    def __call__(self, module, args):
        if self.device.type == "cuda" and torch.cuda.current_device() != self.device.index:
            torch.cuda.set_device(self.device)
        return tuple(None if a is None else a.to(self.device) for a in args)


def metadata_on(meta: AttentionMetadata, device: torch.device) -> AttentionMetadata:
    """``meta`` with its tensors on ``device`` (itself when they are there already); a
    backend's per-step scratch is not carried over (each device's layers build their own)."""
    if meta.slot_mapping.device == device:
        return meta
    return replace(meta, slot_mapping=meta.slot_mapping.to(device), block_tables=meta.block_tables.to(device),
                   seq_lens=meta.seq_lens.to(device), query_start=meta.query_start.to(device),
                   backend_cache=None)


def split_kv_blocks(runner, config: EngineConfig, max_model_len: int, layer_block_bytes: int,
                    peaks: dict[torch.device, int], graphs: bool = False) -> int:
    """KV blocks for a split runner: the same number on every layer (the block tables are
    shared), so the fewest any device can hold for its layers (``kv_blocks`` on each
    device with the block bytes of its layers; ``peaks``: one step's activations per GPU).
    An explicit ``kv_cache_memory`` is the whole pool, over all layers."""
    from engine.runner.memory import kv_blocks

    placement: Placement = runner.placement
    cc = config.cache
    if cc.num_blocks is not None:
        return cc.num_blocks
    if cc.kv_cache_memory is not None:
        return check_split_kv(config, placement, max_model_len, layer_block_bytes)
    counts = []
    for d in placement.devices:
        n = placement.layers_on(d)
        if n:
            peak = peaks.get(d, 0)
            # Each GPU's segment graphs keep a pool of about one decode step's activations.
            reserve = _graph_reserve(runner) if graphs and d.type == "cuda" else None
            counts.append(kv_blocks(config, d, layer_block_bytes * n, max_model_len,
                                    peak_bytes=lambda tokens, p=peak: p, graph_bytes=reserve))
    return min(counts)


def check_split_kv(config: EngineConfig, placement: Placement, max_model_len: int, layer_block_bytes: int,
                   weights: dict[torch.device, int] | None = None) -> int:
    """The blocks of an explicit ``kv_cache_memory`` (the whole pool, over all layers),
    refused where a device's share of it, beside ``weights`` still to load there, does not
    fit its free memory with the headroom an explicit size must leave."""
    from engine.memory_plan import kv_pool_blocks

    cc, sc = config.cache, config.scheduler
    total_bytes = layer_block_bytes * len(placement.layer_devices)
    blocks = kv_pool_blocks(cc.kv_cache_memory, total_bytes, max_model_len, cc.block_size, sc.max_num_seqs)
    for d in placement.devices:
        share = blocks * layer_block_bytes * placement.layers_on(d)
        free, total = free_memory_bytes(d)
        pending = (weights or {}).get(d, 0)
        if share + pending > free - kv_headroom(total):
            where = _memory_of(d)
            beside = f" beside {gib(pending)} of weights" if pending else ""
            raise OutOfMemoryError(f"--kv-cache-memory: the layers on {d} would take {gib(share)} of it{beside}, "
                                   f"but the {where} has {gib(free)} free: ask for less.",
                                   options=("kv_cache_memory",))
    return blocks


def _graph_reserve(runner):
    from engine.runner.memory import graph_reserve_bytes

    return lambda max_batch, prompt_tokens: graph_reserve_bytes(runner, max_batch, 0)


@torch.inference_mode()
def split_activation_peaks(runner, num_tokens: int) -> dict[torch.device, int]:
    """Peak activation memory of one forward over ``num_tokens`` tokens on each GPU of a
    split runner (``engine.runner.memory.activation_peak_bytes``, per device)."""
    from engine.device import restart_cuda_peak

    gpus = [d for d in runner.placement.devices if d.type == "cuda"]
    if not gpus:
        return {}
    blocks = -(-num_tokens // runner.block_size)
    saved = runner.kv_caches
    runner.allocate_kv_cache(blocks)
    before = {}
    for d in gpus:
        torch.cuda.synchronize(d)
        restart_cuda_peak(d)
        before[d] = torch.cuda.memory_allocated(d)
    ids = torch.zeros(num_tokens, dtype=torch.long, device=runner.device)
    pos = torch.arange(num_tokens, device=runner.device) % runner.model.rotary.max_positions
    meta = runner._metadata([list(range(blocks))], [0], [num_tokens])
    hidden = runner.model(ids, pos, runner.kv_caches, meta)
    runner.model.compute_logits(hidden[-1:]).float()
    peaks = {}
    for d in gpus:
        torch.cuda.synchronize(d)
        peaks[d] = torch.cuda.max_memory_allocated(d) - before[d]
    runner.kv_caches = saved
    del hidden
    torch.cuda.empty_cache()
    return peaks
