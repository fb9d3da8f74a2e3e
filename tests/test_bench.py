"""A 4-token smoke run of every `flashnb bench` configuration on a tiny model, and the viz helpers."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from flashnb.bench.bare import BareEngine
from flashnb.bench.report import format_table
from flashnb.bench.run import CONFIGS, BenchConfig, run_bench, take_turns
from flashnb.core.convert import ConvertConfig, convert
from flashnb.core.engine import FlashEngine, Policy
from flashnb.core.pinning import HotNeurons
from flashnb.core.predictor import LowRankPredictor, LowRankPredictors, load_predictors
from flashnb.core.store import FlashStore
from flashnb.errors import FlashnbError
from flashnb.lab.bundling import layout_summary
from flashnb.lab.windowing import window_budget_grid, window_sweep
from flashnb.models.checkpoint import load_model
from flashnb.models.fingerprint import model_fingerprint
from flashnb.viz import style as S
from flashnb.widgets.engine import window_explorer

from conftest import make_tiny_opt
from flash_helpers import synthetic_profile


def tiny_predictors(folder, out, extras: bool = False):
    """Untrained (random) predictors with a low threshold: enough to exercise the engine; with `extras`,
    lookahead predictors and hot neurons (ranked on random sets) beside them."""
    model = load_model(folder)
    c = model.config
    torch.manual_seed(0)
    layers = [LowRankPredictor(c.hidden_size, c.ffn_dim, 8) for _ in range(c.num_hidden_layers)]
    LowRankPredictors(layers, [0.3] * c.num_hidden_layers, model_fingerprint(model)).save(out)
    if extras:
        ahead = [LowRankPredictor(c.hidden_size, c.ffn_dim, 8) for _ in range(c.num_hidden_layers - 1)]
        LowRankPredictors(ahead, [0.3] * (c.num_hidden_layers - 1), model_fingerprint(model),
                          lookahead=True).save(out / "lookahead")
        rng = np.random.default_rng(0)
        sets = [[np.sort(rng.choice(c.ffn_dim, 12, replace=False)) for _ in range(c.num_hidden_layers)]
                for _ in range(16)]
        HotNeurons.measure(sets[:8], sets[8:], c.ffn_dim).save(out)
    return out


def test_every_configuration_runs_and_reports(tmp_path):
    folder = make_tiny_opt(tmp_path / "hf")
    preds = tiny_predictors(folder, tmp_path / "preds", extras=True)
    (tmp_path / "profile.json").write_text(json.dumps(synthetic_profile()))
    cfg = BenchConfig(model=str(folder), predictors=str(preds), prompt="Open the", tokens=4, memory=0.9,
                      in_flight=2, dir=str(tmp_path), profile=str(tmp_path / "profile.json"), progress=False)
    result = run_bench(cfg)
    assert list(result.results) == list(CONFIGS)
    r = {name: m.stats for name, m in result.results.items()}
    for name, s in r.items():
        assert s.tokens == 4 and s.total_ms > 0 and len(s.token_ms) == 4 and s.p10_ms <= s.median_ms <= s.p90_ms
    ffn_bytes = result.ffn_bytes
    assert r["naive"].bytes_read == ffn_bytes                  # the whole FFN, every token
    assert r["hybrid"].bytes_read < ffn_bytes
    assert r["all"].requests <= r["windowing"].requests
    assert r["dense"].bytes_read == 0 and r["mmap"].bytes_read is None   # mmap cannot say what it read apart
    assert r["floor"].bytes_read == 0 and r["floor"].predicted > 0        # the floor reads nothing, predicts
    res = result.results
    assert res["all"].floor_ms == res["predictor"].floor_ms == r["floor"].total_ms
    assert res["naive"].floor_ms == res["mmap"].floor_ms == r["dense"].total_ms
    for name in ("naive", "hybrid", "predictor", "windowing", "all"):
        assert result.results[name].modeled_io_ms > 0
    assert result.results["mmap"].modeled_io_ms is None
    assert res["pinned"].pinned_rows == result.pinning["chosen"] and res["all"].pinned_rows == 0
    assert all(m.dram_bytes <= m.budget_bytes for m in res.values() if m.budget_bytes)
    assert r["pinned"].pinned > 0 or result.pinning["chosen"] == 0
    # all's reads alone: exactly all's requests, timed without anything computed; no ratio, no floor of its own
    assert (r["reads"].bytes_read, r["reads"].requests) == (r["all"].bytes_read, r["all"].requests)
    assert r["reads"].io_ms > 0 and res["reads"].speedup_vs_naive is None and res["reads"].floor_ms is None
    table = format_table(result)
    assert "lower bound for all here" in table and result.lower_bound_ms > 0
    p = result.pinning   # the pinning line: each simulated split in words, the chosen one first
    assert f"{p['chosen']} hot neurons pinned per layer" in table
    assert f"{p['pinned_rows'][0]} pinned: {p['bytes_per_token'][0] / 1e6:.3f} MB" in " ".join(table.split())
    assert "accelerate disk offload" in table and "+bundling (all)" in table and "dense in DRAM" in table
    head, _, *rows = table.splitlines()[:2 + len(res)]
    ends = [head.index(name) + len(name) - 1 for name in ("I/O", "mem", "compute", "total", "median", "p10-p90", "MB/token",
                                                           "GB/s", "vs naive", "model I/O", "x floor")]
    for row in rows:   # every value (a number or a dash) ends where its column's name ends
        assert len(row) == len(head) and all(row[i] != " " and row[i + 1:i + 2] in ("", " ") for i in ends), row
    out = json.loads(json.dumps(result.to_json()))  # JSON-ready
    assert out["results"]["all"]["total_ms"] == r["all"].total_ms and out["settings"]["in_flight"] == 2


def test_configurations_without_their_files_are_skipped_with_the_fix(tmp_path):
    folder = make_tiny_opt(tmp_path / "hf")
    preds = tiny_predictors(folder, tmp_path / "preds")
    (tmp_path / "profile.json").write_text(json.dumps(synthetic_profile()))
    cfg = BenchConfig(model=str(folder), predictors=str(preds), prompt="Open the", tokens=2, memory=1.0,
                      in_flight=2, dir=str(tmp_path), profile=str(tmp_path / "profile.json"), progress=False,
                      configs=("all", "pinned", "lookahead", "placed"))
    result = run_bench(cfg)
    assert list(result.results) == ["all"]
    assert "--hot-neurons-only" in result.skipped["pinned"] and "--lookahead" in result.skipped["lookahead"]
    assert "--placement-only" in result.skipped["placed"]
    assert "skipped: no" in format_table(result)
    with pytest.raises(FlashnbError, match="include all"):
        run_bench(BenchConfig(model=str(folder), predictors=str(preds), configs=("reads",), progress=False))


def test_the_bare_engine_is_all_with_its_bookkeeping_done_before_the_clock(tmp_path):
    """The bare engine (all, its bookkeeping free) gives all's logits bit for bit and reads all's bytes in all's
    requests, reader call by reader call, also where a token's neurons overflow the rows; in the bench it spends
    nothing on the window or memory management."""
    folder = make_tiny_opt(tmp_path / "hf", hidden_size=1024, word_embed_proj_dim=1024, ffn_dim=1024)  # 4 KiB rows
    preds = tiny_predictors(folder, tmp_path / "preds")
    store = FlashStore.open(convert(folder, tmp_path / "store", ConvertConfig(progress=False)))
    with FlashEngine(store, load_predictors(preds), Policy(window=2, memory_budget=0.85)) as all_:
        assert all_.memory.capacity_rows < store.ffn_dim
        with BareEngine(all_) as bare:
            kv_all, kv_bare = all_.model.new_cache(1, 16), bare.model.new_cache(1, 16)
            for token in [5, 17, 17, 230, 9, 41, 3, 77]:
                assert torch.equal(all_.step(token, kv_all), bare.step(token, kv_bare))
    parts = [[(s.cached, s.loaded, s.evicted, s.bytes_read, s.requests) for s in step.layers] for step in all_.steps]
    assert parts == [[(s.cached, s.loaded, s.evicted, s.bytes_read, s.requests) for s in step.layers]
                     for step in bare.steps]
    assert any(len(step.layers) > store.num_layers for step in all_.steps)   # some token read in parts
    assert sum(step.cached for step in bare.steps) > 0 and sum(step.bytes_read for step in bare.steps) > 0
    (tmp_path / "profile.json").write_text(json.dumps(synthetic_profile()))
    cfg = BenchConfig(model=str(folder), predictors=str(preds), prompt="Open the", tokens=3, memory=0.85, in_flight=2,
                      dir=str(tmp_path), profile=str(tmp_path / "profile.json"), progress=False,
                      configs=("all", "bare", "floor"))
    result = run_bench(cfg)
    r = result.results
    assert (r["bare"].stats.bytes_read, r["bare"].stats.requests) == (r["all"].stats.bytes_read,
                                                                      r["all"].stats.requests)
    assert r["bare"].split_ms["window"] == r["bare"].split_ms["memory"] == 0 < r["all"].split_ms["window"]
    assert r["bare"].floor_ms == r["floor"].stats.total_ms and "bookkeeping free (bare)" in format_table(result)
    result = run_bench(replace(cfg, configs=("all", "bare", "reads", "floor")))   # where bare stands to the bound
    ratio = result.results["bare"].stats.total_ms / result.lower_bound_ms
    assert f"bookkeeping free (bare) {ratio:.2f}x" in " ".join(format_table(result).split())
    with pytest.raises(FlashnbError, match="'bare' runs 'all' with its bookkeeping free: include all"):
        run_bench(BenchConfig(model=str(folder), predictors=str(preds), configs=("bare",), progress=False))
    small = make_tiny_opt(tmp_path / "small")   # rows of 128 bytes: not whole blocks, so not read straight in
    with FlashEngine(convert(small, tmp_path / "small-store", ConvertConfig(progress=False)),
                     load_predictors(tiny_predictors(small, tmp_path / "small-preds")), Policy(memory_budget=0.9)) as e:
        with pytest.raises(FlashnbError, match="rows of whole blocks: this store's rows are 128 bytes"):
            BareEngine(e)


def test_a_budget_with_fewer_rows_than_a_token_needs_is_said_beside_the_table(tmp_path):
    """At the smallest budget (one row per layer) "all" reads each token in parts and can fall behind naive:
    the table says why, under the configuration's name; with room for every neuron it says nothing."""
    from flashnb.core.memory import min_budget
    from flashnb.core.predictor import load_predictors

    folder = make_tiny_opt(tmp_path / "hf")
    preds = tiny_predictors(folder, tmp_path / "preds")
    (tmp_path / "profile.json").write_text(json.dumps(synthetic_profile()))
    store = FlashStore.open(convert(folder, tmp_path / "store", ConvertConfig(progress=False)))
    lo = min_budget(store.memory_shape(), 4, load_predictors(preds).memory_bytes(2))
    notes, roomy = {}, 2 * store.memory_shape().model_bytes   # bytes: room for every neuron beside the rest
    for memory in (lo, roomy):
        cfg = BenchConfig(model=str(folder), predictors=str(preds), prompt="Open the", tokens=3, memory=memory,
                          in_flight=2, dir=str(tmp_path), profile=str(tmp_path / "profile.json"), progress=False,
                          configs=("all",))
        result = run_bench(cfg)
        notes[memory] = result.results["all"].rows_note, format_table(result)
    note, table = notes[lo]
    assert "more than the 1 row this budget leaves each layer" in " ".join(note.split())
    assert "+bundling (all): a token needed" in " ".join(table.split())
    assert notes[roomy][0] == "" and "a token needed" not in notes[roomy][1]


