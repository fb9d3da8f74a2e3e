"""Notebook 08's target-sparsity slider: the thresholded SwiGLU model's quality and reads at any target
(computed by flashnb.lab.beyond_relu.SparsityExplorer)."""

from __future__ import annotations

import html

from flashnb.lab.beyond_relu import SparsityExplorer, sparsity_text
from flashnb.viz.beyond import move_chosen, sparsity_figure

SPARSITIES = (0.3, 0.4, 0.5, 0.6, 0.7)  # the slider's stops (and the curves' points)


def sparsity_widget(explorer: SparsityExplorer, criteria=("gate", "scaled-gate", "product"), sparsity: float = 0.5,
                    sparsities=SPARSITIES):
    """A slider over target sparsities that moves the chosen line of the three-panel figure and redraws the
    sentence (each stop measured once, when first needed): an ipywidgets VBox (slider, HTML, FigureWidget)
    with `.redraw(change)` for scripted use."""
    import ipywidgets as w
    import plotly.graph_objects as go

    stops = sorted(set(sparsities) | {round(float(sparsity), 2)})
    curves = {c: explorer.curve(c, stops) for c in criteria}
    fig = go.FigureWidget(sparsity_figure(curves, sparsity))
    label = w.HTML(f"<pre>{html.escape(sparsity_text([explorer.measure(c, sparsity) for c in criteria]))}</pre>")
    slider = w.SelectionSlider(options=[(f"{s:.0%}", s) for s in stops], value=round(float(sparsity), 2),
                               description="sparsity", continuous_update=False)

    def redraw(change):
        s = float(change["new"])
        with fig.batch_update():
            move_chosen(fig, s)
        label.value = f"<pre>{html.escape(sparsity_text([explorer.measure(c, s) for c in criteria]))}</pre>"

    slider.observe(redraw, names="value")
    box = w.VBox([slider, label, fig])
    box.redraw = redraw
    return box
