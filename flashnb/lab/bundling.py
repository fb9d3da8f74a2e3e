"""Lesson 04, row-column bundling (§3.2): the same neurons read from a bundled and an unbundled store.

`layout_rounds` runs the engine on both stores in turns, one token each, several times over, so that the
disk's drift slows both alike and the spread of the runs shows how far a difference can be trusted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from flashnb.lab import stats
from flashnb.lab.stats import TokenStats
from flashnb.text import wrap


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


@dataclass(frozen=True)
class QuantQuality:
    """A store's FFN rows against the checkpoint's, on held-out text (measured)."""

    dtype: str
    bits_per_value: float
    neuron_bytes: int       # one bundle on flash
    parts: tuple[str, ...]  # the matrices whose slices make a bundle, in order (OPT: fc1, fc2)
    code_bytes: int         # of one slice, its values without their scales
    tokens: int
    perplexity: float
    dense_perplexity: float
    top1_agreement: float   # share of positions where both models pick the same next token

    @property
    def perplexity_increase(self) -> float:
        return self.perplexity / self.dense_perplexity - 1.0


def quality_text(q: QuantQuality, s: LayoutStats, base: LayoutStats) -> str:
    """One format's line: its bytes, its quality (measured) and its reads per token against `base` (fp16)."""
    if s is base:
        against = "the reference"
    else:
        against = (f"{base.io_ms / s.io_ms:.2f}x less I/O time than fp16"
                   + ("" if apart(s, base) else " (the runs overlap fp16's: no clear winner on this disk)"))
    return wrap(f"{q.dtype}: {q.bits_per_value:g} bits a value, {q.neuron_bytes} B per neuron; held-out perplexity "
                f"{q.perplexity:.2f} ({q.perplexity_increase:+.2%} against {q.dense_perplexity:.2f}), top-1 agreement "
                f"{q.top1_agreement:.2%} over {q.tokens:,} next-token predictions; reads {s.mb:.3f} MB per token in "
                f"{s.requests:.0f} requests of {s.mean_request_bytes / 1024:.2f} KiB, I/O {s.io_ms:.2f} ms (runs "
                f"{', '.join(f'{r:.2f}' for r in s.io_ms_runs)}): {against} (measured)")


def quantized_quality(dense, stores: dict, ids, context: int = 256) -> list[QuantQuality]:
    """Every store (name -> FlashStore) rebuilt as a dense model (its FFN rows dequantized, float32)
    against the checkpoint's model `dense` on the token stream `ids`: perplexity and top-1 agreement."""
    import torch
    import torch.nn.functional as F

    from flashnb.training.quality import dense_window_logits, windows

    ids = np.asarray(ids, dtype=np.int64)
    targets = [torch.from_numpy(ids[s + 1:e + 1]) for s, e in windows(ids, context)]
    n = sum(len(t) for t in targets)

    def nll(logits) -> float:
        return sum(F.cross_entropy(x, t, reduction="sum").item() for x, t in zip(logits, targets)) / n

    ref = dense_window_logits(dense, ids, context)
    base = float(np.exp(nll(ref)))
    out = []
    for store in stores.values():
        got = dense_window_logits(store.load_model(torch.float32), ids, context)
        agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ref, got)) / n
        f = store.row_format
        out.append(QuantQuality(f.name, f.bits_per_value, store.neuron_bytes, tuple(store.parts), f.code_bytes, n,
                                float(np.exp(nll(got))), base, agree))
    return out
