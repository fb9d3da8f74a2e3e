"""A 4-token smoke run of every `flashnb bench` configuration on a tiny model, and the viz helpers."""

from __future__ import annotations

import json

import numpy as np
import torch

from flashnb.bench import CONFIGS, BenchConfig, format_table, run_bench
from flashnb.checkpoint import load_model
from flashnb.fingerprint import model_fingerprint
from flashnb.predictor import LowRankPredictor, LowRankPredictors

from conftest import make_tiny_opt
from flash_helpers import synthetic_profile


def tiny_predictors(folder, out):
    """Untrained (random) predictors with a low threshold: enough to exercise the engine."""
    model = load_model(folder)
    c = model.config
    torch.manual_seed(0)
    layers = [LowRankPredictor(c.hidden_size, c.ffn_dim, 8) for _ in range(c.num_hidden_layers)]
    LowRankPredictors(layers, [0.3] * c.num_hidden_layers, model_fingerprint(model)).save(out)
    return out


def test_every_configuration_runs_and_reports(tmp_path):
    folder = make_tiny_opt(tmp_path / "hf")
    preds = tiny_predictors(folder, tmp_path / "preds")
    (tmp_path / "profile.json").write_text(json.dumps(synthetic_profile()))
    cfg = BenchConfig(model=str(folder), predictors=str(preds), prompt="Open the", tokens=4, memory=1.0,
                      threads=2, dir=str(tmp_path), profile=str(tmp_path / "profile.json"), progress=False)
    result = run_bench(cfg)
    assert list(result["results"]) == list(CONFIGS)
    for name, m in result["results"].items():
        assert m["tokens"] == 4 and m["total_ms"] > 0 and m["modeled"]["total_ms"] is not None
        assert len(m["token_ms"]) == 4 and m["median_ms"] == float(np.median(m["token_ms"]))
    r = result["results"]
    for name in ("mmap", "accelerate"):  # modeled as warm-page-cache time + files paged in
        assert result["page_cache_warm"][name]["warm_s"] > 0
        assert r[name]["modeled"]["cpu_terms"] == "measured with the page cache warm"
    for cpu in result["engine_cpu_in_ram"].values():  # the same tokens as the run, when tmpfs exists
        assert cpu["tokens"] == 4 and cpu["ram_read_bps"] > 0
    ffn_bytes = result["ffn_bytes"]
    assert r["naive"]["bytes_read_per_token"] == ffn_bytes          # the whole FFN, every token
    assert r["hybrid"]["bytes_read_per_token"] < ffn_bytes
    assert r["all"]["requests_per_token"] <= r["windowing"]["requests_per_token"]
    assert r["naive"]["speedup_vs_naive"] == 1.0
    table = format_table(result)
    assert "accelerate disk offload" in table and "+bundling (all)" in table
    json.dumps(result)  # JSON-ready


def test_window_sweep_and_layout_summary(tmp_path):
    from flashnb.engine import Policy
    from flashnb.store import ConvertConfig, convert
    from flashnb.viz.engine import layout_summary, window_figure, window_sweep
    from flashnb.widgets.engine import window_explorer

    folder = make_tiny_opt(tmp_path / "hf")
    store = convert(folder, tmp_path / "store", ConvertConfig(dtype="fp32", progress=False))
    rng = np.random.default_rng(0)
    needed = [[np.sort(rng.choice(64, 10, replace=False)) for _ in range(2)] for _ in range(12)]
    rows = window_sweep(needed, store, Policy("oracle", 0, 1.0), range(0, 4))
    assert [r["window"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["hit_share"] == 0.0 and rows[3]["mb_per_token"] < rows[0]["mb_per_token"]
    fig = window_figure(rows, 2)
    tokens = next(t for t in fig.data if t.type == "scatter")
    opacity = {w: o for t in fig.data if t.type == "bar" for w, o in zip(t.x, t.marker.opacity)}
    assert list(tokens.y) == rows[2]["per_token_mb"] and opacity == {0: 0.35, 1: 0.35, 2: 1.0, 3: 0.35}
    box, slider, widget = window_explorer(rows, 64, window=2)
    slider.value = 3                                    # the observer redraws both panels
    tokens = next(t for t in widget.data if t.type == "scatter")
    opacity = {w: o for t in widget.data if t.type == "bar" for w, o in zip(t.x, t.marker.opacity)}
    assert list(tokens.y) == rows[3]["per_token_mb"] and "window 3:" in box.children[1].value
    assert opacity == {0: 0.35, 1: 0.35, 2: 0.35, 3: 1.0}
    s = layout_summary({"bundled": [{"requests": 2, "bytes_read": 4096, "io_seconds": 0.001}]})
    assert s["bundled"]["mean_request_bytes"] == 2048 and abs(s["bundled"]["gbps"] - 0.004096) < 1e-12


def test_configurations_take_turns_one_token_each():
    from flashnb.generate import take_turns

    order = []

    def stream(name, n):
        for i in range(n):
            order.append(name)
            yield i

    texts, spent = take_turns({"a": stream("a", 3), "b": stream("b", 1), "c": stream("c", 3)})
    assert order == ["a", "b", "c", "a", "c", "a", "c"]  # b's text ended after one token
    assert texts == {"a": [0, 1, 2], "b": [0], "c": [0, 1, 2]}
    assert set(spent) == {"a", "b", "c"} and all(s >= 0 for s in spent.values())
