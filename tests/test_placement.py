"""Co-activation placement: the order puts co-active neurons side by side, a placed store returns the same
rows and the engine the same logits as an unplaced one, reads of co-active sets need fewer requests, and
bad placements fail in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashnb import FlashnbError
from flashnb.bench.baselines import MmapEngine
from flashnb.core.convert import ConvertConfig, convert
from flashnb.core.engine import FlashEngine, Policy
from flashnb.core.generate import generate, greedy_with_logits
from flashnb.core.placement import Placement, coactivation_order, load_placement
from flashnb.core.predictor import OraclePredictor
from flashnb.core.reader import NeuronReader
from flashnb.core.simulate import sets_from_trace, simulate
from flashnb.core.store import FlashStore
from flashnb.core.verify import verify
from flashnb.models.checkpoint import load_model
from flashnb.models.fingerprint import model_fingerprint
from flashnb.training.traces import record

from conftest import make_tiny_llama, make_tiny_opt
from test_engine import PROMPT

FFN = 64


def paired_mask(tokens: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Neurons that fire in fixed random pairs (each pair fires together on a random 10% of tokens)."""
    rng = np.random.default_rng(seed)
    partner = rng.permutation(FFN).reshape(-1, 2)
    mask = np.zeros((tokens, FFN), bool)
    for a, b in partner:
        on = rng.random(tokens) < 0.1
        mask[on, a] = mask[on, b] = True
    return mask, partner


def test_coactivation_order_puts_partners_side_by_side():
    mask, partner = paired_mask()
    order = coactivation_order(mask)
    assert sorted(order.tolist()) == list(range(FFN))
    pos = np.argsort(order)
    assert all(abs(int(pos[a]) - int(pos[b])) == 1 for a, b in partner)


@pytest.fixture(scope="module", params=["opt", "llama"])
def placed(request, tmp_path_factory):
    """(HF folder, plain store, store with a random placement) of a tiny model."""
    root = tmp_path_factory.mktemp("placed-" + request.param)
    folder = (make_tiny_opt if request.param == "opt" else make_tiny_llama)(root / "hf", max_position_embeddings=80)
    model = load_model(folder)
    rng = np.random.default_rng(1)
    pl = Placement(np.stack([rng.permutation(FFN) for _ in range(model.config.num_hidden_layers)]),
                   model_fingerprint(model), 0, "random, for the test")
    plain = FlashStore.open(convert(folder, root / "plain", ConvertConfig(dtype="fp32", progress=False)))
    moved = FlashStore.open(convert(folder, root / "placed", ConvertConfig(dtype="fp32", progress=False,
                                                                       placement=pl)))
    return folder, plain, moved, pl


def test_a_placed_store_reads_the_same_rows(placed):
    folder, plain, moved, pl = placed
    assert moved.manifest["placement"]["bytes"] == pl.order.size * 4
    assert np.array_equal(moved.file_order(1), pl.order[1]) and np.array_equal(plain.file_order(1), np.arange(FFN))
    ids = np.array([5, 3, 63, 3, 0, 17, 40, 41])  # unsorted, a duplicate
    with NeuronReader(plain) as a, NeuronReader(moved) as b:
        for layer in range(plain.num_layers):
            assert np.array_equal(a.read(layer, ids).rows, b.read(layer, ids).rows)
            assert np.array_equal(plain.ffn_rows(layer), moved.ffn_rows(layer))
    assert verify(moved.path, progress=False).regions == verify(plain.path, progress=False).regions + 1
    ids_t = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(moved.load_model()(ids_t), plain.load_model()(ids_t))


def test_the_engine_and_the_baselines_are_unchanged_by_a_placement(placed):
    folder, _, moved, _ = placed
    dense = load_model(folder)
    expected = list(generate(dense, PROMPT, 32))
    with FlashEngine(moved, OraclePredictor(moved.load_model()), Policy(2, 1.0, in_flight=2)) as eng:
        got, logits = greedy_with_logits(eng, PROMPT, 32)
        measured = [(s.bytes_read, s.requests, s.loaded) for s in eng.steps]
    assert got == expected
    with torch.no_grad():
        assert (logits - dense(torch.tensor([PROMPT + got[:-1]]))[0]).abs().max().item() <= 1e-4
    sim = simulate(sets_from_trace(record(dense, PROMPT + got[:-1])), moved, Policy(2, 1.0, in_flight=2))
    assert [(s.bytes_read, s.requests, s.loaded) for s in sim] == measured
    runner = MmapEngine(moved)
    kv = runner.model.new_cache(1, len(PROMPT))
    out = torch.stack([runner.step(t, kv) for t in PROMPT])
    runner.close()
    with torch.no_grad():
        assert (out - dense(torch.tensor([PROMPT]))[0]).abs().max().item() <= 1e-4


