"""Lesson 08 (beyond ReLU): the activation histogram, the sparsity explorer, the memory routes, reads by
budget and the engine check, on tiny random models; its figures and slider."""

from __future__ import annotations

import numpy as np
import pytest

from flashnb.core.convert import ConvertConfig, convert
from flashnb.core.engine import FlashEngine, Policy
from flashnb.core.memory import min_budget
from flashnb.core.store import FlashStore
from flashnb.core.thresholds import GateThresholds, apply_thresholds
from flashnb.lab import beyond_relu as B
from flashnb.models.checkpoint import load_model

from conftest import make_tiny_llama, make_tiny_opt


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("beyond")
    sw = make_tiny_llama(root / "sw", hidden_act="silu", max_position_embeddings=80)
    relu = make_tiny_opt(root / "relu")
    stores = {lay: FlashStore.open(convert(sw, root / lay, ConvertConfig(lay, "fp32", progress=False)))
              for lay in ("bundled", "gate-apart")}
    ids = np.random.default_rng(0).integers(3, 300, 400)
    return load_model(sw), load_model(relu), stores, ids


def test_histogram_counts_every_activation_and_the_relu_zeros(models):
    sw, relu, _, ids = models
    h = B.activation_histogram({"relu": relu, "swiglu": sw}, ids[:60])
    for name in ("relu", "swiglu"):
        assert h.zero[name] + h.shares[name].sum() == pytest.approx(1.0)
        assert h.below(name, h.edges[-1]) == pytest.approx(1.0)
    assert h.zero["relu"] > 0.2 and h.zero["swiglu"] == 0.0
    assert "exactly 0" in B.histogram_text(h)


def test_explorer_measures_the_thresholded_model_and_its_reads(models):
    sw, _, stores, ids = models
    ex = B.SparsityExplorer(sw, stores, ids[:200], ids[200:329], window=2, context=64)
    none = ex.measure("gate", 0.0)
    assert none.quality.perplexity_increase == pytest.approx(0.0, abs=1e-6) and none.quality.top1_agreement == 1.0
    half = ex.measure("scaled-gate", 0.5)
    assert 0.3 < half.measured_sparsity < 0.7
    assert half.quality.top1_agreement < 1.0
    assert ex.measure("product", 0.5).read_share > 0
    assert "Target sparsity 50%" in B.sparsity_text([half])


def test_two_stages_drop_what_either_rule_drops_and_read_the_gates_candidates(models):
    sw, _, stores, ids = models
    ex = B.SparsityExplorer(sw, stores, ids[:200], ids[200:329], window=2, context=64)
    two, pick, keep = ex.two_stage(0.3, 0.5), ex.measure("scaled-gate", 0.3), ex.measure("product", 0.5)
    assert two.read_share == pick.read_share                   # what is read: the gate's candidates
    assert two.measured_sparsity >= max(pick.measured_sparsity, keep.measured_sparsity) - 0.02
    assert two.measured_sparsity <= pick.measured_sparsity + keep.measured_sparsity + 0.02
    assert "two stages (gate, product)" in B.sparsity_text([keep, two])


def test_explorer_reads_are_the_engines_bytes(models):
    """The read share previews what the engine, run on the same tokens with the same thresholds, reads."""
    sw, _, stores, ids = models
    ex = B.SparsityExplorer(sw, stores, ids[:200], ids[200:265], window=2, context=64)
    point = ex.measure("gate", 0.5)
    st = stores["gate-apart"]
    with FlashEngine(st, GateThresholds(st, ex.thresholds("gate", 0.5)), Policy(2, 1.0, in_flight=2)) as eng:
        kv = eng.model.new_cache(1, 64)
        for t in ids[200:264]:
            eng.step(int(t), kv)
        read = sum(s.bytes_read for s in eng.steps)
    assert point.read_share == pytest.approx(read / 64 / (2 * 64 * 3 * 32 * 4))


def test_memory_routes_split_the_budget_with_the_one_formula(models):
    _, _, stores, _ = models
    apart, bundled = stores["gate-apart"], stores["bundled"]
    low = B.memory_route("gate in DRAM", apart, 0.3, 2)
    assert not low.fits and low.row_bytes == 0
    assert low.min_budget == min_budget(apart.memory_shape(), 2)
    assert low.gate_bytes == 2 * 64 * 32 * 4 and low.other_bytes + low.gate_bytes == apart.resident_bytes
    ok = B.memory_route("gate on flash", bundled, 1.0, 2, predictor_bytes=1000)
    assert ok.fits and ok.gate_bytes == 0
    assert ok.other_bytes + ok.predictor_bytes + ok.row_bytes <= ok.budget_bytes
    assert "does not fit" in B.memory_text([low, ok], {"gate on flash": 30.0})


