"""Trace replay (flashnb.bench.replay) on a small shape: the bytes it reads are exact, and the paper's
naive (the whole model) reads the FFN plus the other weights' share."""

import numpy as np
import pytest

from flashnb.errors import FlashnbError
from flashnb.bench.replay import ReplayShape, replay, replay_store, replay_whole_model, widen, widened_placement
from flashnb.core.placement import Placement, count_runs

SHAPE = ReplayShape(layers=2, d_model=512, ffn_dim=256)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("replay")
    return {lay: replay_store(d, lay, SHAPE, progress=False) for lay in ("bundled", "unbundled")}


def test_widen_keeps_sets_sizes_and_maps_each_neuron_to_factor_neurons():
    small = [[np.array([0, 3]), np.array([1])], [np.array([2]), np.array([])]]
    wide = widen(small, 64, SHAPE)
    assert len(wide) == 2 and len(wide[0]) == SHAPE.layers
    assert [w.size for w in wide[0]] == [8, 4] and wide[1][1].size == 0
    assert all(np.all(np.diff(w) > 0) for t in wide for w in t)  # sorted, unique
    with pytest.raises(FlashnbError, match="at least as wide"):
        widen(small, SHAPE.ffn_dim + 1, SHAPE)


def test_a_widened_placement_keeps_the_copies_of_a_neuron_a_block_apart():
    rng = np.random.default_rng(3)
    small_order = np.stack([rng.permutation(64) for _ in range(2)])
    small = [[np.sort(rng.choice(64, 12, replace=False)) for _ in range(2)] for _ in range(20)]
    placed = widened_placement(Placement(small_order, "f" * 16, 100, "test"), 64, SHAPE)
    assert placed.order.shape == (SHAPE.layers, SHAPE.ffn_dim) and placed.fingerprint is None
    wide = widen(small, 64, SHAPE)
    pos = placed.position
    for t_small, t_wide in zip(small, wide):
        for layer in range(SHAPE.layers):
            rows = np.sort(pos[layer][t_wide[layer]])
            blocks = rows // 64
            assert np.array_equal(np.bincount(blocks, minlength=4), [12] * 4)  # one copy of each neuron per block
            small_rows = np.sort(np.argsort(small_order[layer])[t_small[layer]])
            assert all(np.array_equal(rows[blocks == c] - 64 * c, small_rows) for c in range(4))
    # so the runs of adjacent rows are the small model's, four times (two blocks' runs may touch)
    runs_small, runs_wide = count_runs(small, np.argsort(small_order, axis=1)), count_runs(wide, pos)
    assert 4 * runs_small - 3 * 20 * SHAPE.layers <= runs_wide <= 4 * runs_small


def test_naive_and_sparse_replays_read_exact_bytes(stores):
    st = stores["bundled"]
    naive = replay(st, None, 0, SHAPE.ffn_dim, in_flight=4)
    assert naive.bytes_read == SHAPE.layers * SHAPE.ffn_dim * 2 * SHAPE.d_model * 2
    sets = [[np.array([1, 5, 9]), np.array([2])], [np.array([1, 6]), np.array([2, 3])],
            [np.array([7]), np.array([3])]]
    win = replay(st, sets, 1, SHAPE.ffn_dim, in_flight=4, gap_bytes=0)
    # tokens 2 and 3 (the first is skipped: empty caches): {6} + {3} new, then {7} new, 3 cached
    assert win.tokens == 2 and win.bytes_read == (2 + 1) / 2 * 2048


def test_whole_model_naive_reads_ffn_plus_other_bytes(stores):
    other = 3 * 2048 * SHAPE.layers  # three unbundled rows (two 1 KiB parts each) per layer
    r = replay_whole_model(stores["bundled"], stores["unbundled"], other, tokens=1, in_flight=4)
    ffn = SHAPE.layers * SHAPE.ffn_dim * 2048
    assert r.bytes_read == ffn + other and r.io_ms > 0
