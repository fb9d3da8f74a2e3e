"""`flashnb bench --scale`: random-weight stores of any OPT shape, the engine on them, the neuron sets
of the shipped model widened onto them, and the size sweep, at a tiny shape (seconds)."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flashnb import FlashnbError
from flashnb.bench import scale as S
from flashnb.bench.replay import widen
from flashnb.bench.run import BenchConfig
from flashnb.cli import main
from flashnb.core.engine import FlashEngine, Policy
from flashnb.core.predictor import AllNeurons
from flashnb.core.simulate import simulate
from flashnb.device.profile import Profile, coalescing_gap

from flash_helpers import synthetic_profile

TINY = "128,2048,2"


def test_widen_keeps_each_tokens_share_of_neurons_at_any_width():
    rng = np.random.default_rng(0)
    small = [[np.sort(rng.choice(2048, 100, replace=False)) for _ in range(6)] for _ in range(3)]
    for width, n_layers in ((2048, 6), (3072, 12), (16384, 32)):
        Shape = SimpleNamespace(ffn_dim=width, layers=n_layers)
        wide = widen(small, 2048, Shape)
        assert len(wide) == 3 and all(len(t) == Shape.layers for t in wide)
        for t, token in enumerate(wide):
            for layer, ids in enumerate(token):
                assert np.all(np.diff(ids) > 0) and ids.min() >= 0 and ids.max() < width
                src = small[t][layer * 6 // Shape.layers]
                assert ids.size == sum((j + 1) * width // 2048 - j * width // 2048 for j in src)
        assert all(np.array_equal(a, b) for ta, tb in zip(wide, widen(small, 2048, Shape)) for a, b in zip(ta, tb))
    with pytest.raises(FlashnbError, match="at least as wide"):
        widen(small, 2048, SimpleNamespace(ffn_dim=1024, layers=2))


def test_shapes_parse_and_bad_ones_name_the_fix():
    s = S.parse_scale("6.7b")
    assert (s.d_model, s.ffn_dim, s.layers, s.heads) == (4096, 16384, 32, 32)
    ffn, other = s.bytes()
    assert ffn == 32 * 2 * 4096 * 16384 * 2 and 4.7e9 < other < 4.9e9   # OPT 6.7B: 8.6 GB of FFN, 4.8 GB else
    assert S.parse_scale(TINY).tag == "d128-f2048-l2"
    for bad in ("7b", "64,1000,2", "100,2048,2", "a,b,c"):
        with pytest.raises(FlashnbError, match="--scale"):
            S.parse_scale(bad)


def test_a_scale_store_is_written_once_reused_and_its_engine_equals_its_dense_model(tmp_path):
    shape = S.parse_scale(TINY)
    stores = S.scale_stores(tmp_path, shape, progress=False, log=lambda m: None)
    b, u = stores["bundled"], stores["unbundled"]
    assert b.dram_path.samefile(u.dram_path)                      # one DRAM file for both layouts
    mtime = b.ffn_path.stat().st_mtime_ns
    again = S.scale_stores(tmp_path, shape, progress=False, log=lambda m: pytest.fail("rewrote a valid store"))
    assert again["bundled"].ffn_path.stat().st_mtime_ns == mtime
    dense = b.load_model(torch.float32)
    ids = [2, 17, 400, 9000]
    with torch.no_grad():
        ref = dense(torch.tensor([ids]))[0]
    with FlashEngine(b, AllNeurons(shape.ffn_dim), Policy(0, 1.0, in_flight=2)) as eng:
        kv = eng.model.new_cache(1, len(ids))
        got = torch.stack([eng.step(t, kv) for t in ids])
    assert torch.isfinite(got).all() and (got - ref).abs().max().item() < 2e-2   # fp16 engine, fp32 dense
    for layout, st in stores.items():   # the budget's split, known before writing, is the written store's
        assert shape.memory_shape(layout) == replace(st.memory_shape(), kv_cache_bytes=0)
    replayed = S.ReplayedSets([[np.arange(3)] * shape.layers], shape.d_model, shape.ffn_dim)
    with FlashEngine(b, replayed, Policy(4, 1.0, in_flight=2)) as eng:
        assert shape.predictor_bytes() == eng.memory.predictor_bytes
    S.remove_scale_stores(tmp_path, shape)
    assert not any(tmp_path.iterdir())


def test_a_budget_too_small_for_a_scale_run_is_said_before_writing(tmp_path):
    cfg = BenchConfig(scale=TINY, tokens=1, memory=0.05, in_flight=2, dir=str(tmp_path), configs=("all", "naive"),
                      progress=False)
    with pytest.raises(FlashnbError, match="is too small"):
        S.run_scale(cfg, log=lambda m: None)
    assert not any(tmp_path.iterdir())


def test_too_little_disk_is_one_clear_error_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "_free_bytes", lambda folder: 10 << 20)
    with pytest.raises(FlashnbError, match=r"need 0\.\d+ GB free .* which has 0\.01 GB: free some space, pass --dir"):
        S.scale_stores(tmp_path, S.parse_scale(TINY), progress=False, log=lambda m: None)
    assert not list(tmp_path.rglob("*.bin"))
    # room for one layout but not both: refused before the first is written, naming both
    shape = S.parse_scale(TINY)
    monkeypatch.setattr(S, "_free_bytes", lambda folder: sum(shape.bytes()) + (1 << 28) + 1)
    with pytest.raises(FlashnbError, match=r"stores to write \(bundled, unbundled\)"):
        S.scale_stores(tmp_path, shape, progress=False, log=lambda m: None)
    assert not list(tmp_path.rglob("*.bin"))


def test_a_scale_run_that_fails_while_writing_leaves_no_store(tmp_path, monkeypatch):
    (tmp_path / "profile.json").write_text(json.dumps(synthetic_profile()))
    real, calls = S.write_store, []

    def second_fails(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise FlashnbError("the disk filled up")
        return real(*a, **kw)

    monkeypatch.setattr(S, "write_store", second_fails)
    cfg = BenchConfig(scale=TINY, tokens=1, memory=1.0, in_flight=2, dir=str(tmp_path), configs=("all",),
                      progress=False, profile=str(tmp_path / "profile.json"))
    with pytest.raises(FlashnbError, match="filled up"):
        S.run_scale(cfg, log=lambda m: None)
    assert len(calls) == 2 and not list(tmp_path.rglob("*.bin"))   # the first store, written, was removed


def test_scale_run_reports_every_configuration_and_reads_what_simulate_counts(tmp_path):
    (tmp_path / "profile.json").write_text(json.dumps(synthetic_profile()))
    cfg = BenchConfig(scale=TINY, tokens=3, memory=1.0, in_flight=4, dir=str(tmp_path), configs=S.SCALE_CONFIGS,
                      progress=False, keep=True, profile=str(tmp_path / "profile.json"))
    result = S.run_scale(cfg, log=lambda m: None)
    r = result.results
    assert list(r) == list(S.SCALE_CONFIGS)
    ffn = result.ffn_bytes
    assert r["naive"].stats.bytes_read == ffn                          # the whole FFN, every token
    dram = (tmp_path / "flashnb-scale-d128-f2048-l2" / "bundled" / "dram.safetensors").stat().st_size
    assert r["naive_model"].stats.bytes_read == ffn + dram             # ... and the rest of the model
    assert r["all"].stats.bytes_read < r["predictor"].stats.bytes_read < ffn
    assert all(m.dram_bytes <= m.budget_bytes for m in r.values() if m.budget_bytes)
    out = json.loads(json.dumps(result.to_json()))
    assert "widened" in out["scale"]["neuron_sets"] and out["results"]["all"]["total_ms"] > 0
    # the engine read exactly what simulate counts for the same widened sets
    small, small_ffn = S.shipped_sets(2 + 3 + 1)
    sets = widen(small, small_ffn, S.parse_scale(TINY))
    stores = S.scale_stores(tmp_path, S.parse_scale(TINY), progress=False, log=lambda m: None)
    gap = coalescing_gap(Profile.load(cfg.profile), 4)
    sim = simulate(sets[:2 + 3], stores["bundled"], Policy(cfg.window, 1.0, 4, gap),
                   S.ReplayedSets(sets, 128, 2048).memory_bytes(2))
    assert np.mean([s.bytes_read for s in sim[2:]]) == pytest.approx(r["all"].stats.bytes_read)


def test_quantized_and_placed_scale_stores_read_what_they_should(tmp_path):
    """int8 / q4 bundles in the fp16 model's budget read what simulate counts on their own stores; the placed
    store (the shipped placement widened, copies a block apart) needs about the same bytes in fewer requests."""
    (tmp_path / "profile.json").write_text(json.dumps(synthetic_profile()))
    cfg = BenchConfig(scale=TINY, tokens=3, memory=0.97, in_flight=4, dir=str(tmp_path), configs=("all",) + S.SCALE_OPT_IN,
                      progress=False, keep=True, profile=str(tmp_path / "profile.json"))
    r = S.run_scale(cfg, log=lambda m: None).results
    assert all(m.budget_bytes == r["all"].budget_bytes for m in r.values())   # the same DRAM for every format
    assert r["q4"].stats.bytes_read < r["int8"].stats.bytes_read < r["all"].stats.bytes_read
    stores = S.scale_stores(tmp_path, S.parse_scale(TINY), progress=False, log=lambda m: None, extra=S.SCALE_OPT_IN)
    assert [stores[n].neuron_bytes for n in ("bundled", "int8", "q4")] == [2 * 128 * 2, 2 * 4 * 34, 2 * 4 * 18]
    assert stores["placed"].placed_rows(0) is not None
    small, small_ffn = S.shipped_sets(2 + 3 + 1)
    sets = widen(small, small_ffn, S.parse_scale(TINY))
    gap = coalescing_gap(Profile.load(cfg.profile), 4)
    held = S.ReplayedSets(sets, 128, 2048).memory_bytes(2)
    for name in ("q4", "placed"):
        budget = r["all"].budget_bytes if name == "q4" else 0.97
        sim = simulate(sets[:2 + 3], stores[name], Policy(cfg.window, budget, 4, gap), held)
        assert np.mean([s.bytes_read for s in sim[2:]]) == pytest.approx(r[name].stats.bytes_read)
    # the same neurons (a token served in parts splits in file order, so the window keeps slightly other ones)
    assert r["placed"].stats.bytes_needed == pytest.approx(r["all"].stats.bytes_needed, rel=0.05)
    assert r["placed"].stats.requests < r["all"].stats.requests


def test_bench_scale_options_are_checked(capsys, tmp_path):
    assert main(["bench", "--scale", "7b", "--dir", str(tmp_path)]) == 2
    assert "--scale '7b'" in capsys.readouterr().err
    assert main(["bench", "--scale", TINY, "--replay"]) == 2
    assert "choose one" in capsys.readouterr().err
    assert main(["bench", "--scale", TINY, "--configs", "naive,dense", "--dir", str(tmp_path)]) == 2
    assert "only: drop dense from --configs" in capsys.readouterr().err


def test_the_size_sweep_measures_each_size_in_one_run(tmp_path):
    (tmp_path / "profile.json").write_text(json.dumps(synthetic_profile()))
    cfg = BenchConfig(tokens=2, in_flight=4, dir=str(tmp_path), progress=False, profile=str(tmp_path / "profile.json"))
    points, runs = S.run_sweep(cfg, ("shipped", TINY), log=lambda m: None)
    assert [p.name for p in points] == ["shipped", TINY] and set(runs) == {"shipped", TINY}
    for p in points:
        r = runs[p.name].results
        assert list(r) == ["naive", "all", "mmap"]
        assert p.all_vs_naive == pytest.approx(r["naive"].stats.total_ms / r["all"].stats.total_ms)
        assert runs[p.name].settings["memory"] == pytest.approx(S.sweep_budget(p.name))
    assert 0.5 < S.sweep_budget("6.7b") < 0.55          # OPT 6.7B: about the paper's half memory
    table, sentence = S.format_sweep(points), S.pays_text(points)
    assert TINY in table and sentence.startswith("On this machine all techniques are")
    assert not list(tmp_path.glob("flashnb-scale-*"))   # the scale stores are deleted without --keep
