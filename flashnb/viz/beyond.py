"""Lesson 08's figures: the activations of a ReLU and a SwiGLU model, what a target sparsity costs, and
where half of the memory goes (all computed by flashnb.lab.beyond_relu)."""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from flashnb.lab.beyond_relu import CRITERION_LABELS, ActivationHistogram, BudgetReads, MemoryRoute, SparsityPoint
from flashnb.viz import style as S

# One colour per threshold criterion (Okabe-Ito, apart from the techniques' own use in these figures).
CRITERION_COLORS = {"gate": "#e69f00", "scaled-gate": "#009e73", "product": "#0072b2"}
MODEL_COLORS = ("#0072b2", "#d55e00")  # the ReLU model, the SwiGLU model
ROUTE_COLORS = ("#0072b2", "#d55e00", "#cc79a7", "#009e73")  # ReLU; SwiGLU gate in DRAM; gate on flash; two stages
REFERENCE, CHOSEN = S.TECHNIQUE_COLORS["floor"], S.COMPONENT_COLORS["compute"]  # target lines; the slider's line
MEMORY_PARTS = (("other_bytes", "embeddings, attention, norms", "#999999"),
                ("gate_bytes", "gate matrices", "#d55e00"),
                ("predictor_bytes", "predictors", "#e69f00"),
                ("row_bytes", "window rows for neurons read from flash", "#009e73"))


def activation_figure(h: ActivationHistogram, thresholds: dict[str, float] | None = None) -> go.Figure:
    """The share of each model's FFN activations at most a magnitude (log axis; a model's exact zeros are
    where its line starts), one line per model (measured); `thresholds` {label: value} as vertical lines."""
    fig = go.Figure()
    x = 10 ** h.edges[1:]
    for (name, shares), c in zip(h.shares.items(), MODEL_COLORS):
        y = h.zero[name] + shares.cumsum()
        fig.add_trace(go.Scatter(x=x, y=y, name=S.label(f"{name}: {h.zero[name]:.1%} exactly 0", "measured"),
                                 hovertemplate=f"{name}: %{{y:.1%}} of the activations at most %{{x:.3g}} in "
                                               "magnitude<extra></extra>",
                                 **S.scatter(name, "measured", c, mode="lines")))
    for text, v in (thresholds or {}).items():
        text = text if S.SOURCE_WORDS.search(text) else f"{text} (measured)"
        fig.add_vline(x=v, line_dash="solid", line_width=1, line_color=REFERENCE, annotation_text=text,
                      annotation_position="bottom right", annotation_font_size=10)
        fig.layout.annotations[-1].x = math.log10(v)  # plotly places a log axis' annotation at 10**x
    S.layout(fig, f"How small are the activations that decide a neuron? Every layer, {h.tokens} tokens (measured)",
             x=("|activation| at most", "value after ReLU or SiLU"), y=("share of activations", "%"), height=400)
    fig.update_xaxes(type="log")
    fig.update_yaxes(tickformat=".0%", range=[0, 1.02])
    return S.label_log_axes(fig)


def sparsity_figure(curves: dict[str, list[SparsityPoint]], chosen: float | None = None) -> go.Figure:
    """Perplexity increase, top-1 agreement and the FFN read per token by target sparsity, one line per
    criterion (measured; reads simulated from the thresholded model's own neuron sets), the chosen
    sparsity as a grey line."""
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.09,
                        subplot_titles=("perplexity vs dense", "top-1 agreement with dense",
                                        "read per token (ample DRAM)"))
    window = next(iter(curves.values()))[0].window
    for crit, points in curves.items():
        x = [p.sparsity for p in points]
        c = CRITERION_COLORS[crit]
        for col, y, via, what in ((1, [p.quality.perplexity_increase for p in points], None, "%{y:+.2%} perplexity"),
                                  (2, [p.quality.top1_agreement for p in points], None, "%{y:.1%} top-1 agreement"),
                                  (3, [p.read_share for p in points], S.SIMULATE, "%{y:.1%} of the FFN read per token")):
            source = "modeled" if via else "measured"
            fig.add_trace(go.Scatter(x=x, y=y, name=S.label(CRITERION_LABELS[crit], source, via),
                                     legendgroup=crit + source, showlegend=col != 2,
                                     hovertemplate=f"{CRITERION_LABELS[crit]} at %{{x:.0%}} sparsity: {what}<extra></extra>",
                                     **S.scatter(crit, source, c)), row=1, col=col)
    if chosen is not None:
        for col in (1, 2, 3):
            fig.add_vline(x=chosen, line_color=CHOSEN, line_dash="solid", line_width=3, opacity=0.6, row=1, col=col)
    S.layout(fig, f"What a target sparsity costs the SwiGLU model (held-out, measured; reads simulated, window {window})",
             height=420)
    fig.update_xaxes(title_text=S.axis_title("target sparsity", "% of neurons"), tickformat=".0%")
    fig.update_yaxes(tickformat="+.0%", title_text=S.axis_title("perplexity", "% above dense"), row=1, col=1)
    fig.update_yaxes(tickformat=".0%", title_text=S.axis_title("top-1 agreement", "% of positions"), row=1, col=2)
    fig.update_yaxes(tickformat=".0%", rangemode="tozero", title_text=S.axis_title("read", "% of the FFN's bytes"),
                     row=1, col=3)
    return fig


