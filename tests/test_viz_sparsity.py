"""Notebook 02's figures (flashnb.viz.sparsity) and threshold widget (flashnb.widgets.sparsity), on a tiny
model (no files needed)."""

import numpy as np
import pytest
from sparsity_helpers import tiny

from flashnb.lab.sparsity import ThresholdExplorer
from flashnb.training import tracestats as ts
from flashnb.training.predictors import PredictorTrainConfig, train_predictors
from flashnb.training.quality import Selection
from flashnb.training.traces import record
from flashnb.viz import sparsity as vs
from flashnb.widgets.sparsity import threshold_widget


@pytest.fixture(scope="module")
def setup():
    m = tiny()
    ids = np.random.default_rng(5).integers(0, 50, 129)
    tr = record(m, ids[:-1], context=32)
    preds = train_predictors(m, tr, PredictorTrainConfig(rank=4, epochs=2, batch_size=64), progress=False)
    return m, ids, tr, preds


def test_static_figures(setup):
    m, ids, tr, _ = setup
    summary = ts.summarize(tr, k_max=4)
    fig = vs.sparsity_figure(summary.sparsity, tr.n_tokens)
    assert list(fig.data[0].y) == pytest.approx(list(summary.sparsity))
    hm = vs.activity_heatmap(tr.mask(0), tokens=16, neurons=10, labels=[str(i) for i in tr.ids], layer=0)
    assert np.asarray(hm.data[0].z).shape == (10, 16)
    assert np.asarray(hm.data[0].z).sum() == tr.mask(0)[:16][:, np.argsort(-tr.mask(0).sum(0), kind="stable")[:10]].sum()
    rf = vs.reuse_figure(summary.reuse, summary.s_agg)
    assert len(rf.data) == tr.n_layers + 2
    sel = [Selection.of(tr.mask(i), tr.mask(i)) for i in range(tr.n_layers)]
    sf = vs.selection_figure(sel)
    assert list(sf.data[0].y) == [1.0, 1.0]  # recall of the exact selection
    friends = ts.friend_experiment(tr, neuron_bytes=128)
    ff = vs.friend_figure(friends)
    assert list(ff.data[0].y) == pytest.approx([r.bytes_ratio for r in friends])


def test_threshold_explorer_redraws(setup):
    m, ids, tr, preds = setup
    ex = ThresholdExplorer(m, preds, tr, ids, context=32)
    low, high = ex.measure(0.1), ex.measure(0.9)
    assert low.mean.recall >= high.mean.recall
    assert low.mean.over_selection >= high.mean.over_selection
    assert low.quality.tokens == 128
    curve = ex.curve([0.2, 0.5, 0.8])
    assert curve.recall == sorted(curve.recall, reverse=True)
    assert len(vs.tradeoff_figure(curve, 0.5).data) == 3
    box = threshold_widget(ex, 0.5)
    slider, label, fig = box.children
    bars = {t.meta: t for t in fig.data if t.meta}
    assert sorted(bars) == ["false_positive_rate", "over_selection", "precision", "recall"]
    before = list(bars["over_selection"].y)
    slider.value = 0.1  # the observer redraws
    assert list(bars["over_selection"].y) == pytest.approx([s.over_selection for s in ex.selection(0.1)])
    assert list(bars["precision"].y) == pytest.approx([s.precision for s in ex.selection(0.1)])
    assert list(bars["over_selection"].y) != before and "threshold 0.1 " in label.value   # as the slider writes it
    assert ("0.999", 0.999) in slider.options and ex.measure(0.1).missed_mass <= ex.measure(0.999).missed_mass
    missed = ex.missed_mass(0.9)   # the neurons it misses carry that share of each layer's FFN output
    assert all(0 <= x <= 1 for x in missed) and ex.missed_mass(1e-9) == [0.0] * tr.n_layers

