"""Figures and widgets for notebook 01 (flash characteristics): plotly + ipywidgets.

Every figure says what is *measured* (this machine, direct I/O or the fallback), *modeled* (the
profile's fitted model or the cost model) and *paper* (Alizadeh et al. 2024, M1 Max, Table 2).
Figures are plain `go.Figure`s; `read_time_widget` is an ipywidgets box (no plot state to store).
"""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go

from flashnb.costmodel import GB, PaperDevice, ProfileDevice, as_device, opt_6_7b, paper_policies, table2, \
    time_to_read, token_cost
from flashnb.profile import Profile

OURS = "#1f77b4"
PAPER_COLOR = "#d62728"
MODEL_COLOR = "#7f7f7f"


def _size(n: float) -> str:
    n = float(n)
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            v = n / div
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n:.0f} B"


def _where(profile: Profile) -> str:
    disk = profile.data.get("machine", {}).get("disk", {})
    how = "direct I/O" if profile.direct else "buffered + fadvise (O_DIRECT refused)"
    return f"{disk.get('device', '?')} ({disk.get('fs_type', '?')}), {how}, {profile.data.get('date', '')[:10]}"


def throughput_figure(profile: Profile, paper: PaperDevice | None = None) -> go.Figure:
    """Random-read throughput vs chunk size, one line per thread count (measured markers, the fitted
    model between them), with the paper's M1 Max figures as red markers and its dense rate as a line."""
    paper = paper or as_device(None)
    fig = go.Figure()
    colors = ["#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b"]
    xs = np.geomspace(profile.chunks[0], profile.chunks[-1], 60)
    for i, t in enumerate(profile.thread_counts.astype(int)):
        c = colors[min(len(colors) - 1, int(round(i * (len(colors) - 1) / max(1, profile.thread_counts.size - 1))))]
        fig.add_trace(go.Scatter(x=profile.chunks, y=profile.grid[i] / GB, mode="markers", marker_color=c,
                                 name=f"{t} thread{'s' if t > 1 else ''} (measured)", legendgroup=str(t),
                                 hovertemplate="%{x:.3s}B: %{y:.3f} GB/s<extra>" + f"{t} threads</extra>"))
        fig.add_trace(go.Scatter(x=xs, y=profile.throughput(xs, t) / GB, mode="lines", line=dict(color=c, width=1.5),
                                 name=f"{t} threads (model)", legendgroup=str(t), showlegend=False,
                                 hoverinfo="skip"))
    for (chunk, bps), label in zip(paper.sparse_points, ("unbundled row", "bundle")):
        fig.add_trace(go.Scatter(x=[chunk], y=[bps / GB], mode="markers+text", marker=dict(color=PAPER_COLOR, size=11,
                                 symbol="diamond"), text=[f"paper: {label}"], textposition="top center",
                                 name=f"paper M1 Max, {_size(chunk)} reads", showlegend=False))
    fig.add_hline(y=paper.dense_bps / GB, line_dash="dot", line_color=PAPER_COLOR,
                  annotation_text=f"paper M1 Max sequential {paper.dense_bps / GB:.1f} GB/s",
                  annotation_position="bottom right")
    seq = profile.sequential_throughput() / GB
    fig.add_hline(y=seq, line_dash="dot", line_color=OURS, annotation_text=f"this disk sequential {seq:.2f} GB/s "
                  "(measured)", annotation_position="top left")
    fig.update_layout(title="Random-read throughput vs chunk size (measured here; model = lines; red = paper)",
                      xaxis=dict(title="chunk size (bytes)", type="log", tickvals=list(profile.chunks),
                                 ticktext=[_size(c) for c in profile.chunks]),
                      yaxis=dict(title="GB/s (1e9 bytes/s)", type="log"), height=480,
                      legend=dict(font=dict(size=10)),
                      annotations=list(fig.layout.annotations) + [dict(
                          text=_where(profile), xref="paper", yref="paper", x=0, y=1.06, showarrow=False,
                          font=dict(size=10, color=MODEL_COLOR))])
    return fig


def read_time_text(profile: Profile, chunk_bytes: int, threads: int, nbytes: float = 1e9) -> str:
    """HTML: modeled seconds to read `nbytes` in random `chunk_bytes` reads, here and on the paper's device."""
    mine = time_to_read(nbytes, chunk_bytes, threads, ProfileDevice(profile))
    dev = as_device(None)
    points = dict(dev.sparse_points)
    reads = int(np.ceil(nbytes / chunk_bytes))
    if chunk_bytes in points:
        paper = nbytes / points[chunk_bytes]
        paper_line = f"paper's M1 Max at {_size(chunk_bytes)} reads (Table 2): <b>{paper:.2f} s</b> " \
                     f"({points[chunk_bytes] / GB:.2f} GB/s)"
    else:
        paper_line = "paper's M1 Max: Table 2 gives sparse rates only for 8 KiB (" + \
            f"{points.get(8192, 0) / GB:.2f} GB/s) and 16 KiB ({points.get(16384, 0) / GB:.2f} GB/s) reads"
    return (f"<b>Reading {nbytes / GB:g} GB as {reads:,} random reads of {html.escape(_size(chunk_bytes))} "
            f"with {threads} thread{'s' if threads > 1 else ''}</b><br>"
            f"this disk (modeled from the measured profile): <b>{mine:.2f} s</b> "
            f"({nbytes / mine / GB:.3f} GB/s)<br>{paper_line}<br>"
            f"sequential, measured here: {nbytes / profile.sequential_throughput():.2f} s; "
            f"paper's M1 Max sequential: {nbytes / dev.dense_bps:.2f} s")


