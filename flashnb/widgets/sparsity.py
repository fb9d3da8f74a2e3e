"""Notebook 02's threshold slider: predictor recall, over-selection and predicted-only perplexity
at any threshold, on one held-out trace (computed by flashnb.lab.sparsity.ThresholdExplorer)."""

from __future__ import annotations

import html

from flashnb.lab.sparsity import ThresholdExplorer, threshold_text
from flashnb.viz.sparsity import selection_figure, update_selection_figure


# The slider's stops: every 0.05, then the high thresholds where recall drops and the output starts to move.
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (0.98, 0.99, 0.995, 0.999)


def threshold_widget(explorer: ThresholdExplorer, threshold: float = 0.5):
    """A slider over thresholds that redraws the per-layer selection figure and the quality line (saying
    "measuring ..." while the held-out forward pass runs): an ipywidgets VBox (slider, HTML, FigureWidget)
    with `.redraw(change)` for scripted use."""
    import ipywidgets as w
    import plotly.graph_objects as go

    m = explorer.measure(threshold)
    fig = go.FigureWidget(selection_figure(m.per_layer))
    label = w.HTML(html.escape(threshold_text(m)))
    stops = sorted(set(THRESHOLDS) | {round(float(threshold), 3)})
    slider = w.SelectionSlider(options=[(f"{t:g}", t) for t in stops], value=round(float(threshold), 3),
                               description="threshold", continuous_update=False)

    def redraw(change):
        t = float(change["new"])
        label.value = (f"<i>measuring threshold {t:g}: the selection, then perplexity over "
                       f"{explorer.ids.size - 1} held-out tokens with only the selected neurons ...</i>")
        res = explorer.measure(t)
        with fig.batch_update():
            update_selection_figure(fig, res.per_layer)
        label.value = html.escape(threshold_text(res))

    slider.observe(redraw, names="value")
    box = w.VBox([slider, label, fig])
    box.redraw = redraw  # for tests and scripted use
    return box
