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
    "sparsity.tradeoff_figure", "sparsity.friend_figure", "engine.window_figure", "engine.timeline_figure",
    "engine.window_animation_figure", "engine.memory_figure", "engine.byte_layout_figure", "engine.swap_figure",
    "engine.layout_figure", "engine.placement_figure", "engine.dtype_figure", "beyond.activation_figure", "beyond.sparsity_figure",
    "beyond.memory_figure", "beyond.budget_figure", "tour.data_moved_figure", "tour.time_breakdown_figure", "tour.breakdown_figure",
    "tour.ladder_figure", "tour.budget_figure", "tour.costs_figure", "tour.waterfall_figure", "tour.split_figure",
    "tour.sweep_figure",
}



def window_grid():
    """A WindowGrid of two budgets and windows 0..3: the share read halves with the window, and at the larger
    budget it reads a third less."""
    from flashnb.lab.windowing import WindowGrid, WindowRow

    def rows(scale):
        return tuple(WindowRow(w, scale / (w + 1), 10.0, 20.0, 0.5, 30, (1.0, 0.5 / (w + 1)), scale * 0.1 / (w + 1),
                               0.2) for w in range(4))
    return WindowGrid((0.5, 0.8), (rows(1.0), rows(0.66)))


def timeline():
    """A WindowTimeline of 3 neurons over 4 tokens, every state present."""
    import numpy as np

    from flashnb.lab.windowing import WindowTimeline

    states = np.array([[3, 2, 2, 4], [0, 3, 1, 2], [3, 1, 4, 0]], dtype=np.int8)
    return WindowTimeline(0, 2, 0.5, 10, (5, 9, 12), states)


def byte_slices():
    """Two layouts' first 8 rows of one layer: neurons 1, 2 and 6 needed."""
    from flashnb.lab.bundling import RegionSlice

    return [RegionSlice("bundled", "bundles", 8, 2048, (1, 2, 6), ((2048, 4096), (12288, 2048))),
            RegionSlice("unbundled", "fc1", 8, 1024, (1, 2, 6), ((1024, 2048), (6144, 1024))),
            RegionSlice("unbundled", "fc2", 8, 1024, (1, 2, 6), ((1024, 2048), (6144, 1024)))]


PAPER_WINDOW = {"window": 5, "ffn_loaded_predictor": 0.10, "ffn_loaded_window": 0.024, "window_reuse": 0.78,
                "window_cached_fraction": 0.24}


def style_figures() -> dict:
    """name -> go.Figure for every figure of flashnb.viz.flash, .sparsity, .engine and .beyond."""
    from flashnb.core.records import LayerStep, TokenStep
    from flashnb.device.profile import Profile
    from flashnb.lab.bundling import layout_summary
    from flashnb.lab.flash import LayoutRun
    from flashnb.lab.memory import MemoryTiming, swap_with_last_steps
    from flashnb.lab.sparsity import ThresholdCurve
    from flashnb.training import tracestats as ts
    from flashnb.training.quality import Selection
    from flashnb.training.traces import record
    from flashnb.viz import engine as ve
    from flashnb.viz import flash as vf
    from flashnb.viz import sparsity as vs

    profile = Profile(synthetic_profile())
    model = tiny()
    trace = record(model, np.random.default_rng(1).integers(0, 50, 64), context=32, inputs=False)
    summary = ts.summarize(trace, k_max=4)
    sel = [Selection.of(trace.mask(i), trace.mask(i)) for i in range(trace.n_layers)]
    layouts = [LayoutRun(lay, 2, 10, 4, 8192, r, 10 * 8192 * 2, 10 * 8192 * 2, 0.0, True,
                         (8192 * 10 / g / 1e9 * 0.8, 8192 * 10 / g / 1e9 * 1.2))
               for lay, g, r in (("bundled", 0.2, 40), ("unbundled", 0.1, 80))]
    steps = {lay: [TokenStep(0, [LayerStep(1, 0, 1, 0, 4096, 4096, r, wait_s=1e-3)], 2e-3)]
             for lay, r in (("bundled", 2), ("unbundled", 4))}
    return {
        "flash.throughput": vf.throughput_figure(profile),
        "flash.table2": vf.table2_figure(profile),
        "flash.bundling": vf.bundling_figure(profile),
        "flash.layouts": vf.layouts_figure(layouts),
        "sparsity.sparsity": vs.sparsity_figure(summary.sparsity, trace.n_tokens),
        "sparsity.activity": vs.activity_heatmap(trace.mask(0), tokens=16, neurons=8, layer=0),
        "sparsity.reuse": vs.reuse_figure(summary.reuse, summary.s_agg),
        "sparsity.selection": vs.selection_figure(sel),
        "sparsity.tradeoff": vs.tradeoff_figure(ThresholdCurve([0.3, 0.5], [0.99, 0.9], [2.0, 1.2]), 0.5),
        "sparsity.friends": vs.friend_figure(ts.friend_experiment(trace, neuron_bytes=128)),
        "engine.window": ve.window_figure(window_grid(), 2, 0.5, PAPER_WINDOW),
        "engine.timeline": ve.timeline_figure(timeline(), n_prompt=2),
        "engine.window_animation": ve.window_animation_figure(timeline(), ["</s>", "a", " b", " c"], n_prompt=2),
        "engine.byte_layout": ve.byte_layout_figure(byte_slices()),
        "engine.swap": ve.swap_figure(swap_with_last_steps()),
        "engine.memory": ve.memory_figure([MemoryTiming(1, 1e-5, 3e-5), MemoryTiming(4, 2e-5, 9e-5)]),
        "engine.layout": ve.layout_figure(layout_summary(steps)),
        "engine.placement": ve.placement_figure([np.array([1, 5]), np.array([2, 5, 6])], 8,
                                                np.array([7, 0, 1, 2, 3, 4, 5, 6])),
        "engine.dtype": ve.dtype_figure(*dtype_results()),
        **beyond_figures(),
    }