def move_chosen(fig, chosen: float) -> None:
    """Move the chosen-sparsity lines of `sparsity_figure` (a FigureWidget) to `chosen`."""
    for shape in fig.layout.shapes:
        if shape.type == "line" and shape.xref and shape.xref.startswith("x") and shape.x0 == shape.x1 \
                and shape.line.color == CHOSEN:
            shape.x0 = shape.x1 = chosen


def memory_figure(routes: list[MemoryRoute]) -> go.Figure:
    """Each route's DRAM at the budget as stacked bars (MB), the budget as a line, and the smallest budget
    each route runs in as a marker: modeled by the memory plan (flashnb.core.memory.plan_memory), the split
    the engine would allocate, computed from the stores' shapes, nothing run."""
    plan = "the memory plan"
    names = [r.name for r in routes]
    fig = go.Figure()
    for attr, label, c in MEMORY_PARTS:
        mb = [getattr(r, attr) / 1e6 for r in routes]
        if any(mb):
            fig.add_trace(go.Bar(y=names, x=mb, orientation="h", name=S.label(label, "modeled", plan),
                                 hovertemplate=f"%{{y}}: {label} %{{x:.2f}} MB", **S.bar(label, "modeled", c)))
    fig.add_trace(go.Scatter(y=names, x=[r.min_budget * r.model_bytes / 1e6 for r in routes], mode="markers",
                             name=S.label("smallest budget it runs in", "modeled", plan),
                             hovertemplate="%{y}: runs in %{x:.2f} MB at least",
                             marker=dict(symbol="circle-open", size=11, color="#000000", line=dict(width=2))))
    budget = routes[0].budget_bytes / routes[0].model_bytes
    fig.add_trace(go.Scatter(y=names, x=[r.budget_bytes / 1e6 for r in routes], mode="markers",
                             name=S.label(f"the budget: {budget:.0%} of the model", "modeled", plan),
                             marker=dict(symbol="circle-open", size=11, color=S.PAPER, line=dict(width=2))))
    S.layout(fig, f"Where {budget:.0%} of each model's bytes go (modeled by the engine's memory plan, nothing run)",
             x=("DRAM for weights", "MB"), y=("way of running", None), height=430, barmode="stack")
    fig.update_yaxes(autorange="reversed")
    return fig



def budget_figure(curves: list[BudgetReads], budget: float | None = None) -> go.Figure:
    """Bytes read per token (share of each model's FFN) by memory budget, one line per way of running a
    model (simulated on its neuron sets; a line starts at the smallest budget it runs in)."""
    fig = go.Figure()
    for curve, c in zip(curves, ROUTE_COLORS):
        fig.add_trace(go.Scatter(x=curve.budgets, y=curve.read_share, name=S.label(curve.name, "modeled", S.SIMULATE),
                                 hovertemplate=f"{curve.name}: %{{y:.1%}} of the FFN read per token at %{{x:.0%}} "
                                               "memory<extra></extra>", **S.scatter(curve.name, "modeled", c)))
    if budget is not None:
        fig.add_vline(x=budget, line_color=CHOSEN, line_dash="dash", line_width=1.5, opacity=0.7,
                      annotation_text=f"MEMORY {budget:.0%} (a setting; the lines are modeled)",
                      annotation_position="top right" if budget < 0.75 else "top left", annotation_font_size=10)
    window = curves[0].window
    S.layout(fig, f"What each token reads from flash as DRAM grows (modeled: simulate, window {window}, held-out)",
             x=("memory budget", "share of the model's bytes"), y=("read per token", "share of the FFN's bytes"),
             height=420)
    fig.update_xaxes(tickformat=".0%")
    fig.update_yaxes(tickformat=".0%", rangemode="tozero")
    return fig