def test_window_sweep_and_layout_summary(tmp_path):
    folder = make_tiny_opt(tmp_path / "hf")
    store = FlashStore.open(convert(folder, tmp_path / "store", ConvertConfig(dtype="fp32", progress=False)))
    rng = np.random.default_rng(0)
    sets = [[np.sort(rng.choice(64, 10, replace=False)) for _ in range(2)] for _ in range(12)]
    rows = window_sweep(sets, store, Policy(0, 1.0), range(0, 4))
    assert [r.window for r in rows] == [0, 1, 2, 3]
    assert rows[0].hit_share == 0.0 and rows[3].mb_per_token < rows[0].mb_per_token
    ffn_bytes = store.memory_shape().ffn_bytes
    assert rows[2].ffn_share == pytest.approx(rows[2].mb_per_token * 1e6 / ffn_bytes)
    grid = window_budget_grid(sets, store, Policy(0, 1.0), range(0, 4), budgets=(0.01, 0.9, 1.0))
    assert grid.budgets == (0.9, 1.0)                  # 1% holds no row: left out
    assert grid.at(1.0) == tuple(rows) and grid.gain(1.0) == rows[0].mb_per_token / rows[3].mb_per_token
    with pytest.raises(FlashnbError, match="the least is"):
        window_budget_grid(sets, store, Policy(0, 1.0), range(0, 4), budgets=(0.01,))
    paper = {"window": 5, "ffn_loaded_predictor": 0.1, "ffn_loaded_window": 0.024, "window_reuse": 0.78,
             "window_cached_fraction": 0.24}
    box, slider, budgets, widget = window_explorer(grid, paper, window=2, budget=0.9)
    slider.value = 3                                    # the observers redraw the bars, the frame and the text
    budgets.value = 1.0
    opacity = {w: o for t in widget.data if t.type == "bar" for w, o in zip(t.x, t.marker.opacity)}
    assert opacity == {0: 0.35, 1: 0.35, 2: 0.35, 3: 1.0}
    assert [y for t in widget.data if t.type == "bar" for y in t.y] == [100 * r.ffn_share for r in rows]
    assert "window 3 at 100% of the model" in box.children[1].value
    slider.value = 0                                    # window 0 keeps nothing: its rows are not the window's
    assert "nothing kept from one token to the next" in box.children[1].value
    assert "window's rows hold" not in box.children[1].value.split("Paper")[0]
    assert next(sh for sh in widget.layout.shapes if sh.name == "chosen").y0 == 0.5   # the second budget


