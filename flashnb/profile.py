"""Your disk's read profile: throughput by chunk size and concurrency, measured with direct I/O.

`run_profile` creates a scratch file (random bytes), reads it at random 4 KiB-aligned offsets in
chunks of 4 KiB..4 MiB with 1..64 requests in flight (each cell for a fixed time), reads it
sequentially, and
removes it again (also on Ctrl-C). The result is a `Profile`: the measured grid as JSON (with machine
information, the date, and whether direct I/O or the buffered + fadvise fallback was used) and a
model fitted to it:

- `Profile.throughput(chunk_bytes, threads)`: bytes/s. Per thread count the measured seconds per
  request t(s) = s / throughput are interpolated piecewise-linearly in s (exact at measured points;
  beyond the largest chunk extrapolated at the fitted bandwidth), and between thread counts log-
  linearly in log2(threads).
- `Profile.read_seconds(chunk_sizes, threads)`: seconds to read requests of those sizes with that
  many threads = sum of t(s_i) at min(threads, len(chunk_sizes)) concurrency.
- `Profile.fit`: per thread count a least-squares fit t(s) = latency + s / bandwidth, and
  `Profile.coalesce_gap(threads)` = latency x bandwidth: the unneeded bytes that cost as much as one
  more request, i.e. the reader's break-even coalescing gap.

Requests are issued as the reader issues them: through Linux native AIO with `threads` requests
in flight (the queue depth, like fio's libaio iodepth) where the kernel allows it, else from that
many threads; the JSON says which ("backend"). The API keeps the name `threads` for this
concurrency.

Numbers from here are *measured* on this machine; everything derived from them is *modeled*.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from flashnb.errors import FlashnbError
from flashnb.reader import IN_FLIGHT, AlignedBuffer, evict, open_for_reading, preadv_full

PROFILE_VERSION = 1
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DEFAULT_CHUNKS = tuple(4 * KiB << i for i in range(11))       # 4 KiB .. 4 MiB
QUICK_CHUNKS = (4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB)
DEFAULT_THREADS = (1, 2, 4, 8, 16, 32, 64)
QUICK_THREADS = (1, 4, 16, 64)


def default_profile_path() -> Path:
    """Where `flashnb profile` saves by default: $XDG_CACHE_HOME/flashnb/profile.json."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "flashnb" / "profile.json"


@dataclass
class ProfileConfig:
    """What to measure. Sizes in bytes, durations in seconds.

    dir: folder for the scratch file (None: the system temp folder); size: scratch file bytes;
    chunk_sizes x threads: the random-read grid, each cell read for seconds_per_cell;
    sequential_seconds: duration of each sequential-read measurement.
    """

    dir: str | None = None
    size: int = 1 * GiB
    chunk_sizes: tuple[int, ...] = DEFAULT_CHUNKS
    threads: tuple[int, ...] = DEFAULT_THREADS
    seconds_per_cell: float = 0.9
    sequential_seconds: float = 1.5
    sequential_chunk: int = 4 * MiB
    seed: int = 0
    progress: bool = True
    backend: str = "auto"   # "aio" / "threads" / "auto": how requests are issued, as in ReaderConfig

    @classmethod
    def quick(cls, **kw) -> "ProfileConfig":
        """A run of about 10 s: 6 chunk sizes x 4 thread counts on a 256 MiB file."""
        base = dict(size=256 * MiB, chunk_sizes=QUICK_CHUNKS, threads=QUICK_THREADS, seconds_per_cell=0.25,
                    sequential_seconds=0.4)
        base.update(kw)
        return cls(**base)


# ----------------------------------------------------------------------------------------------
# Machine information


