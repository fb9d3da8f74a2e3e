"""Per-token statistics of a run: the one place where a run's records become means and spreads.

Every table, figure, benchmark and notebook takes its per-token numbers from `TokenStats.of`, fed the
engine's (or a baseline's, or `simulate`'s) records (flashnb.core.records.TokenStep).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from flashnb.core.records import per_token_mean
from flashnb.text import MB, wrap


def apart(runs_a, runs_b) -> bool:
    """Whether two sets of measured runs have ranges that do not overlap: only then is the faster one surely
    faster on this machine (an empty set counts as apart: nothing to compare)."""
    if not len(runs_a) or not len(runs_b):
        return True
    return max(runs_a) < min(runs_b) or max(runs_b) < min(runs_a)


@dataclass(frozen=True)
class TokenStats:
    """Means per token over a run's tokens (ms = milliseconds; bytes; neurons), and the spread of the
    total. Fields that a runner cannot measure separately (mmap and accelerate fault their weights in
    while computing) are None."""

    tokens: int
    total_ms: float                  # wall time
    median_ms: float
    p10_ms: float
    p90_ms: float
    token_ms: tuple[float, ...]      # every token's wall time
    storage_read_bytes: float        # what the kernel fetched from storage (/proc/self/io)
    ffn_neurons: int                 # every layer's FFN neurons (for shares)
    io_ms: float | None = None       # submitting and waiting for reads
    mm_ms: float | None = None       # window planning and memory management
    compute_ms: float | None = None  # the rest: attention, predictors, FFN math
    overlap_ms: float | None = None  # FFN math done while reads were in flight (inside compute)
    predict_ms: float | None = None
    window_ms: float | None = None
    memory_ms: float | None = None
    submit_ms: float | None = None
    wait_ms: float | None = None
    ffn_ms: float | None = None
    verify_ms: float | None = None   # checking bundle checksums (inside wait_ms)
    bytes_read: float | None = None
    bytes_needed: float | None = None
    requests: float | None = None
    reader_calls: float | None = None
    predicted: float | None = None   # neurons
    cached: float | None = None
    loaded: float | None = None
    evicted: float | None = None
    pinned: float | None = None      # predicted neurons served by pinned rows (hot neurons)

    @classmethod
    def of(cls, steps, ffn_neurons: int, split: bool = True) -> "TokenStats":
        """Statistics of `steps` (TokenSteps). `split`: the runner recorded its layers (I/O, memory
        management and counts); False for runners that cannot separate them from compute."""
        walls = np.array([s.wall_seconds * 1e3 for s in steps]) if steps else np.zeros(0)
        pct = (lambda q: float(np.percentile(walls, q))) if walls.size else (lambda q: 0.0)  # noqa: E731
        count = lambda attr: per_token_mean(steps, lambda s: getattr(s, attr))  # noqa: E731
        base = dict(tokens=len(steps), total_ms=count("wall_seconds") * 1e3, median_ms=pct(50), p10_ms=pct(10),
                    p90_ms=pct(90), token_ms=tuple(float(w) for w in walls),
                    storage_read_bytes=count("storage_read_bytes"), ffn_neurons=ffn_neurons)
        if not split:
            return cls(**base)
        ms = lambda attr: count(attr) * 1e3  # noqa: E731
        phase = lambda name: 1e3 * per_token_mean(  # noqa: E731
            steps, lambda s: sum(getattr(x, name) for x in s.layers))
        return cls(**base, io_ms=ms("io_seconds"), mm_ms=ms("mm_seconds"), compute_ms=ms("compute_seconds"),
                   overlap_ms=ms("overlap_seconds"), predict_ms=phase("predict_s"), window_ms=phase("window_s"),
                   memory_ms=phase("memory_s"), submit_ms=phase("submit_s"), wait_ms=phase("wait_s"),
                   ffn_ms=phase("ffn_s"), verify_ms=phase("verify_s"), bytes_read=count("bytes_read"),
                   bytes_needed=count("bytes_needed"),
                   requests=count("requests"), reader_calls=per_token_mean(steps, lambda s: len(s.layers)),
                   predicted=count("predicted"), cached=count("cached"), loaded=count("loaded"),
                   evicted=count("evicted"), pinned=count("pinned"))

    @property
    def io_GBps(self) -> float | None:
        """Bytes read per second of I/O time (GB/s = 1e9 bytes/s)."""
        if not self.io_ms or self.bytes_read is None:
            return None
        return self.bytes_read / (self.io_ms / 1e3) / 1e9

    @property
    def predicted_share(self) -> float | None:
        """Neurons predicted per token, as a share of every layer's FFN."""
        return None if self.predicted is None else self.predicted / self.ffn_neurons

    @property
    def window_hit_share(self) -> float | None:
        """Share of the predicted neurons outside the pinned rows that the window's rows already held."""
        if self.predicted is None:
            return None
        windowed = self.predicted - (self.pinned or 0)
        return self.cached / windowed if windowed else 0.0

    @property
    def bytes_per_token(self) -> float:
        """Bytes moved from storage per token: what the reader read, else what the kernel fetched."""
        return self.bytes_read if self.bytes_read is not None else self.storage_read_bytes

    def to_json(self) -> dict:
        """The fields and the derived shares, JSON-ready."""
        return {**asdict(self), "io_GBps": self.io_GBps, "predicted_share": self.predicted_share,
                "window_hit_share": self.window_hit_share}


def window_advice(mean: TokenStats, mem, layers: int) -> str:
    """A measured warning when a layer's rows hold fewer neurons than a token needed there on average (then
    the tokens that need more are read in parts, and the window keeps less for the next one), else nothing."""
    need = mean.predicted / layers if mean.predicted is not None else 0.0
    held = mem.capacity_rows + mem.pinned_rows
    if need <= held:
        return ""
    more = int((need - held) * layers * mem.row_bytes)
    whole = mem.budget_bytes + more > mem.model_bytes   # beyond the model's bytes a fraction cannot say it
    size = f"{more / MB:.2f} MB" if more >= 0.01 * MB else f"{more / 1e3:.1f} KB"
    kept = f"; the window held {mean.window_hit_share:.0%} of a token's neurons" if mean.window_hit_share else ""
    return wrap(f"note: a token needed {need:.0f} neurons per layer on average (measured), more than the {held} "
                f"row{'s' if held != 1 else ''} this budget leaves each layer, so the tokens that needed more were "
                f"read in parts{kept}; each more row costs {mem.row_bytes} B of --memory (about {size} more would "
                f"hold an average token's neurons, more again the window's"
                + (f": give bytes, e.g. --memory {-(-(mem.budget_bytes + more) // 1000)}KB" if whole else "")
                + ")") + "\n"
