"""One visual language: every figure of flashnb.viz.flash / .sparsity / .engine takes its colours, its
measured / modeled / paper marks and its axis titles from flashnb.viz.style (synthetic inputs, no disk)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from flash_helpers import synthetic_profile
from sparsity_helpers import tiny

from flashnb import tracestats as ts
from flashnb.predictor import Selection
from flashnb.profile import Profile
from flashnb.traces import record
from flashnb.viz import engine as ve
from flashnb.viz import flash as vf
from flashnb.viz import sparsity as vs
from flashnb.viz import style as S

SOURCE = re.compile(r"\b(measured|modeled|paper)\b", re.IGNORECASE)
UNIT = re.compile(r"\(.+\)$")
MARKS = {"measured": ("circle", "solid", ""), "modeled": ("circle-open", "dash", "/"), "paper": ("star", "dot", None)}


@pytest.fixture(scope="module")
def figures() -> dict:
    profile = Profile(synthetic_profile())
    model = tiny()
    trace = record(model, np.random.default_rng(1).integers(0, 50, 64), context=32, inputs=False)
    summary = ts.summarize(trace, k_max=4)
    sel = [Selection.of(trace.mask(i), trace.mask(i)) for i in range(trace.n_layers)]
    layouts = [{"layout": lay, "useful_GBps": g, "requests": r, "calls": 2, "ms_per_call": 3.0,
                "neurons_per_call": 10, "neuron_bytes": 8192, "threads": 4, "direct": True}
               for lay, g, r in (("bundled", 0.2, 20), ("unbundled", 0.1, 40))]
    rows = [{"window": w, "mb_per_token": 1.0 / (w + 1), "neurons_read": 10.0, "predicted": 20.0, "hit_share": 0.5,
             "capacity_rows": 30, "per_token_mb": [1.0, 0.5 / (w + 1)]} for w in range(4)]
    steps = {lay: [{"requests": r, "bytes_read": 4096, "io_seconds": 1e-3}] for lay, r in (("bundled", 2),
                                                                                      ("unbundled", 4))}
    return {
        "flash.throughput": vf.throughput_figure(profile),
        "flash.table2": vf.table2_figure(profile),
        "flash.bundling": vf.bundling_figure(profile),
        "flash.layouts": vf.layouts_figure(layouts),
        "sparsity.sparsity": vs.sparsity_figure(summary.sparsity, trace.n_tokens),
        "sparsity.activity": vs.activity_heatmap(trace.mask(0), tokens=16, neurons=8, layer=0),
        "sparsity.reuse": vs.reuse_figure(summary.reuse, summary.s_agg),
        "sparsity.selection": vs.selection_figure(sel),
        "sparsity.tradeoff": vs.tradeoff_figure({"thresholds": [0.3, 0.5], "recall": [0.99, 0.9],
                                                 "over_selection": [2.0, 1.2]}, 0.5),
        "sparsity.friends": vs.friend_figure(ts.friend_experiment(trace, neuron_bytes=128)),
        "engine.window": ve.window_figure(rows, 2),
        "engine.memory": ve.memory_figure({1: {"preallocated": 1e-5, "naive": 3e-5},
                                           4: {"preallocated": 2e-5, "naive": 9e-5}}),
        "engine.layout": ve.layout_figure(ve.layout_summary(steps)),
    }


def _axis(fig, ref: str):
    return fig.layout[("xaxis" if ref[0] == "x" else "yaxis") + ref[1:]]


def _numeric(values) -> bool:
    return values is None or not any(isinstance(v, str) for v in np.asarray(values, dtype=object).ravel())


def test_every_axis_has_a_title_and_value_axes_have_units(figures):
    for name, fig in figures.items():
        for t in fig.data:
            for ref, values in ((t.xaxis or "x", t.x), (t.yaxis or "y", t.y)):
                axis = _axis(fig, ref)
                title = axis.title.text or ""
                assert title, f"{name}: axis {ref} has no title"
                if axis.type != "category" and _numeric(values):
                    assert UNIT.search(title), f"{name}: axis {ref} title {title!r} names no unit"


def test_every_trace_title_and_annotation_says_measured_modeled_or_paper(figures):
    for name, fig in figures.items():
        assert SOURCE.search(fig.layout.title.text or ""), f"{name}: title {fig.layout.title.text!r}"
        for t in fig.data:
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
        for t in fig.data:
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
    palette = {*S.TECHNIQUE_COLORS.values(), *S.LAYOUT_COLORS.values(), *S.COMPONENT_COLORS.values(), S.OURS,
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
    table2 = dict(zip(["naive", "hybrid", "predictor", "windowing", "all"], f["flash.table2"].data[1].marker.color))
    window_bars = f["engine.window"].data[0].marker.color           # window 0 = predictor alone, then windowing
    seen = {
        "predictor": [table2["predictor"], window_bars[0], _bar_color(f["sparsity.selection"], "+predictor"),
                      f["sparsity.tradeoff"].data[0].line.color],
        "windowing": [table2["windowing"], window_bars[1], f["sparsity.reuse"].data[-2].line.color,
                      f["engine.window"].data[1].line.color],
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
    assert S.label("+windowing", "modeled", S.SIMULATE) == "+windowing (modeled, simulate)"
    assert S.label("naive", "measured") == "naive (whole FFN) (measured)"
    assert S.axis_title("read per token", "MB") == "read per token (MB)"
    assert len(S.sequence(3)) == 3 and len(set(S.sequence(3))) == 3
    with pytest.raises(ValueError):
        S.label("naive", "guessed")
    with pytest.raises(KeyError):
        S.color("turbo")
