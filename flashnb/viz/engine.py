"""Figures for the engine notebooks (03 windowing, 04 bundling, 05 memory management), in the
visual language of `flashnb.viz.style`, drawing the results of flashnb.lab.windowing, .bundling and
.memory.

Previews from a recorded run (flashnb.core.simulate) are *modeled (simulate)*, hatched; engine runs and
timings are *measured*, solid. The window slider lives in `flashnb.widgets.engine`.
"""

from __future__ import annotations

import html

import numpy as np

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from flashnb.viz import style as S


def _window_technique(window: int) -> str:
    return "predictor" if window == 0 else "windowing"


def window_figure(grid, window: int, budget: float, paper: dict) -> go.Figure:
    """Left: the share of the FFN read per token vs window at `budget` (modeled by simulate; window 0 is the
    predictor alone, in its colour), the chosen window opaque, the paper's OPT 6.7B points (predictor alone,
    and its window) as stars. Right: the same for every budget (rows) and window (columns), the chosen cell
    framed. `grid`: flashnb.lab.windowing.WindowGrid; `paper`: data/paper.json's opt_6_7b_policy."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.14,
                        subplot_titles=("by window, at the chosen DRAM budget", "every budget and window"))
    ws = list(grid.windows)
    rows = grid.at(budget)
    fig.add_traces(S.bars(ws, [100 * r.ffn_share for r in rows], [S.color(_window_technique(w)) for w in ws],
                          "modeled", S.label("read per token", "modeled", S.SIMULATE),
                          hovertemplate="window %{x}: %{y:.2f}% of the FFN<extra></extra>"), rows=1, cols=1)
    k = paper["window"]
    # the stars' values in the legend and the hover, not beside them: a star inside a bar would cover its label
    fig.add_trace(go.Scatter(x=[0, k], y=[100 * paper["ffn_loaded_predictor"], 100 * paper["ffn_loaded_window"]],
                             name=S.label(f"OPT 6.7B, half memory: {paper['ffn_loaded_predictor']:.0%} at window 0, "
                                          f"{paper['ffn_loaded_window']:.1%} at window {k}", "paper"),
                             hovertemplate="OPT 6.7B, window %{x}: %{y:.1f}% of the FFN (paper)<extra></extra>",
                             **S.scatter("paper", "paper", S.PAPER, mode="markers")), 1, 1)
    fig.add_trace(go.Heatmap(x=ws, y=[f"{b:.0%}" for b in grid.budgets],
                             z=[[100 * r.ffn_share for r in rs] for rs in grid.rows],
                             colorscale=[[0, "white"], [1, S.color("windowing")]], texttemplate="%{z:.1f}",
                             showscale=False, name=S.label("read per token, % of the FFN", "modeled", S.SIMULATE),
                             hovertemplate="window %{x}, budget %{y}: %{z:.2f}% of the FFN<extra></extra>"), 1, 2)
    fig.add_shape(type="rect", xref="x2", yref="y2", name="chosen", line=dict(color=S.PAPER, width=3, dash="solid"))
    S.layout(fig, "Share of the FFN read from flash per token, one recorded run (modeled by simulate)", height=420)
    fig.update_xaxes(title_text=S.axis_title("window", "tokens"), dtick=1)
    fig.update_yaxes(title_text=S.axis_title("read per token", "% of the FFN"), rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text=S.axis_title("DRAM budget", "% of the model"), row=1, col=2)
    highlight(fig, grid, window, budget)
    return fig


def highlight(fig, grid, window: int, budget: float) -> None:
    """Show `window` at `budget` in a `window_figure` (or its FigureWidget): the left panel's bars at that
    budget, the chosen bar opaque; the heat map's frame on that cell. (The bars are one trace per colour:
    window 0 and the windows after it.)"""
    for t in fig.data:
        if t.type == "bar":
            t.y = [100 * grid.row(budget, w).ffn_share for w in t.x]
            t.marker.opacity = [1.0 if w == window else 0.35 for w in t.x]
    i = grid.budgets.index(budget)   # the heat map's rows are categories 0, 1, ... on its y axis
    fig.update_shapes(dict(x0=window - 0.5, x1=window + 0.5, y0=i - 0.5, y1=i + 0.5), selector=dict(name="chosen"))


# The colours of a neuron's states in `timeline_figure` (flashnb.lab.windowing.STATES, 0..4).
_STATE_COLORS = ("white", S.sequence(7)[0], S.color("windowing"), S.color("predictor"), S.color("naive"))


def timeline_figure(tl, n_prompt: int = 0) -> go.Figure:
    """One layer's most needed neurons (rows, most needed on top) token by token (columns): white not in DRAM,
    light blue held but not needed, green needed and already held (a window hit), orange read from flash,
    grey evicted; modeled by replaying the engine's window decisions (flashnb.lab.windowing.window_timeline)."""
    from flashnb.lab.windowing import STATES

    n = len(_STATE_COLORS)
    scale = [[f, c] for i, c in enumerate(_STATE_COLORS) for f in (i / n, (i + 1) / n)]
    fig = go.Figure(go.Heatmap(z=tl.states, zmin=-0.5, zmax=n - 0.5, colorscale=scale, showscale=False,
                               y=[f"n{i}" for i in tl.neurons], name=S.label("state", "modeled", S.SIMULATE),
                               customdata=[[STATES[int(v)] for v in row] for row in tl.states],
                               hovertemplate="token %{x}, neuron %{y}: %{customdata}<extra></extra>"))
    if n_prompt:
        fig.add_vline(x=n_prompt - 0.5, line_dash="dash", line_color=S.color("dense"), line_width=2.5)  # on any cell
    S.layout(fig, f"Layer {tl.layer}: window {tl.window}, {tl.capacity_rows} rows (modeled by simulate)",
             x=("token", "prompt left of the dashed line"), y=("neuron", f"the {len(tl.neurons)} most needed"),
             height=430)
    S.color_key(fig, [(c, STATES[i]) for i, c in enumerate(_STATE_COLORS) if i], "modeled by simulate")
    fig.update_yaxes(showticklabels=False, autorange="reversed")
    return fig


