"""Reading neurons from flash: direct I/O, a thread pool, coalescing, and per-call statistics.

`NeuronReader.read(layer, ids, out)` fetches the store rows (see flashnb.store) of any set of neuron
ids of one layer: unsorted, with duplicates, empty or all. It is the engine's hot path, so the work
per call is a handful of numpy operations plus one `os.preadv` per request; nothing loops over
neurons in Python except building the iovec lists that scatter a request into place.

How a call goes:

1. Plan (numpy): sort and de-duplicate the ids; turn each neuron into a byte span of ffn.bin per
   region; merge neighbouring spans into one request when the gap between them is at most
   `gap_bytes` (reading a few unneeded bundles is cheaper than another request; the break-even gap
   comes from the device profile: per-request latency x bandwidth); split requests longer than
   `max_request_bytes` so that threads can share them.
2. Read, with one of two backends:
   - "aio" (default on Linux): every request becomes a kernel iocb (flashnb.aio), built for the whole
     batch by numpy; `threads` of them are kept in flight with one io_submit and one io_getevents
     call per round, as fio's libaio engine does. A request that comes back short is re-read
     synchronously.
   - "threads": the requests are dealt, in file order and balanced by bytes, to `threads` worker
     threads; each issues `os.preadv` calls (retrying short reads and EINTR).
   Both fill the destination the same way:
   - scatter path (rows a multiple of the direct-I/O block, `out` block-aligned, e.g. from
     `aligned_empty`): one preadv per request whose iovecs point straight at the caller's rows, the
     unneeded gap rows going to a small sink buffer. No copy.
   - staging path (any other shapes or `out`): block-aligned requests land in a page-aligned staging
     buffer, then one vectorized gather copies the rows into `out`.
3. Duplicated ids are copied from their first occurrence.

The file is opened with os.O_DIRECT (no page cache: the paper's F_NOCACHE). Where the file system
refuses it, the reader falls back to buffered reads and evicts the layer's span with
posix_fadvise(POSIX_FADV_DONTNEED) after every call, and `ReadStats.direct` is False.
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from numpy.lib.stride_tricks import as_strided

from flashnb.errors import FlashnbError
from flashnb.store import FlashStore, Region

if TYPE_CHECKING:
    from flashnb.profile import Profile

PAGE = mmap.PAGESIZE
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_O_DIRECT = getattr(os, "O_DIRECT", 0)
# A profile's break-even gap (latency x bandwidth) comes from a fit that is least certain for small
# chunks; a noisy profile can ask for 80 KiB, which for 2 KiB bundles reads many times the needed
# bytes. Gaps taken from a profile are capped here (bytes); an explicit gap_bytes is used as given.
# Measured on the shipped model (engine runs taking turns, 24 tokens, virtio disk, 64 in flight):
# a 16 KiB gap read 2.5-5x the needed bytes and cost 1-3.6 ms a token against no gap; 4 KiB was
# within noise of no gap while saving 13-25% of the requests.
MAX_PROFILE_GAP = 4 * 1024
# Reads kept in flight by default (the AIO queue depth; reader threads without native AIO). Every
# default in flashnb (policy, bench, CLI, replay, cost model) takes it from here.
IN_FLIGHT = 64


# ----------------------------------------------------------------------------------------------
# Aligned memory


class AlignedBuffer:
    """`nbytes` of page-aligned memory from an anonymous mmap (what O_DIRECT needs).

    `u8` is the whole buffer as a uint8 numpy array, `view` a memoryview of it. Pages are committed
    on first touch.
    """

    def __init__(self, nbytes: int):
        self.nbytes = max(PAGE, -(-int(nbytes) // PAGE) * PAGE)
        self._mm = mmap.mmap(-1, self.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.u8 = np.frombuffer(self._mm, dtype=np.uint8)
        self.view = memoryview(self.u8)

    def array(self, shape: Sequence[int] | int, dtype) -> np.ndarray:
        """A numpy array of `shape` and `dtype` over the start of the buffer."""
        dt = np.dtype(dtype)
        n = int(np.prod(shape)) * dt.itemsize
        if n > self.nbytes:
            raise FlashnbError(f"buffer of {self.nbytes} bytes is too small for {tuple(np.atleast_1d(shape))} "
                               f"{dt} ({n} bytes)")
        return self.u8[:n].view(dt).reshape(shape)


def aligned_empty(shape: Sequence[int] | int, dtype) -> np.ndarray:
    """An uninitialised numpy array whose data starts on a page boundary (anonymous mmap)."""
    dt = np.dtype(dtype)
    return AlignedBuffer(int(np.prod(shape)) * dt.itemsize).array(shape, dt)


# ----------------------------------------------------------------------------------------------
# Configuration, statistics


@dataclass
class ReaderConfig:
    """How a NeuronReader reads.

    threads: requests in flight: the AIO queue depth (backend "aio"), or worker threads each issuing
        one request at a time (backend "threads").
    backend: "aio" (Linux native AIO, flashnb.aio: one system call submits a whole batch, like fio's
        libaio engine), "threads" (os.preadv from a thread pool), or "auto" (aio where the kernel
        allows it, else threads).
    gap_bytes: merge two spans into one request when at most this many unneeded bytes lie between
        them; None = the device profile's break-even gap (`Profile.coalesce_gap`, at most
        MAX_PROFILE_GAP), or 0 without one.
    max_request_bytes: longer merged requests are split (bytes) so threads can share them.
    direct: try O_DIRECT (False: buffered reads + fadvise eviction, e.g. for tests of the fallback).
    io_align: direct-I/O block size in bytes; None = probe (512 where the device accepts it, else 4096).
    """

    threads: int = IN_FLIGHT
    gap_bytes: int | None = None
    max_request_bytes: int = 1 << 20
    backend: str = "auto"
    direct: bool = True
    io_align: int | None = None


def _bucket(n: int) -> int:
    """The power of two at or above n (bytes): a histogram bucket."""
    return 1 << max(0, int(n - 1).bit_length())


@dataclass
class ReadStats:
    """What one `NeuronReader.read` call did. Bytes are bytes; seconds are wall-clock seconds.

    bytes_needed counts each distinct requested neuron once (its row in every region);
    bytes_read is what the requests transferred, including alignment padding and coalesced gaps.
    """

    layer: int
    neurons_requested: int
    neurons_unique: int
    requests: int
    retries: int
    bytes_needed: int
    bytes_read: int
    wall_seconds: float
    threads: int
    direct: bool
    path: str  # "scatter" (straight into the caller's rows) or "staging" (aligned buffer + gather)
    gap_bytes: int
    chunk_sizes: np.ndarray = field(repr=False)  # bytes of each request, in file order
    backend: str = "threads"  # "aio" or "threads": how the requests were issued

    @property
    def throughput(self) -> float:
        """bytes_read / wall_seconds (bytes per second); 0 for an empty call."""
        return self.bytes_read / self.wall_seconds if self.wall_seconds > 0 and self.bytes_read else 0.0

    @property
    def waste(self) -> float:
        """Fraction of bytes_read that was not needed (alignment and coalescing)."""
        return 1.0 - self.bytes_needed / self.bytes_read if self.bytes_read else 0.0

    @property
    def chunk_histogram(self) -> dict[int, int]:
        """Request count per power-of-two size bucket (bucket upper bound in bytes)."""
        out: dict[int, int] = {}
        for s in self.chunk_sizes.tolist():
            b = _bucket(s)
            out[b] = out.get(b, 0) + 1
        return dict(sorted(out.items()))

    def summary(self) -> dict:
        """A JSON-friendly dict of the statistics."""
        return {"layer": self.layer, "neurons_requested": self.neurons_requested,
                "neurons_unique": self.neurons_unique, "requests": self.requests, "retries": self.retries,
                "bytes_needed": self.bytes_needed, "bytes_read": self.bytes_read,
                "wall_seconds": self.wall_seconds, "throughput_bytes_per_s": self.throughput,
                "threads": self.threads, "backend": self.backend, "direct": self.direct, "path": self.path,
                "gap_bytes": self.gap_bytes,
                "chunk_histogram": {str(k): v for k, v in self.chunk_histogram.items()}}


@dataclass
class ReadResult:
    """rows: [len(ids), store.row_values] in the store dtype, row k = neuron ids[k]; stats."""

    rows: np.ndarray
    stats: ReadStats


class PendingRead:
    """The reads of one `NeuronReader.submit` call; `wait()` completes them (once) and returns the
    ReadResult. The reader is locked until then."""

    def __init__(self, lock: threading.Lock, finish):
        self._lock, self._finish = lock, finish
        self._result: ReadResult | None = None

    def wait(self) -> ReadResult:
        if self._result is None:
            try:
                self._result = self._finish()
            finally:
                if self._lock is not None:
                    self._lock.release()
                    self._lock = None
        return self._result


# ----------------------------------------------------------------------------------------------
# Low-level reads


def preadv_full(fd: int, iov: list[memoryview], offset: int) -> int:
    """Read exactly sum(len(iov)) bytes at `offset` into the buffers `iov`; returns the retries.

    Short reads continue where they stopped; EINTR is retried (Python also retries it itself).
    Raises FlashnbError at end of file.
    """
    want = sum(v.nbytes for v in iov)
    done = retries = 0
    while True:
        try:
            n = os.preadv(fd, iov, offset + done)
        except InterruptedError:
            retries += 1
            continue
        done += n
        if done >= want:
            return retries
        if n == 0:
            raise FlashnbError(f"unexpected end of file at byte {offset + done} (wanted {want} bytes at "
                               f"{offset}); the FFN file is truncated: re-create the store")
        retries += 1
        while n:  # drop what was filled
            if n >= iov[0].nbytes:
                n -= iov[0].nbytes
                iov = iov[1:]
            else:
                iov = [iov[0][n:]] + iov[1:]
                n = 0


def probe_io_align(fd: int) -> int:
    """512 if the open O_DIRECT descriptor accepts 512-byte aligned reads, else 4096 (bytes)."""
    buf = AlignedBuffer(2 * PAGE)
    try:
        os.preadv(fd, [buf.view[512:1024]], 512)
        return 512
    except OSError:
        return 4096


def open_for_reading(path: Path, direct: bool = True) -> tuple[int, bool]:
    """Open `path` read-only, with O_DIRECT when possible; returns (fd, direct_used)."""
    if direct and _O_DIRECT:
        try:
            return os.open(path, os.O_RDONLY | _O_DIRECT), True
        except OSError:
            pass  # e.g. tmpfs refuses O_DIRECT: fall back to buffered reads + fadvise eviction
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise FlashnbError(f"cannot open {path} ({e.strerror}); check the store path and permissions") from None
    return fd, False


def evict(fd: int, offset: int = 0, length: int = 0) -> None:
    """Drop the span's pages from the page cache (POSIX_FADV_DONTNEED; length 0 = to the end)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


