"""flashnb's visual language: one colour per technique, one mark per source, units on every axis.

Every figure in the notebooks takes its colours and marks from here, so "+windowing" is the same
green in notebook 03 and notebook 06, and a reader can tell at a glance whether a number was

    measured  on this machine        solid bars, filled markers, solid lines
    modeled   by flashnb.costmodel   hatched bars, open markers, dashed lines
              or flashnb.simulate
    paper     Alizadeh et al. 2024   bars outlined in the technique's colour, star markers, dotted lines

Latency breakdowns use one colour per component (I/O, memory management, compute). A series whose
bars differ in colour (one per technique) is one trace per colour, made by `bars`: plotly.js cannot hatch
bars given an array of colours, and `bar` refuses one for a hatched source.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

SOURCES = ("measured", "modeled", "paper")
SOURCE_WORDS = re.compile(r"\b(measured|modeled|paper)\b")  # a text that already names its source

# One colour per configuration of the paper's ladder and per peer (colour-blind-safe Okabe-Ito order).
TECHNIQUE_COLORS: dict[str, str] = {
    "naive": "#7f7f7f",        # grey: whole FFN every token
    "hybrid": "#a6761d",       # brown: half resident, half streamed
    "predictor": "#e69f00",    # orange: + low-rank predictors
    "windowing": "#009e73",    # green: + window of recent tokens
    "all": "#0072b2",          # blue: + row-column bundling = all techniques
    "mmap": "#cc79a7",         # pink: llama.cpp-style mmap streaming
    "accelerate": "#d55e00",   # vermillion: transformers + accelerate disk offload
    "dense": "#000000",        # black: the whole model in DRAM (the reference)
    "pinned": "#6a3d9a",       # purple: all + hot neurons pinned (PowerInfer's split)
    "lookahead": "#fb9a99",    # salmon: all + lookahead reads
    "placed": "#882255",       # wine: all on a store in the co-activation order
    "floor": "#333333",        # near black: the FFN in DRAM, nothing read (the floor of a sparse token)
    "int8": "#117733",         # dark green: all on int8 bundles
    "q4": "#44aa99",           # teal: all on q4 bundles
    "reads": "#88ccee",        # sky blue: all's reads alone (the disk and the kernel, nothing computed)
    "bound": "#999933",        # olive: the lower bound those reads and the floor give
}
TECHNIQUE_LABELS: dict[str, str] = {
    "naive": "naive (whole FFN)", "hybrid": "hybrid", "predictor": "+predictor", "windowing": "+windowing",
    "all": "+bundling (all)", "mmap": "mmap streaming", "accelerate": "accelerate disk offload",
    "dense": "dense in DRAM", "pinned": "all + hot pinned", "lookahead": "all + lookahead", "placed": "all, co-activation order",
    "floor": "floor (FFN in DRAM, no reads)", "int8": "all, int8 bundles", "q4": "all, q4 bundles",
    "reads": "all's reads alone (disk+kernel)", "bound": "lower bound (floor + reads alone - the floor's FFN math)",
}
# Other spellings of the techniques (costmodel.paper_policies, flashnb bench, the paper's Table 2).
TECHNIQUE_ALIASES: dict[str, str] = {
    "+predictor": "predictor", "+windowing": "windowing", "+bundling": "all", "+bundling (all)": "all",
    "bundling": "all", "naive (whole FFN)": "naive", "accelerate disk offload": "accelerate",
    "mmap streaming": "mmap",
}
# Store layouts share the colours of the techniques they stand for.
LAYOUT_COLORS: dict[str, str] = {"bundled": TECHNIQUE_COLORS["all"], "unbundled": TECHNIQUE_COLORS["predictor"],
                                 "co-activation": TECHNIQUE_COLORS["placed"],  # bundled, co-activation order
                                 "fp16": TECHNIQUE_COLORS["all"]}  # bundled fp16 beside int8 and q4

# Latency components (stacked bars).
COMPONENT_COLORS: dict[str, str] = {"io": "#56b4e9", "mm": "#f0e442", "compute": "#999999"}
COMPONENT_LABELS: dict[str, str] = {"io": "I/O", "mm": "memory management", "compute": "compute"}

# The parts of a token in the engine's own split (flashnb.bench.report.SPLIT), each in its component's hue.
PHASE_COLORS: dict[str, str] = {
    "model_without_ffn": "#999999", "predict": "#e69f00", "window": "#f0e442", "memory": "#d9c600",
    "submit": "#56b4e9", "wait": "#0072b2", "ffn": "#666666", "rest": "#cccccc"}
PHASE_LABELS: dict[str, str] = {
    "model_without_ffn": "model without its FFNs", "predict": "predictors", "window": "window planning",
    "memory": "memory management", "submit": "submitting reads", "wait": "waiting on reads",
    "ffn": "sparse FFN math", "rest": "the rest (Python between steps)"}

# Anything that is neither a technique nor a component: this machine's data series / the paper's.
OURS = TECHNIQUE_COLORS["all"]
SCALES = COMPONENT_COLORS["mm"]  # the fp16 scales inside a quantized bundle (notebook 04), beside its values
PAPER = "#d62728"

# Series that are not techniques (reads in flight, layers): a neutral ramp from light to dark grey-blue.
_SEQUENCE = ("#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b")

# How a modeled number was made, for label(..., via=...): one spelling in every figure.
SIMULATE = "simulate"            # flashnb.simulate replaying recorded neuron sets (a preview)
COST_MODEL = "the cost model"    # flashnb.costmodel
FITTED_PROFILE = "the fitted profile"  # flashnb.profile's interpolation between measured cells

_BAR_PATTERN = {"measured": "", "modeled": "/", "paper": ""}
_MARKER_SYMBOL = {"measured": "circle", "modeled": "circle-open", "paper": "star"}
_DASH = {"measured": "solid", "modeled": "dash", "paper": "dot"}


def _check(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")


def technique(name: str) -> str:
    """The key of TECHNIQUE_COLORS for any spelling of a technique: '+bundling' -> 'all'."""
    return TECHNIQUE_ALIASES.get(name, name)


def color(technique: str) -> str:
    """The colour of a technique (any spelling in TECHNIQUE_ALIASES), layout or latency component."""
    technique = TECHNIQUE_ALIASES.get(technique, technique)
    for table in (TECHNIQUE_COLORS, LAYOUT_COLORS, COMPONENT_COLORS, PHASE_COLORS):
        if technique in table:
            return table[technique]
    raise KeyError(f"no colour for {technique!r}; known: {sorted({**TECHNIQUE_COLORS, **LAYOUT_COLORS, **COMPONENT_COLORS})}")


def sequence(n: int) -> list[str]:
    """`n` colours for series that are not techniques (reads in flight, layers), light to dark."""
    if n <= 1:
        return [_SEQUENCE[-2]] * n
    return [_SEQUENCE[round(i * (len(_SEQUENCE) - 1) / (n - 1))] for i in range(n)]


def label(name: str, source: str, via: str | None = None) -> str:
    """A legend entry that says where the number comes from: '+windowing (measured)',
    '+windowing (modeled by simulate)' with via=SIMULATE."""
    _check(source)
    name = TECHNIQUE_ALIASES.get(name, name)
    return f"{TECHNIQUE_LABELS.get(name, COMPONENT_LABELS.get(name, name))} ({source}{' by ' + via if via else ''})"


def bar(name: str, source: str, color_: str | None = None) -> dict:
    """Keyword arguments for go.Bar: colour of `name` (or `color_`), marked as `source`.

    One colour per trace where the source is hatched: plotly.js cannot hatch bars of an array of colours
    (it logs 'Invalid color specifier' and draws the hatching black), so bars of several colours in one
    series are one trace per colour, made by `bars`."""
    _check(source)
    if not (color_ is None or isinstance(color_, str)):
        if _BAR_PATTERN[source]:
            raise ValueError(f"one colour per {source} bar trace: plotly.js cannot hatch bars of an array of "
                             f"colours; use flashnb.viz.style.bars (one trace per colour), got {color_!r}")
        color_ = list(color_)
    c = color_ or color(name)
    if source == "paper":
        return dict(marker=dict(color="rgba(0,0,0,0)", line=dict(color=c, width=2)))
    return dict(marker=dict(color=c, pattern=dict(shape=_BAR_PATTERN[source], fillmode="overlay",
                                                  fgcolor="white" if source == "modeled" else None)))


def bars(x: Sequence, y: Sequence, colors: Sequence[str], source: str, name: str, *, offsetgroup: str | None = None,
         legendgroup: str | None = None, showlegend: bool = True, **kwargs) -> list[go.Bar]:
    """One series of bars in several colours (bar i in colors[i]), marked as `source`: one go.Bar per
    colour, in first-appearance order, each holding the bars of its colour.

    They share `offsetgroup` and `legendgroup` (default: `name`), so that in barmode 'group' the series
    takes one slot per x, its bars as wide and placed as one trace's would be (give every other bar trace
    of the subplot an offsetgroup too), and the legend shows it once, in its first bar's colour.
    Per-bar keyword arguments (a list, tuple or array as long as `x`: text, hovertext, customdata, ...)
    are split with the bars; anything else goes to every trace. Add them with
    `fig.add_traces(bars(...), rows=r, cols=c)`."""
    _check(source)
    n = len(x)
    if len(y) != n or len(colors) != n:
        raise ValueError(f"x, y and colors must have one entry per bar, got {n}, {len(y)}, {len(colors)}")
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(colors):
        groups.setdefault(c, []).append(i)
    per_bar = {k for k, v in kwargs.items() if isinstance(v, (list, tuple, np.ndarray)) and len(v) == n}
    traces = []
    for j, (c, idx) in enumerate(groups.items()):
        kw = {k: ([v[i] for i in idx] if k in per_bar else v) for k, v in kwargs.items()}
        traces.append(go.Bar(x=[x[i] for i in idx], y=[y[i] for i in idx], name=name,
                             offsetgroup=offsetgroup or name, legendgroup=legendgroup or name,
                             showlegend=showlegend and j == 0, **kw, **bar(name, source, c)))
    return traces


def scatter(name: str, source: str, color_: str | None = None, mode: str = "lines+markers") -> dict:
    """Keyword arguments for go.Scatter: colour of `name`, marker and dash marked as `source`."""
    _check(source)
    c = color_ or color(name)
    return dict(mode=mode, marker=dict(color=c, symbol=_MARKER_SYMBOL[source], size=9 if source == "paper" else 7),
                line=dict(color=c, dash=_DASH[source]))


HALO = "halo (not data)"   # the name of a white band drawn under a line: no source mark, no legend


def halo(width: float) -> dict:
    """Keyword arguments for a go.Scatter drawn just before a line of `width` along the same points: a white band
    under it, so that the line stands out on cells of its own colour (named HALO: it is not data)."""
    return dict(mode="lines", line=dict(color="white", width=width + 2), hoverinfo="skip", showlegend=False,
                name=HALO)


def hline(fig, y: float, source: str, text: str, color_: str | None = None, **kwargs):
    """A horizontal reference line dashed as `source`, its annotation `text` marked as `source`
    (a text that already names its source is kept as it is). On a log axis, make the axis log first."""
    _check(source)
    if not any(s in text for s in SOURCES):
        text = f"{text} ({source})"
    c = color_ or (PAPER if source == "paper" else OURS)
    fig.add_hline(y=y, line_dash=_DASH[source], line_color=c, annotation_text=text, **kwargs)
    note = fig.layout.annotations[-1]
    on_axis = re.fullmatch(r"y(\d*)", note.yref or "")
    if on_axis and fig.layout["yaxis" + on_axis.group(1)].type == "log":  # plotly puts it at log10(its y)
        note.y = math.log10(y)
    return fig


def label_log_axes(fig):
    """Label every log axis of `fig` at 1, 2, 5 x 10^k within its traces' values and their whiskers' ends,
    written out in full:
    plotly's default labels the minor ticks with a bare digit ("2", "5"), which reads as 2 MB where it
    means 20. Axes that match one another (make_subplots' shared axes) get the ticks of all their traces.
    Axes with tick values of their own are left alone. Call it last."""
    layout = fig.layout
    keys = [k for k in layout.to_plotly_json() if k.startswith(("xaxis", "yaxis"))]
    ref = {k: k[0] + k[5:] for k in keys}                                  # "yaxis2" -> "y2"
    root = {ref[k]: layout[k].matches or ref[k] for k in keys}
    for key in keys:
        axis = layout[key]
        if axis.type != "log" or axis.tickvals is not None:
            continue
        group = {r for r, g in root.items() if g == root[ref[key]]}
        values = []
        for t in fig.data:
            if (getattr(t, key[0] + "axis", None) or key[0]) in group:
                v = getattr(t, key[0], None)
                v = [float(x) for x in (v if v is not None else []) if x is not None]
                values += [x for x in v + _whisker_ends(v, getattr(t, "error_" + key[0], None)) if x > 0]
        if not values:
            continue
        lo, hi = min(values), max(values)
        ticks = [m * 10.0 ** e for e in range(int(math.floor(math.log10(lo))) - 1, int(math.ceil(math.log10(hi))) + 1)
                 for m in (1, 2, 5)]
        ticks = [t for t in ticks if lo / 1.5 <= t <= hi * 1.5] or [lo, hi]
        axis.update(tickvals=ticks, ticktext=[f"{t:g}" for t in ticks])
    return fig


def _whisker_ends(values: list[float], err) -> list[float]:
    """Both ends of every data whisker (`error_y` / `error_x` of type "data") around `values`; none without."""
    if err is None or err.array is None or err.type not in (None, "data"):
        return []
    plus = list(err.array)
    minus = plus if err.symmetric is not False or err.arrayminus is None else list(err.arrayminus)
    return [v + p for v, p in zip(values, plus)] + [v - m for v, m in zip(values, minus)]


def whiskers(mid: Sequence[float], runs: Sequence[Sequence[float]]) -> dict:
    """`error_y` for bars at `mid` whose whiskers span each bar's runs, from the fastest to the slowest."""
    return dict(type="data", symmetric=False, color="#444", array=[max(r) - m for r, m in zip(runs, mid)],
                arrayminus=[m - min(r) for r, m in zip(runs, mid)])


def color_key(fig, items: Sequence[tuple[str, str]], note: str):
    """A one-line colour key above the plot, `items` (colour, label) pairs, `note` naming the source (for a
    heat map whose cells have no legend); call it after `layout`: it makes room under the title."""
    key = " ".join(f"<span style='color:{c}'>&#9632;</span> {label}" for c, label in items)
    fig.add_annotation(text=f"{key} ({note})", xref="paper", yref="paper", x=0, y=1.01, showarrow=False,
                       xanchor="left", yanchor="bottom", font=dict(size=11))
    fig.update_layout(margin_t=90 + TITLE_TOP - 10)
    return fig


def axis_title(quantity: str, unit: str | None) -> str:
    """'bytes read per token (MB)'; unit None for counts and ratios is written as such."""
    return f"{quantity} ({unit})" if unit else quantity


# One width for every figure, static or widget: a FigureWidget does not follow its cell's width (it
# falls back to plotly's 700 px) while a static figure fills it, so the two would differ side by side.
# 800 px fits JupyterLab's notebook area (833 px) at a 1280 px window with the file browser open.
WIDTH = 800
# JupyterLab always shows plotly's toolbar (top right): titles start this far below the figure's top edge,
# under the toolbar, so that a long title never runs beneath its icons.
TITLE_TOP = 30


def layout(fig, title: str, x: tuple[str, str | None] | None = None, y: tuple[str, str | None] | None = None,
           height: int = 380, **kwargs):
    """Apply the common layout: white template, title, axis titles with units, legend below everything
    (at the figure's bottom edge, its height reserved, so it never covers an axis title), WIDTH wide, the
    title under JupyterLab's toolbar.
    Subplot titles get room below the title."""
    subplot_titles = any(a.yref == "paper" and a.yanchor == "bottom" for a in fig.layout.annotations)
    fig.update_layout(template="plotly_white", height=height, width=WIDTH,
                      title=dict(text=title, yref="container", y=1, yanchor="top", pad=dict(t=TITLE_TOP)),
                      margin=dict(l=60, r=20, t=(80 if subplot_titles else 60) + TITLE_TOP - 10, b=60),
                      legend=dict(orientation="h", yref="container", y=0, yanchor="bottom"),
                      hoverlabel=dict(namelength=-1), **kwargs)  # whole trace names: they say measured/modeled
    if x is not None:
        fig.update_xaxes(title_text=axis_title(*x))
    if y is not None:
        fig.update_yaxes(title_text=axis_title(*y))
        # a shared y axis (make_subplots(shared_yaxes=True): it matches the first panel's) has no tick labels
        # of its own: its title would repeat the first panel's beside an empty axis
        fig.for_each_yaxis(lambda axis: axis.update(title_text=None) if axis.matches else None)
    return fig
