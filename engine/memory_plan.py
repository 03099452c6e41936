"""The rules a load sizes memory by: the weights dtype ``auto`` picks, and the KV-cache pool.

Torch-free, so the app's fit estimate (through ``engine.api``) applies the very rules
``Engine.load`` does instead of a copy that drifts from them (a copy said bf16 and a
0.1 GiB KV cache where the load took float32 and 1 GiB).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.choices import defined as _defined

#: Never take more than this for the KV pool on CPU unless kv_cache_memory asks for it.
CPU_KV_CAP = 2**30
#: Bytes per element of each weights dtype a load can use (the choices registry's).
DTYPE_BYTES = {c.name: int(c.bytes_per_param) for c in _defined("dtype") if c.bytes_per_param}


def auto_dtype(device_type: str, bf16_supported: bool = True) -> str:
    """The weights dtype ``dtype="auto"`` loads on a ``"cuda"`` or ``"cpu"`` device:
    bfloat16 on a GPU (float16 where it has no bf16), float32 on the CPU."""
    if device_type == "cuda":
        return "bfloat16" if bf16_supported else "float16"
    return "float32"  # bf16 matmuls are slow on most CPUs


def cpu_kv_budget(available_ram_bytes: int, fraction: float) -> int:
    """Bytes the KV pool takes on the CPU by default: ``fraction`` of the available RAM,
    at most ``CPU_KV_CAP``."""
    return min(int(available_ram_bytes * fraction), CPU_KV_CAP)


def context_blocks(max_model_len: int, block_size: int) -> int:
    """KV blocks one sequence of the full context needs (the least a load accepts)."""
    return -(-max_model_len // block_size)


def kv_pool_blocks(budget_bytes: int, block_bytes: int, max_model_len: int, block_size: int,
                   max_num_seqs: int) -> int:
    """KV blocks a load allocates from ``budget_bytes``: no more than every allowed
    sequence at full length could use, and at least one."""
    useful = context_blocks(max_model_len, block_size) * max_num_seqs
    return max(1, min(budget_bytes // block_bytes, useful))


#: What an explicit KV cache size must leave free besides the weights: activations, the
#: runtime, other programs (a fraction of the device's memory, at least this much).
KV_HEADROOM_FRACTION = 0.05
KV_HEADROOM_MIN = 512 * 2**20
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: int | float) -> str:
    """Bytes in the largest binary unit that keeps the number at 1 or more: ``1000`` ->
    ``"1000 B"``, ``1536`` -> ``"1.5 KiB"``, ``22.5 * 2**30`` -> ``"22.5 GiB"``."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def kv_headroom(total_bytes: int) -> int:
    """Bytes an explicit KV cache size must leave free on a device of ``total_bytes``."""
    return max(KV_HEADROOM_MIN, int(total_bytes * KV_HEADROOM_FRACTION))


def explicit_kv_problem(*, requested: int, pool_bytes: int, free_bytes: int, total_bytes: int,
                        weights_bytes: int, where: str) -> str | None:
    """Why a KV pool of ``pool_bytes`` (sized from an explicit ``kv_cache_memory`` of
    ``requested`` bytes) can't be allocated on a device (``where``: "RAM", "GPU cuda:0")
    with ``free_bytes`` free, of which ``weights_bytes`` are still to be taken by the
    weights; ``None`` when it fits with ``kv_headroom`` to spare.

    The pool, not the request, is checked: a budget above what every allowed sequence at
    full length can use is never allocated (``kv_pool_blocks``), so it is harmless.
    """
    spare = kv_headroom(total_bytes)
    room = free_bytes - weights_bytes - spare
    if pool_bytes <= room:
        return None
    head = f"the KV cache does not fit in memory: {format_bytes(requested)} asked for (--kv-cache-memory)"
    if pool_bytes < requested:
        head += f" makes a pool of {format_bytes(pool_bytes)} (all that the sequences at full length can use)"
    have = f"the {where} has {format_bytes(free_bytes)} free"
    if weights_bytes:
        have += f", of which the weights take {format_bytes(weights_bytes)},"
    have += f" and {format_bytes(spare)} is kept spare"
    if room < 2**20:
        todo = ("There is no memory left for it: free memory (close other programs), or load a smaller model, "
                "a smaller dtype or a shorter context")
    else:
        todo = (f"Ask for {_size_arg(room)} or less (--kv-cache-memory {_size_arg(room)}), or leave it out "
                "to size the KV cache automatically")
    return f"{head}, but {have}. {todo}."


def _size_arg(n: int) -> str:
    """``n`` bytes rounded down to a size ``parse_bytes`` reads (``"13.7GiB"``, ``"900MiB"``)."""
    if n >= 2**30:
        return f"{int(n / 2**30 * 10) / 10:g}GiB"
    return f"{n // 2**20}MiB"


@dataclass(frozen=True, slots=True)
class DeviceShare:
    """One device's part of a load over several devices (``ModelCheck.devices``): what it
    holds in words ("layers 0-15, embedding", "rank 1 of 2"), its weights, one full
    context of its KV cache (the least the load accepts), and its free memory now (RAM
    for a CPU; CPU entries share it)."""

    device: str
    holds: str
    weights_bytes: int
    kv_cache_bytes: int
    free_bytes: int

    @property
    def need_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes


@dataclass(frozen=True, slots=True)
class ModelCheck:
    """What a load would take, found without loading it (``engine.api.check_model``,
    which sizes it by the rules above).

    ``kv_cache_bytes`` is the KV pool the load would size; on a GPU, where the pool takes
    what the card has left, it is one full context (the least a load accepts).
    ``free_bytes`` is the device's free memory now, with the loaded model still there.
    ``fits_beside``: loading it now, beside the loaded model, costs the new one nothing
    (the same weights and KV pool as alone, with room to spare); always true when the
    loaded model is on another device, never when it is on the same GPU (the KV pool and
    CUDA graphs take the rest of a card, so two models don't share one).
    """

    name: str
    device: str
    weights_bytes: int
    kv_cache_bytes: int
    free_bytes: int
    fits_beside: bool
    # A load over several devices (--devices): each one's share (the sums above cover them all).
    devices: tuple[DeviceShare, ...] = ()

    @property
    def need_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes
