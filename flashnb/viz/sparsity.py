"""Figures for notebook 02 (sparsity and predictors), in the visual language of `flashnb.viz.style`.

Every trace says what is *measured* (ours, on this model and trace) and what is *paper* (Alizadeh
et al. 2024, OPT 6.7B). Predictor quality is drawn in the colour of the `predictor` technique,
temporal reuse in the colour of `windowing`. Figures are plain `go.Figure`s; the threshold slider
lives in `flashnb.widgets.sparsity`.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from flashnb.training.build_predictors import PAPER
from flashnb.training.quality import Selection
from flashnb.viz import style as S


def sparsity_figure(sparsity: list[float] | np.ndarray, tokens: int, paper: float = PAPER["ffn_sparsity"]) -> go.Figure:
    """FFN sparsity per layer (measured) with the paper's OPT 6.7B figure as a dotted line."""
    s = np.asarray(sparsity)
    fig = go.Figure(go.Bar(x=[f"layer {i}" for i in range(len(s))], y=s, name=S.label("ours", "measured"),
                           text=[f"{v:.1%}" for v in s], textposition="inside", insidetextanchor="end",
                           textfont=dict(color="white"), **S.bar("ours", "measured", S.OURS)))
    # the bars' labels sit inside their tops and the paper's note above its line, so neither covers the other
    S.hline(fig, paper, "paper", f"OPT 6.7B {paper:.0%} (paper)", annotation_position="top left")
    S.layout(fig, f"FFN sparsity per layer (measured over {tokens} held-out tokens)", x=("layer", None),
             y=("sparsity: neurons with activation 0", "% of the FFN"), showlegend=False)
    fig.update_yaxes(range=[0, 1.12], tickformat=".0%")
    return fig


def activity_heatmap(mask: np.ndarray, tokens: int = 64, neurons: int = 256, labels: list[str] | None = None,
                     layer: int | None = None) -> go.Figure:
    """Which neurons fire for which token: the `neurons` most often active neurons (rows, most
    active on top) over the first `tokens` tokens (columns) of one layer's mask [T, F] (measured)."""
    m = mask[:tokens]
    order = np.argsort(-mask.sum(axis=0), kind="stable")[:neurons]
    z = m[:, order].T.astype(np.uint8)
    x = labels[:tokens] if labels is not None else list(range(m.shape[0]))
    x = [f"{i}:{t}" for i, t in enumerate(x)]
    fig = go.Figure(go.Heatmap(z=z, x=x, y=[f"n{j}" for j in order], colorscale=[[0, "white"], [1, S.OURS]],
                               showscale=False, name=S.label("active", "measured"),
                               hovertemplate="token %{x}<br>neuron %{y}<br>active %{z} (measured)<extra></extra>"))
    where = f"layer {layer}, " if layer is not None else ""
    S.layout(fig, f"Which neurons fire ({where}measured): top {len(order)} of {mask.shape[1]}, filled = active",
             x=("token", "position:text"),
             y=("neuron", "id, most active on top"), height=480)
    fig.update_xaxes(showticklabels=tokens <= 64, tickangle=-60)
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    return fig