def window_animation_figure(tl, tokens: list[str], n_prompt: int = 0, ms_per_token: int = 600) -> go.Figure:
    """The window sliding over a sentence: `timeline_figure`'s heat map revealed one token per frame (plotly
    frames, a play button and a token slider). Each frame frames, in the window's colour, the tokens whose
    neurons the window keeps in DRAM and outlines the token being generated; the title quotes both. `tokens`:
    the text of every token of the timeline (prompt included); modeled, like the timeline."""
    from flashnb.lab.windowing import EVICTED, HIT, READ, STATES

    base = timeline_figure(tl, n_prompt)
    z = tl.states
    n_neurons, n_tokens = z.shape
    top, bottom = -0.5, n_neurons - 0.5
    edge = max(1.0, n_neurons / 30)  # the frames' top and bottom run this many rows clear of the cells, where
    #                                  the window's green cannot hide them

    def box(x0, x1):  # a closed rectangle over the whole heat map, as a line trace (frames animate traces)
        return dict(x=[x0, x1, x1, x0, x0], y=[top - edge, top - edge, bottom + edge, bottom + edge, top - edge])

    def frame_data(t):
        shown = [[int(v) for v in row[:t + 1]] + [None] * (n_tokens - t - 1) for row in z]   # later tokens blank
        first = max(0, t - tl.window)
        held = box(first - 0.5, t - 0.5) if tl.window and t > 0 else dict(x=[], y=[])   # nothing kept: no frame
        now = box(t - 0.5, t + 0.5)
        return [go.Heatmap(z=shown), go.Scatter(**held), go.Scatter(**now), go.Scatter(**held), go.Scatter(**now)]

    def title(t):
        col = tl.states[:, t]
        # short lines (the left part of the figure: JupyterLab's toolbar sits at the top right); "</s>" is text
        quote = lambda text: html.escape(repr(text if len(text) <= 40 else "…" + text[-39:]), quote=False)  # noqa: E731
        kept = "".join(tokens[max(0, t - tl.window):t])
        held = f"DRAM keeps the neurons of {quote(kept)}" if tl.window and t else "nothing kept from earlier tokens"
        return (f"Layer {tl.layer}, window {tl.window}, token {t}: {quote(tokens[t])}<br>{held}<br>"
                f"{int((col == HIT).sum())} hits, {int((col == READ).sum())} read, "
                f"{int((col == EVICTED).sum())} evicted (modeled by simulate)")

    fig = go.Figure(base.data, base.layout)
    # numeric rows (the frames are drawn over them) with the neuron ids in the hover text
    fig.data[0].update(z=frame_data(0)[0].z, y=list(range(n_neurons)),
                       customdata=[[f"neuron {i}: {STATES[int(v)]}" for v in row] for i, row in zip(tl.neurons, tl.states)],
                       hovertemplate="token %{x}, %{customdata}<extra></extra>")
    kept_color, now_color = S.color("windowing"), S.color("dense")
    for at, width in ((dict(x=[], y=[]), 4), (box(-0.5, 0.5), 2)):  # a white band under each frame: an edge
        fig.add_trace(go.Scatter(**at, **S.halo(width)))               # between two columns of green hits shows
    fig.add_trace(go.Scatter(x=[], y=[], mode="lines", line=dict(color=kept_color, width=4, dash="dash"),
                             fill="toself", fillcolor="rgba(0,158,115,0.12)", hoverinfo="skip", showlegend=False,
                             name=S.label("tokens the window keeps", "modeled", S.SIMULATE)))
    fig.add_trace(go.Scatter(**box(-0.5, 0.5), mode="lines", line=dict(color=now_color, width=2, dash="dash"),
                             hoverinfo="skip", showlegend=False,
                             name=S.label("token being generated", "modeled", S.SIMULATE)))
    key = fig.layout.annotations[0]   # the colour key: add the two frames
    key.text = (key.text.replace(" (modeled by simulate)", "") + f"<br><span style='color:{kept_color}'>&#9633;</span> "
                f"tokens the window keeps <span style='color:{now_color}'>&#9633;</span> token being generated "
                "(modeled by simulate)")
    fig.frames = [go.Frame(data=frame_data(t), traces=[0, 1, 2, 3, 4], name=str(t), layout=dict(title_text=title(t)))
                  for t in range(n_tokens)]
    play = dict(frame=dict(duration=ms_per_token, redraw=True), fromcurrent=True, transition=dict(duration=0))
    fig.update_layout(
        title_text=title(0), height=580, margin=dict(l=60, r=20, t=155, b=120),
        updatemenus=[dict(type="buttons", direction="left", x=0, y=-0.16, xanchor="left", yanchor="top",
                          buttons=[dict(label="play", method="animate", args=[None, play]),
                                   dict(label="pause", method="animate",
                                        args=[[None], dict(frame=dict(duration=0, redraw=False), mode="immediate")])])],
        sliders=[dict(x=0.16, y=-0.12, len=0.84, currentvalue=dict(visible=False),
                      steps=[dict(label=str(t), method="animate",
                                  args=[[str(t)], dict(frame=dict(duration=0, redraw=True), mode="immediate")])
                             for t in range(n_tokens)])])
    fig.update_xaxes(range=[-0.6, n_tokens - 0.4])   # the frames' outer edges inside the plot
    fig.update_yaxes(range=[bottom + 1.5 * edge, top - 1.5 * edge])
    return fig


