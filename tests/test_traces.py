"""Activation traces and their statistics: exact on hand-made traces, honest on a tiny model."""

import numpy as np
import pytest
import torch

from sparsity_helpers import tiny

from flashnb.training import tracestats as ts
from flashnb.errors import FlashnbError
from flashnb.training.traces import Trace, load_trace, record

F = 8


def hand_trace() -> Trace:
    """One layer, 8 neurons; a 5-token sequence then a 2-token one."""
    sets = [{0, 1}, {1, 2}, {0, 2, 3}, {3}, {4, 5, 6, 7}, {0}, {0}]
    mask = np.zeros((1, len(sets), F), dtype=bool)
    for t, s in enumerate(sets):
        mask[0, t, list(s)] = True
    return Trace(np.packbits(mask, axis=-1), None, np.arange(len(sets), dtype=np.int32),
                 np.array([0, 5]), F, "hand")


def test_mask_and_positions_roundtrip():
    tr = hand_trace()
    assert tr.positions().tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert tr.active_ids(0, 2).tolist() == [0, 2, 3]
    assert tr.mask(0).shape == (7, F)


def test_statistics_exact_on_hand_trace():
    tr = hand_trace()
    m, pos = tr.mask(0), tr.positions()
    assert ts.sparsity(m) == pytest.approx(1 - 14 / 56)
    # eligible tokens (>= 2 predecessors in their sequence): t2, t3, t4; 3 + 1 + 4 = 8 active
    # reuse(1): t2∩t1={2}, t3∩t2={3}, t4∩t3={} -> 2/8;  reuse(2): {0,2}, {3}, {} -> 3/8
    assert ts.temporal_reuse(m, pos, 2).tolist() == pytest.approx([2 / 8, 3 / 8])
    # s_agg(1) = (3+1+4)/3/8;  s_agg(2) = (|t2∪t1|=4 + |t3∪t2|=3 + |t4∪t3|=5)/3/8
    s = ts.aggregated_usage(m, pos, 2)
    assert s.tolist() == pytest.approx([8 / 24, 12 / 24])
    summary = ts.summarize(tr, k_max=2)
    assert summary.increments[0].tolist() == pytest.approx([4 / 24])
    with pytest.raises(FlashnbError, match="predecessors"):
        ts.temporal_reuse(m, pos, 5)


def test_coactivation_and_closest_friends():
    m = hand_trace().mask(0)
    c = ts.coactivation(m)
    assert c[0, 0] == 4 and c[0, 1] == 1 and c[0, 2] == 1 and c[2, 3] == 1 and c[4, 7] == 1
    assert (c == c.T).all()
    friends = ts.closest_friends(c)
    # neuron 0 co-fires once with 1, 2 and 3: lowest id wins; neuron 3's friends: 0 and 2 (once each)
    assert friends[:5].tolist() == [1, 0, 0, 0, 5]
    none = ts.closest_friends(np.diag([3, 0]))
    assert none.tolist() == [-1, -1]


def test_friend_bundling_exact():
    # neuron 0 is everyone's closest friend; tokens {0,1}, {2,3}, {0}, {0,2}
    mask = np.zeros((4, 4), dtype=bool)
    for t, s in enumerate([[0, 1], [2, 3], [0], [0, 2]]):
        mask[t, s] = True
    r = ts.friend_bundling(mask, np.array([1, 0, 0, 0]), neuron_bytes=100)
    # t0: read 0 (+1 useful); t1: read 2 (+0 wasted), read 3 (+0 wasted); t2: read 0 (+1 wasted);
    # t3: read 0 (+1 wasted), read 2 (+0 already loaded: duplicate)
    assert (r.reads_plain, r.reads_bundled) == (7, 6)
    assert (r.friends_useful, r.friends_duplicate, r.friends_wasted) == (1, 1, 4)
    assert (r.bytes_plain, r.bytes_bundled) == (700, 1200)
    assert r.bytes_ratio == pytest.approx(12 / 7) and r.reads_ratio == pytest.approx(6 / 7)
    assert r.distinct_friends == 2
    # neuron 0 (active in 3 of 4 tokens) is the hottest: the friend of 3 of the 4 neurons
    assert r.hot_friend_share == pytest.approx(3 / 4)
    assert (r.median_rate, r.median_friend_rate) == (0.25 + 0.125, 0.75)


def test_record_matches_dense_ffn():
    m = tiny()
    ids = np.random.default_rng(0).integers(0, 50, 70)
    tr = record(m, ids, context=32)
    assert tr.segment_starts.tolist() == [0, 32, 64]
    assert tr.active.shape == (2, 70, 8) and tr.inputs.shape == (2, 70, 32)
    seen = {}
    hooks = [b.ffn.register_forward_pre_hook(lambda mod, a, i=i: seen.__setitem__(i, a[0]))
             for i, b in enumerate(m.layers)]
    with torch.no_grad():
        m(torch.from_numpy(ids[32:64])[None])
    for h in hooks:
        h.remove()
    for i, block in enumerate(m.layers):
        x = seen[i][0]
        want = (torch.relu(block.ffn.fc1(x)) > 0).numpy()
        assert (tr.mask(i)[32:64] == want).all()
        assert np.allclose(tr.inputs[i, 32:64], x.numpy(), atol=2e-3)
    assert not any(b.ffn.record for b in m.layers)  # recording switched off afterwards


def test_save_load_and_model_checks(tmp_path):
    m = tiny()
    tr = record(m, np.arange(40) % 50, context=32, meta={"source": "test"})
    p = tmp_path / "t.safetensors"
    tr.save(p)
    back = load_trace(p, m)
    assert (back.active == tr.active).all() and (back.inputs == tr.inputs).all()
    assert back.meta["source"] == "test" and back.fingerprint == tr.fingerprint
    with pytest.raises(FlashnbError, match="another model"):
        load_trace(p, tiny(seed=1))  # same shapes, other weights
    with pytest.raises(FlashnbError, match="recorded from another model"):
        load_trace(p, tiny(ffn=48))
    with pytest.raises(FlashnbError, match="does not exist"):
        load_trace(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a trace")
    with pytest.raises(FlashnbError, match="not a readable trace"):
        load_trace(tmp_path / "junk.safetensors")


def test_record_rejects_bad_ids():
    with pytest.raises(FlashnbError, match="token ids"):
        record(tiny(), [1, 2, 99])
    with pytest.raises(FlashnbError, match="no token ids"):
        record(tiny(), [])