def read_time_widget(profile: Profile, nbytes: float = 1e9, chunk_bytes: int = 16384, threads: int | None = None):
    """Sliders for chunk size and threads, showing `read_time_text` (ipywidgets VBox)."""
    import ipywidgets as w

    sizes = [int(c) for c in profile.chunks]
    tcounts = [int(t) for t in profile.thread_counts]
    chunk = w.SelectionSlider(options=[(_size(c), c) for c in sizes], description="chunk",
                              value=min(sizes, key=lambda c: abs(c - chunk_bytes)), continuous_update=False)
    thr = w.SelectionSlider(options=tcounts, description="threads", value=threads or tcounts[-1],
                            continuous_update=False)
    out = w.HTML(read_time_text(profile, chunk.value, thr.value, nbytes))

    def update(_=None):
        out.value = read_time_text(profile, chunk.value, thr.value, nbytes)

    chunk.observe(update, names="value")
    thr.observe(update, names="value")
    return w.VBox([chunk, thr, out])


def format_table2(rows: list[dict]) -> str:
    """Table 2 rows (from costmodel.table2) as fixed-width text: modeled beside the paper."""
    lines = [f"{'configuration':<12} {'flash->DRAM':>11} {'read':>8} {'GB/s':>6} {'I/O ms':>8} "
             f"{'paper ms':>9} {'diff':>7}"]
    for r in rows:
        read = _size(r["read_bytes"]) if r["read_bytes"] else "dense"
        lines.append(f"{r['name']:<12} {r['flash_to_dram_GB']:>9.2f}GB {read:>8} {r['throughput_GBps']:>6.2f} "
                     f"{r['io_ms']:>8.0f} {r['paper_io_ms']:>9.0f} {r['rel_error']:>+7.1%}")
    return "\n".join(lines)


def table2_figure(profile: Profile | None = None) -> go.Figure:
    """I/O ms per token for Table 2's configurations: paper, modeled on the paper's device, and (with a
    profile) modeled on this disk. Log scale."""
    paper_rows = table2()
    names = [r["name"] for r in paper_rows]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=names, y=[r["paper_io_ms"] for r in paper_rows], name="paper (Table 2)",
                         marker_color=PAPER_COLOR))
    fig.add_trace(go.Bar(x=names, y=[r["io_ms"] for r in paper_rows], name="modeled, paper's device",
                         marker_color="#ff9896", text=[f"{r['rel_error']:+.1%}" for r in paper_rows],
                         textposition="outside"))
    if profile is not None:
        mine = table2(profile)
        fig.add_trace(go.Bar(x=names, y=[r["io_ms"] for r in mine], name="modeled, this disk (measured profile)",
                             marker_color=OURS))
    fig.update_layout(barmode="group", title="Flash I/O per token, OPT 6.7B fp16, half the model in DRAM",
                      yaxis=dict(title="I/O ms per token", type="log"), height=420)
    return fig


def bundling_figure(profile: Profile) -> go.Figure:
    """Modeled I/O per token for OPT 6.7B with predictor + window, unbundled vs bundled, on the paper's
    device and on this disk: same bytes, bigger reads."""
    shape = opt_6_7b()
    win = {p.name: p for p in paper_policies()}
    devices = [("paper M1 Max", None), ("this disk", ProfileDevice(profile))]
    fig = go.Figure()
    for label, pol, color in (("unbundled (2 reads of 8 KiB per neuron)", win["+windowing"], "#bbbbbb"),
                              ("bundled (1 read of 16 KiB per neuron)", win["+bundling"], OURS)):
        costs = [token_cost(shape, pol, dev) for _, dev in devices]
        fig.add_trace(go.Bar(x=[d for d, _ in devices], y=[c.io_seconds * 1e3 for c in costs], name=label,
                             marker_color=color, text=[f"{c.io_seconds * 1e3:.0f} ms at {c.io_throughput / GB:.2f} GB/s"
                                                       for c in costs], textposition="outside"))
    fig.update_layout(barmode="group", height=400,
                      title="Same 0.2 GB per token, read unbundled or bundled (modeled, OPT 6.7B, window k=5)",
                      yaxis=dict(title="I/O ms per token", type="log"))
    return fig


def layouts_figure(rows: list[dict]) -> go.Figure:
    """Measured: the same neuron sets read from a bundled and an unbundled store (from
    flashnb.profile.compare_layouts): useful GB/s (bytes needed / wall time) and requests."""
    names = [r["layout"] for r in rows]
    fig = go.Figure(go.Bar(x=names, y=[r["useful_GBps"] for r in rows], marker_color=[OURS, "#bbbbbb"][:len(rows)],
                           text=[f"{r['useful_GBps']:.3f} GB/s<br>{r['requests'] // r['calls']} requests/call<br>"
                                 f"{r['ms_per_call']:.1f} ms/call" for r in rows], textposition="outside"))
    r0 = rows[0]
    fig.update_layout(title=f"Measured here: {r0['neurons_per_call']} random neurons of "
                            f"{_size(r0['neuron_bytes'])} per call, {r0['threads']} threads, "
                            f"{'direct I/O' if r0.get('direct') else 'fallback I/O'}",
                      yaxis=dict(title="useful GB/s (needed bytes / wall s)", rangemode="tozero"), height=400)
    return fig
