"""Lesson 04, row-column bundling (§3.2): the same neurons read from a bundled and an unbundled store.

`layout_rounds` runs the engine on both stores in turns, one token each, several times over, so that the
disk's drift slows both alike and the spread of the runs shows how far a difference can be trusted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from flashnb.lab import stats
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
    io_ms_runs: tuple[float, ...] = ()   # each run's mean I/O per token (io_ms is their median)


def apart(a: LayoutStats, b: LayoutStats) -> bool:
    """Whether the two layouts' ranges of runs do not overlap: only then is the faster one surely faster."""
    return stats.apart(a.io_ms_runs or (a.io_ms,), b.io_ms_runs or (b.io_ms,))


def layout_summary(runs: dict[str, list]) -> dict[str, LayoutStats]:
    """Per layout (name -> the engine's TokenSteps of the generated tokens), its reads per token."""
    out = {}
    for layout, steps in runs.items():
        s = TokenStats.of(steps, 1)
        out[layout] = LayoutStats(layout, s.requests, s.bytes_read / s.requests if s.requests else 0.0,
                                  s.bytes_read / 1e6, s.io_ms, s.io_GBps or 0.0)
    return out


def layout_rounds(stores: dict, predictors, prompt_ids: list[int], n: int, policy, rounds: int = 3) -> dict[str, LayoutStats]:
    """Generate `n` tokens from every store (name -> FlashStore) with the same predictors and policy,
    the layouts taking turns one token each, `rounds` times; per layout the reads of the first round and
    the median of the rounds' I/O per token, every round's kept in `io_ms_runs` (measured)."""
    from flashnb.bench.run import take_turns
    from flashnb.core.engine import FlashEngine

    per_round: list[dict[str, LayoutStats]] = []
    for _ in range(rounds):
        engines = {name: FlashEngine(store, predictors, policy) for name, store in stores.items()}
        try:
            take_turns({name: eng.generate(prompt_ids, n) for name, eng in engines.items()})
            per_round.append(layout_summary({name: eng.steps[len(prompt_ids):] for name, eng in engines.items()}))
        finally:
            for eng in engines.values():
                eng.close()
    out = {}
    for name in stores:
        runs = tuple(r[name].io_ms for r in per_round)
        first = per_round[0][name]
        out[name] = replace(first, io_ms=float(np.median(runs)), io_ms_runs=runs,
                            gbps=first.mb / float(np.median(runs)) if np.median(runs) else 0.0)
    return out


@dataclass(frozen=True)
class RegionSlice:
    """The first `rows` rows of one region of a layer, the rows one token needs there, and the requests
    the reader issues for them, in bytes from the region's start (computed by the reader's own planner)."""

    layout: str
    region: str          # "bundles", or the matrix of an unbundled region (fc1, fc2, ...)
    rows: int
    row_bytes: int
    needed: tuple[int, ...]                  # the needed neurons among the first `rows`
    requests: tuple[tuple[int, int], ...]    # (offset, bytes) of each request that starts in the slice


def byte_layout(stores: dict, layer: int, ids, rows: int = 48, gap_bytes: int = 0) -> list[RegionSlice]:
    """For each store (name -> FlashStore) and each of its regions in `layer`: where the needed neurons
    `ids` among the first `rows` lie and the requests that read them (modeled: no bytes are read)."""
    from flashnb.core.reader import NeuronReader, ReaderConfig

    ids = np.asarray(ids, dtype=np.int64)
    sel = ids[ids < rows]
    out = []
    for name, store in stores.items():
        with NeuronReader(store, ReaderConfig(gap_bytes=gap_bytes)) as reader:
            offs, lens = reader.requests(layer, sel)
        for reg in store.regions(layer):
            inside = (offs >= reg.offset) & (offs < reg.offset + rows * reg.row_bytes)
            reqs = tuple((int(o - reg.offset), int(n)) for o, n in zip(offs[inside], lens[inside]))
            out.append(RegionSlice(name, reg.name if name == "bundled" else "+".join(reg.parts), rows, reg.row_bytes,
                                   tuple(int(i) for i in sel), reqs))
    return out
