"""Every figure of flashnb.viz built from small synthetic inputs (no disk, no engine run): the ones of
flashnb.viz.flash / .sparsity / .engine (`style_figures`, checked for the visual language by
tests/test_viz_style.py) and those of flashnb.viz.tour (`tour_figures`); tests/test_viz_browser.py draws
them all in Chromium."""

from __future__ import annotations

import numpy as np
from flash_helpers import synthetic_profile
from sparsity_helpers import tiny

# The functions of flashnb.viz that return a figure, each built below (tests/test_viz_style.py checks that
# this is all of them, so that a new figure is drawn in the browser test too).
FIGURE_FUNCTIONS = {
    "flash.throughput_figure", "flash.table2_figure", "flash.bundling_figure", "flash.layouts_figure",
    "sparsity.sparsity_figure", "sparsity.activity_heatmap", "sparsity.reuse_figure", "sparsity.selection_figure",
    "sparsity.tradeoff_figure", "sparsity.friend_figure", "engine.window_figure", "engine.memory_figure",
    "engine.layout_figure", "tour.data_moved_figure", "tour.time_breakdown_figure", "tour.breakdown_figure",
    "tour.ladder_figure", "tour.budget_figure", "tour.costs_figure",
}

WINDOW_ROWS = [{"window": w, "mb_per_token": 1.0 / (w + 1), "neurons_read": 10.0, "predicted": 20.0,
                "hit_share": 0.5, "capacity_rows": 30, "per_token_mb": [1.0, 0.5 / (w + 1)]} for w in range(4)]


def style_figures() -> dict:
    """name -> go.Figure for every figure of flashnb.viz.flash, .sparsity and .engine."""
    from flashnb import tracestats as ts
    from flashnb.predictor import Selection
    from flashnb.profile import Profile
    from flashnb.traces import record
    from flashnb.viz import engine as ve
    from flashnb.viz import flash as vf
    from flashnb.viz import sparsity as vs

    profile = Profile(synthetic_profile())
    model = tiny()
    trace = record(model, np.random.default_rng(1).integers(0, 50, 64), context=32, inputs=False)
    summary = ts.summarize(trace, k_max=4)
    sel = [Selection.of(trace.mask(i), trace.mask(i)) for i in range(trace.n_layers)]
    layouts = [{"layout": lay, "useful_GBps": g, "requests": r, "calls": 2, "ms_per_call": 3.0,
                "neurons_per_call": 10, "neuron_bytes": 8192, "threads": 4, "direct": True}
               for lay, g, r in (("bundled", 0.2, 20), ("unbundled", 0.1, 40))]
    steps = {lay: [{"requests": r, "bytes_read": 4096, "io_seconds": 1e-3}] for lay, r in (("bundled", 2),
                                                                                      ("unbundled", 4))}
    return {
        "flash.throughput": vf.throughput_figure(profile),
        "flash.table2": vf.table2_figure(profile),
        "flash.bundling": vf.bundling_figure(profile),
        "flash.layouts": vf.layouts_figure(layouts),
        "sparsity.sparsity": vs.sparsity_figure(summary.sparsity, trace.n_tokens),
        "sparsity.activity": vs.activity_heatmap(trace.mask(0), tokens=16, neurons=8, layer=0),
        "sparsity.reuse": vs.reuse_figure(summary.reuse, summary.s_agg),
        "sparsity.selection": vs.selection_figure(sel),
        "sparsity.tradeoff": vs.tradeoff_figure({"thresholds": [0.3, 0.5], "recall": [0.99, 0.9],
                                                 "over_selection": [2.0, 1.2]}, 0.5),
        "sparsity.friends": vs.friend_figure(ts.friend_experiment(trace, neuron_bytes=128)),
        "engine.window": ve.window_figure(WINDOW_ROWS, 2),
        "engine.memory": ve.memory_figure({1: {"preallocated": 1e-5, "naive": 3e-5},
                                           4: {"preallocated": 2e-5, "naive": 9e-5}}),
        "engine.layout": ve.layout_figure(ve.layout_summary(steps)),
    }