def dtype_results() -> tuple[dict, dict]:
    """Notebook 04's row formats from made-up numbers: (format -> LayoutStats, format -> QuantQuality)."""
    from flashnb.lab.bundling import LayoutStats, QuantQuality

    stats = {dt: LayoutStats("bundled", r, mb * 1e6 / r, mb, io, mb / io, (io * 0.9, io, io * 1.1))
             for dt, r, mb, io in (("fp16", 430, 1.4, 8.6), ("int8", 300, 0.85, 5.4), ("q4", 220, 0.5, 3.6))}
    quality = {dt: QuantQuality(dt, bits, nb, ("fc1", "fc2"), code, 2048, ppl, 96.5, top1)
               for dt, bits, nb, code, ppl, top1 in (("fp16", 16, 2048, 1024, 96.5, 1.0),
                                                     ("int8", 8.5, 1088, 512, 96.5, 0.999),
                                                     ("q4", 4.5, 576, 256, 96.56, 0.98))}
    return stats, quality


def beyond_figures() -> dict:
    """Notebook 08's figures from made-up numbers shaped like flashnb.lab.beyond_relu's results."""
    from flashnb.lab.beyond_relu import ActivationHistogram, BudgetReads, MemoryRoute, SparsityPoint
    from flashnb.training.quality import Quality
    from flashnb.viz import beyond as vb

    edges = np.linspace(-3, 1, 9)
    h = ActivationHistogram(edges, {"ReLU model": np.full(8, 0.005), "SwiGLU model": np.full(8, 0.125)},
                            {"ReLU model": 0.96, "SwiGLU model": 0.0}, 64)
    curves = {c: [SparsityPoint(c, s, s, Quality(100, 4.0, 4.0 + s / 20, 1 - s / 5), s / 10, 4) for s in (0.3, 0.5)]
              for c in ("gate", "scaled-gate", "product")}
    routes = [MemoryRoute("ReLU model, predictors", 100, 50, 30, 0, 5, 15, 100, 0.4),
              MemoryRoute("SwiGLU, gate in DRAM", 100, 50, 36, 21, 0, 0, 0, 0.574)]
    reads = [BudgetReads("ReLU model, predictors", 4, [0.45, 0.5, 1.0], [0.06, 0.05, 0.02]),
             BudgetReads("SwiGLU, gate in DRAM", 4, [0.6, 1.0], [0.34, 0.02])]
    return {"beyond.activation": vb.activation_figure(h, {"threshold": 0.25}),
            "beyond.sparsity": vb.sparsity_figure(curves, 0.5),
            "beyond.memory": vb.memory_figure(routes),
            "beyond.budget": vb.budget_figure(reads, 0.5)}


