"""Lesson 04, row-column bundling (§3.2): the same neurons read from a bundled and an unbundled store."""

from __future__ import annotations

from dataclasses import dataclass

from flashnb.lab.stats import TokenStats


@dataclass(frozen=True)
class LayoutStats:
    """One store layout's reads per generated token (measured)."""

    layout: str
    requests: float
    mean_request_bytes: float
    mb: float          # read per token (1e6 bytes)
    io_ms: float
    gbps: float        # bytes read per second of I/O (1e9 bytes/s)


def layout_summary(runs: dict[str, list]) -> dict[str, LayoutStats]:
    """Per layout (name -> the engine's TokenSteps of the generated tokens), its reads per token."""
    out = {}
    for layout, steps in runs.items():
        s = TokenStats.of(steps, 1)
        out[layout] = LayoutStats(layout, s.requests, s.bytes_read / s.requests if s.requests else 0.0,
                                  s.bytes_read / 1e6, s.io_ms, s.io_GBps or 0.0)
    return out
