"""Memory management in DRAM (paper §3.3), and the one split of a memory budget.

`NeuronRows` holds one layer's neurons in DRAM:

* `array` / `rows` — a matrix of `capacity` x `width` values (a bundle per row), allocated once,
  page-aligned (direct I/O lands new rows in place) and never resized;
* `ids`   — the pointer array: row r holds neuron `ids[r]`; rows 0..n-1 are in use;
* `slot`  — the inverse map neuron -> row (or -1).

Deleting neurons copies the last rows over the deleted ones, so the used rows stay 0..n-1 and no
hole is left; new neurons are appended at n; the FFN is computed straight from `rows[:n]`, since
row order does not change the result.

`plan_memory` is the only place a memory budget becomes rows: the tensors that always stay in DRAM,
the predictors and the engine's per-neuron maps come first, then pinned rows (if any), and what is
left becomes each layer's rows for the window. The engine, the hybrid baseline, `simulate`, the trace
replay and the cost model all take their rows from it, and `min_budget` inverts it in closed form.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch

from flashnb.core.io import aligned_empty
from flashnb.errors import FlashnbError
from flashnb.text import MB

# Bytes of bookkeeping besides the rows' values, all counted in the budget:
ROW_BOOKKEEPING = 8       # per row: its neuron's id in the pointer array (int64)
NEURON_BOOKKEEPING = 17   # per neuron of the FFN, in each cache: the window's in-DRAM flag (bool) and last
                          # use (int64), the rows' slot (int64)
PINNED_BOOKKEEPING = 9    # per neuron of each layer that has pinned rows: their slot (int64), a pinned flag


# ----------------------------------------------------------------------------------------------
# The budget


@dataclass(frozen=True)
class MemoryShape:
    """What a budget is split over, in bytes at the store's precision."""

    resident_bytes: int   # tensors that always stay in DRAM: embeddings, attention, norms, FFN biases
    layers: int
    ffn_dim: int
    neuron_bytes: int     # one neuron's bundle: P x d_model values
    kv_cache_bytes: int = 0  # activations, reported beside the budget

    @property
    def ffn_bytes(self) -> int:
        return self.layers * self.ffn_dim * self.neuron_bytes

    @property
    def model_bytes(self) -> int:
        return self.resident_bytes + self.ffn_bytes

    @property
    def row_bytes(self) -> int:
        """DRAM one cached neuron takes: its bundle and its bookkeeping."""
        return self.neuron_bytes + ROW_BOOKKEEPING


