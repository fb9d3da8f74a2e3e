"""Figures for notebook 01 (flash characteristics), in the visual language of `flashnb.viz.style`.

Every trace says what is *measured* (this machine, direct I/O or the fallback), *modeled* (the
profile's fitted model or the cost model) and *paper* (Alizadeh et al. 2024, M1 Max, Table 2).
Figures are plain `go.Figure`s; the read-time slider lives in `flashnb.widgets.flash`.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from flashnb.device.costmodel import (GB, PaperDevice, ProfileDevice, Table2Row, as_device, opt_6_7b, paper_policies,
                                      table2, token_cost)
from flashnb.device.profile import Profile
from flashnb.text import size_text
from flashnb.viz import style as S


def in_flight_text(n: int) -> str:
    """8 -> '8 in flight': reads in flight (the AIO queue depth; reader threads where native AIO is
    unavailable)."""
    return f"{int(n)} in flight"


def where(profile: Profile) -> str:
    """Which disk, how it was read and when: 'measured on vda (ext4), direct I/O, native AIO, 2026-11-26'
    (the backend where the profile records it: 'native AIO', or 'reader threads' where AIO was unavailable)."""
    disk = profile.data.get("machine", {}).get("disk", {})
    how = "direct I/O" if profile.direct else "buffered + fadvise (O_DIRECT refused)"
    backend = {"aio": "native AIO", "threads": "reader threads"}.get(profile.data.get("backend"))
    return (f"measured on {disk.get('device', '?')} ({disk.get('fs_type', '?')}), {how}, "
            f"{backend + ', ' if backend else ''}{profile.data.get('date', '')[:10]}")


def throughput_figure(profile: Profile, paper: PaperDevice | None = None) -> go.Figure:
    """Random-read throughput vs chunk size, one colour per number of reads in flight (the profile's
    `in_flight_counts`: the AIO queue depth, or reader threads without native AIO): measured cells as filled
    markers, the profile's fitted model between them dashed, the paper's M1 Max reads as stars in the
    colour of their layout and its sequential rate dotted."""
    paper = paper or as_device(None)
    fig = go.Figure()
    xs = np.geomspace(profile.chunks[0], profile.chunks[-1], 60)
    depths = profile.in_flight_counts.astype(int)
    for t, c in zip(depths, S.sequence(depths.size)):
        name = in_flight_text(t)
        fig.add_trace(go.Scatter(x=profile.chunks, y=profile.grid[list(depths).index(t)] / GB,
                                 name=S.label(name, "measured"), legendgroup=str(t),
                                 hovertemplate="%{x:.3s}B: %{y:.3f} GB/s<extra>" + f"{name} (measured)</extra>",
                                 **S.scatter(name, "measured", c, mode="markers")))
        fig.add_trace(go.Scatter(x=xs, y=profile.throughput(xs, t) / GB, legendgroup=str(t), showlegend=False,
                                 name=S.label(name, "modeled", S.FITTED_PROFILE), hoverinfo="skip",
                                 **S.scatter(name, "modeled", c, mode="lines")))
    for (chunk, bps), layout, what in zip(paper.sparse_points, ("unbundled", "bundled"), ("row", "bundle")):
        fig.add_trace(go.Scatter(x=[chunk], y=[bps / GB], text=[f"{what} {size_text(chunk)}"],
                                 textposition="top center", name=S.label(f"M1 Max {layout} {size_text(chunk)} reads",
                                                                         "paper"),
                                 **S.scatter(layout, "paper", mode="markers+text")))
    fig.update_yaxes(type="log")  # before the reference lines: S.hline places their labels on the log axis
    S.hline(fig, paper.dense_bps / GB, "paper", f"M1 Max sequential {paper.dense_bps / GB:.1f} GB/s (paper, Table 2)",
            annotation_position="bottom right")
    seq = profile.sequential_throughput() / GB
    S.hline(fig, seq, "measured", f"this disk sequential {seq:.2f} GB/s (measured)",
            annotation_position="bottom left")  # below the line, where small random reads never reach
    fig.add_annotation(text=where(profile), xref="paper", yref="paper", x=0, y=1.06, showarrow=False,
                       font=dict(size=10, color=S.TECHNIQUE_COLORS["naive"]))
    S.layout(fig, "Random reads vs chunk size: measured dots, fitted model dashed, paper stars",
             x=("chunk size", "bytes, log scale"), y=("throughput", "GB/s, log scale"), height=520)
    fig.update_xaxes(type="log", tickvals=list(profile.chunks), ticktext=[size_text(c) for c in profile.chunks])
    fig.update_layout(legend=dict(font=dict(size=10)))
    return S.label_log_axes(fig)


def format_table2(rows: list[Table2Row]) -> str:
    """Table 2 rows (from costmodel.table2) as fixed-width text: modeled beside the paper."""
    lines = [f"{'configuration':<12} {'flash->DRAM':>11} {'read':>8} {'GB/s':>6} {'I/O ms':>8} "
             f"{'paper ms':>9} {'diff':>7}"]
    for r in rows:
        read = size_text(r.read_bytes) if r.read_bytes else "dense"
        lines.append(f"{r.name:<12} {r.flash_to_dram_GB:>9.2f}GB {read:>8} {r.throughput_GBps:>6.2f} "
                     f"{r.io_ms:>8.0f} {r.paper_io_ms:>9.0f} {r.rel_error:>+7.1%}")
    return "\n".join(lines)


def table2_figure(profile: Profile | None = None) -> go.Figure:
    """I/O ms per token for Table 2's configurations, each in its technique's colour. Left: the paper's
    M1 Max, paper (outlined) beside the cost model (hatched). Right (with a profile): the cost model on
    this disk's measured profile. Log scale. Each series is one trace per technique (`style.bars`)."""
    paper_rows = table2()
    names = [r.name for r in paper_rows]
    colors = [S.color(n) for n in names]
    cols = 2 if profile is not None else 1
    fig = make_subplots(rows=1, cols=cols, shared_yaxes=True, subplot_titles=(
        "paper's M1 Max: paper vs modeled", "this disk: modeled from its profile")[:cols])
    # One trace per technique colour and series (S.bars), each series in its own offsetgroup: paper | modeled.
    fig.add_traces(S.bars(names, [r.paper_io_ms for r in paper_rows], colors, "paper",
                          S.label("Table 2, M1 Max", "paper"), offsetgroup="paper"), rows=1, cols=1)
    fig.add_traces(S.bars(names, [r.io_ms for r in paper_rows], colors, "modeled",
                          S.label("the paper's device" + (" (left) and this disk (right)" if profile else ""),
                                  "modeled", S.COST_MODEL), offsetgroup="modeled",
                          text=[f"{r.rel_error:+.1%}" for r in paper_rows], textposition="outside"), rows=1, cols=1)
    if profile is not None:
        mine = table2(profile)
        fig.add_traces(S.bars(names, [r.io_ms for r in mine], colors, "modeled",
                              S.label("this disk", "modeled", S.COST_MODEL), offsetgroup="modeled",
                              showlegend=False,   # its swatch would be the left one's: one entry names both
                              text=[f"{r.io_ms:.0f}" for r in mine], textposition="outside"), rows=1, cols=2)
    S.layout(fig, "Flash I/O per token, OPT 6.7B fp16, half in DRAM: paper (Table 2) vs modeled",
             x=("configuration", None), y=("I/O per token", "ms, log scale"), height=440, barmode="group")
    fig.update_yaxes(type="log")
    fig.update_layout(legend_tracegroupgap=0)  # legend groups of S.bars: rows as close as ungrouped entries
    fig.update_traces(hovertemplate="%{x}: %{y:.0f} ms of I/O per token", selector=dict(type="bar"))
    return S.label_log_axes(fig)


