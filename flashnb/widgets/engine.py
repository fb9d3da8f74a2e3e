"""Notebook 03's sliders: how much must each token read at each window size and DRAM budget? And notebook
04's row-format selector: what do int8 and q4 bundles save?"""

from __future__ import annotations

import html

from flashnb.core.defaults import MEMORY_BUDGET, WINDOW
from flashnb.viz.engine import highlight, window_figure


def window_text(grid, window: int, budget: float, paper: dict) -> str:
    """One line for a cell of a `window_budget_grid` (flashnb.lab.windowing.WindowGrid): the share of the FFN
    read, the reuse, the window's rows; the paper's figures beside them, and what the window gains here."""
    r = grid.row(budget, window)
    return (f"window {window} at {budget:.0%} of the model in DRAM: <b>{r.ffn_share:.2%} of the FFN</b> read per "
            f"token ({r.mb_per_token:.3f} MB; modeled by simulate), {r.hit_share:.0%} of the predicted neurons "
            f"already in DRAM, "
            + (f"the window's rows hold {r.capacity_share:.0%} of the FFN" if window else
               "nothing kept from one token to the next (one set of rows, shared by every layer in turn)")
            + f". Window 0 &rarr; "
            f"{grid.windows[-1]} reads {grid.gain(budget):.1f}x less at this budget. Paper (OPT 6.7B, half "
            f"memory, window {paper['window']}): {paper['ffn_loaded_predictor']:.0%} &rarr; "
            f"{paper['ffn_loaded_window']:.1%} of the FFN, {paper['window_reuse']:.0%} reused, the window's rows "
            f"{paper['window_cached_fraction']:.0%} of the FFN.")


def window_explorer(grid, paper: dict, window: int = WINDOW, budget: float | None = None):
    """A window slider and a DRAM-budget slider over a `window_budget_grid` that redraw `window_figure` and
    its summary line. Returns (box, window slider, budget slider, figure widget)."""
    import ipywidgets as W
    import plotly.graph_objects as go

    budget = grid.budgets[0] if budget is None else budget
    fig = go.FigureWidget(window_figure(grid, window, budget, paper))
    text = W.HTML(window_text(grid, window, budget, paper))
    slider = W.IntSlider(value=window, min=grid.windows[0], max=grid.windows[-1], description="window",
                         continuous_update=False)
    budgets = W.SelectionSlider(options=[(f"{b:.0%}", b) for b in grid.budgets], value=budget,
                                description="DRAM budget", continuous_update=False,
                                style={"description_width": "initial"})

    def redraw(_):
        with fig.batch_update():
            highlight(fig, grid, slider.value, budgets.value)
        text.value = window_text(grid, slider.value, budgets.value, paper)

    slider.observe(redraw, names="value")
    budgets.observe(redraw, names="value")
    return W.VBox([W.HBox([slider, budgets]), text, fig]), slider, budgets, fig


def timeline_text(tl) -> str:
    """One line for a `window_timeline`: how many times its neurons hit, were read and were evicted."""
    from flashnb.lab.windowing import EVICTED, HIT, READ

    hits, reads, gone = tl.count(HIT), tl.count(READ), tl.count(EVICTED)
    rows = f"{tl.capacity_rows} rows per layer" if tl.window else f"{tl.capacity_rows} rows shared by every layer"
    return (f"layer {tl.layer}, window {tl.window}, {rows}: over {tl.states.shape[1]} tokens "
            f"these {len(tl.neurons)} neurons were needed {hits + reads} times, {hits} of them already in DRAM "
            f"({hits / max(hits + reads, 1):.0%}), {reads} read from flash; {gone} evictions (modeled by simulate).")


def timeline_explorer(timeline, window: int = WINDOW, budget: float = MEMORY_BUDGET, budgets=(0.5, 0.6, 0.8, 1.0),
                      n_prompt: int = 0):
    """A window slider and a budget slider that redraw `timeline_figure` (`timeline(window, budget)` returns a
    WindowTimeline). Returns (box, window slider, budget slider, figure widget)."""
    import ipywidgets as W
    import plotly.graph_objects as go

    from flashnb.viz.engine import timeline_figure

    tl = timeline(window, budget)
    fig = go.FigureWidget(timeline_figure(tl, n_prompt))
    text = W.HTML(timeline_text(tl))
    slider = W.IntSlider(value=window, min=0, max=8, description="window", continuous_update=False)
    budget_slider = W.SelectionSlider(options=[(f"{b:.0%}", b) for b in budgets], value=budget,
                                      description="DRAM budget", continuous_update=False,
                                      style={"description_width": "initial"})

    def redraw(_):
        new = timeline(slider.value, budget_slider.value)
        drawn = timeline_figure(new, n_prompt)
        with fig.batch_update():
            for attr in ("z", "y", "customdata"):
                setattr(fig.data[0], attr, getattr(drawn.data[0], attr))
            fig.layout.title.text = drawn.layout.title.text
        text.value = timeline_text(new)

    slider.observe(redraw, names="value")
    budget_slider.observe(redraw, names="value")
    return W.VBox([W.HBox([slider, budget_slider]), text, fig]), slider, budget_slider, fig


def dtype_selector(summary: dict, quality: dict, chosen: str = "q4"):
    """Notebook 04's row-format selector: buttons fp16 / int8 / q4 that bring the chosen format forward in
    flashnb.viz.engine.dtype_figure and write its bytes, quality and reads per token (all measured
    beforehand: `summary` format -> LayoutStats, `quality` format -> QuantQuality). An ipywidgets VBox with
    `.redraw(change)` for scripted use."""
    import ipywidgets as w
    import plotly.graph_objects as go

    from flashnb.lab.bundling import quality_text
    from flashnb.viz.engine import dtype_figure, highlight_dtype

    fig = go.FigureWidget(dtype_figure(summary, quality, chosen))
    base = summary[next(iter(summary))]
    line = lambda name: f"<pre>{html.escape(quality_text(quality[name], summary[name], base))}</pre>"  # noqa: E731
    label = w.HTML(line(chosen))
    buttons = w.ToggleButtons(options=list(summary), value=chosen, description="FFN rows")

    def redraw(change):
        with fig.batch_update():
            highlight_dtype(fig, change["new"])
        label.value = line(change["new"])

    buttons.observe(redraw, names="value")
    box = w.VBox([buttons, label, fig])
    box.redraw = redraw
    return box
