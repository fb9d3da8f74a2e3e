"""Figures for the tour notebooks (00 quickstart, 06 end to end, 07 bring your own model).

Colours, marks and axis titles come from `flashnb.viz.style`: one colour per technique or latency
component; *measured* solid, *modeled* hatched or dashed, *paper* outlined, starred or dotted; every
legend entry names its source. The numbers come from flashnb.lab (engine runs, the bench, the budget
sweep); the budget slider that redraws `budget_figure` is in `flashnb.widgets.tour`.
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from flashnb.viz import style as S
from flashnb.text import MB

COMPONENTS = ("io", "mm", "compute")


# ----------------------------------------------------------------------------------------------
# Notebook 00


def data_moved_figure(steps, ffn_bytes: int, token_text: list[str] | None = None) -> go.Figure:
    """Per generated token (measured): left, MB read from flash beside the whole FFN (what naive reads
    every token); right, the token's predicted neurons split into those already in DRAM (window hits)
    and those read from flash."""
    x = list(range(1, len(steps) + 1))
    hover = token_text or [""] * len(steps)
    tip = lambda what: f"token %{{x}} %{{hovertext}}: {what}<extra></extra>"  # noqa: E731
    fig = make_subplots(rows=1, cols=2, subplot_titles=("data read from flash per token",
                                                        "predicted neurons: cached vs read"))
    fig.add_trace(go.Bar(x=x, y=[s.bytes_read / MB for s in steps],
                         name="read from flash: predictors, window and bundles (measured)",
                         hovertext=hover, hovertemplate=tip("%{y:.3f} MB read from flash"),
                         **S.bar("all", "measured")), 1, 1)
    fig.add_trace(go.Scatter(x=[x[0] - 0.5, x[-1] + 0.5] if x else [], y=[ffn_bytes / MB] * (2 if x else 0),
                             name="whole FFN, what naive reads (measured: store size)",
                             **S.scatter("naive", "measured", mode="lines")), 1, 1)
    fig.add_trace(go.Bar(x=x, y=[s.cached for s in steps], name="neurons already in DRAM: window hits (measured)",
                         hovertext=hover, hovertemplate=tip("%{y} neurons already in DRAM"),
                         **S.bar("windowing", "measured")), 1, 2)
    fig.add_trace(go.Bar(x=x, y=[s.loaded for s in steps], name="neurons read from flash (measured)", hovertext=hover,
                         hovertemplate=tip("%{y} neurons read from flash"), **S.bar("io", "measured")), 1, 2)
    S.layout(fig, "What moves per token (all techniques, measured)", height=400, barmode="stack")
    fig.update_xaxes(title_text=S.axis_title("generated token", None))
    fig.update_yaxes(title_text=S.axis_title("read from flash", "MB"), type="log", row=1, col=1)
    fig.update_yaxes(title_text=S.axis_title("neurons, all layers", "count"), row=1, col=2)
    return S.label_log_axes(fig)


def time_breakdown_figure(steps, token_text: list[str] | None = None) -> go.Figure:
    """Per generated token (measured): wall time stacked as I/O, memory management and compute."""
    x = list(range(1, len(steps) + 1))
    fig = go.Figure()
    for comp in COMPONENTS:
        fig.add_trace(go.Bar(x=x, y=[getattr(s, f"{comp}_seconds") * 1e3 for s in steps], name=S.label(comp, "measured"),
                             hovertext=token_text or [""] * len(steps), **S.bar(comp, "measured"),
                             hovertemplate=f"token %{{x}} %{{hovertext}}: {S.label(comp, 'measured')} "
                                           "%{y:.2f} ms<extra></extra>"))
    return S.layout(fig, "Where the time goes, token by token (measured)", x=("generated token", None),
                    y=("time per token", "ms"), barmode="stack")


# ----------------------------------------------------------------------------------------------
# Notebook 06


def breakdown_figure(result) -> go.Figure:
    """Latency per token of every configuration of a bench result (flashnb.bench.report.BenchResult), one
    horizontal bar each: measured I/O, memory management and compute stacked (one unsplit bar where the
    runner cannot separate them), and under it, hatched, the cost model's I/O for the same requests
    (configurations the cost model does not cover have no such bar)."""
    res = result.results
    # a modeled row only where the cost model has I/O to show (dense and the floor read nothing: no empty row)
    slots = [(n, s) for n in res for s in ("measured", "modeled") if s == "measured" or res[n].modeled_io_ms]
    cats = ([res[n].label for n, _ in slots], [s for _, s in slots])
    fig = go.Figure()
    for comp in COMPONENTS:
        x = [getattr(res[n].stats, f"{comp}_ms") if s == "measured" else None for n, s in slots]
        fig.add_trace(go.Bar(y=cats, x=x, orientation="h", name=S.label(comp, "measured"), legendgroup=comp,
                             **S.bar(comp, "measured")))
    x = [res[n].modeled_io_ms if s == "modeled" else None for n, s in slots]
    fig.add_trace(go.Bar(y=cats, x=x, orientation="h", name=S.label("io", "modeled"), legendgroup="io",
                         **S.bar("io", "modeled")))
    # baselines whose time has no I/O split (mmap, accelerate): their total, one trace each, so that each
    # legend entry shows its own colour
    for name in [n for n in res if res[n].stats.io_ms is None]:
        x = [res[n].stats.total_ms if (n == name and s == "measured") else None for n, s in slots]
        fig.add_trace(go.Bar(y=cats, x=x, orientation="h", name=S.label(f"{res[name].label}: total, not split",
                                                                           "measured"),
                             **S.bar(name, "measured")))
    S.layout(fig, "Latency per token by configuration: measured, and the modeled I/O under it",
             x=("time per token", "ms"), y=("configuration", None), height=140 + 22 * len(slots), barmode="stack")
    fig.update_yaxes(autorange="reversed")
    return fig


def ladder_figure(rows) -> go.Figure:
    """The paper's Table 2 ladder beside ours (flashnb.lab.end_to_end.table2_beside rows): I/O time per
    token relative to naive, the paper's (OPT 6.7B, M1 Max), measured here and modeled here."""
    names = [r.name for r in rows]
    labels = [r.label for r in rows]
    fig = go.Figure()
    series = (("paper", "paper_io_vs_naive", "paper: OPT 6.7B, M1 Max, Table 2"),
              ("measured", "io_vs_naive", "this model on this disk"),
              ("modeled", "modeled_io_vs_naive", "cost model, this run's requests"))
    colors = [S.color(n) for n in names]
    for source, key, what in series:   # each series one trace per technique colour, in one offsetgroup
        vals = [getattr(r, key) for r in rows]
        fig.add_traces(S.bars(labels, vals, colors, source, f"{what} ({source})",
                              offsetgroup=source, text=[None if v is None else f"{v:.1f}x" for v in vals],
                              textposition="outside"))
    S.layout(fig, "I/O speed-up over naive, technique by technique", x=("configuration", None),
             y=("naive I/O time / this I/O time", "x, log scale"), height=420, barmode="group")
    fig.update_yaxes(type="log")
    fig.update_layout(legend_tracegroupgap=0)  # legend groups of S.bars: rows as close as ungrouped entries
    return S.label_log_axes(fig)


