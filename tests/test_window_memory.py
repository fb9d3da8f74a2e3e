"""Windowing (§3.1) and memory management (§3.3): the window's decisions are exact; the rows and their
pointer array stay consistent under swap-with-last deletion; the budget split and its inverse agree."""

from __future__ import annotations

import numpy as np
import pytest

from flashnb import FlashnbError
from flashnb.core.memory import MemoryShape, NeuronRows, budget_bytes, hybrid_plan, min_budget, plan_memory
from flashnb.core.window import Window

N, WIDTH = 64, 6


def bundle(ids: np.ndarray) -> np.ndarray:
    """A recognisable row per neuron: every value equals the neuron id."""
    return np.repeat(np.asarray(ids, dtype=np.float32)[:, None], WIDTH, axis=1)


def check_invariants(r: NeuronRows, w: Window) -> None:
    used = r.held()
    assert (used >= 0).all() and len(set(used.tolist())) == r.n          # unique, valid
    assert (r.ids[r.n:] == -1).all()
    assert (r.slot[used] == np.arange(r.n)).all()                       # inverse map agrees
    assert (r.slot >= 0).sum() == r.n
    assert np.array_equal(r.array[: r.n], bundle(used))                  # each row holds its neuron
    assert r.n <= r.capacity
    assert set(w.held().tolist()) == set(used.tolist())                # the window and the rows agree


def step(w: Window, r: NeuronRows, needed):
    """One token as the engine does it: plan, delete the evicted rows, read the new ones, commit."""
    plan = w.plan(needed)
    r.make_room(plan.evicted, plan.loaded.size)[:] = bundle(plan.loaded)
    r.commit(plan.loaded)
    w.advance(plan)
    return plan


@pytest.mark.parametrize("window", [0, 1, 3, 5])
def test_random_sequences_keep_invariants_and_window_semantics(window):
    rng = np.random.default_rng(window)
    w, r = Window(N, N, window), NeuronRows(N, N, WIDTH, np.float32)
    history: list[set[int]] = []
    for _ in range(60):
        needed = rng.choice(N, size=rng.integers(0, 12), replace=False)
        before = set(w.held().tolist())
        plan = w.plan(needed)
        in_window = set().union(*history[-window:]) if window else set()
        # evicted = exactly the neurons in DRAM that left the window and are not needed again
        # (capacity is ample here); what is in DRAM is never read again; window 0 keeps nothing
        carried = before if window else set()
        assert set(plan.evicted.tolist()) == before - in_window - (set(needed.tolist()) & carried)
        assert set(plan.cached.tolist()) == set(needed.tolist()) & carried
        assert set(plan.loaded.tolist()) == set(needed.tolist()) - carried
        step(w, r, needed)
        check_invariants(r, w)
        history.append(set(needed.tolist()))
        assert set(w.held().tolist()) == in_window | set(needed.tolist())


def test_capacity_is_never_exceeded_and_lru_goes_first():
    w, r = Window(N, 8, 10), NeuronRows(N, 8, WIDTH, np.float32)
    for needed in ([0, 1, 2, 3], [4, 5, 6], [7, 8], [9, 1]):
        step(w, r, np.array(needed))
        check_invariants(r, w)
    # tokens 2 and 3 each overflowed by one row: the least recently used neurons left, the lower id
    # first among equals (0, then 2)
    assert set(w.held().tolist()) == {1, 3, 4, 5, 6, 7, 8, 9}


def test_delete_moves_last_rows_into_holes():
    r = NeuronRows(N, 10, WIDTH, np.float32)
    ids = np.array([10, 11, 12, 13, 14, 15])
    r.append(ids, bundle(ids))
    r.delete(np.array([11, 15, 13]))
    assert r.held().tolist() == [10, 14, 12]  # 14 moved into 11's row; 15 was last, 13 freed
    assert np.array_equal(r.array[:3], bundle([10, 14, 12])) and r.array.shape == (10, WIDTH)


def test_bad_requests_are_refused():
    w = Window(N, 4, 1)
    with pytest.raises(FlashnbError, match="0..63"):
        w.plan(np.array([64]))
    with pytest.raises(FlashnbError, match="raise the memory budget"):
        w.plan(np.arange(5))
    with pytest.raises(FlashnbError, match="window must be >= 0"):
        Window(N, 4, -1)
    with pytest.raises(FlashnbError, match="not in DRAM"):
        NeuronRows(N, 4, WIDTH, np.float32).delete(np.array([3]))


SHAPE = MemoryShape(resident_bytes=10_000, layers=4, ffn_dim=100, neuron_bytes=200)  # model: 90,000 bytes


def test_the_budget_split_counts_every_byte():
    plan = plan_memory(SHAPE, 0.5, window=4, predictor_bytes=1000)
    # 45,000 bytes: 10,000 resident + 1,000 predictors + 4 caches' maps of 100 neurons x 17 bytes leave
    # 27,200 = 130 rows of 208 bytes (200 of values, 8 of pointer), 32 per layer
    assert (plan.budget_bytes, plan.row_bytes, plan.capacity_rows, plan.caches) == (45_000, 208, 32, 4)
    assert plan.used_bytes == 10_000 + 1000 + 6_800 + 4 * 32 * 208 <= plan.budget_bytes
    # what the engine allocates for those caches (fp16 rows of 100 values) is exactly what the plan counts
    caches = [(Window(100, 32, 4), NeuronRows(100, 32, 100, np.float16)) for _ in range(4)]
    allocated = sum(w.in_dram.nbytes + w.last_used.nbytes + r.nbytes for w, r in caches)
    assert allocated == plan.bookkeeping_bytes + plan.cache_bytes
    shared = plan_memory(SHAPE, 45_000, window=0, predictor_bytes=1000)  # bytes, as an int; one shared set
    assert (shared.caches, shared.capacity_rows) == (1, 100)
    assert budget_bytes(0.25, 90_000) == 22_500 and budget_bytes(22_500, 90_000) == 22_500


def test_min_budget_is_the_split_inverted():
    lo = min_budget(SHAPE, window=4, predictor_bytes=1000)
    assert plan_memory(SHAPE, lo, 4, 1000).capacity_rows >= 1
    with pytest.raises(FlashnbError, match=rf"raise the budget \(--memory, or Policy\.memory_budget\) "
                                           rf"to at least {lo:.3f}"):
        plan_memory(SHAPE, lo - 0.002, 4, 1000)


def test_pinning_every_neuron_is_refused_whatever_the_budget():
    """The window needs a row beside the pinned ones: pinning all 100 neurons of a layer is said as that, not
    as a budget too small (the budget here holds the whole model twice)."""
    with pytest.raises(FlashnbError, match="100 pinned rows per layer leave the window no row .* pin at most 99"):
        plan_memory(SHAPE, 200_000, window=4, pinned_rows=100)
    assert plan_memory(SHAPE, 200_000, window=4, pinned_rows=99).capacity_rows == 1


def test_hybrid_pins_what_leaves_room_for_one_streamed_layer():
    plan = hybrid_plan(SHAPE, 0.5)                 # 168 rows beside the resident tensors (no per-neuron maps)
    pinned, buf = plan.pinned_rows, plan.capacity_rows
    assert 4 * pinned + buf <= 168 < 4 * (pinned + 1) + (100 - pinned - 1)
    assert buf == 100 - pinned and plan.used_bytes <= plan.budget_bytes
    assert hybrid_plan(SHAPE, 1.0).pinned_rows == 94   # the pointers count: 100% of the model is not enough
    assert hybrid_plan(SHAPE, 200_000).pinned_rows == 100  # everything fits: nothing streams