def reuse_figure(reuse: np.ndarray, s_agg: np.ndarray) -> go.Figure:
    """Left: temporal reuse(k) per layer. Right: aggregated usage s_agg(k) (mean over layers) and
    its increment s_agg(k+1) - s_agg(k), as in the paper's Figure 4a. Inputs [layers, k_max]; measured."""
    k = np.arange(1, reuse.shape[1] + 1)
    fig = make_subplots(rows=1, cols=2, specs=[[{}, {"secondary_y": True}]], subplot_titles=(
        "reuse within the last k tokens", "s_agg(k) and its increment (cf. Fig. 4a)"))
    for i, (r, c) in enumerate(zip(reuse, S.sequence(len(reuse)))):
        fig.add_trace(go.Scatter(x=k, y=r, name=S.label(f"layer {i}", "measured"),
                                 hovertemplate=f"layer {i}, window %{{x}} tokens: %{{y:.1%}} of a token's active "
                                               "neurons reused<extra></extra>",
                                 **S.scatter(f"layer {i}", "measured", c)), row=1, col=1)
    mean = s_agg.mean(axis=0)
    fig.add_trace(go.Scatter(x=k, y=mean, name=S.label("s_agg(k), mean of layers", "measured"),
                             hovertemplate="window %{x} tokens: %{y:.1%} of the FFN used<extra></extra>",
                             **S.scatter("windowing", "measured")), row=1, col=2)
    fig.add_trace(go.Bar(x=k[:-1] + 0.5, y=np.diff(mean), name=S.label("increment s_agg(k+1) - s_agg(k)", "measured"),
                         customdata=np.stack([k[:-1], k[1:]], axis=1),
                         hovertemplate="window %{customdata[0]} -> %{customdata[1]} tokens: +%{y:.2%} of the FFN"
                                       "<extra></extra>",
                         opacity=0.45, **S.bar("windowing", "measured")), row=1, col=2, secondary_y=True)
    S.layout(fig, "Temporal locality (measured on held-out text)", x=("window k", "tokens"), height=440)
    fig.update_yaxes(title_text=S.axis_title("reuse", "% of a token's active neurons"), tickformat=".0%", row=1, col=1)
    fig.update_yaxes(title_text=S.axis_title("s_agg(k)", "% of the FFN"), tickformat=".0%", row=1, col=2,
                     secondary_y=False)
    fig.update_yaxes(title_text=S.axis_title("increment", "% of the FFN per extra token"), tickformat=".1%",
                     row=1, col=2, secondary_y=True)
    return fig


SELECTION_PANELS = [  # (Selection field, panel title, paper value for OPT 6.7B or None, number format, axis title)
    ("recall", "recall (1 - false negatives)", 1 - PAPER["false_negative_rate"], ".0%", ("recall", "% of active")),
    ("precision", "precision (selected that fire)", None, ".0%", ("precision", "% of selected")),
    ("false_positive_rate", "false positives (of inactive)", PAPER["false_positive_rate"], ".1%",
     ("false positives", "% of inactive")),
    ("over_selection", "over-selection (selected / active)", PAPER["over_selection"], ".1f",
     ("over-selection", "x active")),
]


def selection_figure(per_layer: list[Selection], title: str = "") -> go.Figure:
    """Per-layer recall, precision, false-positive rate and over-selection of a predictor
    (measured, in the predictor's colour), with the paper's OPT 6.7B figures dotted where it states one
    (5% false negatives, 7% false positives, ~3x over-selection). Each bar trace carries its field name
    in `meta`. Two panels by two, so that each keeps room for its title at a notebook's width."""
    layers = [f"L{i}" for i in range(len(per_layer))]
    fig = make_subplots(rows=2, cols=2, horizontal_spacing=0.14, vertical_spacing=0.22,
                        subplot_titles=[p[1] for p in SELECTION_PANELS])
    for i, (key, _, ref, fmt, axis) in enumerate(SELECTION_PANELS):
        row, col = divmod(i, 2)
        at = dict(row=row + 1, col=col + 1)
        y = [getattr(s, key) for s in per_layer]
        fig.add_trace(go.Bar(x=layers, y=y, name=S.label("predictor", "measured"), showlegend=i == 0,
                             text=[format(v, fmt) for v in y], textposition="outside", meta=key,
                             **S.bar("predictor", "measured")), **at)
        if ref is not None:
            fig.add_trace(go.Scatter(x=layers, y=[ref] * len(layers), name=S.label("OPT 6.7B", "paper"),
                                     showlegend=i == 0, **S.scatter("paper", "paper", S.PAPER, mode="lines")), **at)
        fig.update_yaxes(title_text=S.axis_title(*axis), **at)
        fig.update_xaxes(title_text="layer", **at)
        if fmt.endswith("%"):
            fig.update_yaxes(tickformat=".0%", **at)
    for key in ("recall", "precision"):
        row, col = divmod([p[0] for p in SELECTION_PANELS].index(key), 2)
        fig.update_yaxes(range=[0, 1.1], row=row + 1, col=col + 1)
    S.layout(fig, title or "Predictor quality per layer (measured; paper dotted)", height=620)
    return fig


