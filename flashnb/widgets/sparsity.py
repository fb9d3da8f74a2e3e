"""Notebook 02's threshold slider: predictor recall, over-selection and predicted-only perplexity
at any threshold, on one held-out trace."""

from __future__ import annotations

import html

import numpy as np

from flashnb.predictor import Selection, mean_selection, trace_logits
from flashnb.viz.sparsity import selection_figure, update_selection_figure


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
        """One line: the mean selection metrics and the quality at `threshold`, the paper's beside them."""
        s, q = m["mean"], m["quality"]
        return html.escape(
            f"threshold {threshold:.2f} (measured over {q['tokens']} held-out tokens): recall {s.recall:.1%} "
            f"(paper 95%), precision {s.precision:.1%}, false positives {s.false_positive_rate:.1%} (paper 7%), "
            f"over-selection {s.over_selection:.2f}x (paper ~3x), loads {s.selected_share:.1%} of the FFN per "
            f"token | perplexity dense {q['dense_perplexity']:.2f} -> predicted-only "
            f"{q['predicted_perplexity']:.2f} ({q['perplexity_increase']:+.1%}), top-1 agreement "
            f"{q['top1_agreement']:.1%}")

    def widget(self, threshold: float = 0.5):
        """`threshold_widget(self, threshold)`."""
        return threshold_widget(self, threshold)


def threshold_widget(explorer: ThresholdExplorer, threshold: float = 0.5):
    """A slider over thresholds that redraws the per-layer selection figure and the quality line:
    an ipywidgets VBox (slider, HTML, FigureWidget) with `.redraw(change)` for scripted use."""
    import ipywidgets as w
    import plotly.graph_objects as go

    m = explorer.measure(threshold)
    fig = go.FigureWidget(selection_figure(m["per_layer"]))
    label = w.HTML(explorer.summary_html(m, threshold))
    slider = w.FloatSlider(value=threshold, min=0.05, max=0.95, step=0.05, description="threshold",
                           continuous_update=False, readout_format=".2f")

    def redraw(change):
        t = float(change["new"])
        res = explorer.measure(t)
        with fig.batch_update():
            update_selection_figure(fig, res["per_layer"])
        label.value = explorer.summary_html(res, t)

    slider.observe(redraw, names="value")
    box = w.VBox([slider, label, fig])
    box.redraw = redraw  # for tests and scripted use
    return box
