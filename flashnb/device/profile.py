"""Your disk's read profile: throughput by read size and reads in flight, and the model fitted to it.

A `Profile` holds what `flashnb.device.measure.run_profile` measured (a grid of random direct-I/O
reads of 4 KiB..4 MiB with 1..64 reads in flight, plus sequential reads; JSON with machine
information, the date and whether direct I/O or the buffered + fadvise fallback was used) and a
model fitted to it:

- `Profile.throughput(chunk_bytes, in_flight)`: bytes/s. Per number of reads in flight the measured
  seconds per request t(s) = s / throughput are interpolated piecewise-linearly in s (exact at
  measured points; beyond the largest chunk extrapolated at the fitted bandwidth), and between
  numbers in flight log-linearly in log2(in_flight).
- `Profile.read_seconds(chunk_sizes, in_flight)`: seconds to read requests of those sizes = sum of
  t(s_i) at min(in_flight, len(chunk_sizes)) concurrency.
- `Profile.fit`: per number in flight a least-squares fit t(s) = latency + s / bandwidth, and
  `Profile.coalesce_gap(in_flight)` = latency x bandwidth: the unneeded bytes that cost as much as
  one more request, i.e. the reader's break-even coalescing gap (`coalescing_gap` caps it).

Numbers from here are *measured* on this machine; everything derived from them is *modeled*.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from flashnb.core.defaults import MAX_PROFILE_GAP
from flashnb.errors import FlashnbError

PROFILE_VERSION = 2  # 2: "in_flight" where version 1 said "threads"


def default_profile_path() -> Path:
    """Where `flashnb profile` saves by default: $XDG_CACHE_HOME/flashnb/profile.json."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "flashnb" / "profile.json"


@dataclass
class Fit:
    """Per number of reads in flight: seconds per request t(s) = latency_s + s / bandwidth (bytes/s)."""

    in_flight: list[int]
    latency_s: list[float]
    bandwidth: list[float]
    max_rel_error: float = 0.0
    rel_errors: list[list[float]] = field(default_factory=list)