def update_selection_figure(fig, per_layer: list[Selection]) -> None:
    """Put new per-layer values into the bars of a `selection_figure` (or its FigureWidget)."""
    fmts = {key: fmt for key, _, _, fmt, _ in SELECTION_PANELS}
    for trace in fig.data:
        if trace.meta in fmts:
            y = [getattr(s, trace.meta) for s in per_layer]
            trace.y = y
            trace.text = [format(v, fmts[trace.meta]) for v in y]


def tradeoff_figure(curve, threshold: float | None = None) -> go.Figure:
    """Recall against over-selection as the threshold sweeps (a flashnb.lab.sparsity.ThresholdCurve: mean
    over layers, measured), with
    the paper's operating point (95% recall at ~3x) as a star."""
    fig = go.Figure(go.Scatter(x=curve.over_selection, y=curve.recall, name=S.label("predictor", "measured"),
                               text=[f"threshold {t:.2f}" for t in curve.thresholds],
                               hovertemplate="%{text}<br>over-selection %{x:.2f}x<br>recall %{y:.1%}<extra></extra>",
                               **S.scatter("predictor", "measured")))
    fig.add_trace(go.Scatter(x=[PAPER["over_selection"]], y=[1 - PAPER["false_negative_rate"]],
                             name=S.label("OPT 6.7B operating point", "paper"),
                             **S.scatter("predictor", "paper", mode="markers")))
    if threshold is not None:
        i = int(np.argmin(np.abs(np.asarray(curve.thresholds) - threshold)))
        fig.add_trace(go.Scatter(x=[curve.over_selection[i]], y=[curve.recall[i]], mode="markers",
                                 marker=dict(color=S.TECHNIQUE_COLORS["dense"], size=11, symbol="circle"),
                                 name=S.label(f"threshold {threshold:.2f}", "measured")))
    S.layout(fig, "Recall vs over-selection by threshold (measured, mean of layers; paper star)",
             x=("over-selection: selected / truly active", "x"), y=("recall", "% of active neurons selected"),
             height=420)
    fig.update_yaxes(tickformat=".0%")
    return fig


def friend_figure(results: list) -> go.Figure:
    """The closest-friend bundling experiment per layer (measured): bytes and reads with friend
    bundles relative to plain neuron reads (1.0 = no change), and where the friends point."""
    layers = [f"L{i}" for i in range(len(results))]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12, subplot_titles=(
        "friend bundles vs plain reads", "closest friend is a top-5% hot neuron"))
    bytes_c, reads_c = S.sequence(2)
    fig.add_trace(go.Bar(x=layers, y=[r.bytes_ratio for r in results], name=S.label("bytes read", "measured"),
                         hovertemplate="%{x}: %{y:.2f}x the bytes of plain reads<extra></extra>",
                         **S.bar("bytes", "measured", bytes_c)), row=1, col=1)
    fig.add_trace(go.Bar(x=layers, y=[r.reads_ratio for r in results], name=S.label("read operations", "measured"),
                         hovertemplate="%{x}: %{y:.2f}x the read operations of plain reads<extra></extra>",
                         **S.bar("reads", "measured", reads_c)), row=1, col=1)
    fig.add_hline(y=1.0, line_dash="dot", line_color=S.TECHNIQUE_COLORS["naive"], row=1, col=1)
    fig.add_trace(go.Bar(x=layers, y=[r.hot_friend_share for r in results], name=S.label("friend is hot", "measured"),
                         hovertemplate="%{x}: %{y:.0%} of neurons have a top-5% hot neuron as closest friend"
                                       "<extra></extra>", **S.bar("naive", "measured")), row=1, col=2)
    S.layout(fig, "Closest-friend bundling (measured; the paper reports it fails for OPT 6.7B)", x=("layer", None),
             height=420, barmode="group")
    fig.update_yaxes(title_text=S.axis_title("friend bundles / plain reads", "ratio, 1 = no change"), row=1, col=1)
    fig.update_yaxes(title_text=S.axis_title("friend is hot", "% of neurons"), tickformat=".0%", range=[0, 1.05],
                     row=1, col=2)
    return fig