def byte_layout_figure(slices) -> go.Figure:
    """The first rows of each region of one layer (flashnb.lab.bundling.byte_layout), one line per region:
    the rows one token needs, filled in their layout's colour, and the reads the reader issues for them, framed
    (dashed); modeled by the reader's own request planner, nothing read."""
    fig = go.Figure()
    labels = [f"{s.layout}: {s.region}" for s in slices]
    for i, (s, label) in enumerate(zip(slices, labels)):
        kib = s.row_bytes / 1024
        fig.add_trace(go.Bar(orientation="h", y=[label] * len(s.needed), x=[kib] * len(s.needed),
                             base=[n * kib for n in s.needed], width=0.5, showlegend=i in (0, len(slices) - 1),
                             name=S.label(f"rows needed, {s.layout}", "modeled"), legendgroup=s.layout,
                             hovertemplate="neuron row at %{base:.1f} KiB<extra></extra>", **S.bar(s.layout, "modeled")))
        for off, n in s.requests:
            row = len(slices) - 1 - i   # the category's position: the first slice is drawn on top
            fig.add_shape(type="rect", x0=off / 1024, x1=(off + n) / 1024, y0=row - 0.38, y1=row + 0.38,
                          line=dict(color=S.OURS, width=1.5, dash="dash"))
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=dict(color=S.OURS, width=1.5, dash="dash"),
                             name=S.label("a read the reader issues", "modeled")))   # the frames' legend entry
    S.layout(fig, "Where one token's neurons lie in each layout, and the reads that fetch them (modeled)",
             x=("offset in the region", "KiB"), y=("region of the layer", "layout: matrices"),
             height=140 + 60 * len(slices), barmode="overlay")
    fig.update_yaxes(categoryorder="array", categoryarray=labels[::-1], range=[-0.6, len(slices) - 0.4])
    rows = slices[0].rows * slices[0].row_bytes / 1024 if slices else 0
    fig.update_xaxes(range=[0, rows])
    return fig


