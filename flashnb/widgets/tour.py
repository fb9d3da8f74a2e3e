"""The tour notebooks' widgets: notebook 06's DRAM-budget and pinned-split sliders, notebook 07's
model-folder box.

Each builder's default value is what CI runs headless (see `flashnb.widgets`).
"""

from __future__ import annotations

import os

from flashnb.lab.byo import ENV_BYO_MODEL
from flashnb.lab.end_to_end import BudgetSweep, budget_label, budget_text
from flashnb.lab.pinning import SplitSweep, split_text
from flashnb.viz.tour import budget_figure, mark_budget, mark_share, split_figure


def _explorer(options: list[tuple[str, float]], start: float, description: str, figure, mark, text_of):
    """A selection slider over `options` whose moves call `mark(fig, value)` on the FigureWidget of
    `figure` and rewrite the text `text_of(value)` below it, a line break per line. Returns (VBox, slider,
    FigureWidget)."""
    import html

    import ipywidgets as W
    import plotly.graph_objects as go

    def as_html(value) -> str:  # one paragraph per line of the text
        return "<br>".join(html.escape(line) for line in text_of(value).splitlines())

    fig = go.FigureWidget(figure)
    text = W.HTML(as_html(start))
    slider = W.SelectionSlider(options=options, value=start, description=description, continuous_update=False,
                               style={"description_width": "initial"}, layout=W.Layout(width="60%"))

    def redraw(change):
        with fig.batch_update():
            mark(fig, change["new"])
        text.value = as_html(change["new"])

    slider.observe(redraw, names="value")
    return W.VBox([slider, text, fig]), slider, fig


def budget_explorer(sweep: BudgetSweep, budget: float = 0.5):
    """A slider over the sweep's modeled budgets that moves the chosen-budget line of `budget_figure`
    and rewrites `budget_text` below it. Returns (VBox, slider, FigureWidget); the slider starts at the
    budget nearest to `budget`."""
    budgets = [p.budget for p in sweep.modeled["all"]]
    options = [(budget_label(b), b) for b in budgets]
    start = min(budgets, key=lambda b: abs(b - budget))
    return _explorer(options, start, "DRAM budget", budget_figure(sweep, start), mark_budget,
                     lambda b: budget_text(sweep, b))


def split_explorer(sweep: SplitSweep, share: float = 0.0):
    """A slider over the share of a budget's neuron rows that hold pinned hot neurons: moves the line of
    `split_figure` and rewrites `split_text` below it. Returns (VBox, slider, FigureWidget)."""
    shares = sweep.shares()
    start = min(shares, key=lambda s: abs(s - share))
    return _explorer([(f"{s:.0%}", s) for s in shares], start, "share of the rows pinned",
                     split_figure(sweep.choices, start), mark_share, lambda s: split_text(sweep, s))


def model_folder_box(default: str | None = None):
    """A text box for a Hugging Face model folder, pre-filled from `default` or $FLASHNB_BYO_MODEL
    (empty in CI: notebook 07 then runs the shipped model)."""
    import ipywidgets as W

    value = default if default is not None else os.environ.get(ENV_BYO_MODEL, "")
    return W.Text(value=value, description="model folder",
                  placeholder="e.g. ~/models/opt-1.3b (empty: the shipped model)",
                  layout=W.Layout(width="80%"), style={"description_width": "initial"})