def tour_figures() -> dict:
    """name -> go.Figure for every figure of flashnb.viz.tour, from numbers shaped like the real ones
    (TokenStep.totals() dicts, a `run_bench` result, `table2_beside` rows, a BudgetSweep, `costs_table`
    rows) but made up here."""
    from flashnb.bench import LABELS
    from flashnb.tour import BudgetSweep
    from flashnb.viz import tour as vt

    steps = [{"bytes_read": 2e5 * (i + 1), "cached": 30 + i, "read": 20 - i, "predicted": 50,
              "io_seconds": 2e-3, "mm_seconds": 5e-4, "compute_seconds": 1e-3} for i in range(5)]
    configs = ("naive", "hybrid", "predictor", "windowing", "all", "mmap")
    results = {}
    for i, n in enumerate(configs):
        split = n != "mmap"   # mmap streaming cannot split its latency: one unsplit bar
        ms = {"io_ms": 40.0 / (i + 1) if split else None, "mm_ms": 1.0 if split else None,
              "compute_ms": 5.0 if split else None}
        results[n] = {**ms, "total_ms": 46.0 / (i + 1), "label": LABELS[n],
                      "modeled": {"io_ms": 38.0 / (i + 1), "mm_ms": 0.8, "compute_ms": 5.5}}
    paper_ms = (2196, 1090, 738, 164, 87)
    ladder = [{"name": n, "label": LABELS[n], "paper_io_vs_naive": paper_ms[0] / p, "io_vs_naive": 1.0 + i,
               "modeled_io_vs_naive": None if n == "hybrid" else 1.2 + i}
              for i, (n, p) in enumerate(zip(configs[:5], paper_ms))]

    def budget_rows(name: str, budgets, scale: float) -> list[dict]:
        return [{"budget": b, "dram_bytes": int(b * 1e8), "io_ms": scale * (1 - b), "mm_ms": 0.5, "compute_ms": 2.0,
                 "total_ms": scale * (1 - b) + 2.5, "mb_per_token": 10 * (1 - b)} for b in budgets]

    grid = (0.4, 0.55, 0.7, 0.85, 1.0)
    sweep = BudgetSweep(measured={"all": budget_rows("all", (0.55, 1.0), 9.0),
                                  "hybrid": budget_rows("hybrid", (0.55, 1.0), 30.0)},
                        modeled={"all": budget_rows("all", grid, 10.0), "hybrid": budget_rows("hybrid", grid, 32.0)},
                        model_bytes=int(1e8), window=4, tokens=8, device="synthetic")
    costs = [{"name": "dense in DRAM", "io_ms": 0.0, "mm_ms": 0.0, "compute_ms": 3.0, "dram_mb": 100.0},
             {"name": "flash, learned", "io_ms": 4.0, "mm_ms": 0.5, "compute_ms": 2.5, "dram_mb": 55.0}]
    return {
        "tour.data_moved": vt.data_moved_figure(steps, int(5e6), [f"token {i}" for i in range(len(steps))]),
        "tour.time_breakdown": vt.time_breakdown_figure(steps),
        "tour.breakdown": vt.breakdown_figure({"results": results}),
        "tour.ladder": vt.ladder_figure(ladder),
        "tour.budget": vt.budget_figure(sweep, 0.7),
        "tour.costs": vt.costs_figure(costs, int(1e8)),
    }


def bar_series(fig, name_start: str) -> dict:
    """The bars of one series, put back together from the traces `style.bars` splits it into (one per
    colour, all named alike): {x: (y, fill colour or, for outlined paper bars, outline colour)}."""
    out = {}
    for t in fig.data:
        if t.type == "bar" and (t.name or "").startswith(name_start):
            c = t.marker.color if t.marker.color != "rgba(0,0,0,0)" else t.marker.line.color
            assert isinstance(c, str), f"{t.name}: one colour per trace, got {c!r}"
            out.update({x: (y, c) for x, y in zip(t.x, t.y)})
    assert out, f"no bars named {name_start!r}"
    return out
