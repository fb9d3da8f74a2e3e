"""Lesson 05, memory management (§3.3): preallocated rows with swap-with-last deletion, timed against
reallocating every token, replaying one layer's recorded neuron sets."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from flashnb.core.memory import NeuronRows
from flashnb.core.window import Window


@dataclass(frozen=True)
class MemoryTiming:
    """Seconds per token for one layer (best of the repeats, measured)."""

    window: int
    preallocated_s: float   # the paper's: one matrix, delete = copy the last rows over, append at the end
    naive_s: float          # a fresh matrix every token (torch.cat of the kept rows and the new ones)

    @property
    def ratio(self) -> float:
        return self.naive_s / self.preallocated_s


def time_memory_management(sets: list[np.ndarray], ffn_dim: int, width: int, window: int, capacity: int,
                           dtype=torch.float16, repeats: int = 3) -> MemoryTiming:
    """Both schemes follow the same window decisions and add the same rows (random values standing in
    for what the reader returns); only how DRAM is managed differs."""
    pool = torch.randn(ffn_dim, width, generator=torch.Generator().manual_seed(0)).to(dtype)
    np_pool = pool.numpy()
    pre = naive = float("inf")
    for _ in range(repeats):
        win, rows = Window(ffn_dim, capacity, window), NeuronRows(ffn_dim, capacity, width, np_pool.dtype)
        t0 = time.perf_counter()
        for ids in sets:
            plan = win.plan(ids)
            rows.make_room(plan.evicted, plan.loaded.size)[:] = np_pool[: plan.loaded.size]
            rows.commit(plan.loaded)
            win.advance(plan)
        pre = min(pre, (time.perf_counter() - t0) / len(sets))

        win = Window(ffn_dim, capacity, window)  # the same decisions
        mat, held = torch.empty(0, width, dtype=dtype), np.zeros(0, np.int64)
        t0 = time.perf_counter()
        for ids in sets:
            plan = win.plan(ids)
            keep = ~np.isin(held, plan.evicted)
            mat = torch.cat([mat[torch.from_numpy(keep)], pool[: plan.loaded.size]])  # a new matrix every token
            held = np.concatenate([held[keep], plan.loaded])
            win.advance(plan)
        naive = min(naive, (time.perf_counter() - t0) / len(sets))
    return MemoryTiming(window, pre, naive)
