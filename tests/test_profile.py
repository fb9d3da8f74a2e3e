"""The disk profile: a tiny real run, the fitted model on an ideal device, cleanup, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_tiny_opt
from flash_helpers import synthetic_profile
from flashnb.cli import main
from flashnb.core.convert import ConvertConfig, convert
from flashnb.device import measure as measure_mod
from flashnb.device.measure import ProfileConfig, run_profile
from flashnb.device.profile import Profile
from flashnb.errors import FlashnbError
from flashnb.lab.flash import reader_efficiency

TINY = dict(size=1 << 20, chunk_sizes=(4096, 65536), in_flight=(1, 2), seconds_per_cell=0.03,
            sequential_seconds=0.03, sequential_chunk=65536, progress=False)


def test_tiny_run_produces_a_sane_profile(tmp_path):
    prof = run_profile(ProfileConfig(dir=str(tmp_path), **TINY))
    assert not list(tmp_path.iterdir())                       # the scratch file is gone
    d = prof.to_json()
    assert d["kind"] == "measured" and isinstance(d["direct"], bool) and d["file_bytes"] == 1 << 20
    assert {"hostname", "cpus", "platform", "disk"} <= set(d["machine"]) and d["date"][:2] == "20"
    assert [(r["chunk_bytes"], r["in_flight"]) for r in d["random"]] == [(4096, 1), (65536, 1), (4096, 2), (65536, 2)]
    for r in d["random"] + d["sequential"]:
        assert r["reads"] > 0 and r["bytes"] == r["reads"] * r["chunk_bytes"]
        assert r["throughput_bytes_per_s"] == pytest.approx(r["bytes"] / r["seconds"])
        assert 0 < r["latency_p50_s"] <= r["latency_p99_s"]
    assert d["memory"]["memcpy_bytes_per_s"] > 0 and d["seconds_total"] > 0
    assert set(d["summary"]) >= {"direct", "sequential_GBps", "best_random", "fit_max_rel_error"}
    # save / load round trip; the model passes through the measured points
    p = prof.save(tmp_path / "p.json")
    back = Profile.load(p)
    assert json.loads(p.read_text())["random"] == d["random"]
    for r in d["random"]:
        assert back.throughput(r["chunk_bytes"], r["in_flight"]) == pytest.approx(r["throughput_bytes_per_s"])


def test_scratch_file_removed_on_ctrl_c(tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(measure_mod, "measure_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_profile(ProfileConfig(dir=str(tmp_path), **TINY))
    assert not list(tmp_path.iterdir())


def test_bad_profile_settings(tmp_path):
    with pytest.raises(FlashnbError, match="too small"):
        run_profile(ProfileConfig(dir=str(tmp_path), size=4096, chunk_sizes=(4096, 65536), progress=False))
    with pytest.raises(FlashnbError, match="does not exist"):
        run_profile(ProfileConfig(dir=str(tmp_path / "nope"), **{**TINY}))
    with pytest.raises(FlashnbError, match="does not exist"):
        Profile.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text(json.dumps({"flashnb_profile_version": 7}))
    with pytest.raises(FlashnbError, match="not a flashnb profile"):
        Profile.load(tmp_path / "bad.json")


def test_model_on_an_ideal_device():
    a, b = 1e-4, 1e9
    prof = Profile(synthetic_profile(latency_s=a, bandwidth=b))
    for i, t in enumerate(prof.fit.in_flight):                  # t(s) = a / T + s / b is recovered exactly
        assert prof.fit.latency_s[i] == pytest.approx(a / t, rel=1e-6)
        assert prof.fit.bandwidth[i] == pytest.approx(b, rel=1e-6)
    assert prof.fit.max_rel_error < 1e-9
    # between measured sizes: exact for this linear device; between numbers in flight: in between
    s = 40_000
    assert prof.throughput(s, 4) == pytest.approx(s / (a / 4 + s / b), rel=1e-9)
    assert prof.throughput(s, 2) < prof.throughput(s, 3) < prof.throughput(s, 4)
    assert prof.throughput(8 << 20, 1) == pytest.approx((8 << 20) / (a + (8 << 20) / b), rel=1e-9)
    # read_seconds sums request times at min(in flight, requests) concurrency
    sizes = [4096, 16384, 16384, 65536]
    assert prof.read_seconds(sizes, 8) == pytest.approx(sum(a / 4 + x / b for x in sizes), rel=1e-9)
    assert prof.read_seconds([], 8) == 0.0
    assert prof.read_seconds(np.array([65536] * 8), 8) == pytest.approx(8 * (a / 8 + 65536 / b))
    # break-even gap: one request's latency worth of bytes
    assert prof.coalesce_gap(4) == int(a / 4 * b) // 4096 * 4096
    vec = prof.throughput(np.array([4096, 65536]), 2)
    assert vec.shape == (2,) and vec[0] < vec[1]


def test_incomplete_grid_is_refused():
    d = synthetic_profile()
    d["random"] = d["random"][:-1]
    with pytest.raises(FlashnbError, match="incomplete"):
        Profile(d)


def test_reader_efficiency_and_cli(tmp_path, capsys, monkeypatch):
    src = make_tiny_opt(tmp_path / "m", hidden_size=128, ffn_dim=256, word_embed_proj_dim=128)
    store = convert(src, tmp_path / "s", ConvertConfig(progress=False))
    pfile = Profile(synthetic_profile()).save(tmp_path / "p.json")
    r = reader_efficiency(store, Profile.load(pfile), in_flight=2, fraction=0.1, rounds=2, calls_per_round=2,
                          cell_seconds=0.02)
    assert r.calls == 4 and r.bytes_read >= r.bytes_needed == 4 * 26 * 512 and r.requests >= 4
    assert r.efficiency > 0 and r.efficiency_saved > 0 and r.direct in (True, False)
    assert sorted(r.same_time_bps) and all(v > 0 for v in r.same_time_bps.values())
    import functools

    from flashnb.lab import flash
    quick = functools.partial(flash.reader_efficiency, rounds=1, calls_per_round=2, cell_seconds=0.02)
    monkeypatch.setattr(flash, "reader_efficiency", quick)   # the command's own defaults measure for seconds
    assert main(["profile", "--use", str(pfile), "--reader-check", str(store), "--in-flight", "2"]) == 0
    out = capsys.readouterr().out
    assert '"sequential_GBps": 1.0' in out and '"efficiency"' in out