def tour_figures() -> dict:
    """name -> go.Figure for every figure of flashnb.viz.tour, from numbers shaped like the real ones
    (TokenSteps, a bench result, `table2_beside` rows, a BudgetSweep, Runs) but made up here."""
    from flashnb.bench.report import LABELS, BenchResult, ConfigResult
    from flashnb.core.records import LayerStep, TokenStep
    from flashnb.lab.byo import Run
    from flashnb.lab.end_to_end import BudgetPoint, BudgetSweep, LadderRow
    from flashnb.lab.stats import TokenStats
    from flashnb.viz import tour as vt

    steps = [TokenStep(i, [LayerStep(50, 30 + i, 20 - i, 10, int(2e5 * (i + 1)), int(2e5 * (i + 1)), 10,
                                     window_s=2e-4, memory_s=3e-4, submit_s=1e-3, wait_s=1e-3)], wall_seconds=4.5e-3)
             for i in range(5)]
    configs = ("naive", "hybrid", "predictor", "windowing", "all", "mmap")
    results = {}
    for i, n in enumerate(configs):
        split = n != "mmap"   # mmap streaming cannot split its latency: one unsplit bar
        st = [TokenStep(0, [LayerStep(1, 0, 1, 0, 4096, 4096, 2, submit_s=0.02 / (i + 1), wait_s=0.02 / (i + 1),
                                      memory_s=1e-3)] if split else [], wall_seconds=0.046 / (i + 1))]
        results[n] = ConfigResult(n, LABELS[n], TokenStats.of(st, 100, split), "", 1.0, None, None,
                                  38.0 / (i + 1) if split else None)
    bench = BenchResult("today", {}, "m", 1, 1, {}, "synthetic", {}, results)
    paper_ms = (2196, 1090, 738, 164, 87)
    ladder = [LadderRow(n, LABELS[n], 1.0, p, paper_ms[0] / p, 1.0, 1.0, 1.0 + i, 1.0,
                        None if n == "hybrid" else 1.2 + i)
              for i, (n, p) in enumerate(zip(configs[:5], paper_ms))]

    def points(budgets, scale: float, spread: float | None = None) -> list:
        total = [scale * (1 - b) + 2.5 for b in budgets]
        return [BudgetPoint(b, int(b * 1e8), 10 * (1 - b), scale * (1 - b), t, 0.5,
                            *((t - spread, t + 2 * spread) if spread else (None, None)), 6 / b)
                for b, t in zip(budgets, total)]

    grid = (0.4, 0.55, 0.7, 0.85, 1.0)
    sweep = BudgetSweep(measured={"all": points((0.55, 1.0), 9.0, 1.0), "hybrid": points((0.55, 1.0), 30.0, 3.0)},
                        modeled={"all": points(grid, 10.0), "hybrid": points(grid, 32.0)},
                        model_bytes=int(1e8), window=4, tokens=8)
    runs = [Run("dense in DRAM", [], None, TokenStats.of([TokenStep(0, [], 3e-3)], 1), int(1e8)),
            Run("flash, learned", [], None, TokenStats.of(steps, 100), int(5.5e7))]
    from flashnb.core.pinning import PinningChoice

    def token(wall: float, **phases) -> TokenStep:
        return TokenStep(0, [LayerStep(9, 4, 5, 5, 8192, 8192, 5, **phases)], wall_seconds=wall)

    sparse = {"all": token(0.012, predict_s=1e-3, window_s=5e-4, memory_s=4e-4, submit_s=2e-3, wait_s=3e-3,
                           ffn_s=2e-3),
              "floor": TokenStep(0, [LayerStep(9, 9, 0, 0, 0, 0, 0, predict_s=1e-3, ffn_s=1.5e-3)], wall_seconds=5e-3),
              "reads": token(0.004, wait_s=4e-3)}
    floor_bench = BenchResult("today", {}, "m", 1, 1, {}, "synthetic", {},
                              {n: ConfigResult(n, LABELS[n], TokenStats.of([t], 100), "", 1.0, None, None, None)
                               for n, t in sparse.items()})
    choices = {b: PinningChoice([0, 10, 20], [40 * b, 40 * b - 10, 40 * b - 20], [3e5 * b, 2.5e5 * b, 2e5 * b],
                                [9, 8, 7], [6, 6, 6], [3.0 * b, 2.5 * b, 2.2 * b], "modeled I/O ms per token", 20)
               for b in (0.7, 0.9)}
    from flashnb.bench.scale import SweepPoint

    sweep_points = [SweepPoint(n, int(b), 30.0, 30.0 / r, 20.0, r, r * 0.6, r * 1.1)
                    for n, b, r in (("shipped", 4e7, 2.2), ("125m", 2.5e8, 4.6), ("6.7b", 1.34e10, 9.0))]
    return {
        "tour.sweep": vt.sweep_figure(sweep_points, 4.8),
        "tour.waterfall": vt.waterfall_figure(floor_bench, ("all",)),
        "tour.split": vt.split_figure(choices, 0.25),
        "tour.data_moved": vt.data_moved_figure(steps, int(5e6), [f"token {i}" for i in range(len(steps))]),
        "tour.time_breakdown": vt.time_breakdown_figure(steps),
        "tour.breakdown": vt.breakdown_figure(bench),
        "tour.ladder": vt.ladder_figure(ladder),
        "tour.budget": vt.budget_figure(sweep, 0.7),
        "tour.costs": vt.costs_figure(runs, int(1e8)),
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
