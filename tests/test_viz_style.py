"""One visual language: every figure of flashnb.viz.flash / .sparsity / .engine takes its colours, its
measured / modeled / paper marks and its axis titles from flashnb.viz.style (synthetic inputs, no disk)."""

from __future__ import annotations

import re

import numpy as np
import plotly.graph_objects as go
import pytest
from viz_helpers import PAPER_WINDOW, FIGURE_FUNCTIONS, bar_series, style_figures, tour_figures, window_grid

from flashnb.viz import engine as ve
from flashnb.viz import style as S

SOURCE = re.compile(r"\b(measured|modeled|paper)\b", re.IGNORECASE)
UNIT = re.compile(r"\(.+\)$")
MARKS = {"measured": ("circle", "solid", ""), "modeled": ("circle-open", "dash", "/"), "paper": ("star", "dot", None)}


@pytest.fixture(scope="module")
def figures() -> dict:
    return style_figures()


def _axis(fig, ref: str):
    return fig.layout[("xaxis" if ref[0] == "x" else "yaxis") + ref[1:]]


def _numeric(values) -> bool:
    return values is None or not any(isinstance(v, str) for v in np.asarray(values, dtype=object).ravel())


def test_every_axis_has_a_title_and_value_axes_have_units(figures):
    for name, fig in figures.items():
        for t in fig.data:
            for ref, values in ((t.xaxis or "x", t.x), (t.yaxis or "y", t.y)):
                axis = _axis(fig, ref)
                if axis.matches:                      # a shared axis: titled once, on the axis it matches
                    axis = _axis(fig, axis.matches)
                title = axis.title.text or ""
                assert title, f"{name}: axis {ref} has no title"
                if axis.type != "category" and _numeric(values):
                    assert UNIT.search(title), f"{name}: axis {ref} title {title!r} names no unit"


def test_every_trace_title_and_annotation_says_measured_modeled_or_paper(figures):
    for name, fig in figures.items():
        assert SOURCE.search(fig.layout.title.text or ""), f"{name}: title {fig.layout.title.text!r}"
        for t in fig.data:
            if t.name == S.HALO:   # a white band under a line, not data
                assert t.line.color == "white" and t.showlegend is False, f"{name}: halo {t}"
                continue
            assert re.search(r"\((measured|modeled|paper)\b", t.name or ""), f"{name}: trace {t.name!r}"
        subplot_titles = [a for a in fig.layout.annotations if a.yref == "paper" and a.yanchor == "bottom"
                          and a.xanchor == "center"]
        for a in fig.layout.annotations:
            if a not in subplot_titles:
                assert SOURCE.search(a.text), f"{name}: annotation {a.text!r}"


def test_marks_follow_the_source(figures):
    """Measured solid / filled circles, modeled hatched / open circles / dashed, paper outlined / stars /
    dotted, in bars, markers, lines and reference lines alike."""
    for name, fig in figures.items():
        for t in (t for t in fig.data if t.name != S.HALO):
            source = re.search(r"\((measured|modeled|paper)\b", t.name).group(1)
            symbol, dash, pattern = MARKS[source]
            if t.type == "bar":
                if source == "paper":
                    assert t.marker.color == "rgba(0,0,0,0)" and t.marker.line.color is not None, f"{name}: {t.name}"
                else:
                    assert (t.marker.pattern.shape or "") == pattern, f"{name}: {t.name}"
            elif t.type == "scatter":
                if "markers" in t.mode and t.marker.symbol is not None:
                    assert t.marker.symbol == symbol or source == "measured" and t.marker.symbol == "circle", \
                        f"{name}: {t.name} marker {t.marker.symbol}"
                if "lines" in t.mode:
                    assert t.line.dash == dash, f"{name}: {t.name} line {t.line.dash}"
        for shape in fig.layout.shapes:
            assert shape.line.dash in ("solid", "dash", "dot"), f"{name}: reference line without a source mark"


