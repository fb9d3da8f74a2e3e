"""The tour notebooks' figures and widgets (flashnb.viz.tour, flashnb.widgets.tour), built from a small
real bench run, engine run and budget sweep on a tiny random OPT with predictors trained here."""

from __future__ import annotations

import json

import pytest

from flashnb import FlashnbError, tour
from flashnb.bench import LABELS, BenchConfig, run_bench
from flashnb.engine import FlashEngine, Policy
from flashnb.profile import Profile
from flashnb.store import ConvertConfig, FlashStore, convert
from flashnb.tiny import TEXTS, make_tiny_opt
from flashnb.tokenizer import Tokenizer
from flashnb.viz import style as S
from flashnb.viz import tour as V
from flashnb.widgets import tour as W

from flash_helpers import synthetic_profile
from viz_helpers import bar_series

CONFIGS = ("naive", "hybrid", "predictor", "windowing", "all", "mmap")  # accelerate: tests/test_bench.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny OPT whose FFN is most of its bytes (so half memory leaves room for neuron caches), quick
    predictors, a synthetic device profile, a bench run, an engine run and a budget sweep."""
    root = tmp_path_factory.mktemp("tour")
    folder = make_tiny_opt(root / "hf", backend="flashnb", ffn_dim=512, max_position_embeddings=128)
    tok = Tokenizer.from_folder(folder, bos_id=2)
    ids = tok.encode(" ".join(TEXTS))
    preds, metrics = tour.quick_predictors(folder, ids, rank=8, epochs=2)
    preds.save(root / "preds")
    (root / "profile.json").write_text(json.dumps(synthetic_profile()))
    profile = Profile.load(root / "profile.json")
    result = run_bench(BenchConfig(model=str(folder), predictors=str(root / "preds"), prompt="Open the", tokens=3,
                                   threads=2, dir=str(root), profile=str(root / "profile.json"), configs=CONFIGS,
                                   progress=False))
    store = FlashStore.open(convert(folder, root / "store", ConvertConfig(progress=False)))
    prompt = tok.encode("Open the file")
    with FlashEngine(store, Policy("learned", 2, 0.5, threads=2), predictors=preds, profile=profile) as eng:
        out = list(eng.generate(prompt, 6))
    steps = eng.steps[len(prompt):]
    sweep = tour.budget_sweep(store, preds, prompt, profile, measured=(0.6, 1.0), modeled=5, tokens=3, window=2,
                              threads=2)
    return dict(folder=folder, store=store, preds=preds, metrics=metrics, profile=profile, result=result,
                steps=steps, out=out, sweep=sweep, prompt=prompt, tok=tok)


def _axis_titles(fig) -> list[str]:
    """Every axis title of `fig` (all subplots)."""
    lay = fig.layout
    return [lay[k].title.text for k in lay.to_plotly_json() if k.startswith(("xaxis", "yaxis")) and lay[k].title.text]


def test_data_moved_figure_shows_bytes_and_hits_per_token(setup):
    steps, store = setup["steps"], setup["store"]
    fig = V.data_moved_figure(steps, tour.ffn_bytes(store), ["a"] * len(steps))
    mb, ffn_line, hits, reads = fig.data
    tot = [s.totals() for s in steps]
    assert list(mb.y) == [t["bytes_read"] / 1e6 for t in tot]
    assert list(ffn_line.y) == [tour.ffn_bytes(store) / 1e6] * 2
    assert [h + r for h, r in zip(hits.y, reads.y)] == [t["predicted"] for t in tot]   # cached + read = chosen
    assert mb.marker.color == S.color("all") and hits.marker.color == S.color("windowing")
    assert reads.marker.color == S.color("io") and ffn_line.line.color == S.color("naive")
    assert all("(measured" in t.name for t in fig.data)
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


def test_breakdown_figure_puts_modeled_beside_measured(setup):
    result = setup["result"]
    fig = V.breakdown_figure(result)
    names = [t.name for t in fig.data]
    assert names == ["I/O (measured)", "I/O (modeled)", "memory management (measured)", "memory management (modeled)",
                     "compute (measured)", "compute (modeled)", "total, not split (measured)"]
    io_measured, io_modeled = fig.data[0], fig.data[1]
    assert [tuple(x) for x in io_measured.x][0] == tuple(LABELS[n] for n in CONFIGS for _ in (0, 1))
    res = result["results"]
    assert list(io_measured.y[0::2]) == [res[n]["io_ms"] for n in CONFIGS]      # measured slots
    assert all(v is None for v in io_measured.y[1::2])                          # modeled slots empty
    assert list(io_modeled.y[1::2]) == [res[n]["modeled"]["io_ms"] for n in CONFIGS]
    assert io_modeled.marker.pattern.shape == "/" and not io_measured.marker.pattern.shape
    assert io_measured.marker.color == S.color("io")
    unsplit = fig.data[-1]
    assert unsplit.y[2 * CONFIGS.index("mmap")] == res["mmap"]["total_ms"]
    assert unsplit.marker.color[2 * CONFIGS.index("mmap")] == S.color("mmap")
    assert unsplit.y[0] is None                                                  # naive is split
    assert fig.layout.yaxis.title.text == "time per token (ms)"


def test_table2_beside_and_ladder_figure(setup):
    result = setup["result"]
    rows = tour.table2_beside(result)
    assert [r["name"] for r in rows] == ["naive", "hybrid", "predictor", "windowing", "all"]
    assert [r["paper_io_ms"] for r in rows] == [2196, 1090, 738, 164, 87]
    assert rows[0]["io_vs_naive"] == pytest.approx(1.0) and rows[0]["paper_io_vs_naive"] == 1.0
    assert rows[4]["paper_io_vs_naive"] == pytest.approx(2196 / 87)
    res = result["results"]
    assert rows[2]["io_vs_naive"] == pytest.approx(res["naive"]["io_ms"] / res["predictor"]["io_ms"])
    text = tour.format_table2_beside(rows)
    assert "Table 2" in text and len(text.splitlines()) == 2 + 5 + 1
    fig = V.ladder_figure(rows)
    legend = [t.name for t in fig.data if t.showlegend is not False]        # one trace per colour and series
    assert ["(paper)" in legend[0], "(measured)" in legend[1], "(modeled)" in legend[2]] == [True] * 3
    paper, measured, modeled = (bar_series(fig, name) for name in legend)
    labels = [r["label"] for r in rows]
    assert [paper[x][0] for x in labels] == [r["paper_io_vs_naive"] for r in rows]
    techniques = [S.color(n) for n in ("naive", "hybrid", "predictor", "windowing", "all")]
    assert [measured[x][1] for x in labels] == techniques == [paper[x][1] for x in labels]
    assert {t.marker.pattern.shape for t in fig.data if t.name == legend[2]} == {"/"}
    assert [t.offsetgroup for t in fig.data if t.showlegend is not False] == ["paper", "measured", "modeled"]
    assert fig.layout.yaxis.type == "log" and "(x, log scale)" in fig.layout.yaxis.title.text
    t3 = tour.table3_beside(result)
    assert t3["paper_cpu_speedup"] == pytest.approx(3182 / 669)
    assert t3["speedup"] == pytest.approx(result["results"]["naive"]["total_ms"] / result["results"]["all"]["total_ms"])
    assert "3182 ms" in tour.format_table3_beside(t3)


def test_budget_figure_and_explorer(setup):
    sweep = setup["sweep"]
    assert {0.6, 1.0} <= set(sweep.budgets("all"))                  # the grid runs through the measured budgets
    fig = V.budget_figure(sweep, 0.6)
    legend = [t.name for t in fig.data if t.showlegend is not False]
    assert legend == ["+bundling (all) (modeled)", "+bundling (all) (measured)", "hybrid (modeled)",
                      "hybrid (measured)", "paper: about half of OPT 6.7B in DRAM (paper, Table 2)"]
    modeled_all = fig.data[0]
    assert modeled_all.line.dash == "dash" and modeled_all.line.color == S.color("all")
    assert list(modeled_all.x) == [100 * b for b in sweep.budgets("all")]
    assert list(modeled_all.y) == [r["total_ms"] for r in sweep.modeled["all"]]
    measured_hybrid = fig.data[6]
    assert measured_hybrid.mode == "markers" and measured_hybrid.marker.color == S.color("hybrid")
    assert list(measured_hybrid.y) == [r["total_ms"] for r in sweep.measured["hybrid"]]
    titles = _axis_titles(fig)
    assert "DRAM budget (% of the model's bytes)" in titles and "time per token (ms)" in titles
    chosen = [s for s in fig.layout.shapes if s.name == "chosen budget"]
    assert [s.x0 for s in chosen] == [60.0, 60.0]

    box, slider, widget = W.budget_explorer(sweep, budget=0.61)
    assert slider.value == 0.6                                         # nearest modeled budget
    slider.value = 1.0
    assert [s.x0 for s in widget.layout.shapes if s.name == "chosen budget"] == [100.0, 100.0]
    assert "DRAM budget 100% of the model" in box.children[1].value


def test_costs_figure_from_dense_and_flash_runs(setup):
    store, prompt, folder = setup["store"], setup["prompt"], setup["folder"]
    dense = tour.dense_run(folder, prompt, 4)
    flash = tour.flash_run(store, Policy("oracle", 2, 0.5, threads=2), prompt, 4, name="flash, oracle")
    rows = tour.costs_table([dense, flash])
    fig = V.costs_figure(rows, dense.dram_bytes)
    assert [t.name for t in fig.data] == [
        "I/O (measured)", "memory management (measured)", "compute (measured)",
        "DRAM for weights (measured: bytes held)", "whole model (measured: file bytes)"]
    assert list(fig.data[3].y) == [dense.dram_bytes / 1e6, flash.dram_bytes / 1e6]
    assert list(fig.data[3].marker.color) == [S.color("dense"), S.color("all")]
    assert fig.data[0].y[0] == 0.0 and fig.data[2].y[0] == dense.means["total_ms"]   # dense: all compute
    assert "DRAM (MB)" in _axis_titles(fig)


def test_model_folder_box_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv(tour.ENV_BYO_MODEL, "/models/opt-1.3b")
    assert W.model_folder_box().value == "/models/opt-1.3b"
    assert W.model_folder_box("/elsewhere").value == "/elsewhere"
    monkeypatch.delenv(tour.ENV_BYO_MODEL)
    assert W.model_folder_box().value == ""


def test_budget_sweep_reuses_the_bench_runs_at_its_budget(setup):
    result, store, preds, profile, prompt = (setup[k] for k in ("result", "store", "preds", "profile", "prompt"))
    sweep = tour.budget_sweep(store, preds, prompt, profile, measured=(0.5, 1.0), modeled=3, tokens=3, window=4,
                              threads=2, bench=result)
    assert [r["budget"] for r in sweep.measured["all"]] == [0.5, 1.0]             # 0.5 not run again
    first = sweep.measured["all"][0]
    assert first["from"] == "run_bench" and first["total_ms"] == result["results"]["all"]["total_ms"]
    assert sweep.measured["hybrid"][0]["mb_per_token"] == result["results"]["hybrid"]["bytes_read_per_token"] / 1e6
    assert 0.5 in sweep.budgets("all") and 1.0 in sweep.budgets("all")
    assert "bench's runs" in sweep.notes[0] and "calibrated on this machine" in sweep.notes[1]
    with pytest.raises(FlashnbError, match="same settings"):
        tour.budget_sweep(store, preds, prompt, profile, measured=(1.0,), tokens=5, window=4, threads=2, bench=result)
