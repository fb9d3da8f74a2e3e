"""Figures and widgets for notebook 02 (sparsity and predictors): plotly + ipywidgets.

Every figure labels what is *measured* (ours, on this model and trace) and what is *paper*
(Alizadeh et al. 2024, OPT 6.7B). Figures are plain `go.Figure`s; `ThresholdExplorer.widget()`
wraps one in a `go.FigureWidget` (needs anywidget) with a threshold slider.
"""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from flashnb.predictor import Selection, mean_selection, trace_logits
from flashnb.predictor_build import PAPER

OURS = "#1f77b4"
PAPER_COLOR = "#d62728"


def sparsity_figure(sparsity: list[float] | np.ndarray, tokens: int, paper: float = PAPER["ffn_sparsity"]) -> go.Figure:
    """FFN sparsity per layer (measured) with the paper's OPT 6.7B figure as a dashed line."""
    s = np.asarray(sparsity)
    fig = go.Figure(go.Bar(x=[f"layer {i}" for i in range(len(s))], y=s, name="ours (measured)",
                           marker_color=OURS, text=[f"{v:.1%}" for v in s], textposition="outside"))
    fig.add_hline(y=paper, line_dash="dash", line_color=PAPER_COLOR,
                  annotation_text=f"paper: OPT 6.7B {paper:.0%}", annotation_position="bottom right")
    fig.update_layout(title=f"FFN sparsity per layer (share of neurons with activation 0; measured over "
                            f"{tokens} held-out tokens)", yaxis=dict(title="sparsity", range=[0, 1.05],
                                                                     tickformat=".0%"),
                      height=380, showlegend=False)
    return fig


def activity_heatmap(mask: np.ndarray, tokens: int = 64, neurons: int = 256, labels: list[str] | None = None,
                     layer: int | None = None) -> go.Figure:
    """Which neurons fire for which token: the `neurons` most often active neurons (rows, most
    active on top) over the first `tokens` tokens (columns) of one layer's mask [T, F]."""
    m = mask[:tokens]
    order = np.argsort(-mask.sum(axis=0), kind="stable")[:neurons]
    z = m[:, order].T.astype(np.uint8)
    x = labels[:tokens] if labels is not None else list(range(m.shape[0]))
    x = [f"{i}:{t}" for i, t in enumerate(x)]
    fig = go.Figure(go.Heatmap(z=z, x=x, y=[f"n{j}" for j in order], colorscale=[[0, "white"], [1, "black"]],
                               showscale=False, hovertemplate="token %{x}<br>neuron %{y}<br>active %{z}<extra></extra>"))
    where = f"layer {layer}, " if layer is not None else ""
    fig.update_layout(title=f"Neuron activity ({where}measured): black = active; {neurons} most active "
                            f"neurons of {mask.shape[1]}, sorted by frequency",
                      xaxis=dict(title="token", showticklabels=tokens <= 64, tickangle=-60),
                      yaxis=dict(title="neuron", autorange="reversed", showticklabels=False),
                      height=460)
    return fig


def reuse_figure(reuse: np.ndarray, s_agg: np.ndarray) -> go.Figure:
    """Left: temporal reuse(k) per layer. Right: aggregated usage s_agg(k) (mean over layers) and
    its increment s_agg(k+1) - s_agg(k), as in the paper's Figure 4a. Inputs [layers, k_max]."""
    k = np.arange(1, reuse.shape[1] + 1)
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "reuse: share of a token's active neurons already active in the last k tokens",
        "aggregated usage s_agg(k) and increment (cf. paper Fig. 4a)"), specs=[[{}, {"secondary_y": True}]])
    for i, r in enumerate(reuse):
        fig.add_trace(go.Scatter(x=k, y=r, mode="lines+markers", name=f"layer {i}"), row=1, col=1)
    mean = s_agg.mean(axis=0)
    fig.add_trace(go.Scatter(x=k, y=mean, mode="lines+markers", name="s_agg(k), mean of layers",
                             line=dict(color="black")), row=1, col=2)
    fig.add_trace(go.Bar(x=k[:-1] + 0.5, y=np.diff(mean), name="increment s_agg(k+1) - s_agg(k)",
                         marker_color="#ff7f0e", opacity=0.6), row=1, col=2, secondary_y=True)
    fig.update_xaxes(title_text="k (tokens)")
    fig.update_yaxes(tickformat=".0%", row=1, col=1)
    fig.update_yaxes(title_text="share of the FFN", tickformat=".0%", row=1, col=2)
    fig.update_yaxes(tickformat=".1%", row=1, col=2, secondary_y=True)
    fig.update_layout(title="Temporal locality (measured on held-out text)", height=420)
    return fig


