"""Figures and widgets for the engine notebooks (03 windowing, 04 bundling, 05 memory management).

Simulated numbers (flashnb.simulate, from a recorded trace) are labelled *preview*; engine runs are
labelled *measured*; the paper's numbers are labelled *paper*.
"""

from __future__ import annotations

import time

import numpy as np
import plotly.graph_objects as go
import torch

from flashnb.cache import NeuronCache

OURS = "#1f77b4"
PREVIEW = "#9ecae1"
PAPER_COLOR = "#d62728"
MB = 1e6


def window_sweep(needed, store, policy, windows=range(0, 9), predictor_bytes: int = 0) -> list[dict]:
    """Simulate each window size: mean MB read per token, neurons cached, hit share (preview)."""
    from dataclasses import replace

    from flashnb.engine import memory_plan
    from flashnb.simulate import simulate
    from flashnb.store import FlashStore

    store = store if isinstance(store, FlashStore) else FlashStore.open(store)
    rows = []
    for w in windows:
        pol = replace(policy, window=int(w))
        sim = simulate(needed, store, pol, predictor_bytes)
        tot = [s.totals() for s in sim[1:]]  # the first token finds an empty cache
        pred = np.mean([t["predicted"] for t in tot])
        rows.append({"window": int(w), "mb_per_token": np.mean([t["bytes_read"] for t in tot]) / MB,
                     "neurons_read": np.mean([t["read"] for t in tot]), "predicted": pred,
                     "hit_share": np.mean([t["cached"] for t in tot]) / pred if pred else 0.0,
                     "capacity_rows": memory_plan(store, pol, predictor_bytes).capacity_rows,
                     "per_token_mb": [s.bytes_read / MB for s in sim]})
    return rows


def window_figure(rows: list[dict], window: int) -> go.FigureWidget:
    """Left: MB read per token vs window (preview); right: per-token MB at the chosen window."""
    from plotly.subplots import make_subplots

    fig = go.FigureWidget(make_subplots(rows=1, cols=2, subplot_titles=(
        "mean data read per token vs window (preview)", "data read per token at the chosen window")))
    ws = [r["window"] for r in rows]
    fig.add_trace(go.Bar(x=ws, y=[r["mb_per_token"] for r in rows], marker_color=PREVIEW, name="preview"), 1, 1)
    sel = next(r for r in rows if r["window"] == window)
    fig.add_trace(go.Scatter(y=sel["per_token_mb"], mode="lines+markers", marker_color=OURS,
                             name=f"window {window} (preview)"), 1, 2)
    fig.update_xaxes(title_text="window (tokens)", row=1, col=1)
    fig.update_yaxes(title_text="MB read per token", row=1, col=1)
    fig.update_xaxes(title_text="token", row=1, col=2)
    fig.update_yaxes(title_text="MB read", row=1, col=2)
    fig.update_layout(height=360, showlegend=False, margin=dict(t=40, b=40))
    _highlight(fig, rows, window)
    return fig


def _highlight(fig, rows, window: int) -> None:
    fig.data[0].marker.color = [OURS if r["window"] == window else PREVIEW for r in rows]
    sel = next(r for r in rows if r["window"] == window)
    fig.data[1].y = sel["per_token_mb"]
    fig.data[1].name = f"window {window} (preview)"


def window_text(row: dict, ffn_neurons: int) -> str:
    return (f"window {row['window']}: {row['mb_per_token']:.3f} MB read per token (preview), "
            f"{row['neurons_read']:.0f} of {row['predicted']:.0f} predicted neurons read "
            f"({row['hit_share']:.0%} already in DRAM); cache {row['capacity_rows']} rows per layer "
            f"= {row['capacity_rows'] / ffn_neurons:.0%} of a layer's FFN. Paper (OPT 6.7B, window 5): "
            "predictor alone loads ~10% of the FFN per token, windowing ~2.4%.")


def window_explorer(rows: list[dict], ffn_neurons: int, window: int = 4):
    """A window slider that redraws the preview figure and its summary line."""
    import ipywidgets as W

    fig = window_figure(rows, window)
    text = W.HTML(window_text(next(r for r in rows if r["window"] == window), ffn_neurons))
    slider = W.IntSlider(value=window, min=rows[0]["window"], max=rows[-1]["window"], description="window")

    def redraw(change):
        with fig.batch_update():
            _highlight(fig, rows, change["new"])
        text.value = window_text(next(r for r in rows if r["window"] == change["new"]), ffn_neurons)

    slider.observe(redraw, names="value")
    return W.VBox([slider, text, fig]), slider, fig