def test_layout_summary_of_engine_records():
    from flashnb.core.records import LayerStep, TokenStep

    steps = [TokenStep(0, [LayerStep(3, 0, 3, 0, 4096, 4096, 2, submit_s=0.0005, wait_s=0.0005)], wall_seconds=0.002)]
    s = layout_summary({"bundled": steps})["bundled"]
    assert (s.requests, s.mean_request_bytes, s.mb, s.io_ms) == (2, 2048, 0.004096, 1.0)
    assert s.gbps == 0.004096


def test_configurations_take_turns_one_token_each():
    order = []

    def stream(name, n):
        for i in range(n):
            order.append(name)
            yield i

    texts, spent = take_turns({"a": stream("a", 3), "b": stream("b", 1), "c": stream("c", 3)})
    assert order == ["a", "b", "c", "a", "c", "a", "c"]  # b's text ended after one token
    assert texts == {"a": [0, 1, 2], "b": [0], "c": [0, 1, 2]}
    assert set(spent) == {"a", "b", "c"}


def test_layouts_take_turns_over_rounds(tmp_path):
    from flashnb.core.predictor import OraclePredictor
    from flashnb.lab.bundling import LayoutStats, apart, layout_rounds

    folder = make_tiny_opt(tmp_path / "hf")
    stores = {layout: FlashStore.open(convert(folder, tmp_path / layout, ConvertConfig(layout=layout, progress=False)))
              for layout in ("bundled", "unbundled")}
    oracle = OraclePredictor(load_model(folder))
    s = layout_rounds(stores, oracle, [2, 5, 7], 4, Policy(window=1, memory_budget=1.0), rounds=2)
    assert len(s["bundled"].io_ms_runs) == len(s["unbundled"].io_ms_runs) == 2
    assert s["bundled"].io_ms == float(np.median(s["bundled"].io_ms_runs))
    assert s["bundled"].requests < s["unbundled"].requests          # the same neurons in half the requests
    a, b = (LayoutStats(n, 1, 1, 1, m, 1, runs) for n, m, runs in (("a", 1.0, (0.9, 1.1)), ("b", 2.0, (1.9, 2.1))))
    assert apart(a, b) and not apart(a, LayoutStats("c", 1, 1, 1, 1.0, 1, (1.0, 2.0)))


