"""The neuron cache: pointer array and rows stay consistent; capacity holds; windowing is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashnb import FlashnbError
from flashnb.cache import NeuronCache

N, WIDTH = 64, 6


def bundle(ids: np.ndarray) -> torch.Tensor:
    """A recognisable row per neuron: every value equals the neuron id."""
    return torch.as_tensor(ids, dtype=torch.float32)[:, None].repeat(1, WIDTH)


def check_invariants(c: NeuronCache) -> None:
    used = c.ids[: c.n]
    assert (used >= 0).all() and len(set(used.tolist())) == c.n          # unique, valid
    assert (c.ids[c.n:] == -1).all()
    assert (c.slot[used] == np.arange(c.n)).all()                       # inverse map agrees
    assert (c.slot >= 0).sum() == c.n
    assert torch.equal(c.rows[: c.n], bundle(used))                      # each row holds its neuron
    assert c.n <= c.capacity


@pytest.mark.parametrize("window", [0, 1, 3, 5])
def test_random_sequences_keep_invariants_and_window_semantics(window):
    rng = np.random.default_rng(window)
    c = NeuronCache(N, capacity=N, bundle_width=WIDTH, window=window)
    history: list[set[int]] = []
    for _ in range(60):
        needed = rng.choice(N, size=rng.integers(0, 12), replace=False)
        before = set(c.cached().tolist())
        plan = c.plan(needed)
        in_window = set().union(*history[-window:]) if window else set()
        # evicted = exactly the cached neurons that left the window and are not needed again
        # (capacity is ample here); what is cached is never read again; window 0 keeps nothing
        carried = before if window else set()
        assert set(plan.evict.tolist()) == before - in_window - (set(needed.tolist()) & carried)
        assert set(plan.hits.tolist()) == set(needed.tolist()) & carried
        assert set(plan.load.tolist()) == set(needed.tolist()) - carried
        assert before - set(plan.evict.tolist()) <= in_window | set(needed.tolist())
        c.apply(plan, bundle(plan.load))
        check_invariants(c)
        history.append(set(needed.tolist()))
        assert set(c.cached().tolist()) == in_window | set(needed.tolist())


def test_capacity_is_never_exceeded_and_lru_goes_first():
    c = NeuronCache(N, capacity=8, bundle_width=WIDTH, window=10)
    for needed in ([0, 1, 2, 3], [4, 5, 6], [7, 8], [9, 1]):
        plan = c.plan(np.array(needed))
        c.apply(plan, bundle(plan.load))
        check_invariants(c)
    # tokens 2 and 3 each overflowed by one row: the least recently used neurons (0, then 2) left
    assert set(c.cached().tolist()) == {1, 3, 4, 5, 6, 7, 8, 9}


def test_delete_moves_last_rows_into_holes():
    c = NeuronCache(N, capacity=10, bundle_width=WIDTH, window=5)
    ids = np.array([10, 11, 12, 13, 14, 15])
    c.append(ids, bundle(ids))
    c.delete(np.array([11, 15, 13]))
    check_invariants(c)
    assert c.cached().tolist() == [10, 14, 12]  # 14 moved into 11's row; 15 was last, 13 freed
    assert c.rows.shape == (10, WIDTH)


def test_mask_selects_this_tokens_neurons():
    c = NeuronCache(N, capacity=10, bundle_width=WIDTH, window=5)
    ids = np.array([3, 9, 4])
    c.append(ids, bundle(ids))
    assert c.mask(np.array([4, 3])).tolist() == [1.0, 0.0, 1.0]


def test_bad_requests_are_refused():
    c = NeuronCache(N, capacity=4, bundle_width=WIDTH, window=1)
    with pytest.raises(FlashnbError, match="0..63"):
        c.plan(np.array([64]))
    with pytest.raises(FlashnbError, match="raise the memory budget"):
        c.plan(np.arange(5))
    with pytest.raises(FlashnbError, match="window must be >= 0"):
        NeuronCache(N, capacity=4, bundle_width=WIDTH, window=-1)