def _block_device(path: Path) -> dict:
    """The block device under `path` as sysfs describes it (Linux; empty elsewhere)."""
    info: dict = {}
    try:
        st = os.stat(path)
        sys_dir = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
        real = sys_dir.resolve()
        if (real / "partition").exists():
            real = real.parent
        info["device"] = real.name
        for key, rel in [("logical_block_size", "queue/logical_block_size"),
                         ("physical_block_size", "queue/physical_block_size"),
                         ("rotational", "queue/rotational"), ("scheduler", "queue/scheduler"),
                         ("read_ahead_kb", "queue/read_ahead_kb"),
                         ("model", "device/model"), ("vendor", "device/vendor")]:
            f = real / rel
            if f.exists():
                info[key] = f.read_text().strip()
    except (OSError, ValueError):
        pass
    try:  # file system type: the longest mount point that prefixes the path
        best = ("", "")
        rp = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and (rp == parts[1] or rp.startswith(parts[1].rstrip("/") + "/")) \
                    and len(parts[1]) >= len(best[0]):
                best = (parts[1], parts[2])
        if best[0]:
            info["mount"], info["fs_type"] = best
    except OSError:
        pass
    return info


DEFAULT_READAHEAD = 128 * 1024  # Linux's default read_ahead_kb, where sysfs does not say


def readahead_bytes(path: str | Path) -> int:
    """The kernel's readahead window (bytes) for files under `path`: how much a page fault or a
    buffered read of a cold file asks the device for at once (the block device's read_ahead_kb)."""
    kb = _block_device(Path(path)).get("read_ahead_kb")
    try:
        return int(kb) * 1024 if kb and int(kb) > 0 else DEFAULT_READAHEAD
    except ValueError:
        return DEFAULT_READAHEAD


