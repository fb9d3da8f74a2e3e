"""Notebook 03's window slider: how much must each token read at each window size?"""

from __future__ import annotations

from flashnb.viz.engine import highlight, window_figure


def window_text(row, ffn_neurons: int) -> str:
    """One line for a `window_sweep` row (flashnb.lab.windowing.WindowRow): data read, hits, cache size;
    the paper's figures beside them."""
    return (f"window {row.window}: {row.mb_per_token:.3f} MB read per token (modeled, simulate), "
            f"{row.neurons_loaded:.0f} of {row.predicted:.0f} predicted neurons read "
            f"({row.hit_share:.0%} already in DRAM); cache {row.capacity_rows} rows per layer "
            f"= {row.capacity_rows / ffn_neurons:.0%} of a layer's FFN. Paper (OPT 6.7B, window 5): "
            "predictor alone loads ~10% of the FFN per token, windowing ~2.4%.")


def window_explorer(rows, ffn_neurons: int, window: int = 4):
    """A window slider over `window_sweep` rows that redraws `window_figure` and its summary line.
    Returns (box, slider, figure widget)."""
    import ipywidgets as W
    import plotly.graph_objects as go

    fig = go.FigureWidget(window_figure(rows, window))
    text = W.HTML(window_text(next(r for r in rows if r.window == window), ffn_neurons))
    slider = W.IntSlider(value=window, min=rows[0].window, max=rows[-1].window, description="window",
                         continuous_update=False)

    def redraw(change):
        with fig.batch_update():
            highlight(fig, rows, change["new"])
        text.value = window_text(next(r for r in rows if r.window == change["new"]), ffn_neurons)

    slider.observe(redraw, names="value")
    return W.VBox([slider, text, fig]), slider, fig
