"""DRAM memory management for FFN neurons (paper §3.3) and windowing (paper §3.1).

One `NeuronCache` per layer holds the bundles of the neurons currently in DRAM:

* `rows`  — a matrix of `capacity` x `bundle_width` values, allocated once and never resized;
* `ids`   — the pointer array: row r holds neuron `ids[r]`; rows 0..n-1 are in use;
* `slot`  — the inverse map neuron -> row (or -1), so membership tests are O(1).

Deleting neurons copies the last rows over the deleted ones (so the used rows stay 0..n-1 and no
hole is ever left), new neurons are appended at n, and the FFN is computed straight from `rows[:n]`:
row order does not change the result.

Windowing: the cache keeps every neuron that the last `window` tokens needed. For a new token it
evicts the neurons that left the window (unless the new token needs them again) and loads only the
needed neurons that are not cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flashnb.errors import FlashnbError


def sorted_unique(ids) -> np.ndarray:
    """`ids` as a sorted int64 array without duplicates (no copy when it already is one)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size > 1 and not bool(np.all(ids[1:] > ids[:-1])):
        ids = np.unique(ids)
    return ids


def split_needed(needed: np.ndarray, capacity: int) -> list[np.ndarray]:
    """A token's neuron ids in parts of at most `capacity`: one part when they fit the cache.

    A token that needs more neurons than a cache holds is served part by part (each part planned,
    read and computed in turn, the outputs summed); its window then covers fewer tokens.
    """
    needed = sorted_unique(needed)
    if needed.size <= capacity:
        return [needed]
    return np.array_split(needed, -(-needed.size // capacity))


@dataclass
class StepPlan:
    """What one token changes in one layer's cache (neuron ids, int64 arrays)."""

    needed: np.ndarray    # neurons this token needs (sorted, unique)
    hits: np.ndarray      # ... of which already cached
    load: np.ndarray      # ... of which must be read from flash
    evict: np.ndarray     # cached neurons that leave (out of the window, or pushed out by capacity)


class NeuronCache:
    """One layer's neuron cache: preallocated rows, pointer array, swap-with-last deletion."""

    def __init__(self, num_neurons: int, capacity: int, bundle_width: int, window: int,
                 dtype: torch.dtype = torch.float32):
        if capacity < 1:
            raise FlashnbError(f"neuron cache capacity must be >= 1 row, got {capacity}")
        if window < 0:
            raise FlashnbError(f"window must be >= 0 tokens (0 = no window), got {window}")
        self.num_neurons, self.capacity, self.window = num_neurons, capacity, window
        # page-aligned storage, so direct I/O can land new rows in place (see `reserve`)
        from flashnb.reader import aligned_empty

        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        self.array = aligned_empty((capacity, bundle_width), np_dtype)
        self.rows = torch.from_numpy(self.array)
        self.ids = np.full(capacity, -1, dtype=np.int64)
        self.slot = np.full(num_neurons, -1, dtype=np.int64)
        self.last_used = np.full(num_neurons, np.iinfo(np.int64).min // 2, dtype=np.int64)
        self.n = 0
        self.token = -1

    @property
    def nbytes(self) -> int:
        """Bytes of DRAM this cache holds (allocated rows + pointer arrays)."""
        return (self.rows.element_size() * self.rows.numel() + self.ids.nbytes + self.slot.nbytes
                + self.last_used.nbytes)

    def cached(self) -> np.ndarray:
        return self.ids[: self.n]

    def plan(self, needed: np.ndarray) -> StepPlan:
        """Decide, for the next token, which neurons to evict and which to load (changes nothing).

        Window k: the cache keeps the neurons needed by the previous k tokens, so this token reads
        only the needed neurons that are not cached (k = 0: nothing is kept between tokens). Cached
        neurons that left the window are evicted unless this token needs them again. If the kept
        neurons and the new ones exceed the capacity, the least recently used of the kept neurons
        that this token does not need are evicted too.
        """
        needed = sorted_unique(needed)
        if needed.size and (needed[0] < 0 or needed[-1] >= self.num_neurons):
            raise FlashnbError(f"neuron ids must be in 0..{self.num_neurons - 1}, got "
                               f"{needed[0]}..{needed[-1]}")
        if needed.size > self.capacity:
            raise FlashnbError(f"a token needs {needed.size} neurons but the cache holds {self.capacity} "
                               "rows; raise the memory budget (or the cache capacity)")
        t = self.token + 1
        cached = self.cached()
        slots = self.slot[needed]
        hit = slots >= 0 if self.window else np.zeros(needed.size, dtype=bool)  # k = 0: nothing carries over
        hits, load = needed[hit], needed[~hit]
        keep = self.last_used[cached] >= t - self.window    # still inside the window
        now = np.zeros(self.n, dtype=bool)
        now[slots[hit]] = True                                 # needed again: stays
        keep |= now
        overflow = int(keep.sum()) + load.size - self.capacity
        if overflow > 0:
            candidates = np.flatnonzero(keep & ~now)
            order = candidates[np.argsort(self.last_used[cached[candidates]], kind="stable")]
            keep[order[:overflow]] = False
        return StepPlan(needed, hits, load, cached[~keep])

    def apply(self, plan: StepPlan, loaded_rows: torch.Tensor) -> None:
        """Evict `plan.evict`, then append `loaded_rows` (one row per id of `plan.load`, same order)."""
        self.delete(plan.evict)
        self.append(plan.load, loaded_rows)
        self._advance(plan)

    def reserve(self, plan: StepPlan) -> np.ndarray:
        """Evict `plan.evict` and return the free rows [n, n + len(plan.load)) for the reader to fill
        in place; `commit(plan)` then appends them. (The engine's zero-copy path.)"""
        self.delete(plan.evict)
        k = plan.load.size
        if self.n + k > self.capacity:
            raise FlashnbError(f"cache overflow: {self.n} + {k} rows > capacity {self.capacity}")
        return self.array[self.n:self.n + k]

    def commit(self, plan: StepPlan) -> None:
        """Register the rows written into `reserve(plan)` as neurons `plan.load`."""
        k = plan.load.size
        self.ids[self.n:self.n + k] = plan.load
        self.slot[plan.load] = np.arange(self.n, self.n + k)
        self.n += k
        self._advance(plan)

    def _advance(self, plan: StepPlan) -> None:
        self.token += 1
        self.last_used[plan.needed] = self.token

    def delete(self, neurons: np.ndarray) -> None:
        """Remove neurons: the last used rows are copied into the freed places, in one indexed copy,
        so rows 0..n-1 stay dense and nothing is reallocated."""
        neurons = np.asarray(neurons, dtype=np.int64)
        if neurons.size == 0:
            return
        where = self.slot[neurons]
        if (where < 0).any():
            raise FlashnbError(f"neurons {neurons[where < 0][:5].tolist()} are not cached")
        new_n = self.n - neurons.size
        dead = np.zeros(self.n, dtype=bool)
        dead[where] = True
        holes = np.flatnonzero(dead[:new_n])                 # freed rows inside the kept prefix
        if holes.size:
            movers = new_n + np.flatnonzero(~dead[new_n:])   # tail rows that stay: move them down
            self.array[holes] = self.array[movers]           # numpy: a row copy each, any dtype
            self.ids[holes] = self.ids[movers]
            self.slot[self.ids[holes]] = holes
        self.slot[neurons] = -1
        self.ids[new_n:self.n] = -1
        self.n = new_n

    def append(self, neurons: np.ndarray, rows: torch.Tensor) -> None:
        """Write new neurons' bundles to rows n..n+k-1."""
        k = len(neurons)
        if self.n + k > self.capacity:
            raise FlashnbError(f"cache overflow: {self.n} + {k} rows > capacity {self.capacity}")
        if k:
            self.rows[self.n:self.n + k] = rows
            self.ids[self.n:self.n + k] = neurons
            self.slot[neurons] = np.arange(self.n, self.n + k)
            self.n += k

    def mask(self, needed: np.ndarray) -> torch.Tensor:
        """A 0/1 vector over rows[:n]: 1 where the row's neuron is in `needed`."""
        m = np.zeros(self.n, dtype=np.float32)
        m[self.slot[np.asarray(needed, dtype=np.int64)]] = 1.0
        return torch.from_numpy(m)
