"""Notebook 02's threshold slider: predictor recall, over-selection and predicted-only perplexity
at any threshold, on one held-out trace (computed by flashnb.lab.sparsity.ThresholdExplorer)."""

from __future__ import annotations

import html

from flashnb.lab.sparsity import ThresholdExplorer, threshold_text
from flashnb.viz.sparsity import selection_figure, update_selection_figure


def threshold_widget(explorer: ThresholdExplorer, threshold: float = 0.5):
    """A slider over thresholds that redraws the per-layer selection figure and the quality line:
    an ipywidgets VBox (slider, HTML, FigureWidget) with `.redraw(change)` for scripted use."""
    import ipywidgets as w
    import plotly.graph_objects as go

    m = explorer.measure(threshold)
    fig = go.FigureWidget(selection_figure(m.per_layer))
    label = w.HTML(html.escape(threshold_text(m)))
    slider = w.FloatSlider(value=threshold, min=0.05, max=0.95, step=0.05, description="threshold",
                           continuous_update=False, readout_format=".2f")

    def redraw(change):
        res = explorer.measure(float(change["new"]))
        with fig.batch_update():
            update_selection_figure(fig, res.per_layer)
        label.value = html.escape(threshold_text(res))

    slider.observe(redraw, names="value")
    box = w.VBox([slider, label, fig])
    box.redraw = redraw  # for tests and scripted use
    return box
