"""Which configurations of a side-by-side comparison load together: decided before anything
loads, from what each load would take (``engine.api.check_model``: weights and KV cache,
found without loading) against what its device has free now.

Greedy in plan order: a configuration joins the group before it when the group's needs
plus its own still fit; otherwise it starts the next group. Groups run one after another,
so the first configuration (the reference) is always in the first group.

The margin. ``need_bytes`` is weights plus KV cache; a running engine also holds its steps'
activations, its CUDA graphs' pool and the allocator's slack, which it doesn't count. Each
configuration of a group therefore also reserves the engine's own headroom for those
(``kv_headroom``: what a load with an explicit KV-cache size must leave free, 5% of the
device, at least 512 MiB), one per engine since each has its own. On a GPU the group stays
within the plan's ``memory_fraction`` of what is free, as a load stays within it of the
card. On the CPU each KV pool is sized from the RAM left when it loads: a configuration
joins only if the pool it gets beside the group is the one it would get alone (so its KV
memory compares with a sequential run's). A GPU pool that takes what the card has left
(more than one sequence at a time, no explicit size) never shares the card.

A configuration ``check_model`` refuses runs alone, where its load fails the usual way
and says why (the others go on).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from app.services.compare_plan import ComparePlan
from engine.api import EngineConfig, HearthError, ModelCheck, check_model, cpu_kv_budget, format_bytes, kv_headroom

log = logging.getLogger("hearth.app.compare")


@dataclass(frozen=True, slots=True)
class Arrangement:
    """``groups``: configuration indexes, every one once, in plan order, in the order they
    run (a group of one runs alone); ``notes``: why neighbours don't share a group."""

    groups: tuple[tuple[int, ...], ...]
    notes: tuple[str, ...] = ()


@dataclass(slots=True)
class _Group:
    indexes: list[int]
    device: str
    free: int
    budget: int
    used: int


def arrange(plan: ComparePlan, should_stop: Callable[[], bool] = lambda: False,
            check: Callable[[EngineConfig], ModelCheck] | None = None) -> Arrangement:
    """The groups of ``plan`` (checked) by the rules in the module docstring. ``check``
    sizes one load (default: ``engine.api.check_model``). Once ``should_stop()`` is true the rest
    are not checked (each alone: the run marks them cancelled)."""
    check = check or check_model
    groups: list[list[int]] = []
    notes: list[str] = []
    current: _Group | None = None
    labels = plan.labels

    def close() -> None:
        nonlocal current
        if current is not None:
            groups.append(current.indexes)
            current = None

    for index, config in enumerate(plan.configs):
        if should_stop():
            close()
            groups.append([index])
            continue
        try:
            engine_config = plan.engine_config(config)
            sized = check(engine_config)
        except HearthError as e:  # its load will fail the same way, alone, and say so
            close()
            groups.append([index])
            notes.append(f"{labels[index]} runs alone: {e}")
            continue
        except Exception as e:  # a bug in the check: run it alone rather than guess
            log.info("side-by-side check of %s failed", labels[index], exc_info=True)
            close()
            groups.append([index])
            notes.append(f"{labels[index]} runs alone: its memory could not be checked ({type(e).__name__}: {e})")
            continue
        if not _pool_is_bounded(engine_config, sized.device):
            close()
            groups.append([index])
            notes.append(f"{labels[index]} runs alone: its KV cache takes what the GPU has left (more than one "
                         "sequence at a time); give it a KV cache size to share the GPU")
            continue
        cost = sized.need_bytes + kv_headroom(sized.free_bytes)
        if current is not None and _joins(current, sized, cost, engine_config):
            current.indexes.append(index)
            current.used += cost
            continue
        if current is not None:
            beside = " and ".join(labels[i] for i in current.indexes)
            notes.append(f"{labels[index]} does not fit beside {beside}: it needs {format_bytes(cost)} with "
                         f"headroom and {format_bytes(max(0, current.budget - current.used))} are left of "
                         f"{format_bytes(current.free)} free on {current.device}, so it loads after them")
        close()
        current = _Group([index], sized.device, sized.free_bytes, _budget(sized, engine_config), cost)
    close()
    return Arrangement(tuple(tuple(g) for g in groups), tuple(notes))


def _budget(sized: ModelCheck, config: EngineConfig) -> int:
    """What a group may take on ``sized``'s device: the free memory; on a GPU within the
    share of it a load may use (``memory_fraction``)."""
    if sized.device.startswith("cuda"):
        return int(sized.free_bytes * config.cache.memory_fraction)
    return sized.free_bytes


def _joins(group: _Group, sized: ModelCheck, cost: int, config: EngineConfig) -> bool:
    if sized.device != group.device or group.used + cost > group.budget:
        return False
    if sized.device == "cpu" and config.cache.kv_cache_memory is None and config.cache.num_blocks is None:
        # The pool it gets beside the group, from the RAM the group leaves, must be the
        # one it would get alone (``kv_cache_bytes``): the load sizes it the same way.
        left = group.free - group.used - sized.weights_bytes
        return cpu_kv_budget(left, config.cache.cpu_memory_fraction) >= sized.kv_cache_bytes
    return True


def _pool_is_bounded(config: EngineConfig, device: str) -> bool:
    """Whether the load's KV pool has a known size (what ``check_model`` counted): on a GPU
    only an explicit size, or one sequence at a time (the pool then holds one context,
    not the rest of the card)."""
    if not device.startswith("cuda"):
        return True
    cache = config.cache
    return cache.kv_cache_memory is not None or cache.num_blocks is not None or config.scheduler.max_num_seqs == 1