def _fit_line(s: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """Least squares of relative error for t = a + s * inv_b; returns (a, 1/inv_b)."""
    A = np.stack([1.0 / t, s / t], axis=1)
    (a, inv_b), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    if a < 0 or inv_b <= 0:  # degenerate data: fall back to the two end points
        inv_b = max((t[-1] - t[0]) / (s[-1] - s[0]), 1e-12) if s.size > 1 else t[0] / s[0]
        a = max(t[0] - s[0] * inv_b, 0.0)
    return float(a), float(1.0 / inv_b)


class Profile:
    """A measured profile (the JSON `data`) and the model fitted to it (see module doc)."""

    def __init__(self, data: dict):
        self.data = data
        rows = data.get("random") or []
        if not rows:
            raise FlashnbError("profile has no random-read measurements; re-run `flashnb profile`")
        self.chunks = np.array(sorted({r["chunk_bytes"] for r in rows}), dtype=np.float64)
        self.in_flight_counts = np.array(sorted({r["in_flight"] for r in rows}), dtype=np.float64)
        grid = np.full((self.in_flight_counts.size, self.chunks.size), np.nan)
        for r in rows:
            i = int(np.searchsorted(self.in_flight_counts, r["in_flight"]))
            j = int(np.searchsorted(self.chunks, r["chunk_bytes"]))
            grid[i, j] = r["throughput_bytes_per_s"]
        if np.isnan(grid).any() or (grid <= 0).any():
            raise FlashnbError("profile grid is incomplete (a chunk size x in_flight cell is missing or zero); "
                               "re-run `flashnb profile`")
        self.grid = grid                                    # bytes/s [in_flight, chunks]
        self.req_seconds = self.chunks[None, :] / grid      # seconds per request at that concurrency
        fits = [_fit_line(self.chunks, self.req_seconds[i]) for i in range(self.in_flight_counts.size)]
        rel = [[float((a + s / b) / t - 1) for s, t in zip(self.chunks, self.req_seconds[i])]
               for i, (a, b) in enumerate(fits)]
        self.fit = Fit([int(t) for t in self.in_flight_counts], [f[0] for f in fits], [f[1] for f in fits],
                       float(np.max(np.abs(rel))), rel)

    # -- persistence -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise FlashnbError(f"profile {p} does not exist; measure one with `flashnb profile --out {p}`") from None
        except IsADirectoryError:
            raise FlashnbError(f"profile {p} is a folder; give the profile's JSON file (`flashnb profile` writes "
                               "one)") from None
        except OSError as e:
            raise FlashnbError(f"profile {p} cannot be read ({e.strerror}); give a readable JSON file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FlashnbError(f"{p} is not valid JSON ({e}); re-run `flashnb profile`") from None
        if not isinstance(data, dict) or data.get("flashnb_profile_version") != PROFILE_VERSION:
            raise FlashnbError(f"{p} is not a flashnb profile of version {PROFILE_VERSION}; re-run `flashnb profile`")
        return cls(data)

    def to_json(self) -> dict:
        d = dict(self.data)
        d["fit"] = asdict(self.fit)
        d["summary"] = self.summary()
        return d

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(p)
        return p

    # -- the model ---------------------------------------------------------------------------
    def _req_seconds_at(self, i: int, s: np.ndarray) -> np.ndarray:
        """Seconds per request of size s at index i of the reads-in-flight counts: piecewise linear in s."""
        c, t = self.chunks, self.req_seconds[i]
        out = np.interp(s, c, t)
        hi = s > c[-1]
        out[hi] = t[-1] + (s[hi] - c[-1]) / self.fit.bandwidth[i]
        lo = s < c[0]
        out[lo] = t[0]  # below the smallest chunk: latency-bound, no faster than the smallest read
        return out

    def request_seconds(self, chunk_bytes, in_flight: float) -> np.ndarray:
        """Device seconds per request of `chunk_bytes` when `in_flight` requests are in flight."""
        s = np.atleast_1d(np.asarray(chunk_bytes, dtype=np.float64))
        T = np.log2(np.clip(float(in_flight), self.in_flight_counts[0], self.in_flight_counts[-1]))
        lt = np.log2(self.in_flight_counts)
        i = int(np.clip(np.searchsorted(lt, T, side="right") - 1, 0, lt.size - 1))
        if i == lt.size - 1 or T <= lt[i]:
            return self._req_seconds_at(i, s)
        w = (T - lt[i]) / (lt[i + 1] - lt[i])  # interpolate log(time) between reads-in-flight counts
        return np.exp((1 - w) * np.log(self._req_seconds_at(i, s)) + w * np.log(self._req_seconds_at(i + 1, s)))

    def throughput(self, chunk_bytes, in_flight: float):
        """Modeled throughput (bytes/s) of random `chunk_bytes` reads with `in_flight` reads in flight."""
        s = np.atleast_1d(np.asarray(chunk_bytes, dtype=np.float64))
        thr = s / self.request_seconds(s, in_flight)
        return float(thr[0]) if np.ndim(chunk_bytes) == 0 else thr

    def read_seconds(self, chunk_sizes: Iterable[int] | np.ndarray, in_flight: int) -> float:
        """Modeled seconds to read requests of `chunk_sizes` bytes over `in_flight` reads in flight."""
        s = np.asarray(list(chunk_sizes) if not isinstance(chunk_sizes, np.ndarray) else chunk_sizes, np.float64)
        if s.size == 0:
            return 0.0
        return float(self.request_seconds(s, min(in_flight, s.size)).sum())

    def coalesce_gap(self, in_flight: int) -> int:
        """Break-even gap in bytes (latency x bandwidth of the fit at `in_flight`), 4 KiB-aligned."""
        lt = np.log2(self.in_flight_counts)
        T = np.log2(np.clip(in_flight, self.in_flight_counts[0], self.in_flight_counts[-1]))
        a = float(np.interp(T, lt, self.fit.latency_s))
        b = float(np.exp(np.interp(T, lt, np.log(self.fit.bandwidth))))
        return int(a * b) // 4096 * 4096

    @property
    def direct(self) -> bool:
        return bool(self.data.get("direct"))

    def sequential_throughput(self) -> float:
        """Best measured sequential throughput (bytes/s)."""
        seq = self.data.get("sequential") or []
        return max((r["throughput_bytes_per_s"] for r in seq), default=float(self.grid.max()))

    def best(self) -> tuple[int, int, float]:
        """(chunk_bytes, in_flight, bytes/s) of the best measured random-read cell."""
        i, j = np.unravel_index(np.argmax(self.grid), self.grid.shape)
        return int(self.chunks[j]), int(self.in_flight_counts[i]), float(self.grid[i, j])

    def summary(self) -> dict:
        """A few headline numbers (GB/s = 1e9 bytes/s) for reports and the CLI."""
        def at(c, t):
            return round(self.throughput(c, t) / 1e9, 3)
        tmax = int(self.in_flight_counts[-1])
        bc, bt, bv = self.best()
        return {"direct": self.direct, "sequential_GBps": round(self.sequential_throughput() / 1e9, 3),
                "best_random": {"chunk_bytes": bc, "in_flight": bt, "GBps": round(bv / 1e9, 3)},
                f"random_4KiB_{tmax}_in_flight_GBps": at(4096, tmax),
                f"random_16KiB_{tmax}_in_flight_GBps": at(16384, tmax),
                f"random_64KiB_{tmax}_in_flight_GBps": at(65536, tmax),
                f"random_4MiB_{tmax}_in_flight_GBps": at(4 << 20, tmax),
                "random_4KiB_1_in_flight_GBps": at(4096, 1),
                "latency_s_1_in_flight": round(self.fit.latency_s[0], 6),
                f"coalesce_gap_bytes_{tmax}_in_flight": self.coalesce_gap(tmax),
                "fit_max_rel_error": round(self.fit.max_rel_error, 3)}


def load_default_profile() -> Profile | None:
    """The profile saved at `default_profile_path()`, or None if there is none."""
    p = default_profile_path()
    return Profile.load(p) if p.is_file() else None


def coalescing_gap(profile: "Profile | None", in_flight: int) -> int:
    """The reader's coalescing gap for a device (bytes): the profile's break-even gap, capped at
    MAX_PROFILE_GAP (flashnb.core.defaults says why); 0 without a profile."""
    if profile is None:
        return 0
    return min(int(profile.coalesce_gap(in_flight)), MAX_PROFILE_GAP)
