"""The rules a load sizes memory by: the weights dtype ``auto`` picks, and the KV-cache pool.

Torch-free, so the app's fit estimate (through ``engine.api``) applies the very rules
``Engine.load`` does instead of a copy that drifts from them (a copy said bf16 and a
0.1 GiB KV cache where the load took float32 and 1 GiB).
"""

from __future__ import annotations

#: Never take more than this for the KV pool on CPU unless kv_cache_memory asks for it.
CPU_KV_CAP = 2**30
#: Bytes per element of each weights dtype a load can use.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


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