# -- notebook 05: memory management --------------------------------------------------------------

def memory_figure(timings) -> go.Figure:
    """Memory management per token for one layer (µs) vs window (flashnb.lab.memory.MemoryTiming list): the
    paper's preallocated matrix with swap-with-last deletion (in the colour of all techniques) against
    reallocating every token (in the colour of naive). Measured: the median of the runs (points on a log axis,
    where bars would start from an arbitrary floor), the whiskers their range."""
    ts = sorted(timings, key=lambda t: t.window)
    ws = [t.window for t in ts]
    fig = go.Figure()
    for key, technique, what in (("preallocated", "all", "preallocated + swap-with-last"),
                                 ("naive", "naive", "reallocate every token")):
        mid = [getattr(t, f"{key}_s") * 1e6 for t in ts]
        runs = [getattr(t, f"{key}_runs") or (getattr(t, f"{key}_s"),) for t in ts]
        fig.add_trace(go.Scatter(x=ws, y=mid, name=S.label(what, "measured"), **S.scatter(technique, "measured"),
                             error_y=S.whiskers(mid, [[x * 1e6 for x in r] for r in runs]),
                             customdata=[[min(r) * 1e6, max(r) * 1e6] for r in runs],
                             hovertemplate=f"{what}, window %{{x}}: %{{y:.0f}} µs per token (median; runs "
                                           "%{customdata[0]:.0f}-%{customdata[1]:.0f} µs)<extra></extra>"))
    S.layout(fig, "Memory management per token, one layer (measured: medians, whiskers: range)",
             x=("window", "tokens"), y=("memory management per token", "µs"), height=360)
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="log")   # reallocating can cost tens of times more: on a linear axis the other vanishes
    return S.label_log_axes(fig)


_ROW_STATES = ("free", "kept", "moved", "new")
_ROW_COLORS = ("white", S.sequence(7)[1], S.color("all"), S.color("predictor"))


def swap_figure(snapshots) -> go.Figure:
    """A layer's preallocated rows (rows of the matrix, top to bottom) after each step of
    flashnb.lab.memory.swap_with_last_steps (columns), each cell the neuron id the row holds: kept rows light,
    rows moved into a hole blue, new rows orange, free rows white."""
    n = len(_ROW_STATES)
    scale = [[f, c] for i, c in enumerate(_ROW_COLORS) for f in (i / n, (i + 1) / n)]
    z = [[_ROW_STATES.index(s.state[r]) for s in snapshots] for r in range(len(snapshots[0].ids))]
    text = [["" if s.ids[r] < 0 else str(s.ids[r]) for s in snapshots] for r in range(len(snapshots[0].ids))]
    said = [["free: spare capacity" if s.ids[r] < 0 else f"neuron {s.ids[r]} ({s.state[r]})" for s in snapshots]
            for r in range(len(snapshots[0].ids))]
    fig = go.Figure(go.Heatmap(z=z, text=text, texttemplate="%{text}", zmin=-0.5, zmax=n - 0.5, colorscale=scale,
                               showscale=False, xgap=3, ygap=3, x=[s.caption for s in snapshots],
                               y=[f"row {r}" for r in range(len(z))], name=S.label("rows", "measured"),
                               customdata=said, hovertemplate="%{y}: %{customdata}<extra></extra>"))
    S.layout(fig, f"Swap-with-last, step by step (the engine's NeuronRows on {len(z)} rows, measured)",
             x=("step", None),
             y=("row of the preallocated matrix", None), height=380)
    fig.update_layout(margin_l=80)
    S.color_key(fig, list(zip(_ROW_COLORS[1:], _ROW_STATES[1:])), "measured: flashnb's NeuronRows; white: free")
    fig.update_yaxes(autorange="reversed")
    return fig


