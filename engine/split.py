"""Multi-device loads (issue 18), the part that needs no tensors: the ``--devices``,
``--split`` and ``--split-ratio`` options read and checked, and a layer split's plan —
which contiguous layers each device holds, sized by what each device can hold (its
weights plus its share of the KV cache) or by a ratio given.

Nothing here loads or moves a tensor; the runner's bring-up is what will place the layer
ranges. Kept apart so that the CLI, the load dialog's device picker and the fit estimate
can all show the same plan before anything loads (LM Studio's "GPU offload" slider and
llama.cpp's ``--tensor-split`` answer the same question).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from engine.errors import InvalidRequestError

SPLIT_MODES = ("layer", "tensor")
_DEVICE = re.compile(r"^(cpu|cuda(?::(\d+))?)$")


def parse_devices(text: str) -> tuple[str, ...]:
    """``cuda:0,cuda:1,cpu`` as canonical names (``cuda`` is ``cuda:0``). A GPU may be
    named once; ``cpu`` may repeat (two CPU "devices" try both modes without a GPU)."""
    names = [part.strip().lower() for part in text.split(",")]
    if not text.strip() or any(not n for n in names):
        raise InvalidRequestError(f"--devices {text!r}: give device names separated by commas, e.g. "
                                  "cuda:0,cuda:1 or cuda:0,cpu.", options=("devices",))
    out = []
    for name in names:
        m = _DEVICE.match(name)
        if m is None:
            raise InvalidRequestError(f"--devices: unknown device {name!r}; use cpu, cuda or cuda:N "
                                      "(`hearth doctor` lists the GPUs here).", options=("devices",))
        out.append("cpu" if name == "cpu" else f"cuda:{m.group(2) or 0}")
    gpus = [d for d in out if d != "cpu"]
    twice = sorted({d for d in gpus if gpus.count(d) > 1})
    if twice:
        raise InvalidRequestError(f"--devices names {twice[0]} twice: each GPU can hold one part of the model.",
                                  options=("devices",))
    return tuple(out)


def check_available(devices: tuple[str, ...], gpu_count: int) -> None:
    """Every GPU named exists here (``gpu_count``: how many CUDA devices torch sees)."""
    for d in devices:
        if d != "cpu" and int(d.split(":")[1]) >= gpu_count:
            have = f"{gpu_count} CUDA device(s) (cuda:0..cuda:{gpu_count - 1})" if gpu_count else "no CUDA GPU"
            raise InvalidRequestError(f"--devices names {d}, but torch sees {have} here.", options=("devices",))


def parse_split_ratio(text: str, devices: int) -> tuple[float, ...]:
    """``0.6,0.4``: one positive share per device, normalised to sum to 1."""
    try:
        shares = [float(part) for part in text.split(",")]
    except ValueError:
        raise InvalidRequestError(f"--split-ratio {text!r}: give one number per device, separated by commas, "
                                  "e.g. 0.6,0.4.", options=("split_ratio",)) from None
    if len(shares) != devices:
        raise InvalidRequestError(f"--split-ratio has {len(shares)} shares for {devices} devices: give one per "
                                  "device of --devices, in the same order.", options=("split_ratio",))
    if any(not math.isfinite(s) or s <= 0 for s in shares):
        raise InvalidRequestError(f"--split-ratio {text!r}: every share must be a positive number (leave a device "
                                  "out of --devices rather than give it 0).", options=("split_ratio",))
    total = sum(shares)
    return tuple(s / total for s in shares)


def check_mode(mode: str, devices: tuple[str, ...]) -> str:
    """``layer`` or ``tensor``, and whether it fits the devices."""
    if mode not in SPLIT_MODES:
        raise InvalidRequestError(f"--split must be layer or tensor, got {mode!r}.", options=("split",))
    if mode == "tensor":
        kinds = {"cpu" if d == "cpu" else "cuda" for d in devices}
        if len(kinds) > 1:
            raise InvalidRequestError("tensor parallel runs one rank per device of one kind (GPUs over NCCL, or "
                                      "CPUs over gloo): to put layers on the CPU beside GPUs use --split layer.",
                                      options=("split",))
    return mode


@dataclass(frozen=True, slots=True)
class LayerSplit:
    """Device ``devices[i]`` holds layers ``ranges[i]`` (contiguous, in order, every layer
    once); the first also holds the embedding, ``head_device_index``'s the final norm and
    the LM head."""

    devices: tuple[str, ...]
    ranges: tuple[range, ...]
    bytes_per_device: tuple[int, ...]  # the weights each holds

    def device_of(self, layer: int) -> str:
        for device, r in zip(self.devices, self.ranges):
            if layer in r:
                return device
        raise IndexError(f"layer {layer} is in no range of this split")

    def describe(self) -> str:
        return ", ".join(f"{d}: layers {r.start}-{r.stop - 1}" for d, r in zip(self.devices, self.ranges))


def head_device_index(devices: tuple[str, ...]) -> int:
    """Which device holds the final norm and the LM head: the last GPU (a partial offload's
    CPU layers hand their hidden states back to it: the head is the largest matrix of a
    decode step, up to a fifth of its bytes), else the last device."""
    gpus = [i for i, d in enumerate(devices) if d != "cpu"]
    return gpus[-1] if gpus else len(devices) - 1


def expected_decode_tok_s(weight_bytes: dict[str, int], bandwidth: dict[str, float]) -> float:
    """Batch-1 decode speed a split can reach at best: each token reads every device's
    weights (``weight_bytes``: device -> bytes) once, at that device's memory bandwidth
    (``bandwidth``: device -> bytes/s). What a user sees before the load (llama.cpp's and
    LM Studio's offload sliders leave them to guess); the real speed lands below it by the
    kernels' efficiency, the KV reads and the hops."""
    seconds = sum(b / bandwidth[d] for d, b in weight_bytes.items())
    return 1.0 / seconds if seconds > 0 else float("inf")


def plan_layer_split(devices: tuple[str, ...], num_layers: int, layer_bytes: int, first_bytes: int,
                     last_bytes: int, room: tuple[int, ...] | None = None,
                     ratio: tuple[float, ...] | None = None) -> LayerSplit:
    """Contiguous layer ranges for ``devices``, in their order. ``layer_bytes``: what one
    layer costs its device (weights and its KV share); ``first_bytes`` / ``last_bytes``: the
    embedding (first device) and the norm and LM head (``head_device_index``). With ``ratio``, layers
    go by it. Else by ``room`` (the bytes each device may use): the GPUs take layers in
    proportion to their room, each as many as it holds at most, and the CPUs only what the
    GPUs can't hold (partial offload; at least one layer each, since they were named).
    InvalidRequestError when the devices can't hold the model, saying by how much."""
    n = len(devices)
    if n < 1 or num_layers < 1:
        raise InvalidRequestError("a layer split needs at least one device and one layer.")
    if num_layers < n:
        raise InvalidRequestError(f"the model has {num_layers} layers, fewer than the {n} devices of --devices: "
                                  "name fewer devices.", options=("devices",))
    head = head_device_index(devices)
    extras = [(first_bytes if i == 0 else 0) + (last_bytes if i == head else 0) for i in range(n)]
    if ratio is not None:
        if len(ratio) != n:
            raise InvalidRequestError(f"--split-ratio has {len(ratio)} shares for {n} devices.",
                                      options=("split_ratio",))
        counts = _spread(num_layers, list(ratio), [num_layers] * n)
    else:
        if room is None or len(room) != n:
            raise ValueError("plan_layer_split needs the room of every device, or a ratio")
        caps = [max(0, (r - e) // layer_bytes) if layer_bytes > 0 else num_layers for r, e in zip(room, extras)]
        if sum(caps) < num_layers or min(caps) < 1:
            need = num_layers * layer_bytes + first_bytes + last_bytes
            tight = [d for d, c in zip(devices, caps) if c < 1]
            why = (f"it needs about {_gib(need)} with its KV cache, {_gib(need - sum(room))} more than they have"
                   if need > sum(room) else f"{', '.join(tight)} can't hold even one layer")
            raise InvalidRequestError(
                f"the model does not fit {', '.join(devices)}: {why}. Add a device (the CPU last: `cpu`), pick a "
                "smaller quantization, or shorten the context (its KV cache shares the room).",
                options=("devices",))
        gpus = [i for i, d in enumerate(devices) if d != "cpu"]
        cpus = [i for i, d in enumerate(devices) if d == "cpu"]
        counts = [0] * n
        on_gpus = min(sum(caps[i] for i in gpus), num_layers - len(cpus)) if gpus else 0
        for group, total in ((gpus, on_gpus), (cpus, num_layers - on_gpus)):
            if group:
                for i, c in zip(group, _spread(total, [float(room[i]) for i in group], [caps[i] for i in group])):
                    counts[i] = c
    ranges, start = [], 0
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    sizes = tuple(c * layer_bytes + e for c, e in zip(counts, extras))
    return LayerSplit(tuple(devices), tuple(ranges), sizes)


def _spread(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """``total`` items over slots in proportion to ``weights``, each at least one and at
    most its cap (the caller made sure they hold ``total``)."""
    counts = [1] * len(weights)
    left = total - len(weights)
    while left > 0:
        open_ = [i for i, c in enumerate(counts) if c < caps[i]]
        if not open_:
            raise ValueError("the caps hold fewer items than the total")
        w = {i: weights[i] for i in open_} if any(weights[i] for i in open_) else dict.fromkeys(open_, 1.0)
        shares = {i: left * w[i] / sum(w.values()) for i in open_}
        given = 0
        for i in open_:
            add = min(int(shares[i]), caps[i] - counts[i])
            counts[i] += add
            given += add
        if given == 0:  # the rest are fractions: one each to the largest shares
            for i in sorted(open_, key=lambda i: -shares[i])[:left]:
                counts[i] += 1
                given += 1
        left -= given
    return counts


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