def bundling_figure(profile: Profile) -> go.Figure:
    """Modeled I/O per token for OPT 6.7B with predictor + window, unbundled vs bundled, on the paper's
    device and on this disk: same bytes, bigger reads."""
    shape = opt_6_7b()
    win = {p.name: p for p in paper_policies()}
    devices = [("paper's M1 Max", None), ("this disk (measured profile)", ProfileDevice(profile))]
    fig = go.Figure()
    for layout, what, pol in (("unbundled", "2 reads of 8 KiB per neuron", win["+windowing"]),
                              ("bundled", "1 read of 16 KiB per neuron", win["+bundling"])):
        costs = [token_cost(shape, pol, dev) for _, dev in devices]
        fig.add_trace(go.Bar(x=[d for d, _ in devices], y=[c.io_seconds * 1e3 for c in costs],
                             name=S.label(f"{layout}: {what}", "modeled", S.COST_MODEL),
                             text=[f"{c.io_seconds * 1e3:.0f} ms at {c.io_throughput / GB:.2f} GB/s" for c in costs],
                             hovertemplate=f"%{{x}}, {layout}: %{{y:.0f}} ms of I/O per token<extra></extra>",
                             textposition="outside", **S.bar(layout, "modeled")))
    S.layout(fig, "Same 0.2 GB per token, read unbundled or bundled (modeled, OPT 6.7B, window k=5)",
             x=("device", None), y=("I/O per token", "ms"), height=420, barmode="group")
    fig.update_yaxes(rangemode="tozero")  # from zero: the bars' heights are in the ratio of their times
    return fig


def layouts_figure(rows) -> go.Figure:
    """Measured: the same neuron sets read from a bundled and an unbundled store (flashnb.lab.flash.LayoutRun
    rows, from compare_layouts): useful GB/s (bytes needed / wall time) and requests; the whiskers span the
    calls, from the slowest to the fastest (where the rows have them)."""
    fig = go.Figure()
    for r in rows:
        spread = r.call_useful_GBps
        fig.add_trace(go.Bar(x=[r.layout], y=[r.useful_GBps], name=S.label(r.layout, "measured"),
                             hovertemplate=f"{r.layout}: %{{y:.3f}} GB/s of bytes needed"
                                           + (f" (calls {min(spread):.3f}-{max(spread):.3f})" if spread else "")
                                           + "<extra></extra>",
                             text=[f"{r.useful_GBps:.3f} GB/s<br>{r.requests // r.calls} requests/call<br>"
                                   f"{r.ms_per_call:.1f} ms/call"], textposition="inside" if spread else "outside",
                             insidetextanchor="start",   # at the bar's foot, clear of the whiskers on its top
                             error_y=S.whiskers([r.useful_GBps], [spread]) if spread else None,
                             **S.bar(r.layout, "measured")))
    r0 = rows[0]
    S.layout(fig, f"Measured here: {r0.neurons_per_call} random neurons of {size_text(r0.neuron_bytes)} per "
                  f"call, {in_flight_text(r0.in_flight)}, {'direct I/O' if r0.direct else 'buffered I/O (O_DIRECT refused)'}",
             x=("store layout", None), y=("useful throughput: bytes needed / wall time", "GB/s"), height=420)
    fig.update_yaxes(rangemode="tozero")
    return fig