# -- notebook 04: bundled vs unbundled -----------------------------------------------------------

def layout_figure(summary: dict, title: str = "Bundled vs unbundled store, same tokens") -> go.Figure:
    """Requests per token, mean request size and I/O ms per token, one bar per store (measured), each layout
    in its colour."""
    names = list(summary)
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.1,
                        subplot_titles=("requests per token", "mean request size", "I/O per token"))
    for n in names:
        v = summary[n]
        kw = dict(name=S.label(n, "measured"), legendgroup=n, **S.bar(n, "measured"))
        runs = v.io_ms_runs or (v.io_ms,)
        fig.add_trace(go.Bar(x=[n], y=[v.requests], hovertemplate=f"{n}: %{{y:.0f}} requests per token<extra></extra>",
                             **kw), 1, 1)
        fig.add_trace(go.Bar(x=[n], y=[v.mean_request_bytes / 1024], showlegend=False,
                             hovertemplate=f"{n}: %{{y:.2f}} KiB per request<extra></extra>", **kw), 1, 2)
        fig.add_trace(go.Bar(x=[n], y=[v.io_ms], showlegend=False, text=[f"{v.gbps:.3f} GB/s"],
                             hovertemplate=f"{n}: %{{y:.2f}} ms per token (runs {', '.join(f'{r:.2f}' for r in runs)})"
                                           "<extra></extra>",
                             textposition="inside", insidetextanchor="start", textfont=dict(color="white"),
                             **kw,   # the label at the bar's foot, clear of the whisker at its top
                             error_y=S.whiskers([v.io_ms], [runs])), 1, 3)
    S.layout(fig, f"{title} (measured, direct I/O; whiskers: runs' range)",
             height=380)
    for col, (q, unit) in enumerate((("requests", "count per token"), ("request size", "KiB"),
                                     ("I/O per token", "ms")), start=1):
        fig.update_yaxes(title_text=S.axis_title(q, unit), row=1, col=col)
        fig.update_xaxes(title_text="store layout", row=1, col=col)
    return fig


def placement_figure(sets: list[np.ndarray], ffn_dim: int, position: np.ndarray, tokens: int = 64,
                     rows: int | None = None) -> go.Figure:
    """Which rows of one layer's file a run of tokens reads (filled), rows on the y axis in file order (the
    first `rows` of them, default all): left the original order (neuron i at row i), right the co-activation
    order (`position[i]`: neuron i's row)."""
    sets = sets[:tokens]
    rows = rows or ffn_dim
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=("original order: neuron i at row i", "co-activation order"))
    for col, pos in ((1, np.arange(ffn_dim)), (2, position)):
        z = np.zeros((ffn_dim, len(sets)), np.uint8)
        for t, ids in enumerate(sets):
            z[pos[ids], t] = 1
        layout = "co-activation" if col == 2 else "bundled"
        fig.add_trace(go.Heatmap(z=z[:rows], colorscale=[[0, "white"], [1, S.color(layout)]], showscale=False,
                                 name=S.label(f"read, {layout} store", "measured"),
                                 hovertemplate="token %{x}<br>file row %{y}<br>read %{z} (measured)<extra></extra>"),
                      1, col)
    S.layout(fig, f"Where one layer's reads fall in its first {rows} file rows, token by token (measured sets)",
             x=("token", "position in the text"), y=("file row", "neuron slot in the layer's region"), height=520)
    fig.update_yaxes(autorange="reversed")
    return fig


