"""What the engine did, token by token: the records, and the recorder that times the loop from outside.

The per-token loop (`flashnb.core.engine.FlashFFN.forward`) holds no clock: the steps it calls are
wrapped by `Recorder.timed`, which adds each call's seconds to its phase, and `Recorder.layer` files
one `LayerStep` per layer (per part of a layer whose neurons exceed its rows) with the counts and
the phases' seconds. `per_token_mean` is flashnb's one per-token mean; `flashnb.lab.stats.TokenStats`
gathers them for tables and figures.

Phases: predict (the predictor), window (planning hits, loads and evictions), memory (deleting and
appending rows), submit (planning and submitting the reads), wait (waiting for the reads), ffn (the
sparse FFN math). FFN math done between submit and wait ran while the reads were in flight: overlap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

PHASES = ("predict", "window", "memory", "submit", "wait", "ffn")


def process_read_bytes() -> int:
    """Bytes this process has caused to be fetched from storage (/proc/self/io read_bytes; 0 where
    the kernel does not report it)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class LayerStep:
    """One layer of one token. Counts are neurons, bytes are bytes, times are seconds."""

    predicted: int     # neurons the predictor chose
    cached: int        # ... in DRAM from earlier tokens (window hits)
    loaded: int        # ... read from flash for this token (by this layer's reads or a lookahead's)
    evicted: int       # neurons that left DRAM
    bytes_read: int    # what the reads transferred (alignment and coalesced gaps included)
    bytes_needed: int  # the loaded neurons' bundles
    requests: int
    predict_s: float = 0.0
    window_s: float = 0.0
    memory_s: float = 0.0
    submit_s: float = 0.0
    wait_s: float = 0.0
    ffn_s: float = 0.0
    overlap_s: float = 0.0  # FFN math done while this layer's reads were in flight (part of ffn_s)
    verify_s: float = 0.0   # checking the rows' checksums as they arrived (part of wait_s)
    direct: bool = True     # O_DIRECT; False: the buffered fallback (the file system refuses direct I/O)
    pinned: int = 0         # predicted neurons held in the pinned rows (hot neurons; not in cached or loaded)
    prefetched: int = 0     # of `loaded`: read one layer early by a lookahead guess

    @property
    def io_seconds(self) -> float:
        return self.submit_s + self.wait_s

    @property
    def mm_seconds(self) -> float:
        return self.window_s + self.memory_s


@dataclass
class TokenStep:
    """One token: its layers, its wall time, and the neuron sets each layer used."""

    token: int
    layers: list[LayerStep] = field(default_factory=list)
    wall_seconds: float = 0.0
    storage_read_bytes: int = 0  # what the kernel fetched from storage for this process (/proc/self/io)
    predicted_sets: list[np.ndarray] = field(default_factory=list)  # ids per layer: a trace for simulate
    lookahead_sets: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> the ids guessed one layer early

    def _sum(self, name: str):
        return sum(getattr(s, name) for s in self.layers)

    @property
    def io_seconds(self) -> float:
        return self._sum("io_seconds")

    @property
    def mm_seconds(self) -> float:
        return self._sum("mm_seconds")

    @property
    def compute_seconds(self) -> float:
        """Everything that is neither I/O nor memory management: attention, predictors, FFN math."""
        return max(0.0, self.wall_seconds - self.io_seconds - self.mm_seconds)

    @property
    def overlap_seconds(self) -> float:
        return self._sum("overlap_s")

    @property
    def bytes_read(self) -> int:
        return self._sum("bytes_read")

    @property
    def bytes_needed(self) -> int:
        return self._sum("bytes_needed")

    @property
    def requests(self) -> int:
        return self._sum("requests")

    @property
    def predicted(self) -> int:
        return self._sum("predicted")

    @property
    def cached(self) -> int:
        return self._sum("cached")

    @property
    def loaded(self) -> int:
        return self._sum("loaded")

    @property
    def evicted(self) -> int:
        return self._sum("evicted")

    @property
    def pinned(self) -> int:
        return self._sum("pinned")

    @property
    def prefetched(self) -> int:
        return self._sum("prefetched")