def budget_bytes(budget: float | int, model_bytes: int) -> int:
    """A memory budget in bytes. A float is a fraction of the model's bytes in (0, 1]; an int is bytes."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise FlashnbError(f"a memory budget is a fraction of the model (a float in (0, 1]) or bytes (a whole "
                           f"number), got {budget!r}")
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise FlashnbError(f"a memory budget in bytes must be >= 1, got {budget}")
        return int(budget)
    if not 0.0 < float(budget) <= 1.0:
        raise FlashnbError(f"a memory budget given as a float is a fraction of the model's bytes in (0, 1], got "
                           f"{budget}; give bytes as a whole number"
                           + (f" (e.g. {int(model_bytes // 2)}, half this model)" if model_bytes > 1 else " (>= 1)"))
    return int(float(budget) * model_bytes)


@dataclass(frozen=True)
class MemoryPlan:
    """Where a budget goes, in bytes (rows are neurons)."""

    model_bytes: int       # all weights at the store's precision (DRAM part + FFN)
    budget_bytes: int
    resident_bytes: int    # tensors that always stay in DRAM
    predictor_bytes: int
    row_bytes: int         # one cached neuron with its bookkeeping
    pinned_rows: int       # per layer: neurons that stay in DRAM the whole run
    caches: int            # layers with rows of their own (1: one set of rows shared by every layer)
    capacity_rows: int     # rows of each cache (the window's neurons)
    layers: int
    kv_cache_bytes: int    # activations, beside the budget
    bookkeeping_bytes: int = 0  # the engine's per-neuron maps (bookkeeping_bytes())

    @property
    def pinned_bytes(self) -> int:
        return self.layers * self.pinned_rows * self.row_bytes

    @property
    def cache_bytes(self) -> int:
        return self.caches * self.capacity_rows * self.row_bytes

    @property
    def used_bytes(self) -> int:
        return (self.resident_bytes + self.predictor_bytes + self.bookkeeping_bytes + self.pinned_bytes
                + self.cache_bytes)


def rows_in_budget(shape: MemoryShape, budget: float | int, held_bytes: int = 0) -> int:
    """Neuron rows the budget holds after the resident tensors and `held_bytes` (predictors, maps) (>= 0)."""
    free = budget_bytes(budget, shape.model_bytes) - shape.resident_bytes - held_bytes
    return max(0, free) // shape.row_bytes


def bookkeeping_bytes(shape: MemoryShape, window: int, pinned_rows: int = 0) -> int:
    """The engine's per-neuron maps: each cache's window flags, last uses and slots, and each layer's
    pinned slots and flags when it pins rows."""
    return shape.ffn_dim * (_caches(shape, window) * NEURON_BOOKKEEPING
                            + (shape.layers * PINNED_BOOKKEEPING if pinned_rows else 0))


def _caches(shape: MemoryShape, window: int) -> int:
    return 1 if window == 0 else shape.layers  # nothing survives a layer at k = 0: one set of rows serves all


def plan_memory(shape: MemoryShape, budget: float | int, window: int, predictor_bytes: int = 0,
                pinned_rows: int = 0, maps: bool = True) -> MemoryPlan:
    """THE split: resident tensors, predictors, the engine's per-neuron maps (`maps`; the hybrid
    baseline has none) and `pinned_rows` per layer first; the rest of the budget becomes each cache's
    rows (one cache per layer, one shared when window = 0)."""
    if maps and pinned_rows >= shape.ffn_dim:
        raise FlashnbError(f"{pinned_rows} pinned rows per layer leave the window no row (the FFN has {shape.ffn_dim} "
                           f"neurons per layer): pin at most {shape.ffn_dim - 1}")
    caches = _caches(shape, window)
    fixed = bookkeeping_bytes(shape, window, pinned_rows) if maps else 0
    rows = rows_in_budget(shape, budget, predictor_bytes + fixed)
    capacity = min(shape.ffn_dim - pinned_rows, (rows - shape.layers * pinned_rows) // caches)
    if capacity < 1:
        total = budget_bytes(budget, shape.model_bytes)
        need = min_budget(shape, window, predictor_bytes, pinned_rows, maps)
        raise FlashnbError(
            f"memory budget of {total / MB:.2f} MB ({total / shape.model_bytes:.0%} of the model's "
            f"{shape.model_bytes / MB:.2f} MB) is too small: resident tensors take "
            f"{shape.resident_bytes / MB:.2f} MB, predictors {predictor_bytes / MB:.2f} MB, the engine's "
            f"per-neuron maps {fixed / MB:.2f} MB"
            + (f", {pinned_rows} pinned rows per layer {shape.layers * pinned_rows * shape.row_bytes / MB:.2f} MB"
               if pinned_rows else "")
            + ", leaving no window row per layer; "
            + (f"raise the budget (--memory, or Policy.memory_budget) to at least {need:.3f} of the model"
               + (" or pin fewer rows" if pinned_rows else "")
               if need <= 1 else "even the whole model's bytes leave none: "
               + ("pin fewer rows" if pinned_rows else
                  f"give the budget in bytes, at least {int(need * shape.model_bytes)}")))
    return MemoryPlan(shape.model_bytes, budget_bytes(budget, shape.model_bytes), shape.resident_bytes,
                      predictor_bytes, shape.row_bytes, pinned_rows, caches, capacity, shape.layers,
                      shape.kv_cache_bytes, fixed)


def min_budget(shape: MemoryShape, window: int, predictor_bytes: int = 0, pinned_rows: int = 0,
               maps: bool = True) -> float:
    """The smallest budget (a fraction of the model, rounded up to 0.001) that `plan_memory` accepts:
    one row per cache beside the resident tensors, the predictors, the maps and the pinned rows."""
    need = (shape.resident_bytes + predictor_bytes + (bookkeeping_bytes(shape, window, pinned_rows) if maps else 0)
            + (_caches(shape, window) + shape.layers * pinned_rows) * shape.row_bytes)
    return float(np.ceil(need / shape.model_bytes * 1000) / 1000)


def hybrid_plan(shape: MemoryShape, budget: float | int) -> MemoryPlan:
    """The hybrid baseline's split: as many neurons pinned per layer as leave room for one buffer
    holding the rest of a layer, which is then read in full every token (less room: nothing pinned,
    and the buffer streams a layer in pieces)."""
    rows, n, L = rows_in_budget(shape, budget), shape.ffn_dim, shape.layers
    if rows < 1:
        raise FlashnbError(f"memory budget {budget_bytes(budget, shape.model_bytes) / MB:.2f} MB leaves no "
                           f"room for reading FFN rows beside the resident tensors "
                           f"({shape.resident_bytes / MB:.2f} MB); raise it")
    pinned = int(min(n, max(0, (rows - n) // max(1, L - 1))))
    return plan_memory(shape, budget, 0, 0, pinned, maps=False) if pinned < n else MemoryPlan(
        shape.model_bytes, budget_bytes(budget, shape.model_bytes), shape.resident_bytes, 0, shape.row_bytes,
        n, 1, 0, L, shape.kv_cache_bytes)


# ----------------------------------------------------------------------------------------------
# The rows


class NeuronRows:
    """One layer's neurons in DRAM: preallocated rows, pointer array, swap-with-last deletion."""

    def __init__(self, num_neurons: int, capacity: int, width: int, dtype: np.dtype | str):
        if capacity < 1:
            raise FlashnbError(f"a layer's DRAM must hold at least 1 neuron row, got {capacity}")
        self.num_neurons, self.capacity = num_neurons, capacity
        self.array = aligned_empty((capacity, width), np.dtype(dtype))
        self.rows = torch.from_numpy(self.array)
        self.ids = np.full(capacity, -1, dtype=np.int64)
        self.slot = np.full(num_neurons, -1, dtype=np.int64)
        self.n = 0

    @property
    def nbytes(self) -> int:
        """Bytes of DRAM these rows hold (allocated rows + pointer arrays)."""
        return self.array.nbytes + self.ids.nbytes + self.slot.nbytes

    def held(self) -> np.ndarray:
        """The neurons in rows 0..n-1, in row order."""
        return self.ids[: self.n]

    def clear(self) -> None:
        """Free every row (their values stay until overwritten)."""
        self.slot[self.ids[: self.n]] = -1
        self.ids[: self.n] = -1
        self.n = 0

    def delete(self, neurons: np.ndarray) -> None:
        """Remove neurons: the last used rows are copied into the freed places, in one indexed copy,
        so rows 0..n-1 stay dense and nothing is reallocated."""
        neurons = np.asarray(neurons, dtype=np.int64)
        if neurons.size == 0:
            return
        where = self.slot[neurons]
        if (where < 0).any():
            raise FlashnbError(f"neurons {neurons[where < 0][:5].tolist()} are not in DRAM")
        new_n = self.n - neurons.size
        dead = np.zeros(self.n, dtype=bool)
        dead[where] = True
        holes = np.flatnonzero(dead[:new_n])                 # freed rows inside the kept prefix
        if holes.size:
            movers = new_n + np.flatnonzero(~dead[new_n:])   # tail rows that stay: move them down
            self.array[holes] = self.array[movers]
            self.ids[holes] = self.ids[movers]
            self.slot[self.ids[holes]] = holes
        self.slot[neurons] = -1
        self.ids[new_n:self.n] = -1
        self.n = new_n

    def make_room(self, evicted: np.ndarray, k: int) -> np.ndarray:
        """Delete `evicted` and return the free rows [n, n + k), for the reader to fill in place;
        `commit` then appends them."""
        self.delete(evicted)
        if self.n + k > self.capacity:
            raise FlashnbError(f"DRAM rows overflow: {self.n} + {k} rows > capacity {self.capacity}")
        return self.array[self.n:self.n + k]

    def commit(self, neurons: np.ndarray) -> None:
        """Register the rows written into `make_room(..., len(neurons))` as `neurons`."""
        k = len(neurons)
        self.ids[self.n:self.n + k] = neurons
        self.slot[neurons] = np.arange(self.n, self.n + k)
        self.n += k

    def append(self, neurons: np.ndarray, values) -> None:
        """Write new neurons' bundles `values` [k, width] to rows n..n+k-1."""
        self.make_room(np.zeros(0, np.int64), len(neurons))[:] = np.asarray(values, dtype=self.array.dtype)
        self.commit(neurons)
