"""Notebook 01's slider: how long does reading 1 GB as random reads of a given size take?"""

from __future__ import annotations

import html

import numpy as np

from flashnb.device.costmodel import GB, ProfileDevice, as_device, time_to_read
from flashnb.device.profile import Profile
from flashnb.text import size_text


def read_time_text(profile: Profile, chunk_bytes: int, in_flight: int, nbytes: float = 1e9) -> str:
    """HTML: modeled seconds to read `nbytes` in random `chunk_bytes` reads with `in_flight` reads in flight,
    here and on the paper's device."""
    mine = time_to_read(nbytes, chunk_bytes, in_flight, ProfileDevice(profile))
    dev = as_device(None)
    points = dict(dev.sparse_points)
    reads = int(np.ceil(nbytes / chunk_bytes))
    if chunk_bytes in points:
        paper = nbytes / points[chunk_bytes]
        paper_line = f"paper's M1 Max at {size_text(chunk_bytes)} reads (paper, Table 2): <b>{paper:.2f} s</b> " \
                     f"({points[chunk_bytes] / GB:.2f} GB/s)"
    else:
        paper_line = "paper's M1 Max: Table 2 gives sparse rates only for 8 KiB (" + \
            f"{points.get(8192, 0) / GB:.2f} GB/s) and 16 KiB ({points.get(16384, 0) / GB:.2f} GB/s) reads"
    return (f"<b>Reading {nbytes / GB:g} GB as {reads:,} random reads of {html.escape(size_text(chunk_bytes))} "
            f"with {in_flight} read{'s' if in_flight > 1 else ''} in flight</b><br>"
            f"this disk (modeled from the measured profile): <b>{mine:.2f} s</b> "
            f"({nbytes / mine / GB:.3f} GB/s)<br>{paper_line}<br>"
            f"sequential, measured here: {nbytes / profile.sequential_throughput():.2f} s; "
            f"paper's M1 Max sequential (paper): {nbytes / dev.dense_bps:.2f} s")


def read_time_widget(profile: Profile, nbytes: float = 1e9, chunk_bytes: int = 16384, in_flight: int | None = None):
    """Sliders for chunk size and reads in flight (the profile's `in_flight_counts`) over the profile's measured
    grid, showing `read_time_text` (an ipywidgets VBox: chunk slider, in-flight slider, HTML)."""
    import ipywidgets as w

    sizes = [int(c) for c in profile.chunks]
    tcounts = [int(t) for t in profile.in_flight_counts]
    chunk = w.SelectionSlider(options=[(size_text(c), c) for c in sizes], description="chunk",
                              value=min(sizes, key=lambda c: abs(c - chunk_bytes)), continuous_update=False)
    thr = w.SelectionSlider(options=tcounts, description="in flight", value=in_flight or tcounts[-1],
                            continuous_update=False)
    out = w.HTML(read_time_text(profile, chunk.value, thr.value, nbytes))

    def update(_=None):
        out.value = read_time_text(profile, chunk.value, thr.value, nbytes)

    chunk.observe(update, names="value")
    thr.observe(update, names="value")
    return w.VBox([chunk, thr, out])