def _colors(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def test_only_style_colours(figures):
    palette = {*S.TECHNIQUE_COLORS.values(), *S.LAYOUT_COLORS.values(), *S.COMPONENT_COLORS.values(),
               *S.PHASE_COLORS.values(), S.OURS,
               S.PAPER, *S.sequence(7), "rgba(0,0,0,0)", "white"}
    for name, fig in figures.items():
        for t in fig.data:
            if t.type == "heatmap":
                assert {c for _, c in t.colorscale} <= palette
                continue
            used = _colors(t.marker.color) + _colors(t.marker.line.color if t.marker.line else None)
            used += _colors(t.line.color) if t.type == "scatter" else []
            assert set(used) <= palette, f"{name}: {t.name} uses {set(used) - palette}"
        for shape in fig.layout.shapes:
            assert shape.line.color in palette, f"{name}: reference line colour {shape.line.color}"


def _bar_color(fig, name_start: str, i: int = 0) -> str:
    t = next(t for t in fig.data if t.name.startswith(name_start))
    c = t.marker.color if t.marker.color != "rgba(0,0,0,0)" else t.marker.line.color
    return c if isinstance(c, str) else c[i]


def test_a_technique_has_one_colour_in_every_module(figures):
    f = figures
    table2 = {S.technique(x): c for x, (_, c) in bar_series(f["flash.table2"], "the paper's device").items()}
    window_bars = {w: c for w, (_, c) in bar_series(f["engine.window"], "read per token").items()}
    window_map = next(t for t in f["engine.window"].data if t.type == "heatmap")
    seen = {                                                        # window 0 = predictor alone, then windowing
        "predictor": [table2["predictor"], window_bars[0], _bar_color(f["sparsity.selection"], "+predictor"),
                      f["sparsity.tradeoff"].data[0].line.color],
        "windowing": [table2["windowing"], window_bars[1], f["sparsity.reuse"].data[-2].line.color,
                      window_map.colorscale[-1][1]],
        "all": [table2["all"], _bar_color(f["engine.memory"], "preallocated")],
        "naive": [table2["naive"], _bar_color(f["engine.memory"], "reallocate")],
        "bundled": [_bar_color(f["flash.layouts"], "bundled"), _bar_color(f["engine.layout"], "bundled"),
                    _bar_color(f["flash.bundling"], "bundled"), f["flash.throughput"].data[-1].marker.color],
        "unbundled": [_bar_color(f["flash.layouts"], "unbundled"), _bar_color(f["engine.layout"], "unbundled"),
                      _bar_color(f["flash.bundling"], "unbundled"), f["flash.throughput"].data[-2].marker.color],
    }
    for technique, colours in seen.items():
        assert set(colours) == {S.color(technique)}, f"{technique}: {colours}"
    assert S.color("+bundling") == S.color("bundled") == S.TECHNIQUE_COLORS["all"]


def test_style_helpers():
    assert S.label("+windowing", "modeled", S.SIMULATE) == "+windowing (modeled by simulate)"
    assert S.label("naive", "measured") == "naive (whole FFN) (measured)"
    assert S.axis_title("read per token", "MB") == "read per token (MB)"
    assert len(S.sequence(3)) == 3 and len(set(S.sequence(3))) == 3
    with pytest.raises(ValueError):
        S.label("naive", "guessed")
    with pytest.raises(KeyError):
        S.color("turbo")


def test_bar_refuses_colours_it_cannot_hatch():
    """plotly.js cannot hatch bars of an array of colours (tests/test_viz_browser.py sees its warning):
    modeled bars get one colour per trace; solid and outlined bars may take a list."""
    with pytest.raises(ValueError, match="style.bars"):
        S.bar("naive", "modeled", [S.color("naive"), S.color("all")])
    assert S.bar("naive", "measured", ["#000000", "#7f7f7f"])["marker"]["color"] == ["#000000", "#7f7f7f"]
    assert S.bar("naive", "paper", ("#000000",))["marker"]["line"]["color"] == ["#000000"]
    assert S.bar("naive", "modeled", "#000000")["marker"]["pattern"]["shape"] == "/"


def test_bars_one_trace_per_colour_in_one_slot():
    grey, green = S.color("naive"), S.color("windowing")
    traces = S.bars(["a", "b", "c"], [1, 2, 3], [grey, green, grey], "modeled", "x (modeled)",
                    text=["1", "2", "3"], textposition="outside", hovertext=("h1", "h2", "h3"))
    assert [t.marker.color for t in traces] == [grey, green]                  # first-appearance order
    assert [list(t.x) for t in traces] == [["a", "c"], ["b"]] and [list(t.y) for t in traces] == [[1, 3], [2]]
    assert [list(t.text) for t in traces] == [["1", "3"], ["2"]]               # per-bar arguments split
    assert [list(t.hovertext) for t in traces] == [["h1", "h3"], ["h2"]]
    assert {t.textposition for t in traces} == {"outside"}                     # the others go to every trace
    assert {t.offsetgroup for t in traces} == {t.legendgroup for t in traces} == {"x (modeled)"}
    assert [t.showlegend for t in traces] == [True, False] and {t.name for t in traces} == {"x (modeled)"}
    assert {t.marker.pattern.shape for t in traces} == {"/"}
    hidden = S.bars(["a"], [1], [grey], "paper", "p (paper)", offsetgroup="paper", showlegend=False)
    assert hidden[0].offsetgroup == "paper" and hidden[0].showlegend is False
    assert hidden[0].marker.line.color == grey
    with pytest.raises(ValueError, match="one entry per bar"):
        S.bars(["a", "b"], [1, 2], [grey], "measured", "x (measured)")


def test_row_format_highlight_fades_the_other_bars_not_their_labels():
    from viz_helpers import dtype_results

    fig = ve.dtype_figure(*dtype_results(), chosen="q4")
    ve.highlight_dtype(fig, "int8")
    bars = [t for t in fig.data if t.meta]
    assert {t.meta[0]: t.marker.opacity for t in bars} == {"fp16": 0.35, "int8": 1.0, "q4": 0.35}
    assert all(t.opacity in (None, 1.0) for t in bars)   # a faded trace would fade its "fc1"/"fc2" text too
    ink = {t.meta[0]: t.insidetextfont.color for t in bars if t.orientation == "h"}
    assert ink["int8"] == "white" and ink["fp16"] == ink["q4"] != "white"   # dark labels on the faded bars


def test_window_figure_highlight_follows_the_window_and_the_budget():
    grid = window_grid()
    fig = ve.window_figure(grid, 2, 0.5, PAPER_WINDOW)
    bars = [t for t in fig.data if t.type == "bar"]
    assert [list(t.x) for t in bars] == [[0], [1, 2, 3]]                        # predictor alone, then windowing
    assert len({t.offsetgroup for t in bars}) == 1
    ve.highlight(fig, grid, 3, 0.8)
    assert {w: o for t in bars for w, o in zip(t.x, t.marker.opacity)} == {0: 0.35, 1: 0.35, 2: 0.35, 3: 1.0}
    assert [y for t in bars for y in t.y] == [100 * r.ffn_share for r in grid.at(0.8)]   # in % of the FFN
    frame = next(sh for sh in fig.layout.shapes if sh.name == "chosen")
    assert (frame.x0, frame.x1, frame.y0, frame.y1) == (2.5, 3.5, 0.5, 1.5)       # window 3, the second budget
    paper = next(t for t in fig.data if "paper" in (t.name or ""))
    assert list(paper.x) == [0, 5] and list(paper.y) == [10.0, 2.4]
    heat = next(t for t in fig.data if t.type == "heatmap")
    assert list(heat.y) == ["50%", "80%"] and heat.z[1][3] == 100 * grid.row(0.8, 3).ffn_share


def test_hline_label_sits_on_its_line_on_a_log_axis(figures):
    """plotly places an annotation on a log axis at log10(y): S.hline gives it that, so the label of a
    reference line is drawn beside the line (and does not stretch the axis)."""
    fig = figures["flash.throughput"]
    assert fig.layout.yaxis.type == "log"
    labels = [a for a in fig.layout.annotations if a.yref == "y"]
    assert len(labels) == 2
    for a, shape in zip(labels, fig.layout.shapes):
        assert a.y == pytest.approx(np.log10(shape.y0))
    lin = S.hline(go.Figure(), 0.5, "paper", "half")
    assert lin.layout.annotations[0].y == 0.5 and lin.layout.annotations[0].text == "half (paper)"


def test_the_helpers_build_every_figure_of_flashnb_viz():
    """tests/viz_helpers.py (and so tests/test_viz_browser.py) covers every function of flashnb.viz that
    returns a figure, one figure each."""
    import importlib
    import inspect

    found = set()
    for module in ("flash", "sparsity", "engine", "beyond", "tour"):
        mod = importlib.import_module(f"flashnb.viz.{module}")
        for name, f in inspect.getmembers(mod, inspect.isfunction):
            if f.__module__ == mod.__name__ and inspect.signature(f).return_annotation in ("go.Figure", go.Figure):
                found.add(f"{module}.{name}")
    assert found == FIGURE_FUNCTIONS
    built = {**style_figures(), **tour_figures()}
    assert len(built) == len(FIGURE_FUNCTIONS) and all(isinstance(f, go.Figure) for f in built.values())


def test_log_axes_are_labelled_in_full(figures):
    """Every log axis carries its own 1-2-5 labels written out ("20", not plotly's bare minor digit "2")."""
    seen = 0
    for name, fig in {**figures, **tour_figures()}.items():
        for key, axis in fig.layout.to_plotly_json().items():
            if key.startswith(("xaxis", "yaxis")) and axis.get("type") == "log":
                assert axis.get("tickvals"), f"{name}.{key}: a log axis without tick values"
                if axis.get("ticktext") and all(isinstance(v, (int, float)) for v in axis["tickvals"]):
                    seen += 1
                    assert all(float(t) == pytest.approx(v) for t, v in zip(axis["ticktext"], axis["tickvals"]) if
                               t.replace(".", "", 1).replace("e-", "", 1).isdigit()), f"{name}.{key}"
    assert seen >= 4


def test_shared_log_axes_are_labelled_for_every_panel(figures):
    """table2_figure's panels share one log axis (make_subplots' shared_yaxes): its labels must span the bars
    of both panels, not only those of the panel the axis is drawn beside."""
    fig = figures["flash.table2"]
    assert fig.layout.yaxis2.matches == "y"
    ys = [float(v) for t in fig.data for v in t.y if v]
    assert fig.layout.yaxis.tickvals == fig.layout.yaxis2.tickvals
    assert max(fig.layout.yaxis.tickvals) * 1.5 >= max(ys) and min(fig.layout.yaxis.tickvals) / 1.5 <= min(ys)


def test_log_axis_labels_span_the_whiskers_too():
    """Notebook 05's medians with whiskers to their slowest run: the labels reach the whiskers' ends, not only
    the points (a run's whisker at 4.6 ms sat beyond a top label of 1 ms)."""
    from flashnb.lab.memory import MemoryTiming

    t = MemoryTiming(1, 60e-6, 400e-6, preallocated_runs=(55e-6, 60e-6, 62e-6), naive_runs=(300e-6, 400e-6, 4.6e-3))
    fig = ve.memory_figure([t])
    ticks = fig.layout.yaxis.tickvals
    assert max(ticks) * 1.5 >= 4600 and min(ticks) / 1.5 <= 55


def test_every_figure_has_one_width():
    """Static figures and widgets stand side by side in a notebook: one width for all (a FigureWidget
    would otherwise fall back to 700 px while a static figure fills its cell)."""
    widths = {name: fig.layout.width for name, fig in {**style_figures(), **tour_figures()}.items()}
    assert set(widths.values()) == {S.WIDTH}, widths


def test_byte_layout_frames_have_a_legend_entry(figures):
    """The dashed frames (layout shapes, which have no legend) get one entry in their line's colour and dash."""
    fig = figures["engine.byte_layout"]
    entry = [t for t in fig.data if t.type == "scatter"]
    assert [t.name for t in entry] == ["a read the reader issues (modeled)"]
    frames = {(s.line.color, s.line.dash) for s in fig.layout.shapes}
    assert frames == {(entry[0].line.color, entry[0].line.dash)} and len(fig.layout.shapes) == 6