def test_window_timeline_replays_the_engines_window_decisions(tmp_path):
    from flashnb.core.simulate import simulate
    from flashnb.lab.windowing import EVICTED, HIT, READ, window_timeline
    from flashnb.widgets.engine import timeline_explorer

    folder = make_tiny_opt(tmp_path / "hf")
    store = FlashStore.open(convert(folder, tmp_path / "store", ConvertConfig(dtype="fp32", progress=False)))
    rng = np.random.default_rng(1)
    sets = [[np.sort(rng.choice(64, 10, replace=False)) for _ in range(2)] for _ in range(12)]
    policy = Policy(window=2, memory_budget=1.0)
    tl = window_timeline(sets, store, policy, layer=1, neurons=64)
    sim = simulate(sets, store, policy)
    assert tl.states.shape == (64, 12)
    assert tl.count(HIT) == sum(s.layers[1].cached for s in sim)       # the same hits and reads as simulate
    assert tl.count(READ) == sum(s.layers[1].loaded for s in sim)
    assert tl.count(EVICTED) == sum(s.layers[1].evicted for s in sim)
    box, slider, budgets, fig = timeline_explorer(lambda w, b: window_timeline(sets, store, Policy(w, b), 1),
                                                  window=2, budget=1.0, budgets=(0.9, 1.0))
    before = np.array(fig.data[0].z).copy()
    slider.value = 0                                      # no window: nothing is ever a hit
    assert not (np.array(fig.data[0].z) == HIT).any() and (before == HIT).any()
    assert "window 0" in box.children[1].value and "rows shared by every layer" in box.children[1].value

    from flashnb.viz.engine import window_animation_figure

    tokens = ["</s>"] + [f" t{i}" for i in range(1, 12)]
    fig = window_animation_figure(tl, tokens, n_prompt=3)
    assert [f.name for f in fig.frames] == [str(t) for t in range(12)]            # one frame per token
    frame = fig.frames[5]
    z = np.array(frame.data[0].z, dtype=object)
    assert (z[:, :6] == tl.states[:, :6]).all() and (z[:, 6:] == None).all()    # noqa: E711  revealed up to 5
    held, current = frame.data[3], frame.data[4]
    assert (min(held.x), max(held.x)) == (2.5, 4.5) and (min(current.x), max(current.x)) == (4.5, 5.5)
    assert (frame.data[1].x, frame.data[2].x) == (held.x, current.x)   # each over a white band of its own
    assert [t.name for t in fig.data[1:3]] == [S.HALO] * 2 and fig.data[1].line.width > fig.data[3].line.width
    lo, hi = sorted(fig.layout.yaxis.range)   # the frames' top and bottom run clear of the cells, and in view
    assert lo < min(held.y) < -0.5 and tl.states.shape[0] - 0.5 < max(held.y) < hi
    left, right = fig.layout.xaxis.range                  # the last token's frame is drawn whole
    assert left < -0.5 and max(fig.frames[-1].data[4].x) < right
    assert "token 5: ' t5'" in frame.layout.title.text and "' t3 t4'" in frame.layout.title.text   # window 2
    col = tl.states[:, 5]
    assert f"{(col == HIT).sum()} hits, {(col == READ).sum()} read, {(col == EVICTED).sum()} evicted" in \
        frame.layout.title.text
    assert "token 0: '&lt;/s&gt;'" in fig.frames[0].layout.title.text       # a special token is text, not a tag
    assert [list(s["args"][0]) for s in fig.layout.sliders[0].steps] == [[str(t)] for t in range(12)]