def budget_figure(sweep, budget: float | None = None) -> go.Figure:
    """Latency per token (left) and data read per token (right) vs DRAM budget for all techniques and
    hybrid: modeled curves (dashed) through the budget grid, engine runs at a few budgets (filled
    markers, their tokens' p10-p90 as error bars and in their hover), the paper's operating point (about half
    the model) dotted, `budget` marked by a grey band. Budgets at which nothing is read are left off the
    log-scaled right panel."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("latency per token", "data read from flash per token"))
    for name in ("all", "hybrid"):
        for source in ("modeled", "measured"):
            rows = getattr(sweep, source)[name]
            x = [100 * r.budget for r in rows]
            mode = "lines+markers" if source == "modeled" else "markers"
            for col, key in ((1, "total_ms"), (2, "mb_per_token")):
                y = [getattr(r, key) if (col == 1 or getattr(r, key)) else None for r in rows]  # 0: off the log axis
                hover = "DRAM budget %{x:.1f}%: " + ("%{y:.1f} ms per token" if col == 1 else "%{y:.2f} MB per token")
                spread = {} if col == 2 or source == "modeled" else dict(  # the tokens' p10-p90
                    error_y=dict(S.whiskers(y, [[r.p10_ms, r.p90_ms] for r in rows]), thickness=1.5, width=4,
                                 color=S.color(name)),   # in the series' colour: the two overlap at a budget
                    customdata=[[r.p10_ms, r.p90_ms] for r in rows])
                if spread:
                    hover += " (tokens' p10-p90 %{customdata[0]:.1f}-%{customdata[1]:.1f} ms)"
                fig.add_trace(go.Scatter(x=x, y=y, name=S.label(name, source), legendgroup=f"{name}{source}",
                                         showlegend=col == 1, hovertemplate=hover, **spread,
                                         **S.scatter(name, source, mode=mode)), 1, col)
    for col in (1, 2):
        fig.add_vline(x=50, line=dict(S.scatter("naive", "paper", S.PAPER)["line"], width=1), row=1, col=col)
    fig.add_trace(go.Scatter(x=[None], y=[None], name="paper: about half of OPT 6.7B in DRAM (paper, Table 2)",
                             **S.scatter("naive", "paper", S.PAPER, mode="lines")), 1, 1)
    S.layout(fig, f"Memory-latency trade-off: {sweep.window}-token window, {sweep.tokens} tokens per run", height=420)
    fig.update_xaxes(title_text=S.axis_title("DRAM budget", "% of the model's bytes"))
    fig.update_yaxes(title_text=S.axis_title("time per token", "ms"), row=1, col=1)
    fig.update_yaxes(title_text=S.axis_title("read from flash", "MB per token"), type="log", row=1, col=2)
    if budget is not None:
        mark_budget(fig, budget)
    return S.label_log_axes(fig)


def mark_budget(fig, budget: float) -> None:
    """Draw (or move) the chosen budget's vertical line on both panels of `budget_figure`."""
    _mark_both_panels(fig, 100 * budget, "chosen budget")