def per_token_mean(steps, value: Callable[["TokenStep"], float]) -> float:
    """The mean over `steps` (TokenSteps, recorded or simulated) of `value(step)`; 0.0 without steps. Every
    per-token mean in flashnb is this one (TokenStats, the pinned split, the cost model's I/O of a run)."""
    values = [value(s) for s in steps]
    return float(np.mean(values)) if values else 0.0


def window_counts(plan, landed: np.ndarray | None) -> tuple[int, int, int]:
    """(window hits, neurons read for this token, of them read early by a lookahead) of a WindowPlan whose
    window had the lookahead's `landed` neurons admitted before it planned: those count as read, not hit."""
    early = np.intersect1d(plan.cached, landed, assume_unique=True).size if landed is not None and landed.size else 0
    return plan.cached.size - early, plan.loaded.size + early, early


class Recorder:
    """Collects TokenSteps; `timed` wraps a step of the loop so that its seconds reach its phase."""

    def __init__(self):
        self.steps: list[TokenStep] = []
        self._phase = dict.fromkeys(PHASES, 0.0)
        self._overlap = 0.0
        self._in_flight = False
        self._reads: list = []
        self._t0 = 0.0
        self._r0 = 0

    def timed(self, phase: str, fn: Callable) -> Callable:
        """`fn`, its seconds added to `phase` on every call."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        clock, seconds = time.perf_counter, self._phase

        def call(*args, **kw):
            t0, out = clock(), None
            try:
                out = fn(*args, **kw)
                return out
            finally:
                dt = clock() - t0
                seconds[phase] += dt
                if phase == "ffn" and self._in_flight:
                    self._overlap += dt
                elif phase == "submit":   # FFN math overlaps only reads still in flight (not done in submit)
                    self._in_flight = bool(getattr(out, "flying", False))
                elif phase == "wait":
                    self._in_flight = False

        return call

    def start_token(self, token: int) -> None:
        self.steps.append(TokenStep(token))
        self._r0, self._t0 = process_read_bytes(), time.perf_counter()

    def end_token(self) -> None:
        step = self.steps[-1]
        step.wall_seconds = time.perf_counter() - self._t0
        step.storage_read_bytes = process_read_bytes() - self._r0

    def predicted(self, ids: np.ndarray) -> None:
        """The neuron set a layer of the current token used."""
        self.steps[-1].predicted_sets.append(ids)

    def guessed(self, layer: int, ids: np.ndarray) -> None:
        """The neuron set a lookahead predictor guessed for `layer` of the current token."""
        self.steps[-1].lookahead_sets[layer] = ids

    def read(self, stats) -> None:
        """A read that belongs to the next layer (part) filed: a prefetch, or the part's own read."""
        self._reads.append(stats)

    def layer(self, plan, pinned: int = 0, landed: np.ndarray | None = None) -> None:
        """File one layer (part) of the current token: `plan` (a WindowPlan), `pinned` predicted neurons
        served by the pinned rows, `landed` the neurons a lookahead read for it, the reads filed for it
        since the last one (`read`), and the phases' seconds since the last one."""
        cached, loaded, early = window_counts(plan, landed)
        p, reads = self._phase, self._reads
        read = (sum(s.bytes_read for s in reads), sum(s.bytes_needed for s in reads), sum(s.requests for s in reads),
                sum(s.verify_seconds for s in reads), all(s.direct for s in reads))
        self._reads = []
        self.steps[-1].layers.append(LayerStep(
            predicted=plan.predicted.size + pinned, cached=cached, loaded=loaded, prefetched=early,
            evicted=plan.evicted.size, bytes_read=read[0], bytes_needed=read[1], requests=read[2],
            predict_s=p["predict"], window_s=p["window"], memory_s=p["memory"], submit_s=p["submit"],
            wait_s=p["wait"], ffn_s=p["ffn"], overlap_s=self._overlap, verify_s=read[3], direct=read[4],
            pinned=pinned))
        for k in p:
            p[k] = 0.0
        self._overlap = 0.0