def test_tokens_served_in_parts_stay_exact_and_split_in_file_order(placed):
    """A cache of 10 rows per layer: a token's neurons are served in parts, each a contiguous stretch of the
    placed file; logits stay the dense model's and simulate counts the engine's reads exactly."""
    from flashnb.core.memory import ROW_BOOKKEEPING, bookkeeping_bytes
    from flashnb.core.window import split_predicted

    folder, _, moved, pl = placed
    ids = np.arange(0, FFN, 2)
    parts = split_predicted(ids, 10, pl.position[0])
    assert sorted(np.concatenate(parts).tolist()) == ids.tolist()
    rows = [np.sort(pl.position[0][p]) for p in parts]
    assert all(a[-1] < b[0] for a, b in zip(rows, rows[1:]))  # each part lies before the next on flash
    budget = (moved.resident_bytes + bookkeeping_bytes(moved.memory_shape(), 2)
              + moved.num_layers * 10 * (moved.neuron_bytes + ROW_BOOKKEEPING))
    pol = Policy(2, budget, in_flight=2)
    with FlashEngine(moved, OraclePredictor(moved.load_model()), pol) as eng:
        kv = eng.model.new_cache(1, len(PROMPT))
        out = torch.stack([eng.step(t, kv) for t in PROMPT])
        assert max(len(i) for s in eng.steps for i in s.predicted_sets) > 10
        sets = [s.predicted_sets for s in eng.steps]
        measured = [(s.bytes_read, s.requests) for s in eng.steps]
    with torch.no_grad():
        assert (out - load_model(folder)(torch.tensor([PROMPT]))[0]).abs().max().item() <= 1e-4
    assert [(s.bytes_read, s.requests) for s in simulate(sets, moved, pol)] == measured


def test_co_active_neurons_placed_together_need_fewer_requests(tmp_path):
    """Neurons that fire in pairs: in the learned order each token's pairs are adjacent rows, read as one
    request each; in the original order almost every neuron is a request of its own."""
    folder = make_tiny_opt(tmp_path / "hf", ffn_dim=FFN, hidden_size=1024)  # rows of 4 KiB: one block each
    model = load_model(folder)
    mask, _ = paired_mask(tokens=200)
    pl = Placement(np.stack([coactivation_order(mask)] * model.config.num_hidden_layers), model_fingerprint(model),
                   200, "pairs")
    plain = FlashStore.open(convert(folder, tmp_path / "plain", ConvertConfig(progress=False)))
    moved = FlashStore.open(convert(folder, tmp_path / "placed", ConvertConfig(progress=False, placement=pl)))
    test_mask, _ = paired_mask(tokens=50, seed=0)  # the same pairs, other tokens
    with NeuronReader(plain) as a, NeuronReader(moved) as b:
        req = np.array([(a.requests(0, np.flatnonzero(m))[1].size, b.requests(0, np.flatnonzero(m))[1].size,
                         a.requests(0, np.flatnonzero(m))[1].sum(), b.requests(0, np.flatnonzero(m))[1].sum())
                        for m in test_mask if m.any()])
    assert req[:, 1].sum() * 1.8 <= req[:, 0].sum()   # pairs: about half the requests
    assert req[:, 3].sum() == req[:, 2].sum()          # the same bytes


def test_bad_placements_fail_in_one_line(placed, tmp_path):
    folder, _, moved, pl = placed
    other = make_tiny_opt(tmp_path / "other", seed=7)
    with pytest.raises(FlashnbError, match="belongs to another model"):
        convert(other, tmp_path / "s", ConvertConfig(progress=False, placement=pl))
    assert not (tmp_path / "s").exists()
    with pytest.raises(FlashnbError, match="permutation"):
        Placement(np.zeros((2, FFN), np.int64), "x", 0, "")
    with pytest.raises(FlashnbError, match="placement.safetensors is missing"):
        load_placement(tmp_path)
    pl.save(tmp_path / "p")
    back = load_placement(tmp_path / "p")
    assert np.array_equal(back.order, pl.order) and back.fingerprint == pl.fingerprint
    (tmp_path / "p" / "placement.safetensors").write_bytes(b"junk")
    with pytest.raises(FlashnbError, match="learn the placement again"):
        load_placement(tmp_path / "p")
    # a damaged placement.bin in a store: verify names it, the engine refuses it
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(moved.path, copy)
    data = bytearray((copy / "placement.bin").read_bytes())
    data[0:8] = data[8:16]  # two rows hold the same neuron
    (copy / "placement.bin").write_bytes(bytes(data))
    with pytest.raises(FlashnbError, match="placement"):
        verify(copy, progress=False)
    with pytest.raises(FlashnbError, match="permutation"):
        FlashStore.open(copy).file_rows(0, np.array([1]))


def test_placement_figure_draws_each_token_read_at_its_file_row():
    from flashnb.viz.engine import placement_figure

    sets = [np.array([1, 5]), np.array([2, 5, 6])]
    position = np.array([7, 0, 1, 2, 3, 4, 5, 6])
    fig = placement_figure(sets, 8, position)
    original, placed = (np.array(t.z) for t in fig.data)
    assert original[:, 1].nonzero()[0].tolist() == [2, 5, 6]
    assert placed[:, 1].nonzero()[0].tolist() == [1, 4, 5]  # neurons 2, 5, 6 lie at rows 1, 4, 5


def test_the_shipped_placement_makes_a_placed_store(tmp_path):
    from flashnb.shipped_models import shipped

    m = shipped()
    st = m.store(tmp_path, placed=True)
    assert st.path.name == "bundled-placed" and st.placement_path is not None
    assert np.array_equal(st.file_order(0), load_placement(m.predictors_folder).order[0])