def _mark_both_panels(fig, x: float, name: str) -> None:
    """Draw (or move) a grey vertical line named `name` at `x` on both panels of a 1 x 2 figure."""
    mine = [s for s in (fig.layout.shapes or ()) if s.name == name]
    if mine:
        for s in mine:
            s.x0 = s.x1 = x
        return
    line = dict(color="rgba(0,0,0,0.35)", width=4, dash="dash")
    for xref, yref in (("x", "y domain"), ("x2", "y2 domain")):
        fig.add_shape(type="line", name=name, xref=xref, yref=yref, x0=x, x1=x, y0=0, y1=1, layer="below", line=line)
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=line, name=f"grey line: the {name}, set by the "
                             "slider (modeled)"))   # its legend entry


# ----------------------------------------------------------------------------------------------
# Notebook 07


def costs_figure(runs, model_bytes: int) -> go.Figure:
    """Per-token cost of each run (flashnb.lab.byo.Run list, measured): time stacked as I/O, memory
    management and compute (left); DRAM held for weights beside the model's size (right)."""
    names = [r.name for r in runs]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("time per token", "DRAM for weights"))
    for comp in COMPONENTS:
        fig.add_trace(go.Bar(x=names, y=[getattr(r.stats, f"{comp}_ms") for r in runs], name=S.label(comp, "measured"),
                             **S.bar(comp, "measured")), 1, 1)
    for dense, what, tech in ((True, "the whole model", "dense"), (False, "weights, predictors and maps", "all")):
        held = [r for r in runs if r.name.startswith("dense") == dense]   # one legend entry per colour
        if held:
            fig.add_trace(go.Bar(x=[r.name for r in held], y=[r.dram_bytes / MB for r in held],
                                 name=f"DRAM held: {what} (measured: bytes held)", marker=dict(color=S.color(tech))),
                          1, 2)
    S.hline(fig, model_bytes / MB, "measured", "whole model (measured: file bytes)", S.color("naive"),
            annotation_position="top left", row=1, col=2)   # across the whole panel
    S.layout(fig, "Dense in DRAM vs from flash (measured)", height=420, barmode="stack")
    fig.update_xaxes(title_text=S.axis_title("run", None))
    fig.update_yaxes(title_text=S.axis_title("time per token", "ms"), row=1, col=1)
    top = max([model_bytes] + [r.dram_bytes for r in runs]) / MB   # the dense run holds the whole model:
    fig.update_yaxes(title_text=S.axis_title("DRAM", "MB"), range=[0, 1.15 * top], row=1, col=2)  # line below the edge
    return fig


