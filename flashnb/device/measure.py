"""Measuring your disk: random and sequential direct-I/O reads of a scratch file, by read size and
reads in flight, as the reader issues them.

`run_profile` creates a scratch file (random bytes), reads it at random 4 KiB-aligned offsets in
chunks of 4 KiB..4 MiB with 1..64 reads in flight (each cell for a fixed time), reads it
sequentially, and removes it again (also on Ctrl-C). Requests go through Linux native AIO with
`in_flight` requests queued (like fio's libaio iodepth) where the kernel allows it, else from that
many threads; the JSON says which ("backend"). The result is a `flashnb.device.profile.Profile`.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from flashnb.core import aio
from flashnb.core.io import AlignedBuffer, evict, open_for_reading, preadv_full
from flashnb.device.profile import PROFILE_VERSION, Profile
from flashnb.errors import FlashnbError
from flashnb.paths import missing_folder
from flashnb.text import show_progress

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DEFAULT_CHUNKS = tuple(4 * KiB << i for i in range(11))       # 4 KiB .. 4 MiB
QUICK_CHUNKS = (4 * KiB, 8 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB)   # 8 KiB: the paper's unbundled read
DEFAULT_IN_FLIGHT = (1, 2, 4, 8, 16, 32, 64)
QUICK_IN_FLIGHT = (1, 4, 16, 64)


@dataclass
class ProfileConfig:
    """What to measure. Sizes in bytes, durations in seconds.

    dir: folder for the scratch file (None: the system temp folder); size: scratch file bytes;
    chunk_sizes x in_flight: the random-read grid, each cell read for seconds_per_cell;
    sequential_seconds: duration of each sequential-read measurement.
    """

    dir: str | None = None
    size: int = 1 * GiB
    chunk_sizes: tuple[int, ...] = DEFAULT_CHUNKS
    in_flight: tuple[int, ...] = DEFAULT_IN_FLIGHT
    seconds_per_cell: float = 0.9
    sequential_seconds: float = 1.5
    sequential_chunk: int = 4 * MiB
    seed: int = 0
    progress: bool = True
    backend: str = "auto"   # "aio" / "threads" / "auto": how requests are issued, as in ReaderConfig

    @classmethod
    def quick(cls, **kw) -> "ProfileConfig":
        """A run of about 10 s: 7 chunk sizes (4 KiB .. 4 MiB, 8 KiB included) x 4 numbers of reads in flight on a
        256 MiB file."""
        base = dict(size=256 * MiB, chunk_sizes=QUICK_CHUNKS, in_flight=QUICK_IN_FLIGHT, seconds_per_cell=0.25,
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
            raise FlashnbError(f"profile folder: {missing_folder(self.folder)}; pass an existing folder with --dir")
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
    n_slots = max(1, (file_bytes - chunk) // 4096)
    nseq = max(1, file_bytes // chunk)
    batch = 4 * depth
    buf = AlignedBuffer(depth * chunk)  # requests share depth slots of it: the bytes are not kept
    addrs = buf.u8.ctypes.data + (np.arange(batch, dtype=np.uint64) % depth) * chunk
    lens = np.full(batch, chunk, dtype=np.int64)
    ctx = aio.acquire(depth)
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
            res = ctx.run(aio.pread_iocbs(fd, offs.astype(np.int64), addrs, lens))
            if (res != chunk).any():
                bad = res[res != chunk][0]
                raise FlashnbError(f"profile read failed: {os.strerror(-bad) if bad < 0 else 'short read'}")
            dt = time.perf_counter() - t0
            lat.append(dt * min(depth, batch) / batch)
            reads += batch
            k += batch
        elapsed = time.perf_counter() - t_start
    finally:
        aio.release(ctx)
    return {"chunk_bytes": chunk, "in_flight": depth, "reads": reads, "bytes": reads * chunk, "seconds": elapsed,
            "throughput_bytes_per_s": reads * chunk / elapsed, "latency_p50_s": float(np.percentile(lat, 50)),
            "latency_p99_s": float(np.percentile(lat, 99))}


def _aio_usable(backend: str) -> bool:
    """Whether cells run through native AIO: backend 'aio' (required), 'auto' (where available), 'threads'."""
    if backend not in ("auto", "aio", "threads"):
        raise FlashnbError(f"profile backend must be 'auto', 'aio' or 'threads', got {backend!r}")
    if backend == "threads":
        return False
    if aio.available():
        return True
    if backend == "aio":
        raise FlashnbError("native AIO is unavailable on this machine; profile with backend 'threads'")
    return False


def measure_cell(fd: int, direct: bool, file_bytes: int, chunk: int, in_flight: int, seconds: float,
                 rng: np.random.Generator, sequential: bool = False, use_aio: bool = False) -> dict:
    """Read `chunk`-byte requests, `in_flight` of them in flight, for `seconds`; the cell's measurements.
    `use_aio`: through one native AIO context (queue depth `in_flight`), else `in_flight` threads."""
    if use_aio and direct:
        return _cell_aio(fd, file_bytes, chunk, in_flight, seconds, rng, sequential)
    threads = in_flight  # one thread per read in flight
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
    return {"chunk_bytes": chunk, "in_flight": threads, "reads": reads, "bytes": reads * chunk,
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


def run_profile(cfg: ProfileConfig | None = None) -> Profile:
    """Measure this disk (see module doc); returns the Profile. The scratch file is always removed."""
    from tqdm.auto import tqdm

    cfg = cfg or ProfileConfig()
    folder = Path(cfg.dir) if cfg.dir else Path(tempfile.gettempdir())
    if cfg.size < max(cfg.chunk_sizes) * 4:
        raise FlashnbError(f"--size {cfg.size} is too small: use at least 4 x the largest chunk "
                           f"({4 * max(cfg.chunk_sizes) >> 20} MiB)")
    if cfg.size % 4096:
        raise FlashnbError(f"--size {cfg.size} is not a multiple of 4096 bytes: e.g. {cfg.size // 4096 * 4096}")
    if any(c % 4096 or c <= 0 for c in cfg.chunk_sizes) or any(t < 1 for t in cfg.in_flight):
        raise FlashnbError("chunk sizes must be positive multiples of 4096 bytes and reads in flight >= 1")
    rng = np.random.default_rng(cfg.seed)
    use_aio = _aio_usable(cfg.backend)
    t_begin = time.perf_counter()
    info = machine_info(folder)
    date = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    cells = [(c, t) for t in cfg.in_flight for c in cfg.chunk_sizes]
    seq_in_flight = sorted({1, min(16, max(cfg.in_flight))})
    random_rows, seq_rows = [], []
    with _Scratch(folder, cfg.size, cfg.seed) as path:
        fd, direct = open_for_reading(path, True)
        try:
            if not direct:
                evict(fd)
            try:  # a direct read can still be refused (EINVAL) on some file systems
                measure_cell(fd, direct, cfg.size, 4096, 1, 0.05, rng)
            except FlashnbError:
                os.close(fd)
                fd, direct = open_for_reading(path, False)
                evict(fd)
            with tqdm(total=len(cells) + len(seq_in_flight), desc="profile", unit="cell",
                      disable=not show_progress(cfg.progress), leave=False) as bar:
                for c, t in cells:
                    random_rows.append(measure_cell(fd, direct, cfg.size, c, t, cfg.seconds_per_cell, rng,
                                             use_aio=use_aio))
                    gbps = random_rows[-1]["throughput_bytes_per_s"] / 1e9
                    bar.set_postfix_str(f"{c // 1024} KiB x {t}: {gbps:.2f} GB/s")
                    bar.update(1)
                for t in seq_in_flight:
                    row = measure_cell(fd, direct, cfg.size, cfg.sequential_chunk, t, cfg.sequential_seconds, rng,
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


def process_rss() -> tuple[int, int]:
    """(resident set now, its peak so far) of this process, in bytes (0 where the kernel does not say)."""
    now = peak = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    now = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except OSError:
        pass
    return now, peak