def dtype_figure(summary: dict, quality: dict, chosen: str = "q4") -> go.Figure:
    """Notebook 04's row formats: left, one neuron's bundle of each format drawn to scale (each part's codes,
    then its scales, flashnb.core.quant); middle and right, the data read and the I/O time per token
    (measured, `summary`: format -> flashnb.lab.bundling.LayoutStats), whiskers the runs' range. `quality`:
    format -> QuantQuality, for the hover. The `chosen` format is drawn solid, the others faded
    (`highlight_dtype` moves it)."""
    names = list(summary)
    fig = make_subplots(rows=1, cols=3, column_widths=[0.5, 0.25, 0.25], horizontal_spacing=0.08,
                        subplot_titles=("one neuron's bundle", "read per token", "I/O per token"))
    for n in names:
        q = quality[n]
        code = q.neuron_bytes / len(q.parts) if n not in ("int8", "q4") else q.code_bytes
        scale = q.neuron_bytes / len(q.parts) - code
        x0 = 0.0
        for j, part in enumerate(q.parts):
            for what, width in (("values", code), ("scales", scale)):
                if width:
                    look = S.bar(n, "measured", None if what == "values" else S.SCALES)
                    look["marker"].update(line=dict(color="white", width=1), opacity=_faded(n, chosen))
                    fig.add_trace(go.Bar(orientation="h", y=[n], x=[width], base=[x0], width=0.6, showlegend=False,
                                         name=S.label(f"{n} {what}", "measured"), meta=[n], textposition="inside",
                                         insidetextfont=dict(color=_ink(n, chosen)),
                                         text=[part if what == "values" else ""], insidetextanchor="middle",
                                         hovertemplate=f"{n}, {part}, {what}: {width:.0f} B<extra></extra>",
                                         **look), 1, 1)
                x0 += width
        v = summary[n]
        kw = dict(showlegend=False, meta=[n], **S.bar(n, "measured"))
        kw["marker"]["opacity"] = _faded(n, chosen)
        fig.add_trace(go.Bar(x=[n], y=[v.mb], name=S.label(n, "measured"),
                             hovertemplate=f"{n}: %{{y:.3f}} MB per token, {v.requests:.0f} requests of "
                                           f"{v.mean_request_bytes / 1024:.1f} KiB<extra></extra>", **kw), 1, 2)
        runs = v.io_ms_runs or (v.io_ms,)
        fig.add_trace(go.Bar(x=[n], y=[v.io_ms], name=S.label(n, "measured"), error_y=S.whiskers([v.io_ms], [runs]),
                             hovertemplate=f"{n}: %{{y:.2f}} ms per token (runs {', '.join(f'{r:.2f}' for r in runs)})"
                                           "<extra></extra>", **kw), 1, 3)
    S.layout(fig, "Row formats: bytes per neuron, and what the engine reads per token in the same DRAM (measured)",
             height=360, barmode="overlay")
    fig.update_xaxes(title_text=S.axis_title("bundle bytes: values, then scales in yellow", "B"), row=1, col=1)
    fig.update_yaxes(categoryorder="array", categoryarray=names[::-1], title_text="FFN row format", row=1, col=1)
    for col, (qty, unit) in ((2, ("read per token", "MB")), (3, ("I/O per token", "ms"))):
        fig.update_yaxes(title_text=S.axis_title(qty, unit), row=1, col=col)
        fig.update_xaxes(title_text="FFN row format", row=1, col=col)
    return fig


def _faded(name: str, chosen: str) -> float:
    """The fill opacity of a format's bars: the chosen one solid, the others faded (their labels stay legible)."""
    return 1.0 if name == chosen else 0.35


def _ink(name: str, chosen: str) -> str:
    """A bundle bar's label colour: white on the chosen (solid) bar, dark on the faded ones."""
    return "white" if name == chosen else S.TECHNIQUE_COLORS["floor"]


def highlight_dtype(fig, chosen: str) -> None:
    """Draw format `chosen` solid and the others faded in a dtype_figure (a FigureWidget: in place)."""
    for t in fig.data:
        if t.meta:
            t.marker.opacity = _faded(t.meta[0], chosen)
            if t.orientation == "h":   # the bundle bars, labelled inside
                t.insidetextfont.color = _ink(t.meta[0], chosen)
