"""Windowing (paper §3.1): keep the neurons of the last k tokens in DRAM, load only the new ones.

One `Window` per layer decides, token by token, which of the neurons a token needs are already in
DRAM (`cached`), which must be read from flash (`loaded`), and which cached neurons leave DRAM
(`evicted`): those no token of the last k needed, unless this one needs them again. When the kept
neurons and the new ones do not fit the rows the memory budget allows, the least recently used kept
neurons go too (ties: the lower neuron id first). With k = 0 nothing carries over between tokens.

The window only decides; `flashnb.core.memory.NeuronRows` holds the rows (§3.3). `flashnb.core.simulate`
runs windows alone, without rows, to count what the engine would read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flashnb.errors import FlashnbError

_NEVER = np.iinfo(np.int64).min // 2


def check_lookahead_window(window: int) -> None:
    """Lookahead reads land in a layer's own rows; window 0 shares one set of rows between the layers."""
    if window == 0:
        raise FlashnbError("lookahead reads land in a layer's own rows, which window 0 shares between layers: "
                           "use a window of at least 1 token with lookahead predictors")


def sorted_unique(ids) -> np.ndarray:
    """`ids` as a sorted int64 array without duplicates (no copy when it already is one)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size > 1 and not bool(np.all(ids[1:] > ids[:-1])):
        ids = np.unique(ids)
    return ids


def split_predicted(predicted: np.ndarray, capacity: int, file_rows: np.ndarray | None = None) -> list[np.ndarray]:
    """A token's neuron ids in parts of at most `capacity`: one part when they fit the rows.

    A token that needs more neurons than a layer's rows hold is served part by part (each part
    planned, read and computed in turn, the outputs summed); its window then covers fewer tokens.
    The parts follow the neurons' order on flash (`file_rows`: each neuron's row, when a placement
    moves them), so that each part's reads stay as contiguous as the whole set's.
    """
    predicted = sorted_unique(predicted)
    if predicted.size <= capacity:
        return [predicted]
    predicted = in_file_order(predicted, file_rows)
    return [np.sort(p) for p in np.array_split(predicted, -(-predicted.size // capacity))]


def layer_windows(num_layers: int, num_neurons: int, capacity: int, k: int) -> list["Window"]:
    """One window per layer, as the engine keeps them; with k = 0 nothing survives a layer, so every layer
    shares one (the engine's layers then share one set of rows)."""
    if k == 0:
        return [Window(num_neurons, capacity, 0)] * num_layers
    return [Window(num_neurons, capacity, k) for _ in range(num_layers)]


def reader_calls(window: "Window", predicted: np.ndarray, capacity: int,
                 file_rows: np.ndarray | None = None) -> list[tuple["WindowPlan", np.ndarray]]:
    """The reader calls the engine makes for one layer's `predicted` neurons of a token, without making them:
    per part (`split_predicted`), the window's plan and its loads in the order they lie on flash; the window
    advances past each part, as the engine's does (`flashnb.core.simulate` and the bench's replays use it)."""
    calls = []
    for part in split_predicted(predicted, capacity, file_rows):
        plan = window.plan(part)
        window.advance(plan)
        calls.append((plan, in_file_order(plan.loaded, file_rows)))
    return calls


def in_file_order(ids: np.ndarray, file_rows: np.ndarray | None) -> np.ndarray:
    """`ids` in the order their rows lie on flash (`file_rows`: each neuron's row, when a placement moves
    them; unchanged without one). Rows read in this order land side by side in DRAM, so that every run
    of file-adjacent rows is one piece of one request, as without a placement."""
    return ids if file_rows is None or ids.size < 2 else ids[np.argsort(file_rows[ids], kind="stable")]


@dataclass
class WindowPlan:
    """What one token changes in one layer's DRAM (neuron ids, sorted int64 arrays)."""

    predicted: np.ndarray  # neurons this token needs
    cached: np.ndarray     # ... of which already in DRAM (window hits)
    loaded: np.ndarray     # ... of which must be read from flash
    evicted: np.ndarray    # neurons in DRAM that leave: out of the window, or pushed out by capacity


class Window:
    """One layer's window of k tokens over `num_neurons` neurons, at most `capacity` of them in DRAM."""

    def __init__(self, num_neurons: int, capacity: int, k: int):
        if capacity < 1:
            raise FlashnbError(f"a layer's DRAM must hold at least 1 neuron row, got {capacity}")
        if k < 0:
            raise FlashnbError(f"window must be >= 0 tokens (0 = no window), got {k}")
        self.num_neurons, self.capacity, self.k = num_neurons, capacity, k
        self.in_dram = np.zeros(num_neurons, dtype=bool)
        self.last_used = np.full(num_neurons, _NEVER, dtype=np.int64)
        self.token = -1

    def held(self) -> np.ndarray:
        """The neurons in DRAM now (ascending ids)."""
        return np.flatnonzero(self.in_dram)

    def clear(self) -> None:
        """Forget every neuron: the next token starts with nothing in DRAM."""
        self.in_dram[:] = False
        self.last_used[:] = _NEVER

    def plan(self, predicted) -> WindowPlan:
        """The next token's hits, loads and evictions for its `predicted` neurons (changes nothing)."""
        predicted = sorted_unique(predicted)
        if predicted.size and (predicted[0] < 0 or predicted[-1] >= self.num_neurons):
            raise FlashnbError(f"neuron ids must be in 0..{self.num_neurons - 1}, got "
                               f"{predicted[0]}..{predicted[-1]}")
        if predicted.size > self.capacity:
            raise FlashnbError(f"a token needs {predicted.size} neurons but the layer's DRAM holds "
                               f"{self.capacity} rows; raise the memory budget")
        hit = self.in_dram[predicted] if self.k else np.zeros(predicted.size, dtype=bool)
        cached, loaded = predicted[hit], predicted[~hit]
        held = self.held()
        t = self.token + 1
        keep = self.last_used[held] >= t - self.k       # still inside the window ...
        needed_again = np.zeros(self.num_neurons, dtype=bool)
        needed_again[cached] = True
        now = needed_again[held]
        keep |= now                                      # ... or needed again by this token
        overflow = int(keep.sum()) + loaded.size - self.capacity
        if overflow > 0:                                 # least recently used first, then lower ids
            candidates = np.flatnonzero(keep & ~now)
            order = candidates[np.argsort(self.last_used[held[candidates]], kind="stable")]
            keep[order[:overflow]] = False
        return WindowPlan(predicted, cached, loaded, held[~keep])

    def plan_prefetch(self, guessed) -> WindowPlan:
        """Lookahead: load the `guessed` neurons of the next token (a guess made one layer early) that
        are not in DRAM, evicting only what capacity requires (least recently used, not guessed); no
        window expiry, no token advance: the exact `plan` of the token does that. An empty plan when
        the guess alone exceeds the capacity."""
        guessed = sorted_unique(guessed)
        if guessed.size and (guessed[0] < 0 or guessed[-1] >= self.num_neurons):
            raise FlashnbError(f"neuron ids must be in 0..{self.num_neurons - 1}")
        none = guessed[:0]
        if guessed.size > self.capacity:
            return WindowPlan(none, none, none, none)
        hit = self.in_dram[guessed]
        held = self.held()
        overflow = held.size + int((~hit).sum()) - self.capacity
        evicted = none
        if overflow > 0:
            spare = held[~np.isin(held, guessed, assume_unique=True)]
            evicted = np.sort(spare[np.argsort(self.last_used[spare], kind="stable")[:overflow]])
        return WindowPlan(guessed, guessed[hit], guessed[~hit], evicted)

    def admit(self, plan: WindowPlan) -> None:
        """A prefetch plan's reads arrived: its loads are in DRAM, kept for the coming token only if
        that token needs them."""
        self.in_dram[plan.evicted] = False
        self.in_dram[plan.loaded] = True
        self.last_used[plan.loaded] = self.token - self.k

    def advance(self, plan: WindowPlan) -> None:
        """The token of `plan` is done: its evictions left DRAM, its loads arrived."""
        self.in_dram[plan.evicted] = False
        self.in_dram[plan.loaded] = True
        self.token += 1
        self.last_used[plan.predicted] = self.token
