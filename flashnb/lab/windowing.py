"""Lesson 03, windowing (§3.1): how much does each token read at each window size?

`window_sweep` replays one recorded run's neuron sets through `flashnb.core.simulate` at every window
size (modeled: exactly the bytes and requests the engine would issue, without running the model).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from flashnb.core.engine import Policy
from flashnb.core.memory import plan_memory
from flashnb.core.simulate import simulate
from flashnb.core.store import FlashStore
from flashnb.lab.stats import TokenStats

MB = 1e6


@dataclass(frozen=True)
class WindowRow:
    """One window size, per generated token (the first token, which finds DRAM empty, left out)."""

    window: int
    mb_per_token: float               # read from flash
    neurons_loaded: float
    predicted: float
    hit_share: float                  # predicted neurons already in DRAM
    capacity_rows: int                # rows per layer the budget leaves the window
    per_token_mb: tuple[float, ...]   # every token's read, the first included


def window_sweep(sets, store: FlashStore, policy: Policy, windows=range(0, 9), predictor_bytes: int = 0) -> list[WindowRow]:
    """Simulate each window size under `policy`'s budget (modeled)."""
    rows = []
    for w in windows:
        pol = replace(policy, window=int(w))
        sim = simulate(sets, store, pol, predictor_bytes)
        s = TokenStats.of(sim[1:], store.num_layers * store.ffn_dim)
        cap = plan_memory(store.memory_shape(), pol.memory_budget, pol.window, predictor_bytes).capacity_rows
        rows.append(WindowRow(int(w), s.bytes_read / MB, s.loaded, s.predicted, s.window_hit_share, cap,
                              tuple(t.bytes_read / MB for t in sim)))
    return rows