# ----------------------------------------------------------------------------------------------
# Notebook 06: where a token goes against its floor, and the pinned/window split


def waterfall_figure(result, names=("all", "pinned")) -> go.Figure:
    """For each named configuration of a bench result with a token split (`ConfigResult.split_ms`), a
    waterfall of its measured token, read top to bottom: the model without its FFNs, then each engine phase
    laid after what came before, up to the total; under it the floor measured in the same run (the same
    token with the FFN in DRAM: the model, the predictors and the sparse FFN math, nothing read) and, for
    all when the run measured them, its reads alone (the disk and the kernel) and the lower bound they
    give (`flashnb.bench.report.BenchResult.lower_bound_ms`)."""
    from flashnb.bench.report import SPLIT

    res = [result.results[n] for n in names if n in result.results and result.results[n].split_ms]
    fig = make_subplots(rows=1, cols=max(1, len(res)), shared_yaxes=True, subplot_titles=[r.label for r in res],
                        horizontal_spacing=0.04)
    reads, bound = result.results.get("reads"), result.lower_bound_ms
    rows = [S.PHASE_LABELS[k] for k in SPLIT] + ["total", "floor"] + (["reads alone", "lower bound"] if bound else [])
    for col, r in enumerate(res, 1):
        base = 0.0
        for k in SPLIT:
            v = r.split_ms[k]
            fig.add_trace(go.Bar(y=[S.PHASE_LABELS[k]], x=[v], base=[base if v >= 0 else base + v], orientation="h",
                                 name=f"{S.PHASE_LABELS[k]} (measured)", legendgroup=k, showlegend=False,
                                 customdata=[v], hovertemplate=f"{S.PHASE_LABELS[k]}: %{{customdata:.2f}} ms "
                                 "(measured)<extra></extra>", **S.bar(k, "measured")), 1, col)
            base += v
        fig.add_trace(go.Bar(y=["total"], x=[r.stats.total_ms], orientation="h", name=S.label(r.name, "measured"),
                             showlegend=False, **S.bar(r.name, "measured")), 1, col)
        fig.add_trace(go.Bar(y=["floor"], x=[r.floor_ms], orientation="h", name=S.label("floor", "measured"),
                             legendgroup="floor", showlegend=False, **S.bar("floor", "measured")), 1, col)
        if r.name == "all" and bound:  # (a bound implies the run measured all's reads alone)
            f = result.results["floor"].stats
            fig.add_trace(go.Bar(y=["reads alone"], x=[reads.stats.io_ms], orientation="h", showlegend=False,
                                 name=S.label("reads", "measured"),
                                 **S.bar("reads", "measured")), 1, col)
            fig.add_trace(go.Bar(y=["lower bound"], x=[bound], orientation="h", showlegend=False,
                                 name=S.label("bound", "measured"),
                                 hovertemplate=f"lower bound: the floor {f.total_ms:.2f} + reads alone "
                                 f"{reads.stats.io_ms:.2f} - the floor's FFN math {f.ffn_ms:.2f} = {bound:.2f} ms "
                                 "(measured)<extra></extra>", **S.bar("bound", "measured")), 1, col)
        fig.update_xaxes(title_text=S.axis_title("time per token", "ms"), row=1, col=col)
    S.layout(fig, "A token's milliseconds, step by step, against its floor (measured, same run)", height=420,
             barmode="overlay")
    fig.update_yaxes(categoryorder="array", categoryarray=rows[::-1])
    fig.update_yaxes(title_text=S.axis_title("part of the token", None), row=1, col=1)
    return fig