def machine_info(path: Path) -> dict:
    """Host, OS, CPU count, Python/numpy versions and the block device holding `path`."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"hostname": platform.node(), "platform": platform.platform(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "loadavg_at_start": load, "disk": _block_device(path)}


# ----------------------------------------------------------------------------------------------
# Measuring


class _Scratch:
    """A scratch file of random bytes, removed on exit (also after Ctrl-C)."""

    def __init__(self, folder: Path, size: int, seed: int):
        self.folder, self.size, self.seed = folder, size, seed
        self.path: Path | None = None

    def __enter__(self) -> Path:
        if not self.folder.is_dir():
            raise FlashnbError(f"profile folder {self.folder} does not exist; pass an existing folder with --dir")
        fd, name = tempfile.mkstemp(prefix=".flashnb-profile-", suffix=".tmp", dir=self.folder)
        self.path = Path(name)
        rng = np.random.default_rng(self.seed)
        try:
            with os.fdopen(fd, "wb") as f:
                block = bytearray(rng.bytes(8 * MiB))
                left = self.size
                while left > 0:  # one random block, each copy with a fresh random head (no dedup)
                    n = min(left, len(block))
                    block[:4096] = rng.bytes(4096)
                    f.write(memoryview(block)[:n])
                    left -= n
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            self.__exit__(None, None, None)
            raise FlashnbError(f"cannot write the {self.size}-byte scratch file in {self.folder} ({e.strerror}); "
                               "free some space or pass another --dir / a smaller --size") from None
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.path

    def __exit__(self, *exc) -> None:
        if self.path is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.path = None


def _cell_aio(fd: int, file_bytes: int, chunk: int, depth: int, seconds: float, rng: np.random.Generator,
              sequential: bool = False) -> dict:
    """Read `chunk`-byte requests, `depth` in flight through native AIO (flashnb.aio, as the reader
    does), for `seconds`; the cell's measurements. Latencies are per batch of 4 x depth requests,
    converted to per-request latency by Little's law (in-flight requests / completion rate)."""
    from flashnb.aio import AioContext, pread_iocbs

    n_slots = max(1, (file_bytes - chunk) // 4096)
    nseq = max(1, file_bytes // chunk)
    batch = 4 * depth
    buf = AlignedBuffer(depth * chunk)  # requests share depth slots of it: the bytes are not kept
    addrs = buf.u8.ctypes.data + (np.arange(batch, dtype=np.uint64) % depth) * chunk
    lens = np.full(batch, chunk, dtype=np.int64)
    ctx = AioContext(depth)
    lat: list[float] = []
    reads = k = 0
    try:
        t_start = time.perf_counter()
        end = t_start + seconds
        while True:
            t0 = time.perf_counter()
            if t0 >= end and reads:
                break
            if sequential:
                offs = ((k + np.arange(batch)) % nseq) * chunk
            else:
                offs = rng.integers(0, n_slots, batch) * 4096
            res = ctx.run(pread_iocbs(fd, offs.astype(np.int64), addrs, lens))
            if (res != chunk).any():
                bad = res[res != chunk][0]
                raise FlashnbError(f"profile read failed: {os.strerror(-bad) if bad < 0 else 'short read'}")
            dt = time.perf_counter() - t0
            lat.append(dt * min(depth, batch) / batch)
            reads += batch
            k += batch
        elapsed = time.perf_counter() - t_start
    finally:
        ctx.close()
    return {"chunk_bytes": chunk, "threads": depth, "reads": reads, "bytes": reads * chunk, "seconds": elapsed,
            "throughput_bytes_per_s": reads * chunk / elapsed, "latency_p50_s": float(np.percentile(lat, 50)),
            "latency_p99_s": float(np.percentile(lat, 99))}


def _aio_usable(backend: str) -> bool:
    """Whether cells run through native AIO: backend 'aio' (required), 'auto' (where available), 'threads'."""
    if backend not in ("auto", "aio", "threads"):
        raise FlashnbError(f"profile backend must be 'auto', 'aio' or 'threads', got {backend!r}")
    if backend == "threads":
        return False
    from flashnb import aio

    if aio.available():
        return True
    if backend == "aio":
        raise FlashnbError("native AIO is unavailable on this machine; profile with backend 'threads'")
    return False


def _cell(fd: int, direct: bool, file_bytes: int, chunk: int, threads: int, seconds: float,
          rng: np.random.Generator, sequential: bool = False, use_aio: bool = False) -> dict:
    """Read `chunk`-byte requests, `threads` in flight, for `seconds`; the cell's measurements.
    `use_aio`: through one native AIO context (queue depth = threads), else `threads` threads."""
    if use_aio and direct:
        return _cell_aio(fd, file_bytes, chunk, threads, seconds, rng, sequential)
    n_slots = max(1, (file_bytes - chunk) // 4096)
    counts = [0] * threads
    lat: list[list[float]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    start = threading.Barrier(threads + 1)
    stop_at = [0.0]
    offsets = [(rng.integers(0, n_slots, 8192) * 4096).tolist() for _ in range(threads)]
    nseq = max(1, file_bytes // chunk)

    bufs = [AlignedBuffer(chunk) for _ in range(threads)]  # allocated here: a thread never dies before the barrier

    def work(t: int) -> None:
        iov = [bufs[t].view[:chunk]]
        offs, k, lt = offsets[t], 0, lat[t]
        pc = time.perf_counter
        try:
            start.wait()
            end = stop_at[0]
            while True:
                t0 = pc()
                if t0 >= end:
                    break
                off = ((k * threads + t) % nseq) * chunk if sequential else offs[k % len(offs)]
                preadv_full(fd, iov, off)
                if not direct:
                    evict(fd, off, chunk)
                lt.append(pc() - t0)
                k += 1
            counts[t] = k
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ths = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(threads)]
    for th in ths:
        th.start()
    t_start = time.perf_counter()
    stop_at[0] = t_start + seconds
    start.wait()
    for th in ths:
        th.join()
    elapsed = time.perf_counter() - t_start
    if errors:
        e = errors[0]
        raise e if isinstance(e, FlashnbError) else FlashnbError(f"profile read failed: {e!r}")
    reads = sum(counts)
    all_lat = np.concatenate([np.asarray(x) for x in lat]) if reads else np.zeros(1)
    return {"chunk_bytes": chunk, "threads": threads, "reads": reads, "bytes": reads * chunk,
            "seconds": elapsed, "throughput_bytes_per_s": reads * chunk / elapsed,
            "latency_p50_s": float(np.percentile(all_lat, 50)), "latency_p99_s": float(np.percentile(all_lat, 99))}


def _memory_rates(nbytes: int = 32 * MiB) -> dict:
    """DRAM copy rate and fp32 matrix-vector rate (bytes of weights per second) on this machine."""
    import torch

    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    best_copy = min(_timed(lambda: np.copyto(b, a)) for _ in range(3))
    w = torch.ones(2048, nbytes // 4 // 2048)
    x = torch.ones(w.shape[1])
    best_mv = min(_timed(lambda: torch.mv(w, x)) for _ in range(3))
    return {"memcpy_bytes_per_s": nbytes / best_copy, "matvec_fp32_bytes_per_s": nbytes / best_mv,
            "torch_threads": torch.get_num_threads()}


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_profile(cfg: ProfileConfig | None = None) -> "Profile":
    """Measure this disk (see module doc); returns the Profile. The scratch file is always removed."""
    from tqdm.auto import tqdm

    cfg = cfg or ProfileConfig()
    folder = Path(cfg.dir) if cfg.dir else Path(tempfile.gettempdir())
    if cfg.size < max(cfg.chunk_sizes) * 4 or cfg.size % 4096:
        raise FlashnbError(f"--size {cfg.size} is too small or not a multiple of 4096: use at least "
                           f"4 x the largest chunk ({4 * max(cfg.chunk_sizes)} bytes)")
    if any(c % 4096 or c <= 0 for c in cfg.chunk_sizes) or any(t < 1 for t in cfg.threads):
        raise FlashnbError("chunk sizes must be positive multiples of 4096 bytes and threads >= 1")
    rng = np.random.default_rng(cfg.seed)
    use_aio = _aio_usable(cfg.backend)
    t_begin = time.perf_counter()
    info = machine_info(folder)
    date = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    cells = [(c, t) for t in cfg.threads for c in cfg.chunk_sizes]
    seq_threads = sorted({1, min(16, max(cfg.threads))})
    random_rows, seq_rows = [], []
    with _Scratch(folder, cfg.size, cfg.seed) as path:
        fd, direct = open_for_reading(path, True)
        try:
            if not direct:
                evict(fd)
            try:  # a direct read can still be refused (EINVAL) on some file systems
                _cell(fd, direct, cfg.size, 4096, 1, 0.05, rng)
            except FlashnbError:
                os.close(fd)
                fd, direct = open_for_reading(path, False)
                evict(fd)
            with tqdm(total=len(cells) + len(seq_threads), desc="profile", unit="cell", disable=not cfg.progress,
                      leave=False) as bar:
                for c, t in cells:
                    random_rows.append(_cell(fd, direct, cfg.size, c, t, cfg.seconds_per_cell, rng,
                                             use_aio=use_aio))
                    gbps = random_rows[-1]["throughput_bytes_per_s"] / 1e9
                    bar.set_postfix_str(f"{c // 1024} KiB x {t}: {gbps:.2f} GB/s")
                    bar.update(1)
                for t in seq_threads:
                    row = _cell(fd, direct, cfg.size, cfg.sequential_chunk, t, cfg.sequential_seconds, rng,
                                sequential=True, use_aio=use_aio)
                    seq_rows.append(row)
                    bar.update(1)
        finally:
            os.close(fd)
    data = {
        "flashnb_profile_version": PROFILE_VERSION,
        "kind": "measured",
        "date": date,
        "machine": info,
        "dir": str(folder.resolve()),
        "file_bytes": cfg.size,
        "direct": direct,
        "backend": "aio" if (use_aio and direct) else "threads",
        "cache_state": "direct I/O (page cache bypassed)" if direct else
                       "buffered reads, each request evicted with posix_fadvise(DONTNEED)",
        "config": asdict(cfg),
        "random": random_rows,
        "sequential": seq_rows,
        "memory": _memory_rates(8 * MiB if cfg.seconds_per_cell < 0.5 else 32 * MiB),
        "seconds_total": None,
    }
    data["seconds_total"] = time.perf_counter() - t_begin
    return Profile(data)


# ----------------------------------------------------------------------------------------------
# The fitted model


@dataclass
class Fit:
    """Per thread count: seconds per request t(s) = latency_s + s / bandwidth (bytes/s)."""

    threads: list[int]
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
        self.thread_counts = np.array(sorted({r["threads"] for r in rows}), dtype=np.float64)
        grid = np.full((self.thread_counts.size, self.chunks.size), np.nan)
        for r in rows:
            i = int(np.searchsorted(self.thread_counts, r["threads"]))
            j = int(np.searchsorted(self.chunks, r["chunk_bytes"]))
            grid[i, j] = r["throughput_bytes_per_s"]
        if np.isnan(grid).any() or (grid <= 0).any():
            raise FlashnbError("profile grid is incomplete (a chunk size x threads cell is missing or zero); "
                               "re-run `flashnb profile`")
        self.grid = grid                                    # bytes/s [threads, chunks]
        self.req_seconds = self.chunks[None, :] / grid      # seconds per request at that concurrency
        fits = [_fit_line(self.chunks, self.req_seconds[i]) for i in range(self.thread_counts.size)]
        rel = [[float((a + s / b) / t - 1) for s, t in zip(self.chunks, self.req_seconds[i])]
               for i, (a, b) in enumerate(fits)]
        self.fit = Fit([int(t) for t in self.thread_counts], [f[0] for f in fits], [f[1] for f in fits],
                       float(np.max(np.abs(rel))), rel)

    # -- persistence -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise FlashnbError(f"profile {p} does not exist; measure one with `flashnb profile --out {p}`") from None
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
        """Seconds per request of size s at thread-count index i: piecewise linear in s."""
        c, t = self.chunks, self.req_seconds[i]
        out = np.interp(s, c, t)
        hi = s > c[-1]
        out[hi] = t[-1] + (s[hi] - c[-1]) / self.fit.bandwidth[i]
        lo = s < c[0]
        out[lo] = t[0]  # below the smallest chunk: latency-bound, no faster than the smallest read
        return out

    def request_seconds(self, chunk_bytes, threads: float) -> np.ndarray:
        """Device seconds per request of `chunk_bytes` when `threads` requests are in flight."""
        s = np.atleast_1d(np.asarray(chunk_bytes, dtype=np.float64))
        T = np.log2(np.clip(float(threads), self.thread_counts[0], self.thread_counts[-1]))
        lt = np.log2(self.thread_counts)
        i = int(np.clip(np.searchsorted(lt, T, side="right") - 1, 0, lt.size - 1))
        if i == lt.size - 1 or T <= lt[i]:
            return self._req_seconds_at(i, s)
        w = (T - lt[i]) / (lt[i + 1] - lt[i])  # interpolate log(time) between thread counts
        return np.exp((1 - w) * np.log(self._req_seconds_at(i, s)) + w * np.log(self._req_seconds_at(i + 1, s)))

    def throughput(self, chunk_bytes, threads: float):
        """Modeled throughput (bytes/s) of random `chunk_bytes` reads with `threads` threads."""
        s = np.atleast_1d(np.asarray(chunk_bytes, dtype=np.float64))
        thr = s / self.request_seconds(s, threads)
        return float(thr[0]) if np.ndim(chunk_bytes) == 0 else thr

    def read_seconds(self, chunk_sizes: Iterable[int] | np.ndarray, threads: int) -> float:
        """Modeled seconds to read requests of `chunk_sizes` bytes over `threads` threads."""
        s = np.asarray(list(chunk_sizes) if not isinstance(chunk_sizes, np.ndarray) else chunk_sizes, np.float64)
        if s.size == 0:
            return 0.0
        return float(self.request_seconds(s, min(threads, s.size)).sum())

    def coalesce_gap(self, threads: int) -> int:
        """Break-even gap in bytes (latency x bandwidth of the fit at `threads`), 4 KiB-aligned."""
        lt = np.log2(self.thread_counts)
        T = np.log2(np.clip(threads, self.thread_counts[0], self.thread_counts[-1]))
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
        """(chunk_bytes, threads, bytes/s) of the best measured random-read cell."""
        i, j = np.unravel_index(np.argmax(self.grid), self.grid.shape)
        return int(self.chunks[j]), int(self.thread_counts[i]), float(self.grid[i, j])

    def summary(self) -> dict:
        """A few headline numbers (GB/s = 1e9 bytes/s) for reports and the CLI."""
        def at(c, t):
            return round(self.throughput(c, t) / 1e9, 3)
        tmax = int(self.thread_counts[-1])
        bc, bt, bv = self.best()
        return {"direct": self.direct, "sequential_GBps": round(self.sequential_throughput() / 1e9, 3),
                "best_random": {"chunk_bytes": bc, "threads": bt, "GBps": round(bv / 1e9, 3)},
                f"random_4KiB_{tmax}threads_GBps": at(4096, tmax),
                f"random_16KiB_{tmax}threads_GBps": at(16384, tmax),
                f"random_64KiB_{tmax}threads_GBps": at(65536, tmax),
                f"random_4MiB_{tmax}threads_GBps": at(4 << 20, tmax),
                "random_4KiB_1thread_GBps": at(4096, 1),
                "latency_s_1thread": round(self.fit.latency_s[0], 6),
                f"coalesce_gap_bytes_{tmax}threads": self.coalesce_gap(tmax),
                "fit_max_rel_error": round(self.fit.max_rel_error, 3)}


def load_default_profile() -> Profile | None:
    """The profile saved at `default_profile_path()`, or None if there is none."""
    p = default_profile_path()
    return Profile.load(p) if p.is_file() else None


# ----------------------------------------------------------------------------------------------
# Reader efficiency: achieved vs modeled on a real store


def reader_efficiency(store_path: str | Path, profile: Profile | None = None, threads: int = IN_FLIGHT,
                      fraction: float = 0.1, rounds: int = 6, calls_per_round: int = 3, cell_seconds: float = 0.2,
                      seed: int = 0, gap_bytes: int | None = None) -> dict:
    """The reader's achieved throughput over the throughput a profile predicts for the same requests.

    Each reader call reads a random, sorted `fraction` of one layer's neurons (what the engine sends).
    Efficiency = predicted seconds / wall seconds, summed over all calls, where predicted seconds =
    `Profile.read_seconds(the calls' request sizes, threads)`.

    Two predictions are reported, because a shared or virtual disk drifts by tens of percent within
    minutes: `efficiency_saved` against `profile` (if given: measured earlier, elsewhere on the disk),
    and `efficiency` against a *same-time* profile measured here: profile cells (random direct reads of
    the power-of-two sizes spanning the reader's request sizes, at `threads` threads, on the store's own
    ffn.bin) interleaved with the reader calls, round by round, so drift hits both alike.
    """
    from flashnb.reader import NeuronReader, ReaderConfig, aligned_empty
    from flashnb.store import FlashStore

    store = FlashStore.open(store_path)
    rng = np.random.default_rng(seed)
    k = max(1, int(round(fraction * store.ffn_dim)))
    out = aligned_empty((k, store.row_values), store.np_dtype)
    wall = pred_saved = 0.0
    nbytes = needed = reqs = 0
    sizes: list[np.ndarray] = []
    cells: list[dict] = []
    fsize = store.ffn_path.stat().st_size
    with NeuronReader(store, ReaderConfig(threads=threads, gap_bytes=gap_bytes), profile=profile) as r:
        st = r.read(0, np.sort(rng.choice(store.ffn_dim, k, replace=False)), out).stats  # warm-up
        lo = 1 << int(np.floor(np.log2(max(4096, st.chunk_sizes.min()))))
        hi = 1 << int(np.ceil(np.log2(max(lo, st.chunk_sizes.max()))))
        grid = [lo << i for i in range(int(np.log2(hi // lo)) + 1)][:8]
        for rnd in range(rounds):
            for c in grid:  # same-time profile cells, on the same file
                if 4 * c <= fsize:
                    cells.append(_cell(r.fd, r.direct, fsize, c, threads, cell_seconds, rng,
                                       use_aio=r.backend == "aio"))
            for j in range(calls_per_round):
                ids = np.sort(rng.choice(store.ffn_dim, k, replace=False))
                st = r.read((rnd * calls_per_round + j) % store.num_layers, ids, out).stats
                wall += st.wall_seconds
                if profile is not None:
                    pred_saved += profile.read_seconds(st.chunk_sizes, threads)
                sizes.append(st.chunk_sizes)
                nbytes += st.bytes_read
                needed += st.bytes_needed
                reqs += st.requests
        info = {"direct": r.direct, "gap_bytes": r.gap_bytes, "gap_source": r.gap_source, "path": st.path}
    merged: dict[int, dict] = {}
    for c in cells:  # pool the rounds per chunk size: bytes and seconds add up
        m = merged.setdefault(c["chunk_bytes"], {**c, "reads": 0, "bytes": 0, "seconds": 0.0})
        m["reads"] += c["reads"]
        m["bytes"] += c["bytes"]
        m["seconds"] += c["seconds"]
    for m in merged.values():
        m["throughput_bytes_per_s"] = m["bytes"] / m["seconds"]
    same_time = Profile({"random": list(merged.values()), "sequential": []})
    pred = sum(same_time.read_seconds(s, threads) for s in sizes)
    calls = rounds * calls_per_round
    res = {"store": str(store.path), "layout": store.layout, "neuron_bytes": store.neuron_bytes,
           "fraction": fraction, "calls": calls, "threads": threads, "requests": reqs,
           "bytes_read": nbytes, "bytes_needed": needed, "wall_seconds": wall,
           "achieved_GBps": nbytes / wall / 1e9,
           "same_time_profile_GBps": {str(c): round(m["throughput_bytes_per_s"] / 1e9, 4)
                                      for c, m in sorted(merged.items())},
           "predicted_seconds": pred, "predicted_GBps": nbytes / pred / 1e9, "efficiency": pred / wall, **info}
    if profile is not None:
        res.update(predicted_seconds_saved=pred_saved, predicted_GBps_saved=nbytes / pred_saved / 1e9,
                   efficiency_saved=pred_saved / wall)
    return res


# ----------------------------------------------------------------------------------------------
# Bundled vs unbundled, measured on real stores


def random_opt_checkpoint(folder: str | Path, d_model: int = 2048, ffn_dim: int = 8192, layers: int = 2,
                          vocab: int = 512, seed: int = 0) -> Path:
    """Write an OPT-shaped Hugging Face folder of random fp16 weights (for I/O experiments only:
    the values are noise, the byte layout is a real OPT's)."""
    from safetensors.numpy import save_file

    from flashnb.models.opt import OPTConfig

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    cfg = OPTConfig(vocab_size=vocab, hidden_size=d_model, ffn_dim=ffn_dim, num_hidden_layers=layers,
                    num_attention_heads=max(1, d_model // 64), max_position_embeddings=64)
    rng = np.random.default_rng(seed)

    def rnd(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    d = d_model
    t = {"model.decoder.embed_tokens.weight": rnd(vocab, d), "model.decoder.embed_positions.weight": rnd(66, d),
         "model.decoder.final_layer_norm.weight": np.ones(d, np.float16),
         "model.decoder.final_layer_norm.bias": np.zeros(d, np.float16)}
    for i in range(layers):
        p = f"model.decoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[p + f"self_attn.{n}.weight"], t[p + f"self_attn.{n}.bias"] = rnd(d, d), rnd(d)
        for n in ("self_attn_layer_norm", "final_layer_norm"):
            t[p + n + ".weight"], t[p + n + ".bias"] = np.ones(d, np.float16), np.zeros(d, np.float16)
        t[p + "fc1.weight"], t[p + "fc1.bias"] = rnd(ffn_dim, d), rnd(ffn_dim)
        t[p + "fc2.weight"], t[p + "fc2.bias"] = rnd(d, ffn_dim), rnd(d)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = cfg.to_hf()
    hf["torch_dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return out


def compare_layouts(workdir: str | Path, profile: Profile | None = None, d_model: int = 2048,
                    ffn_dim: int = 8192, layers: int = 2, fraction: float = 0.05, threads: int = 8,
                    calls: int = 8, seed: int = 0, gap_bytes: int | None = None) -> list[dict]:
    """Measure the same random neuron sets read from a bundled and an unbundled store.

    Builds a random OPT-shaped checkpoint in `workdir` and converts it both ways (fp16), then reads
    `fraction` of a layer's neurons `calls` times from each store, alternating stores so that drift
    of the disk hits both alike. Returns one dict per layout: requests, bytes needed and read, wall
    seconds, and useful throughput (bytes needed per second), plus the profile's prediction.
    """
    from flashnb.reader import NeuronReader, ReaderConfig, aligned_empty
    from flashnb.store import ConvertConfig, FlashStore, convert

    work = Path(workdir)
    src = work / "checkpoint"
    if not (src / "model.safetensors").is_file():
        random_opt_checkpoint(src, d_model, ffn_dim, layers, seed=seed)
    stores = {}
    for layout in ("bundled", "unbundled"):
        p = work / f"store-{layout}"
        if not (p / "manifest.json").is_file():
            convert(src, p, ConvertConfig(layout=layout, progress=False))
        stores[layout] = FlashStore.open(p)
    rng = np.random.default_rng(seed)
    k = max(1, int(round(fraction * ffn_dim)))
    acc = {lay: {"layout": lay, "requests": 0, "bytes_needed": 0, "bytes_read": 0, "wall_seconds": 0.0,
                 "predicted_seconds": 0.0} for lay in stores}
    readers = {lay: NeuronReader(s, ReaderConfig(threads=threads, gap_bytes=gap_bytes), profile=profile)
               for lay, s in stores.items()}
    try:
        out = aligned_empty((k, stores["bundled"].row_values), stores["bundled"].np_dtype)
        for c in range(calls + 1):
            ids = np.sort(rng.choice(ffn_dim, k, replace=False))
            order = list(stores) if c % 2 == 0 else list(stores)[::-1]
            for lay in order:
                st = readers[lay].read(c % layers, ids, out).stats
                if c == 0:
                    continue  # warm-up call (thread pool start)
                a = acc[lay]
                a["requests"] += st.requests
                a["bytes_needed"] += st.bytes_needed
                a["bytes_read"] += st.bytes_read
                a["wall_seconds"] += st.wall_seconds
                if profile is not None:
                    a["predicted_seconds"] += profile.read_seconds(st.chunk_sizes, threads)
                a.update(direct=st.direct, gap_bytes=st.gap_bytes, neuron_bytes=stores[lay].neuron_bytes)
    finally:
        for r in readers.values():
            r.close()
    rows = []
    for a in acc.values():
        a["useful_GBps"] = a["bytes_needed"] / a["wall_seconds"] / 1e9
        a["read_GBps"] = a["bytes_read"] / a["wall_seconds"] / 1e9
        a["ms_per_call"] = a["wall_seconds"] / calls * 1e3
        a["calls"], a["neurons_per_call"], a["threads"] = calls, k, threads
        rows.append(a)
    return rows