def test_reads_by_budget_skip_budgets_too_small_and_read_less_with_more_dram(models):
    sw, _, stores, ids = models
    t = B.SparsityExplorer(sw, stores, ids[:200], ids[200:265], window=2, context=64).thresholds("gate", 0.5)
    sets = B.route_sets(sw, ids[:40], thresholds=t)
    assert len(sets) == 40 and len(sets[0]) == 2
    store = stores["gate-apart"]
    least = min_budget(store.memory_shape(), 2)
    curve = B.reads_by_budget("gate", sets, store, 2, [0.05, least, 1.0])
    assert curve.budgets == [least, 1.0]  # 5% holds less than the resident tensors
    assert curve.read_share[1] <= curve.read_share[0]


def test_engine_check_against_the_thresholded_reference(models):
    sw, _, stores, ids = models
    t = B.SparsityExplorer(sw, stores, ids[:200], ids[200:265], window=2, context=64).thresholds("scaled-gate", 0.5)
    st = stores["gate-apart"]
    c = B.engine_check("gate in DRAM", st, GateThresholds(st, t), Policy(2, 1.0, in_flight=2), [2, 5, 9], 12,
                       apply_thresholds(load_model(st.path.parent / "sw"), t))
    assert c.same_tokens and c.rounding_only and c.max_logit_diff <= 1e-4 and len(c.tokens) == 12
    assert 0 < c.read_share < 1 and "same as its reference: True" in B.check_text([c])


def test_figures_and_slider(models):
    import plotly.graph_objects as go

    from flashnb.viz import beyond as V
    from flashnb.widgets.beyond import sparsity_widget

    sw, relu, stores, ids = models
    h = B.activation_histogram({"relu": relu, "swiglu": sw}, ids[:40])
    assert isinstance(V.activation_figure(h, {"t": 0.1}), go.Figure)
    ex = B.SparsityExplorer(sw, stores, ids[:200], ids[200:265], window=2, context=64)
    box = sparsity_widget(ex, sparsity=0.5, sparsities=(0.3, 0.5))
    fig, label = box.children[2], box.children[1]
    moved = [s for s in fig.layout.shapes if s.line.color == V.CHOSEN]
    assert len(moved) == 3 and all(s.x0 == 0.5 for s in moved)
    before = label.value
    box.redraw({"new": 0.3})
    assert all(s.x0 == 0.3 for s in fig.layout.shapes if s.line.color == V.CHOSEN) and label.value != before
    routes = [B.memory_route("a", stores["bundled"], 0.95, 2), B.memory_route("b", stores["gate-apart"], 0.5, 2)]
    assert len(V.memory_figure(routes).data) >= 3
    sets = B.route_sets(sw, ids[:20], thresholds=ex.thresholds("gate", 0.5))
    curve = B.reads_by_budget("gate", sets, stores["gate-apart"], 2, [0.95, 1.0])
    assert curve.budgets == [0.95, 1.0]
    assert V.budget_figure([curve], 0.95).data[0].x == tuple(curve.budgets)


def test_card_and_related_text_quote_their_sources():
    card = {"heldout": {"tokens": 100}, "sweep": [
        {"criterion": "gate", "sparsity": 0.5, "perplexity_increase": 0.017, "top1_agreement": 0.9}],
        "predictors": {"quality": {"perplexity_increase": 0.01, "top1_agreement": 0.91}, "heldout_recall": 0.7,
                       "heldout_over_selection": 1.1}}
    text = B.card_text(card, 0.5)
    assert "+1.70%" in text and "90.0%" in text and "91.0%" in text
    with pytest.raises(Exception, match="not 0.3"):
        B.card_text(card, 0.3)
    related = {"cats": {"models": "M", "criterion": "c", "ffn_sparsity": 0.5, "quality": "q", "speedup": "s"},
               "teal": {"models": "M2", "criterion": "c2", "quality": "q2", "speedup": "s2"}}
    out = B.related_text(related, "ours")
    assert "CATS (theirs)" in out and "TEAL (theirs)" in out and "flashnb (ours, measured here): ours" in out