# ----------------------------------------------------------------------------------------------
# The reader


@dataclass
class _Plan:
    """Requests of one call, in file order. Offsets/lengths in bytes."""

    req_off: np.ndarray       # file offset of each request
    req_len: np.ndarray       # bytes of each request
    run_start: np.ndarray     # scatter: index of the request's first run (len = requests + 1)
    run_dst: np.ndarray       # scatter: byte offset in the destination of each run of needed rows
    run_len: np.ndarray       # scatter: bytes of each run
    run_gap: np.ndarray       # scatter: unneeded bytes after the run, read into the sink
    gather: list[tuple[int, np.ndarray]]  # staging: (region index, staging byte offset per unique id)


class NeuronReader:
    """Reads neuron rows of a FlashStore with direct I/O and a thread pool. Use as a context manager
    or call `close()`. `profile` (flashnb.profile.Profile) sets the coalescing gap."""

    def __init__(self, store: FlashStore | str | Path, config: ReaderConfig | None = None,
                 profile: "Profile | None" = None):
        self.store = store if isinstance(store, FlashStore) else FlashStore.open(store)
        self.config = config or ReaderConfig()
        if self.config.threads < 1:
            raise FlashnbError(f"threads must be at least 1, got {self.config.threads}")
        self.fd, self.direct = open_for_reading(self.store.ffn_path, self.config.direct)
        self.io_align = self.config.io_align or (probe_io_align(self.fd) if self.direct else 512)
        if self.config.gap_bytes is not None:
            self.gap_bytes, self.gap_source = int(self.config.gap_bytes), "config"
        elif profile is not None:
            gap = min(int(profile.coalesce_gap(self.config.threads)), MAX_PROFILE_GAP)
            self.gap_bytes, self.gap_source = gap, "profile"
        else:
            self.gap_bytes, self.gap_source = 0, "none"
        if self.config.backend not in ("auto", "aio", "threads"):
            raise FlashnbError(f"reader backend must be 'auto', 'aio' or 'threads', got {self.config.backend!r}")
        self._aio = None
        if self.config.backend in ("auto", "aio"):
            from flashnb.aio import AioContext

            try:
                self._aio = AioContext(self.config.threads)
            except OSError as e:
                if self.config.backend == "aio":
                    raise FlashnbError(f"native AIO is unavailable here ({e.strerror}); use backend='threads'") from None
        self.backend = "aio" if self._aio is not None else "threads"
        self._pool = ThreadPoolExecutor(max(1, self.config.threads - 1), thread_name_prefix="flashnb-read")
        self._staging: AlignedBuffer | None = None
        self._sink = AlignedBuffer(self.gap_bytes + self.io_align + max(r.row_bytes for r in self.store.regions(0)))
        self._lock = threading.Lock()
        self._item = self.store.np_dtype.itemsize
        regs = self.store.regions(0)
        # region j's rows land at column part_col[j] (bytes) of an output row
        self._part_col = [self.store.parts.index(r.parts[0]) * self.store.d_model * self._item for r in regs]
        self._scatter_ok = all(r.row_bytes % self.io_align == 0 for r in regs) and \
            self.store.neuron_bytes % self.io_align == 0

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        if self.fd >= 0:
            self._pool.shutdown(wait=True)
            if self._aio is not None:
                self._aio.close()
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "NeuronReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- the hot path ------------------------------------------------------------------------
    def read(self, layer: int, ids, out: np.ndarray | None = None) -> ReadResult:
        """Rows [len(ids), row_values] of neurons `ids` of `layer`, equal to the checkpoint's values.

        `ids`: any integer sequence/array/tensor. `out`: optional C-contiguous destination of that
        shape and the store dtype; block-aligned (e.g. `aligned_empty`) for the zero-copy path.
        """
        return self.submit(layer, ids, out).wait()

    def submit(self, layer: int, ids, out: np.ndarray | None = None) -> "PendingRead":
        """Start `read(layer, ids, out)` and return at once: with native AIO the requests are in the
        kernel's hands, so the caller can compute while the disk works; `wait()` completes them and
        returns the ReadResult (the rows are in `out` only then). Without native AIO the reads are
        done here. Until `wait()` the reader takes no other call (other threads block)."""
        self._lock.acquire()  # one call at a time: the staging buffer, the sink and the AIO context are shared
        try:
            finish = self._start(layer, ids, out)
        except BaseException:
            self._lock.release()
            raise
        return PendingRead(self._lock, finish)

    def _start(self, layer: int, ids, out: np.ndarray | None):
        """Validate, plan and issue the reads; returns the function that completes them."""
        t0 = time.perf_counter()
        if self.fd < 0:
            raise FlashnbError("this NeuronReader is closed; open a new one")
        st = self.store
        regs = st.regions(layer)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = ids.size
        if n and (ids.min() < 0 or ids.max() >= st.ffn_dim):
            bad = ids[(ids < 0) | (ids >= st.ffn_dim)]
            raise FlashnbError(f"neuron ids {bad[:5].tolist()}{' ...' if bad.size > 5 else ''} are out of range "
                               f"for layer {layer} of {st.path} (valid ids: 0..{st.ffn_dim - 1})")
        if out is None:
            out = aligned_empty((n, st.row_values), st.np_dtype)
        elif (out.dtype != st.np_dtype or out.shape != (n, st.row_values) or not out.flags.c_contiguous
              or not out.flags.writeable):
            raise FlashnbError(f"out must be a writeable C-contiguous {st.np_dtype} array of shape "
                               f"{(n, st.row_values)}, got {out.dtype} {out.shape}")
        if n == 0:
            empty = ReadResult(out, self._stats(layer, 0, 0, np.zeros(0, np.int64), 0, t0, "scatter"))
            return lambda: empty
        out_u8 = out.reshape(-1).view(np.uint8)
        uniq, first, inv, scatter, plan = self._plan(regs, ids, out_u8.ctypes.data % self.io_align == 0)
        dst = memoryview(out_u8) if scatter else self._staging_view(int(plan.req_len.sum()))
        base = out_u8.ctypes.data if scatter else self._staging.u8.ctypes.data
        run = self._start_run(plan, dst, base, scatter)

        def finish() -> ReadResult:
            retries = run()
            if not scatter:
                self._gather(plan, regs, uniq.size, first, out)
            if inv is not None and uniq.size < n:  # duplicates: copy from the first occurrence
                dup = np.ones(n, bool)
                dup[first] = False
                out[dup] = out[first[inv[dup]]]
            if not self.direct:
                lo = regs[0].offset
                evict(self.fd, lo, regs[-1].offset + regs[-1].size - lo)
            stats = self._stats(layer, n, uniq.size, plan.req_len, retries, t0, "scatter" if scatter else "staging")
            return ReadResult(out, stats)

        return finish

    def _plan(self, regs: tuple[Region, ...], ids: np.ndarray, out_aligned: bool):
        """Unique ids, first occurrences, inverse (None if already sorted and unique), path, plan."""
        n = ids.size
        if n > 1 and bool(np.all(ids[1:] > ids[:-1])):  # sorted and unique: the engine's usual case
            uniq, first, inv = ids, np.arange(n), None
        else:
            uniq, first, inv = np.unique(ids, return_index=True, return_inverse=True)
        scatter = (not self.direct) or (self._scatter_ok and out_aligned)
        plan = (self._plan_scatter(regs, uniq, first, self.store.neuron_bytes) if scatter
                else self._plan_staging(regs, uniq))
        return uniq, first, inv, scatter, plan

    def request_sizes(self, layer: int, ids, out_aligned: bool = True) -> np.ndarray:
        """Bytes of every request `read(layer, ids)` would issue (into a block-aligned `out` unless
        `out_aligned` is False), without reading anything: what `flashnb.simulate` counts."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            return np.zeros(0, np.int64)
        if ids.min() < 0 or ids.max() >= self.store.ffn_dim:
            raise FlashnbError(f"neuron ids must lie in 0..{self.store.ffn_dim - 1} for layer {layer}")
        return np.asarray(self._plan(self.store.regions(layer), ids, out_aligned)[4].req_len, dtype=np.int64)

    def _stats(self, layer, n, n_u, req_len, retries, t0, path) -> ReadStats:
        return ReadStats(layer=layer, neurons_requested=int(n), neurons_unique=int(n_u), requests=int(req_len.size),
                         retries=int(retries), bytes_needed=int(n_u) * self.store.neuron_bytes,
                         bytes_read=int(req_len.sum()), wall_seconds=time.perf_counter() - t0,
                         threads=self.config.threads, direct=self.direct, path=path, gap_bytes=self.gap_bytes,
                         chunk_sizes=np.asarray(req_len, dtype=np.int64), backend=self.backend)

    # -- planning ----------------------------------------------------------------------------
    def _plan_scatter(self, regs: tuple[Region, ...], uniq: np.ndarray, first: np.ndarray,
                      out_row_bytes: int) -> _Plan:
        """Rows go straight to out[first occurrence]; file-adjacent rows with adjacent destinations
        form one run (one iovec); runs closer than gap_bytes share a request, the gap going to a sink."""
        M = self.config.max_request_bytes
        offs, lens, starts, dsts, rlens, gaps = [], [], [], [], [], []
        nrun = 0
        for j, r in enumerate(regs):
            rb = r.row_bytes
            s = r.offset + uniq * rb                          # file offset of each row
            d = first * out_row_bytes + self._part_col[j]     # destination offset of each row
            brk = np.ones(uniq.size, bool)
            brk[1:] = (np.diff(uniq) != 1) | (np.diff(d) != rb)
            rs = np.flatnonzero(brk)
            nrows = np.diff(np.append(rs, uniq.size))
            step = max(1, M // rb)                            # rows per piece of a long run
            npc = -(-nrows // step)
            ridx = np.repeat(np.arange(rs.size), npc)
            k = np.arange(ridx.size) - np.repeat(np.cumsum(npc) - npc, npc)
            run_s = s[rs][ridx] + k * step * rb
            run_d = d[rs][ridx] + k * step * rb
            run_l = np.minimum(step, nrows[ridx] - k * step) * rb
            R = run_s.size
            gap = np.zeros(R, np.int64)
            gap[:-1] = run_s[1:] - (run_s[:-1] + run_l[:-1])
            new = np.ones(R, bool)
            new[1:] = gap[:-1] > self.gap_bytes
            grp = np.cumsum(new) - 1
            g0 = np.flatnonzero(new)
            piece = (run_s - run_s[g0][grp]) // M             # about M bytes per request
            kk = (np.arange(R) - g0[grp]) // (IOV_MAX // 2)   # at most IOV_MAX iovecs per request
            new[1:] |= (piece[1:] != piece[:-1]) | (kk[1:] != kk[:-1])
            req_first = np.flatnonzero(new)
            req_last = np.append(req_first[1:], R) - 1
            gap[req_last] = 0                                 # nothing to skip after a request's last run
            offs.append(run_s[req_first])
            lens.append(run_s[req_last] + run_l[req_last] - run_s[req_first])
            starts.append(req_first + nrun)
            dsts.append(run_d)
            rlens.append(run_l)
            gaps.append(gap)
            nrun += R
        return _Plan(np.concatenate(offs), np.concatenate(lens), np.append(np.concatenate(starts), nrun),
                     np.concatenate(dsts), np.concatenate(rlens), np.concatenate(gaps), [])

    def _plan_staging(self, regs: tuple[Region, ...], uniq: np.ndarray) -> _Plan:
        """Block-aligned requests into a staging buffer; rows are gathered from it afterwards."""
        A = self.io_align
        offs, lens, gather = [], [], []
        base = 0
        for j, r in enumerate(regs):
            s = r.offset + uniq * r.row_bytes
            a_s = s // A * A
            a_e = -(-(s + r.row_bytes) // A) * A
            new = np.ones(uniq.size, bool)
            new[1:] = (a_s[1:] - a_e[:-1]) > self.gap_bytes
            gi = np.flatnonzero(new)
            g_s = a_s[gi]
            g_e = np.append(a_e[gi[1:] - 1], a_e[-1])
            g_len = g_e - g_s
            g_stage = base + np.concatenate(([0], np.cumsum(g_len)[:-1]))
            grp = np.cumsum(new) - 1
            gather.append((j, g_stage[grp] + (s - g_s[grp])))
            base += int(g_len.sum())
            # split long groups into pieces of at most max_request_bytes (a multiple of A)
            step = max(A, self.config.max_request_bytes // A * A)
            npieces = -(-g_len // step)
            gidx = np.repeat(np.arange(gi.size), npieces)
            k = np.arange(gidx.size) - np.repeat(np.cumsum(npieces) - npieces, npieces)
            p_off = g_s[gidx] + k * step
            p_len = np.minimum(step, g_e[gidx] - p_off)
            offs.append(p_off)
            lens.append(p_len)
        off, ln = np.concatenate(offs), np.concatenate(lens)
        empty = np.zeros(0, np.int64)
        return _Plan(off, ln, empty, empty, empty, empty, gather)

    def _staging_view(self, nbytes: int) -> memoryview:
        if self._staging is None or self._staging.nbytes < nbytes:
            self._staging = AlignedBuffer(max(nbytes, 1 << 20))
        return self._staging.view

    def _gather(self, plan: _Plan, regs, n_u: int, first: np.ndarray, out: np.ndarray) -> None:
        """Copy each unique row from staging into out[first occurrence] (one fancy index per region)."""
        stg = self._staging.u8
        it = self._item
        for j, pos in plan.gather:
            rb = regs[j].row_bytes
            g = math.gcd(self.io_align, rb)  # every row starts on a multiple of g (see _plan_staging)
            rows = as_strided(stg.view(self.store.np_dtype), shape=((stg.size - rb) // g + 1, rb // it),
                              strides=(g, it), writeable=False)
            c0 = self._part_col[j] // it
            out[first, c0:c0 + rb // it] = rows[pos // g]

    # -- executing ---------------------------------------------------------------------------
    def _start_run(self, plan: _Plan, dst: memoryview, base: int, scatter: bool):
        """Issue the plan's requests (into `dst`, whose address is `base`); returns the function that
        waits for them and returns the retries (with threads, the reads are already done)."""
        stage = None if scatter else np.concatenate(([0], np.cumsum(plan.req_len)[:-1]))  # staging offsets
        if self._aio is not None:
            return self._start_aio(plan, dst, base, stage)
        retries = self._run_threads(plan, dst, stage)
        return lambda: retries

    def _start_aio(self, plan: _Plan, dst: memoryview, base: int, stage: np.ndarray | None):
        """All requests through one AIO context, `threads` in flight; the returned function waits for
        them, re-reads short or failed ones synchronously (which raises the clear error where the
        file really is short) and returns the retries."""
        from flashnb import aio

        iov = None
        if stage is None:  # scatter: iovecs, each run of rows, then its gap (into the sink) where it has one
            has_gap = plan.run_gap > 0
            per_run = 1 + has_gap
            first = np.concatenate(([0], np.cumsum(per_run)[:-1]))
            iov = np.zeros(int(per_run.sum()), aio.IOVEC)
            iov["base"][first] = base + plan.run_dst
            iov["len"][first] = plan.run_len
            iov["base"][first[has_gap] + 1] = self._sink.u8.ctypes.data
            iov["len"][first[has_gap] + 1] = plan.run_gap[has_gap]
            iov_start = np.append(first, iov.size)[plan.run_start]
            cbs = aio.preadv_iocbs(self.fd, plan.req_off, iov, iov_start)
        else:
            cbs = aio.pread_iocbs(self.fd, plan.req_off, base + stage, plan.req_len)
        batch = self._aio.start(cbs)

        def wait() -> int:
            res = batch.wait()
            del batch.iocbs  # the kernel is done with the iocbs (and with `iov`, which they point to)
            bad = np.flatnonzero(res != plan.req_len).tolist()
            work = self._work_scatter if stage is None else self._work_staging
            return len(bad) + sum(work(plan, dst, stage, i, i + 1) for i in bad)

        wait.iov = iov  # keep the iovecs alive while the requests are in flight
        return wait

    def _run_threads(self, plan: _Plan, dst: memoryview, stage: np.ndarray | None) -> int:
        """Issue the plan's requests over the thread pool; returns the retries.

        The requests are cut into up to 32 batches per thread (of at least 4 requests) of similar
        bytes, in file order; the threads pull batches from a shared counter until none is left, so
        a slow request delays only its own thread's next pull, not a fixed share of the work.
        """
        nreq = plan.req_off.size
        T = min(self.config.threads, nreq)
        nb = min(nreq, 32 * T, max(T, nreq // 4))  # small batches, but not of one request
        cum = np.cumsum(plan.req_len)
        cuts = np.searchsorted(cum, cum[-1] * np.arange(1, nb) / nb, side="left") + 1
        bounds = np.unique(np.concatenate(([0], np.minimum(cuts, nreq), [nreq]))).tolist()
        work = self._work_scatter if stage is None else self._work_staging
        if T == 1:
            return work(plan, dst, stage, 0, nreq)
        batches = list(zip(bounds[:-1], bounds[1:]))
        counter = itertools.count()

        def pull() -> int:
            retries = 0
            while (i := next(counter)) < len(batches):  # next() on a count is atomic under the GIL
                retries += work(plan, dst, stage, *batches[i])
            return retries

        futures = [self._pool.submit(pull) for _ in range(T - 1)]
        mine = pull()  # the calling thread is the T-th worker
        return mine + sum(f.result() for f in futures)

    def _work_staging(self, plan: _Plan, dst: memoryview, stage: np.ndarray, a: int, b: int) -> int:
        fd, retries = self.fd, 0
        for off, ln, so in zip(plan.req_off[a:b].tolist(), plan.req_len[a:b].tolist(), stage[a:b].tolist()):
            retries += preadv_full(fd, [dst[so:so + ln]], off)
        return retries

    def _work_scatter(self, plan: _Plan, dst: memoryview, _stage, a: int, b: int) -> int:
        fd, retries, sink = self.fd, 0, self._sink.view
        rs = plan.run_start[a:b + 1].tolist()
        r0, r1 = rs[0], rs[-1]
        rd, rl, rg = plan.run_dst[r0:r1].tolist(), plan.run_len[r0:r1].tolist(), plan.run_gap[r0:r1].tolist()
        for i, off in enumerate(plan.req_off[a:b].tolist()):
            iov = []
            for k in range(rs[i] - r0, rs[i + 1] - r0):
                d = rd[k]
                iov.append(dst[d:d + rl[k]])
                if rg[k]:
                    iov.append(sink[:rg[k]])
            retries += preadv_full(fd, iov, off)
        return retries