SELECTION_PANELS = [  # (Selection field, panel title, paper value for OPT 6.7B or None, number format)
    ("recall", "recall (1 - false negatives)", 1 - PAPER["false_negative_rate"], ".0%"),
    ("precision", "precision (selected that fire)", None, ".0%"),
    ("false_positive_rate", "false positives (of inactive)", PAPER["false_positive_rate"], ".1%"),
    ("over_selection", "over-selection (selected / active)", PAPER["over_selection"], ".1f"),
]


def selection_figure(per_layer: list[Selection], title: str = "") -> go.Figure:
    """Per-layer recall, precision, false-positive rate and over-selection of a predictor
    (measured), with the paper's OPT 6.7B figures where it states one (5% false negatives, 7% false
    positives, ~3x over-selection). Each bar trace carries its field name in `meta`."""
    layers = [f"L{i}" for i in range(len(per_layer))]
    fig = make_subplots(rows=1, cols=len(SELECTION_PANELS), subplot_titles=[p[1] for p in SELECTION_PANELS])
    for col, (key, _, ref, fmt) in enumerate(SELECTION_PANELS, start=1):
        y = [getattr(s, key) for s in per_layer]
        fig.add_trace(go.Bar(x=layers, y=y, marker_color=OURS, name="ours (measured)", showlegend=col == 1,
                             text=[format(v, fmt) for v in y], textposition="outside", meta=key), row=1, col=col)
        if ref is not None:
            fig.add_trace(go.Scatter(x=layers, y=[ref] * len(layers), mode="lines", name="paper (OPT 6.7B)",
                                     line=dict(color=PAPER_COLOR, dash="dash"), showlegend=col == 1),
                          row=1, col=col)
    for col in (1, 2):
        fig.update_yaxes(range=[0, 1.1], tickformat=".0%", row=1, col=col)
    fig.update_yaxes(tickformat=".0%", row=1, col=3)
    fig.update_layout(title=title or "Predictor quality per layer", height=400, legend=dict(orientation="h", y=-0.15))
    return fig


def update_selection_figure(fig, per_layer: list[Selection]) -> None:
    """Put new per-layer values into the bars of a `selection_figure` (or its FigureWidget)."""
    fmts = {key: fmt for key, _, _, fmt in SELECTION_PANELS}
    for trace in fig.data:
        if trace.meta in fmts:
            y = [getattr(s, trace.meta) for s in per_layer]
            trace.y = y
            trace.text = [format(v, fmts[trace.meta]) for v in y]


def tradeoff_figure(curve: dict, threshold: float | None = None) -> go.Figure:
    """Recall against over-selection as the threshold sweeps (mean over layers, measured), with
    the paper's operating point (95% recall at ~3x)."""
    fig = go.Figure(go.Scatter(x=curve["over_selection"], y=curve["recall"], mode="lines+markers",
                               name="ours (measured)", text=[f"threshold {t:.2f}" for t in curve["thresholds"]],
                               hovertemplate="%{text}<br>over-selection %{x:.2f}x<br>recall %{y:.1%}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[PAPER["over_selection"]], y=[1 - PAPER["false_negative_rate"]], mode="markers",
                             marker=dict(color=PAPER_COLOR, size=12, symbol="star"), name="paper (OPT 6.7B)"))
    if threshold is not None:
        i = int(np.argmin(np.abs(np.asarray(curve["thresholds"]) - threshold)))
        fig.add_trace(go.Scatter(x=[curve["over_selection"][i]], y=[curve["recall"][i]], mode="markers",
                                 marker=dict(color="black", size=10), name=f"threshold {threshold:.2f}"))
    fig.update_layout(title="Recall vs over-selection as the threshold varies (mean over layers)",
                      xaxis_title="over-selection (selected / truly active)", yaxis=dict(title="recall",
                                                                                       tickformat=".0%"),
                      height=400)
    return fig


