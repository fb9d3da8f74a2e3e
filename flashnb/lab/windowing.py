"""Lesson 03, windowing (§3.1): how much does each token read at each window size?

`window_sweep` replays one recorded run's neuron sets through `flashnb.core.simulate` at every window
size (modeled: exactly the bytes and requests the engine would issue, without running the model);
`window_budget_grid` does it at several DRAM budgets, since the budget decides how many of the window's
neurons fit: the window pays until the rows the budget leaves it are full, then it flattens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from flashnb.core.engine import Policy
from flashnb.core.memory import min_budget, plan_memory
from flashnb.core.simulate import simulate
from flashnb.core.window import Window, reader_calls
from flashnb.core.store import FlashStore
from flashnb.errors import FlashnbError
from flashnb.lab.stats import TokenStats
from flashnb.text import MB


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
    ffn_share: float = 0.0            # read per token / the whole FFN's bytes (the paper's "% of the FFN")
    capacity_share: float = 0.0       # the window's rows / the FFN's neurons (the paper's 24% at k = 5)


def window_sweep(sets, store: FlashStore, policy: Policy, windows=range(0, 9), predictor_bytes: int = 0) -> list[WindowRow]:
    """Simulate each window size under `policy`'s budget (modeled)."""
    rows = []
    for w in windows:
        pol = replace(policy, window=int(w))
        sim = simulate(sets, store, pol, predictor_bytes)
        s = TokenStats.of(sim[1:], store.num_layers * store.ffn_dim)
        cap = plan_memory(store.memory_shape(), pol.memory_budget, pol.window, predictor_bytes).capacity_rows
        rows.append(WindowRow(int(w), s.bytes_read / MB, s.loaded, s.predicted, s.window_hit_share, cap,
                              tuple(t.bytes_read / MB for t in sim), s.bytes_read / store.memory_shape().ffn_bytes,
                              min(cap, store.ffn_dim) / store.ffn_dim))
    return rows


@dataclass(frozen=True)
class WindowGrid:
    """`window_sweep` at each DRAM budget (fractions of the model's bytes) that leaves the window a row."""

    budgets: tuple[float, ...]
    rows: tuple[tuple[WindowRow, ...], ...]   # rows[i][j]: budgets[i], the j-th window

    @property
    def windows(self) -> tuple[int, ...]:
        return tuple(r.window for r in self.rows[0])

    def at(self, budget: float) -> tuple[WindowRow, ...]:
        return self.rows[self.budgets.index(budget)]

    def row(self, budget: float, window: int) -> WindowRow:
        return next(r for r in self.at(budget) if r.window == window)

    def gain(self, budget: float) -> float:
        """How many times less the longest window reads than window 0 at `budget`."""
        rows = self.at(budget)
        return rows[0].mb_per_token / rows[-1].mb_per_token if rows[-1].mb_per_token else float("inf")


def window_budget_grid(sets, store: FlashStore, policy: Policy, windows=range(0, 9),
                       budgets=(0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 1.0), predictor_bytes: int = 0) -> WindowGrid:
    """`window_sweep` at every budget in `budgets` that holds the resident tensors, the predictors and a
    row per layer for the longest window (modeled)."""
    shape, longest = store.memory_shape(), max(windows)
    fits = [b for b in budgets if b >= min_budget(shape, longest, predictor_bytes)]
    if not fits:
        raise FlashnbError(f"none of the budgets {budgets} holds the resident tensors and predictors with a window "
                           f"of {longest}: the least is {min_budget(shape, longest, predictor_bytes):.3f}")
    rows = tuple(tuple(window_sweep(sets, store, replace(policy, memory_budget=b), windows, predictor_bytes))
                 for b in fits)
    return WindowGrid(tuple(fits), rows)


# The state of a neuron at a token in a `window_timeline` (0: not in DRAM).
HELD, HIT, READ, EVICTED = 1, 2, 3, 4
STATES = {0: "not in DRAM", HELD: "held, not needed", HIT: "needed, already held (hit)", READ: "needed, read from flash",
          EVICTED: "evicted"}


@dataclass(frozen=True)
class WindowTimeline:
    """One layer's neurons token by token under a window and a budget (the engine's own window decisions,
    `flashnb.core.window.Window`, replayed on recorded sets): `states[i, t]` is neuron `neurons[i]`'s state
    at token t (STATES), for the most often needed neurons."""

    layer: int
    window: int
    budget: float | int
    capacity_rows: int
    neurons: tuple[int, ...]
    states: np.ndarray            # int8 [neurons, tokens]

    def count(self, state: int) -> int:
        return int((self.states == state).sum())


def window_timeline(sets, store: FlashStore, policy: Policy, layer: int, predictor_bytes: int = 0,
                    neurons: int = 96) -> WindowTimeline:
    """Replay `layer`'s recorded neuron sets (sets[t][layer]) through the window `policy` gives it, and
    keep every state of its `neurons` most often needed neurons (modeled: the engine's plan, no reads)."""
    cap = plan_memory(store.memory_shape(), policy.memory_budget, policy.window, predictor_bytes).capacity_rows
    win = Window(store.ffn_dim, cap, policy.window)
    states = np.zeros((store.ffn_dim, len(sets)), dtype=np.int8)
    for t, token_sets in enumerate(sets):
        states[win.held(), t] = HELD
        for plan, _ in reader_calls(win, np.asarray(token_sets[layer], dtype=np.int64), cap):   # as the engine does
            states[plan.evicted, t] = np.where(states[plan.evicted, t] >= HIT, states[plan.evicted, t], EVICTED)
            states[plan.cached, t] = HIT
            states[plan.loaded, t] = READ
    needed = ((states == HIT) | (states == READ)).sum(axis=1)
    top = np.argsort(-needed, kind="stable")[:neurons]
    return WindowTimeline(layer, policy.window, policy.memory_budget, cap, tuple(int(i) for i in top), states[top])