# -- notebook 05: memory management --------------------------------------------------------------

def time_memory_management(needed_per_token: list[np.ndarray], ffn_dim: int, width: int, window: int,
                           capacity: int, dtype=torch.float16, repeats: int = 3) -> dict:
    """Seconds per token of the paper's scheme vs naive reallocation, replaying one layer's sets.

    preallocated: NeuronCache (one matrix allocated once; delete = copy the last rows over the deleted
    ones; append at the end). naive: the cached rows kept as a fresh tensor rebuilt every token
    (torch.cat of the kept rows and the new ones), as a straightforward implementation would.
    Both add the same rows (random values standing in for what the reader returns).
    """
    pool = torch.randn(ffn_dim, width, generator=torch.Generator().manual_seed(0)).to(dtype)
    best = {"preallocated": float("inf"), "naive": float("inf")}
    for _ in range(repeats):
        cache = NeuronCache(ffn_dim, capacity, width, window, dtype)
        t0 = time.perf_counter()
        for ids in needed_per_token:
            plan = cache.plan(ids)
            cache.apply(plan, pool[: plan.load.size])
        best["preallocated"] = min(best["preallocated"], (time.perf_counter() - t0) / len(needed_per_token))

        shadow = NeuronCache(ffn_dim, capacity, 0, window)  # the same decisions, bookkeeping only
        rows, ids_now = torch.empty(0, width, dtype=dtype), np.zeros(0, np.int64)
        t0 = time.perf_counter()
        for ids in needed_per_token:
            plan = shadow.plan(ids)
            keep = ~np.isin(ids_now, plan.evict)
            rows = torch.cat([rows[torch.from_numpy(keep)], pool[: plan.load.size]])  # a new matrix every token
            ids_now = np.concatenate([ids_now[keep], plan.load])
            shadow.apply(plan, torch.empty(plan.load.size, 0))
        best["naive"] = min(best["naive"], (time.perf_counter() - t0) / len(needed_per_token))
    return best


def memory_figure(timings: dict[int, dict]) -> go.Figure:
    """Memory-management seconds per token (ms) vs window, preallocated vs naive (measured)."""
    ws = sorted(timings)
    fig = go.Figure()
    fig.add_trace(go.Bar(x=ws, y=[timings[w]["preallocated"] * 1e3 for w in ws], name="preallocated + swap-with-last",
                         marker_color=OURS))
    fig.add_trace(go.Bar(x=ws, y=[timings[w]["naive"] * 1e3 for w in ws], name="reallocate every token",
                         marker_color="#ff7f0e"))
    fig.update_layout(barmode="group", height=340, xaxis_title="window (tokens)",
                      yaxis_title="ms per token per layer (measured)", margin=dict(t=30, b=40))
    return fig


# -- notebook 04: bundled vs unbundled -----------------------------------------------------------

def layout_summary(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per layout, means per token of TokenStep.totals() dicts: requests, bytes, I/O time, throughput."""
    out = {}
    for layout, tot in runs.items():
        req = float(np.mean([t["requests"] for t in tot]))
        nbytes = float(np.mean([t["bytes_read"] for t in tot]))
        io = float(np.mean([t["io_seconds"] for t in tot]))
        out[layout] = {"requests": req, "mean_request_bytes": nbytes / req if req else 0.0, "mb": nbytes / MB,
                       "io_ms": io * 1e3, "gbps": nbytes / io / 1e9 if io else 0.0}
    return out


def layout_figure(summary: dict[str, dict]) -> go.Figure:
    """Requests per token and I/O ms per token, bundled vs unbundled (measured)."""
    from plotly.subplots import make_subplots

    names = list(summary)
    colors = [OURS if n == "bundled" else "#ff7f0e" for n in names]
    fig = make_subplots(rows=1, cols=3, subplot_titles=("requests per token", "mean request (KiB)",
                                                        "I/O per token (ms, measured)"))
    fig.add_trace(go.Bar(x=names, y=[summary[n]["requests"] for n in names], marker_color=colors), 1, 1)
    fig.add_trace(go.Bar(x=names, y=[summary[n]["mean_request_bytes"] / 1024 for n in names], marker_color=colors), 1, 2)
    fig.add_trace(go.Bar(x=names, y=[summary[n]["io_ms"] for n in names], marker_color=colors,
                         text=[f"{summary[n]['gbps']:.2f} GB/s" for n in names], textposition="outside"), 1, 3)
    fig.update_layout(height=340, showlegend=False, margin=dict(t=40, b=30))
    return fig
