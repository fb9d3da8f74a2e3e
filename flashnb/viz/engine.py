"""Figures for the engine notebooks (03 windowing, 04 bundling, 05 memory management), in the
visual language of `flashnb.viz.style`, and the numbers they plot.

Previews from a recorded run (flashnb.simulate) are *modeled (simulate)*, hatched; engine runs and
timings are *measured*, solid. The window slider lives in `flashnb.widgets.engine`.
"""

from __future__ import annotations

import time

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from flashnb.cache import NeuronCache
from flashnb.viz import style as S

MB = 1e6


def window_sweep(needed, store, policy, windows=range(0, 9), predictor_bytes: int = 0) -> list[dict]:
    """Simulate each window size (modeled): mean MB read per token, neurons read, hit share, cache rows,
    and the MB read token by token."""
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


def _window_technique(window: int) -> str:
    return "predictor" if window == 0 else "windowing"


def window_figure(rows: list[dict], window: int) -> go.Figure:
    """Left: mean MB read per token vs window (modeled by simulate; window 0 is the predictor alone,
    in its colour), the chosen window opaque. Right: MB read token by token at the chosen window."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("mean per token, by window", "token by token, chosen window"))
    ws = [r["window"] for r in rows]
    fig.add_traces(S.bars(ws, [r["mb_per_token"] for r in rows], [S.color(_window_technique(w)) for w in ws],
                          "modeled", S.label("mean per token", "modeled", S.SIMULATE)), rows=1, cols=1)
    fig.add_trace(go.Scatter(y=[], **S.scatter("windowing", "modeled")), 1, 2)
    S.layout(fig, "Data read from flash per token, one recorded run (modeled, simulate)", height=400,
             showlegend=False)
    fig.update_layout(margin=dict(b=50))
    fig.update_xaxes(title_text=S.axis_title("window", "tokens"), row=1, col=1)
    fig.update_yaxes(title_text=S.axis_title("read per token", "MB"), row=1, col=1)
    fig.update_xaxes(title_text=S.axis_title("generated token", "index"), row=1, col=2)
    fig.update_yaxes(title_text=S.axis_title("read", "MB"), row=1, col=2)
    highlight(fig, rows, window)
    return fig


def highlight(fig, rows: list[dict], window: int) -> None:
    """Show `window` in a `window_figure` (or its FigureWidget): its bar opaque, its tokens on the right.
    (The left panel's bars are one trace per colour: window 0 and the windows after it.)"""
    for t in fig.data:
        if t.type == "bar":
            t.marker.opacity = [1.0 if w == window else 0.35 for w in t.x]
    sel = next(r for r in rows if r["window"] == window)
    c = S.color(_window_technique(window))
    tokens = next(t for t in fig.data if t.type == "scatter")
    tokens.y = sel["per_token_mb"]
    tokens.marker.color, tokens.line.color = c, c
    tokens.name = S.label(f"window {window}", "modeled", S.SIMULATE)


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
    """Memory management per token for one layer (µs) vs window: the paper's preallocated matrix with
    swap-with-last deletion (in the colour of all techniques) against reallocating every token (in the
    colour of naive). Measured."""
    ws = sorted(timings)
    fig = go.Figure()
    for key, technique, what in (("preallocated", "all", "preallocated + swap-with-last"),
                                 ("naive", "naive", "reallocate every token")):
        fig.add_trace(go.Bar(x=ws, y=[timings[w][key] * 1e6 for w in ws], name=S.label(what, "measured"),
                             **S.bar(technique, "measured")))
    S.layout(fig, "Memory management per token, one layer (measured, best of repeats)", x=("window", "tokens"),
             y=("memory management per token", "µs"), height=360, barmode="group")
    fig.update_xaxes(type="category")
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
    """Requests per token, mean request size and I/O ms per token, bundled vs unbundled (measured),
    each layout in its colour."""
    names = list(summary)
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.1,
                        subplot_titles=("requests per token", "mean request size", "I/O per token"))
    for n in names:
        v = summary[n]
        kw = dict(name=S.label(n, "measured"), legendgroup=n, **S.bar(n, "measured"))
        fig.add_trace(go.Bar(x=[n], y=[v["requests"]], **kw), 1, 1)
        fig.add_trace(go.Bar(x=[n], y=[v["mean_request_bytes"] / 1024], showlegend=False, **kw), 1, 2)
        fig.add_trace(go.Bar(x=[n], y=[v["io_ms"]], showlegend=False, text=[f"{v['gbps']:.2f} GB/s"],
                             textposition="outside", **kw), 1, 3)
    S.layout(fig, "Bundled vs unbundled store, same tokens and neurons (measured, direct I/O)", height=380)
    for col, (q, unit) in enumerate((("requests", "count per token"), ("request size", "KiB"),
                                     ("I/O per token", "ms")), start=1):
        fig.update_yaxes(title_text=S.axis_title(q, unit), row=1, col=col)
        fig.update_xaxes(title_text="store layout", row=1, col=col)
    return fig
