"""The tour notebooks' figures and widgets (flashnb.viz.tour, flashnb.widgets.tour), built from a small
real bench run, engine run and budget sweep on a tiny random OPT with predictors trained here."""

from __future__ import annotations

import json

import pytest

from flashnb import FlashnbError
from flashnb.bench.report import LABELS
from flashnb.bench.run import BenchConfig, run_bench
from flashnb.core.convert import ConvertConfig, convert
from flashnb.core.engine import FlashEngine, Policy
from flashnb.core.predictor import OraclePredictor
from flashnb.core.store import FlashStore
from flashnb.device.profile import Profile, coalescing_gap
from flashnb.lab import byo, end_to_end, quickstart
from flashnb.models.tiny import TEXTS, make_tiny_opt
from flashnb.models.tokenizer import Tokenizer
from flashnb.viz import style as S
from flashnb.viz import tour as V
from flashnb.widgets import tour as W

from flash_helpers import synthetic_profile
from viz_helpers import bar_series

CONFIGS = ("naive", "hybrid", "predictor", "windowing", "all", "mmap")  # accelerate: tests/test_bench.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny OPT whose FFN is most of its bytes (so 60% of memory leaves room for neuron caches), quick
    predictors, a synthetic device profile, a bench run, an engine run and a budget sweep."""
    root = tmp_path_factory.mktemp("tour")
    folder = make_tiny_opt(root / "hf", backend="flashnb", ffn_dim=512, max_position_embeddings=128)
    tok = Tokenizer.from_folder(folder, bos_id=2)
    ids = tok.encode(" ".join(TEXTS))
    preds = byo.quick_predictors(folder, ids, rank=8, epochs=2).predictors
    preds.save(root / "preds")
    (root / "profile.json").write_text(json.dumps(synthetic_profile()))
    profile = Profile.load(root / "profile.json")
    result = run_bench(BenchConfig(model=str(folder), predictors=str(root / "preds"), prompt="Open the", tokens=3,
                                   memory=0.6, in_flight=2, dir=str(root), profile=str(root / "profile.json"),
                                   configs=CONFIGS,
                                   progress=False))
    store = FlashStore.open(convert(folder, root / "store", ConvertConfig(progress=False)))
    prompt = tok.encode("Open the file")
    with FlashEngine(store, preds, Policy(2, 0.6, 2, coalescing_gap(profile, 2))) as eng:
        out = list(eng.generate(prompt, 6))
    steps = eng.steps[len(prompt):]
    sweep = end_to_end.budget_sweep(store, preds, prompt, profile, measured=(0.6, 1.0), modeled=5, tokens=3,
                                    window=2, in_flight=2)
    return dict(folder=folder, store=store, preds=preds, profile=profile, result=result,
                steps=steps, out=out, sweep=sweep, prompt=prompt, tok=tok)


def _axis_titles(fig) -> list[str]:
    """Every axis title of `fig` (all subplots)."""
    lay = fig.layout
    return [lay[k].title.text for k in lay.to_plotly_json() if k.startswith(("xaxis", "yaxis")) and lay[k].title.text]


def test_data_moved_figure_shows_bytes_and_hits_per_token(setup):
    steps, store = setup["steps"], setup["store"]
    fig = V.data_moved_figure(steps, quickstart.ffn_bytes(store), ["a"] * len(steps))
    mb, ffn_line, hits, reads = fig.data
    assert list(mb.y) == [s.bytes_read / 1e6 for s in steps]
    assert list(ffn_line.y) == [quickstart.ffn_bytes(store) / 1e6] * 2
    assert [h + r for h, r in zip(hits.y, reads.y)] == [s.predicted for s in steps]   # cached + read = chosen
    assert mb.marker.color == S.color("all") and hits.marker.color == S.color("windowing")
    assert reads.marker.color == S.color("io") and ffn_line.line.color == S.color("naive")
    assert all("(measured" in t.name for t in fig.data)
    assert mb.name == "read from flash: predictors, window and bundles (measured)"   # what the bars are
    titles = _axis_titles(fig)
    assert "read from flash (MB)" in titles and "neurons, all layers (count)" in titles
    assert fig.layout.barmode == "stack"


def test_time_breakdown_figure_stacks_the_three_components(setup):
    steps = setup["steps"]
    fig = V.time_breakdown_figure(steps)
    assert [t.name for t in fig.data] == ["I/O (measured)", "memory management (measured)", "compute (measured)"]
    assert [t.marker.color for t in fig.data] == [S.color("io"), S.color("mm"), S.color("compute")]
    total = [sum(t.y[i] for t in fig.data) for i in range(len(steps))]
    assert total == pytest.approx([s.wall_seconds * 1e3 for s in steps])
    assert fig.layout.yaxis.title.text == "time per token (ms)"


def test_breakdown_figure_puts_modeled_io_beside_measured(setup):
    result = setup["result"]
    fig = V.breakdown_figure(result)
    names = [t.name for t in fig.data]
    assert names == ["I/O (measured)", "memory management (measured)", "compute (measured)", "I/O (modeled)",
                     "mmap streaming: total, not split (measured)"]
    io_measured, io_modeled = fig.data[0], fig.data[3]
    res = result.results
    slots = [(n, s) for n in res for s in ("measured", "modeled") if s == "measured" or res[n].modeled_io_ms]
    assert tuple(io_measured.y[0]) == tuple(LABELS[n] for n, _ in slots) and io_measured.orientation == "h"
    assert [v for v, (_, s) in zip(io_measured.x, slots) if s == "measured"] == [res[n].stats.io_ms for n in res]
    assert all(v is None for v, (_, s) in zip(io_measured.x, slots) if s == "modeled")   # modeled slots empty
    assert [v for v, (_, s) in zip(io_modeled.x, slots) if s == "modeled"] == \
        [res[n].modeled_io_ms for n in res if res[n].modeled_io_ms]
    assert io_modeled.marker.pattern.shape == "/" and not io_measured.marker.pattern.shape
    assert io_measured.marker.color == S.color("io")
    unsplit, mmap = fig.data[-1], slots.index(("mmap", "measured"))
    assert unsplit.x[mmap] == res["mmap"].stats.total_ms and unsplit.marker.color == S.color("mmap")  # legend too
    assert unsplit.x[0] is None                                                  # naive is split
    assert fig.layout.xaxis.title.text == "time per token (ms)"


def test_table2_beside_and_ladder_figure(setup):
    result = setup["result"]
    rows = end_to_end.table2_beside(result)
    assert [r.name for r in rows] == ["naive", "hybrid", "predictor", "windowing", "all"]
    assert [r.paper_io_ms for r in rows] == [2196, 1090, 738, 164, 87]
    assert rows[0].io_vs_naive == pytest.approx(1.0) and rows[0].paper_io_vs_naive == 1.0
    assert rows[4].paper_io_vs_naive == pytest.approx(2196 / 87)
    res = result.results
    assert rows[2].io_vs_naive == pytest.approx(res["naive"].stats.io_ms / res["predictor"].stats.io_ms)
    text = end_to_end.format_table2_beside(rows)
    assert "Table 2" in text and sum(not line.startswith("  ") for line in text.splitlines()) == 2 + 5 + 1  # + note
    fig = V.ladder_figure(rows)
    legend = [t.name for t in fig.data if t.showlegend is not False]        # one trace per colour and series
    assert ["(paper)" in legend[0], "(measured)" in legend[1], "(modeled)" in legend[2]] == [True] * 3
    paper, measured, modeled = (bar_series(fig, name) for name in legend)
    labels = [r.label for r in rows]
    assert [paper[x][0] for x in labels] == [r.paper_io_vs_naive for r in rows]
    techniques = [S.color(n) for n in ("naive", "hybrid", "predictor", "windowing", "all")]
    assert [measured[x][1] for x in labels] == techniques == [paper[x][1] for x in labels]
    assert {t.marker.pattern.shape for t in fig.data if t.name == legend[2]} == {"/"}
    assert [t.offsetgroup for t in fig.data if t.showlegend is not False] == ["paper", "measured", "modeled"]
    assert fig.layout.yaxis.type == "log" and "(x, log scale)" in fig.layout.yaxis.title.text
    t3 = end_to_end.table3_beside(result)
    assert t3.paper_cpu_speedup == pytest.approx(3182 / 669)
    assert t3.speedup == pytest.approx(res["naive"].stats.total_ms / res["all"].stats.total_ms)
    assert "3182 ms" in end_to_end.format_table3_beside(t3)


def test_budget_figure_and_explorer(setup):
    sweep = setup["sweep"]
    assert {0.6, 1.0} <= {p.budget for p in sweep.modeled["all"]}   # the grid runs through the measured budgets
    fig = V.budget_figure(sweep, 0.6)
    legend = [t.name for t in fig.data if t.showlegend is not False]
    assert legend == ["+bundling (all) (modeled)", "+bundling (all) (measured)", "hybrid (modeled)",
                      "hybrid (measured)", "paper: about half of OPT 6.7B in DRAM (paper, Table 2)",
                      "grey line: the chosen budget, set by the slider (modeled)"]
    modeled_all = fig.data[0]
    assert modeled_all.line.dash == "dash" and modeled_all.line.color == S.color("all")
    assert list(modeled_all.x) == [100 * p.budget for p in sweep.modeled["all"]]
    assert list(modeled_all.y) == [p.total_ms for p in sweep.modeled["all"]]
    measured_hybrid = fig.data[6]
    assert measured_hybrid.mode == "markers" and measured_hybrid.marker.color == S.color("hybrid")
    assert list(measured_hybrid.y) == [p.total_ms for p in sweep.measured["hybrid"]]
    # its error bars span its tokens' p10-p90
    bars = measured_hybrid.error_y
    assert [t + up for t, up in zip(measured_hybrid.y, bars.array)] == pytest.approx(
        [p.p90_ms for p in sweep.measured["hybrid"]])
    assert [t - down for t, down in zip(measured_hybrid.y, bars.arrayminus)] == pytest.approx(
        [p.p10_ms for p in sweep.measured["hybrid"]])
    assert "ms per token (tokens' p10-p90 %{customdata[0]:.1f}-%{customdata[1]:.1f} ms)" in measured_hybrid.hovertemplate
    assert [list(c) for c in measured_hybrid.customdata] == [[p.p10_ms, p.p90_ms] for p in sweep.measured["hybrid"]]
    titles = _axis_titles(fig)
    assert "DRAM budget (% of the model's bytes)" in titles and "time per token (ms)" in titles
    chosen = [s for s in fig.layout.shapes if s.name == "chosen budget"]
    assert [s.x0 for s in chosen] == [60.0, 60.0]

    box, slider, widget = W.budget_explorer(sweep, budget=0.61)
    assert slider.value == 0.6                                         # nearest modeled budget
    slider.value = 1.0
    assert [s.x0 for s in widget.layout.shapes if s.name == "chosen budget"] == [100.0, 100.0]
    assert "DRAM budget 100% of the model" in box.children[1].value
    for label, budget in slider.options:                               # the slider and its text agree
        slider.value = budget
        assert f"DRAM budget {label} of the model" in box.children[1].value


def test_split_explorer_moves_along_the_simulated_splits():
    from flashnb.core.pinning import PinningChoice
    from flashnb.lab.pinning import SplitSweep
    from flashnb.lab.stats import TokenStats
    from flashnb.core.records import LayerStep, TokenStep

    choices = {b: PinningChoice([0, 100, 200], [400, 300, 200], [4e5, 3e5, 2.5e5], [40, 30, 25], [6, 6, 6],
                                [4.0, 3.0, 2.6], "modeled I/O ms per token", 200) for b in (0.7, 0.9)}
    stats = {k: TokenStats.of([TokenStep(0, [LayerStep(9, 4, 5, 5, n, n, 5, wait_s=1e-3)], wall_seconds=5e-3)], 100)
             for k, n in (("unpinned", 400000), ("pinned", 250000))}
    sweep = SplitSweep(choices, 4, 0.9, stats, 8)
    box, slider, widget = W.split_explorer(sweep)
    assert slider.value == 0.0 and [s.x0 for s in widget.layout.shapes if s.name == "chosen share"] == [0.0, 0.0]
    assert "<br>Budget 70%: 0 pinned + 400 window rows" in box.children[1].value   # a line per budget
    slider.value = 0.5
    assert [s.x0 for s in widget.layout.shapes if s.name == "chosen share"] == [50.0, 50.0]
    assert "<br>Budget 90%: 200 pinned + 200 window rows per layer read 0.250 MB" in box.children[1].value
    assert "add at most 1% reader calls" in box.children[1].value                 # the rule that chose
    assert "the chosen split 0.250 MB" in box.children[1].value      # the engine's confirmation, measured


def test_costs_figure_from_dense_and_flash_runs(setup):
    store, prompt, folder = setup["store"], setup["prompt"], setup["folder"]
    dense = byo.dense_run(folder, prompt, 4)
    flash = byo.flash_run(store, OraclePredictor(store.load_model()), Policy(2, 0.5, in_flight=2), prompt, 4,
                          name="flash, oracle")
    fig = V.costs_figure([dense, flash], dense.dram_bytes)
    assert [t.name for t in fig.data] == [
        "I/O (measured)", "memory management (measured)", "compute (measured)",
        "DRAM held: the whole model (measured: bytes held)",
        "DRAM held: weights, predictors and maps (measured: bytes held)"]   # one legend entry per colour
    whole = [s for s in fig.layout.shapes if s.yref == "y2"]                        # a line across the panel
    assert [s.y0 for s in whole] == [dense.dram_bytes / 1e6] and "whole model" in fig.layout.annotations[-1].text
    assert [list(t.y) for t in fig.data[3:]] == [[dense.dram_bytes / 1e6], [flash.dram_bytes / 1e6]]
    assert [t.marker.color for t in fig.data[3:]] == [S.color("dense"), S.color("all")]
    assert fig.data[0].y[0] == 0.0 and fig.data[2].y[0] == dense.stats.total_ms   # dense: all compute
    assert "DRAM (MB)" in _axis_titles(fig)


def test_model_folder_box_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv(byo.ENV_BYO_MODEL, "/models/opt-1.3b")
    assert W.model_folder_box().value == "/models/opt-1.3b"
    assert W.model_folder_box("/elsewhere").value == "/elsewhere"
    monkeypatch.delenv(byo.ENV_BYO_MODEL)
    assert W.model_folder_box().value == ""


def test_budget_sweep_measures_and_models_every_budget(setup):
    sweep, store, preds = setup["sweep"], setup["store"], setup["preds"]
    assert [p.budget for p in sweep.measured["all"]] == [0.6, 1.0]
    assert all(p.dram_bytes <= p.budget * sweep.model_bytes for p in sweep.measured["all"])
    # the modeled 'all' reads come from simulate: at a measured budget they equal the run's bytes
    mod = {p.budget: p for p in sweep.modeled["all"]}
    assert mod[0.6].mb_per_token == pytest.approx(sweep.measured["all"][0].mb_per_token)
    assert mod[1.0].mb_per_token <= mod[0.6].mb_per_token          # more DRAM never reads more
    # the modeled hybrid prices the requests its reader makes: at a measured budget, the run's bytes and calls
    hyb, ran = {p.budget: p for p in sweep.modeled["hybrid"]}[0.6], sweep.measured["hybrid"][0]
    assert hyb.mb_per_token == pytest.approx(ran.mb_per_token) and hyb.reader_calls == ran.reader_calls
    # the modeled stops: the smallest feasible budget, then whole percents (what the slider shows)
    lowest = min(mod)
    assert all(round(b * 100, 6) == round(b * 100) for b in mod if b != lowest)
    # measured points carry their tokens' spread, which the slider's text gives
    for p in sweep.measured["all"] + sweep.measured["hybrid"]:
        assert p.p10_ms <= p.p90_ms
    m = sweep.measured["all"][0]
    assert f"p10-p90 {m.p10_ms:.1f}-{m.p90_ms:.1f}" in end_to_end.budget_text(sweep, 0.6)
    # the modeled reads' calls, which rise where a token's neurons no longer fit a layer's rows
    assert f"in {mod[0.6].reader_calls:.0f} reader calls" in end_to_end.budget_text(sweep, 0.6)
    assert mod[lowest].reader_calls >= mod[1.0].reader_calls
    with pytest.raises(FlashnbError, match="outside"):
        end_to_end.budget_sweep(store, preds, setup["prompt"], setup["profile"], measured=(0.01,), tokens=2)


def test_waterfall_lays_each_phase_after_the_last_up_to_the_total():
    from viz_helpers import tour_figures

    fig = tour_figures()["tour.waterfall"]
    bars = [t for t in fig.data if t.type == "bar"]
    assert all(t.orientation == "h" for t in bars)
    phases, total, floor, reads, bound = bars[:-4], bars[-4], bars[-3], bars[-2], bars[-1]
    for before, after in zip(phases, phases[1:]):          # each starts where the one before ended
        assert after.base[0] == pytest.approx(before.base[0] + before.x[0]) or after.x[0] < 0
    assert phases[-1].base[0] + phases[-1].x[0] == pytest.approx(total.x[0])   # the phases add up to the total
    assert list(floor.y) == ["floor"] and floor.x[0] == pytest.approx(5.0)
    # the lower bound: floor 5 ms + all's reads alone 4 ms - the floor's FFN math 1.5 ms
    assert list(reads.y) == ["reads alone"] and reads.x[0] == pytest.approx(4.0)
    assert list(bound.y) == ["lower bound"] and bound.x[0] == pytest.approx(7.5)
    assert list(fig.layout.yaxis.categoryarray)[0] == "lower bound"


def test_text_block_keeps_a_terminal_table_unwrapped():
    block = V.text_block("a < b\n" + "x" * 130)
    assert "white-space:pre" in block.data and "a &lt; b" in block.data and "x" * 130 in block.data
