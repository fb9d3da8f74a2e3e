"""Figures for the engine notebooks (03 windowing, 04 bundling, 05 memory management), in the
visual language of `flashnb.viz.style`, drawing the results of flashnb.lab.windowing, .bundling and
.memory.

Previews from a recorded run (flashnb.core.simulate) are *modeled (simulate)*, hatched; engine runs and
timings are *measured*, solid. The window slider lives in `flashnb.widgets.engine`.
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from flashnb.viz import style as S

MB = 1e6


def _window_technique(window: int) -> str:
    return "predictor" if window == 0 else "windowing"


def window_figure(rows, window: int) -> go.Figure:
    """Left: mean MB read per token vs window (modeled by simulate; window 0 is the predictor alone,
    in its colour), the chosen window opaque. Right: MB read token by token at the chosen window."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("mean per token, by window", "token by token, chosen window"))
    ws = [r.window for r in rows]
    fig.add_traces(S.bars(ws, [r.mb_per_token for r in rows], [S.color(_window_technique(w)) for w in ws],
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


def highlight(fig, rows, window: int) -> None:
    """Show `window` in a `window_figure` (or its FigureWidget): its bar opaque, its tokens on the right.
    (The left panel's bars are one trace per colour: window 0 and the windows after it.)"""
    for t in fig.data:
        if t.type == "bar":
            t.marker.opacity = [1.0 if w == window else 0.35 for w in t.x]
    sel = next(r for r in rows if r.window == window)
    c = S.color(_window_technique(window))
    tokens = next(t for t in fig.data if t.type == "scatter")
    tokens.y = list(sel.per_token_mb)
    tokens.marker.color, tokens.line.color = c, c
    tokens.name = S.label(f"window {window}", "modeled", S.SIMULATE)


# -- notebook 05: memory management --------------------------------------------------------------

def memory_figure(timings) -> go.Figure:
    """Memory management per token for one layer (µs) vs window (flashnb.lab.memory.MemoryTiming list): the paper's preallocated matrix with
    swap-with-last deletion (in the colour of all techniques) against reallocating every token (in the
    colour of naive). Measured."""
    ts = sorted(timings, key=lambda t: t.window)
    ws = [t.window for t in ts]
    fig = go.Figure()
    for key, technique, what in (("preallocated_s", "all", "preallocated + swap-with-last"),
                                 ("naive_s", "naive", "reallocate every token")):
        fig.add_trace(go.Bar(x=ws, y=[getattr(t, key) * 1e6 for t in ts], name=S.label(what, "measured"),
                             **S.bar(technique, "measured")))
    S.layout(fig, "Memory management per token, one layer (measured, best of repeats)", x=("window", "tokens"),
             y=("memory management per token", "µs"), height=360, barmode="group")
    fig.update_xaxes(type="category")
    return fig


# -- notebook 04: bundled vs unbundled -----------------------------------------------------------

def layout_figure(summary: dict) -> go.Figure:
    """Requests per token, mean request size and I/O ms per token, bundled vs unbundled (measured),
    each layout in its colour."""
    names = list(summary)
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.1,
                        subplot_titles=("requests per token", "mean request size", "I/O per token"))
    for n in names:
        v = summary[n]
        kw = dict(name=S.label(n, "measured"), legendgroup=n, **S.bar(n, "measured"))
        fig.add_trace(go.Bar(x=[n], y=[v.requests], **kw), 1, 1)
        fig.add_trace(go.Bar(x=[n], y=[v.mean_request_bytes / 1024], showlegend=False, **kw), 1, 2)
        fig.add_trace(go.Bar(x=[n], y=[v.io_ms], showlegend=False, text=[f"{v.gbps:.2f} GB/s"],
                             textposition="outside", **kw), 1, 3)
    S.layout(fig, "Bundled vs unbundled store, same tokens and neurons (measured, direct I/O)", height=380)
    for col, (q, unit) in enumerate((("requests", "count per token"), ("request size", "KiB"),
                                     ("I/O per token", "ms")), start=1):
        fig.update_yaxes(title_text=S.axis_title(q, unit), row=1, col=col)
        fig.update_xaxes(title_text="store layout", row=1, col=col)
    return fig