def test_byte_layout_shows_the_readers_own_requests(tmp_path):
    from flashnb.core.reader import NeuronReader, ReaderConfig
    from flashnb.lab.bundling import byte_layout

    folder = make_tiny_opt(tmp_path / "hf")
    stores = {layout: FlashStore.open(convert(folder, tmp_path / layout, ConvertConfig(layout=layout, progress=False)))
              for layout in ("bundled", "unbundled")}
    ids = np.array([1, 2, 6, 40])
    slices = byte_layout(stores, 0, ids, rows=8)
    assert [(s.layout, s.region) for s in slices] == [("bundled", "bundles"), ("unbundled", "fc1"), ("unbundled", "fc2")]
    assert all(s.needed == (1, 2, 6) for s in slices)                 # neuron 40 lies beyond the 8 rows shown
    with NeuronReader(stores["bundled"], ReaderConfig()) as reader:
        sizes = reader.request_sizes(0, ids[:3])
    assert sum(n for _, n in slices[0].requests) == int(sizes.sum())  # the reader's own plan, in the slice
    assert len(slices[1].requests) + len(slices[2].requests) == 2 * len(slices[0].requests)   # twice the reads


def test_the_placed_configuration_reads_the_same_neurons_in_fewer_requests(tmp_path):
    """`--configs all,placed`: the same predictors and policy on a store in the co-activation order learned
    from the predictors' own selections: the same tokens and neurons, fewer requests."""
    from flashnb.core.placement import Placement
    from flashnb.core.predictor import load_predictors
    from flashnb.core.simulate import sets_from_trace
    from flashnb.models.checkpoint import load_model
    from flashnb.training.traces import record

    folder = make_tiny_opt(tmp_path / "hf")
    preds = tiny_predictors(folder, tmp_path / "preds")
    model = load_model(folder)
    sets = sets_from_trace(record(model, np.random.default_rng(0).integers(3, 300, 200)), load_predictors(preds))
    masks = [np.zeros((len(sets), 64), bool) for _ in range(model.config.num_hidden_layers)]
    for t, token in enumerate(sets):
        for layer, ids in enumerate(token):
            masks[layer][t, ids] = True
    Placement.learn(masks, load_predictors(preds).fingerprint, "test").save(preds)
    (tmp_path / "profile.json").write_text(json.dumps(synthetic_profile()))
    cfg = BenchConfig(model=str(folder), predictors=str(preds), prompt="Open the", tokens=8, memory=1.0,
                      in_flight=2, dir=str(tmp_path), profile=str(tmp_path / "profile.json"), progress=False,
                      configs=("all", "placed"))
    result = run_bench(cfg)
    a, p = result.results["all"], result.results["placed"]
    assert a.text == p.text and a.stats.predicted == p.stats.predicted   # the same tokens, the same neurons
    assert p.stats.loaded == pytest.approx(a.stats.loaded, rel=0.05)     # (a token split in parts, in file order,
    assert p.stats.requests <= a.stats.requests                          # keeps a few other neurons in its window)
    assert "co-activation order" in format_table(result)