def friend_figure(results: list) -> go.Figure:
    """The closest-friend bundling experiment per layer (measured): bytes and reads with friend
    bundles relative to plain neuron reads (1.0 = no change), and where the friends point."""
    layers = [f"L{i}" for i in range(len(results))]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("with friend bundles / without",
                                                        "share of neurons whose closest friend is a top-5% hot neuron"))
    fig.add_trace(go.Bar(x=layers, y=[r.bytes_ratio for r in results], name="bytes read"), row=1, col=1)
    fig.add_trace(go.Bar(x=layers, y=[r.reads_ratio for r in results], name="read operations"), row=1, col=1)
    fig.add_hline(y=1.0, line_dash="dot", row=1, col=1)
    fig.add_trace(go.Bar(x=layers, y=[r.hot_friend_share for r in results], name="friend is hot",
                         marker_color="#7f7f7f"), row=1, col=2)
    fig.update_yaxes(tickformat=".0%", range=[0, 1.05], row=1, col=2)
    fig.update_layout(title="Closest-friend bundling (measured; the paper reports it fails for OPT 6.7B)",
                      barmode="group", height=400)
    return fig


class ThresholdExplorer:
    """Predictor metrics and predicted-only quality at any threshold, on one held-out trace.

    Logits per layer (on the trace's recorded FFN inputs) and the dense model's logits are computed
    once; `measure(threshold)` then recomputes selection metrics (fast) and runs the model with each
    FFN restricted to the selected neurons (a forward pass over `ids`).
    """

    def __init__(self, model, predictors, trace, ids: np.ndarray, context: int | None = None):
        from flashnb.predicted_ffn import dense_window_logits

        self.model, self.predictors, self.trace = model, predictors, trace
        self.ids = np.asarray(ids, dtype=np.int64)
        self.context = context or model.config.max_position_embeddings
        self.logits = [trace_logits(predictors, trace, i) for i in range(trace.n_layers)]
        self.masks = [trace.mask(i) for i in range(trace.n_layers)]
        self.dense = dense_window_logits(model, self.ids, self.context)
        self._measured: dict[float, dict] = {}

    def selection(self, threshold: float) -> list[Selection]:
        """Per-layer selection metrics at probability `threshold` (from the cached logits)."""
        z = np.log(threshold / (1 - threshold))
        return [Selection.of(lg > z, m) for lg, m in zip(self.logits, self.masks)]

    def curve(self, thresholds=np.round(np.arange(0.1, 0.91, 0.1), 2)) -> dict:
        """Mean-over-layers recall and over-selection for each threshold."""
        means = [mean_selection(self.selection(t)) for t in thresholds]
        return {"thresholds": list(map(float, thresholds)), "recall": [m.recall for m in means],
                "over_selection": [m.over_selection for m in means]}

    def measure(self, threshold: float) -> dict:
        """{'per_layer': [Selection], 'mean': Selection, 'quality': predicted_ffn.quality dict};
        remembered per threshold, since the model and data do not change."""
        from flashnb.predicted_ffn import quality

        key = round(float(threshold), 6)
        if key not in self._measured:
            per_layer = self.selection(key)
            q = quality(self.model, self.predictors.with_thresholds(key), self.ids, self.context, self.dense)
            self._measured[key] = {"per_layer": per_layer, "mean": mean_selection(per_layer), "quality": q}
        return self._measured[key]

    @staticmethod
    def summary_html(m: dict, threshold: float) -> str:
        s, q = m["mean"], m["quality"]
        return html.escape(
            f"threshold {threshold:.2f}: recall {s.recall:.1%} (paper 95%), precision {s.precision:.1%}, false positives "
            f"{s.false_positive_rate:.1%} (paper 7%), over-selection {s.over_selection:.2f}x (paper ~3x), "
            f"loads {s.selected_share:.1%} of the FFN per token | perplexity dense {q['dense_perplexity']:.2f} "
            f"-> predicted-only {q['predicted_perplexity']:.2f} ({q['perplexity_increase']:+.1%}), "
            f"top-1 agreement {q['top1_agreement']:.1%} over {q['tokens']} held-out tokens (measured)")

    def widget(self, threshold: float = 0.5):
        """A slider over thresholds that redraws the per-layer figure and the quality line."""
        import ipywidgets as w

        m = self.measure(threshold)
        fig = go.FigureWidget(selection_figure(m["per_layer"]))
        label = w.HTML(self.summary_html(m, threshold))
        slider = w.FloatSlider(value=threshold, min=0.05, max=0.95, step=0.05, description="threshold",
                               continuous_update=False, readout_format=".2f")

        def redraw(change):
            t = float(change["new"])
            res = self.measure(t)
            with fig.batch_update():
                update_selection_figure(fig, res["per_layer"])
            label.value = self.summary_html(res, t)

        slider.observe(redraw, names="value")
        box = w.VBox([slider, label, fig])
        box.redraw = redraw  # for tests and scripted use
        return box