def split_figure(choices: dict, share: float | None = None) -> go.Figure:
    """Hot neurons pinned vs window rows, simulated (flashnb.core.simulate.choose_pinned with the cost
    model's I/O as its score) at each DRAM budget in `choices` {budget: PinningChoice}: data read per
    token (left) and the cost model's I/O per token (right) against the share of the budget's neuron
    rows pinned; each budget's choice a larger marker; `share` marked by a grey band."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("data read from flash per token", "I/O per token"))
    colors = S.sequence(len(choices) + 1)[1:]  # the lightest is too pale for a line
    for (budget, c), col in zip(sorted(choices.items()), colors):
        total = [p + w for p, w in zip(c.pinned_rows, c.window_rows)]
        x = [100 * p / t for p, t in zip(c.pinned_rows, total)]
        best = c.pinned_rows.index(c.chosen)
        name = f"budget {budget:.0%}"
        for panel, y in ((1, [b / MB for b in c.bytes_per_token]), (2, c.score)):
            fig.add_trace(go.Scatter(x=x, y=y, name=S.label(name, "modeled", S.SIMULATE), legendgroup=name,
                                     showlegend=panel == 1, **S.scatter(name, "modeled", col)), 1, panel)
            chosen = S.scatter(name, "modeled", col, mode="markers")
            chosen["marker"]["size"] = 15
            fig.add_trace(go.Scatter(x=[x[best]], y=[y[best]], name=f"{name}: chosen split (modeled by simulate)",
                                     legendgroup=name, showlegend=False, **chosen), 1, panel)
    # a legend entry for the large markers (the slider's grey line gets its own in _mark_both_panels)
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="large marker: each budget's chosen split "
                             "(modeled by simulate)", marker=dict(size=15, color="#666666", symbol="circle-open")))
    S.layout(fig, "Pinned hot neurons or a longer window: one budget, two uses (simulated)", height=440)
    fig.update_xaxes(title_text=S.axis_title("neuron rows pinned", "% of the budget's rows"))
    fig.update_yaxes(title_text=S.axis_title("read from flash", "MB per token"), row=1, col=1)
    fig.update_yaxes(title_text=S.axis_title("I/O, cost model", "ms per token"), row=1, col=2)
    if share is not None:
        mark_share(fig, share)
    return fig


def mark_share(fig, share: float) -> None:
    """Draw (or move) the chosen share's vertical line on both panels of `split_figure`."""
    _mark_both_panels(fig, 100 * share, "chosen share")


def sweep_figure(points, paper_speedup: float | None = None) -> go.Figure:
    """Speed-up of all techniques per token against model size (flashnb.bench.scale.SweepPoint list):
    over naive and over mmap, measured (solid), and over naive modeled as measured compute plus the
    cost model's I/O (dashed); the paper's OPT 6.7B CPU speed-up starred."""
    x = [p.model_bytes / 1e9 for p in points]
    text = [p.name for p in points]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=[p.all_vs_naive for p in points], text=text, name="all vs naive (measured)",
                             **S.scatter("naive", "measured")))
    fig.add_trace(go.Scatter(x=x, y=[p.all_vs_mmap for p in points], text=text, name="all vs mmap (measured)",
                             **S.scatter("mmap", "measured")))
    fig.add_trace(go.Scatter(x=x, y=[p.modeled_all_vs_naive for p in points], text=text,
                             name="all vs naive (modeled: measured compute + cost model I/O)",
                             **S.scatter("naive", "modeled")))
    if paper_speedup is not None:
        fig.add_trace(go.Scatter(x=[13.4], y=[paper_speedup], name="OPT 6.7B on the M1 Max CPU (paper, Table 3)",
                                 **S.scatter("all", "paper", S.PAPER, mode="markers")))
    S.hline(fig, 1.0, "measured", "no gain", color_=S.color("naive"))
    S.layout(fig, "Where flash loading starts to pay: speed-up per token against model size",
             x=("model size, fp16", "GB, log scale"), y=("speed-up of all techniques", "x"), height=420)
    fig.update_xaxes(type="log")
    return S.label_log_axes(fig)


def text_block(text: str, font_px: int = 10):
    """A fixed-width text (a table made for a terminal) as notebook HTML in a smaller font that never wraps:
    a row of 120-odd characters fits the output area, and a longer one scrolls instead of breaking."""
    import html

    from IPython.display import HTML

    style = f"font-size:{font_px}px;line-height:1.35;white-space:pre;overflow-x:auto"
    return HTML(f'<pre style="{style}">{html.escape(text)}</pre>')
