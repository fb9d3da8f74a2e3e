"""Reading neurons from flash: direct I/O, native AIO, coalescing, and per-call statistics (§3.2).

`NeuronReader.read(layer, ids, out)` fetches the store rows (flashnb.core.store) of any neuron ids of one
layer (unsorted, duplicated, none or all): the engine's hot path, a few numpy operations per call.

How a call goes:

1. Plan (flashnb.core.requests): sort and de-duplicate the ids' file rows (a placement moves them), turn
   the rows into byte spans of the FFN file, merge neighbours closer than `gap_bytes`, split long requests.
2. Read, with one of two backends:
   - "aio" (default on Linux): every request becomes a kernel iocb (flashnb.core.aio), built for the
     whole batch by numpy; `in_flight` of them are kept in flight with one io_submit and one
     io_getevents call per round, as fio's libaio engine does. A request that comes back short is
     re-read synchronously.
   - "threads": the requests are dealt, in file order and balanced by bytes, to `in_flight` worker
     threads; each issues `os.preadv` calls (retrying short reads and EINTR).
   Both fill the destination the same way: straight into the caller's rows when `out` is
   block-aligned (scatter), else through an aligned staging buffer and one vectorized gather.
3. Duplicated ids are copied from their first occurrence.

`submit` starts a call and returns a `PendingRead` at once, so the engine computes while the disk works;
`wait()` completes it. One call is pending at a time: a thread that submits again before waiting gets a
clear error, another waits its turn, and a dropped pending read is completed when it is collected.

The file is opened with os.O_DIRECT (no page cache: the paper's F_NOCACHE). Where the file system refuses it,
the reader reads buffered, evicts the layer's span with posix_fadvise(POSIX_FADV_DONTNEED) after every call,
and says so (`NeuronReader.io_mode`, `ReadStats.direct` False). `requests` shows a call's reads unread.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import as_strided

from flashnb.core import aio
from flashnb.core.defaults import IN_FLIGHT, MAX_REQUEST_BYTES
from flashnb.core.integrity import check_rows
from flashnb.core.io import AlignedBuffer, aligned_empty, evict, open_for_reading, probe_io_align
from flashnb.core.requests import (RequestPlan, as_ids, plan_scatter, plan_staging, read_scatter, read_staging,
                                   scatter_iocbs)
from flashnb.core.manifest import Region
from flashnb.core.store import FlashStore
from flashnb.errors import FlashnbError

BACKENDS = ("auto", "aio", "threads")


@dataclass(frozen=True)
class ReaderConfig:
    """How a NeuronReader reads.

    in_flight: reads kept in flight: the AIO queue depth (backend "aio"), or worker threads each
        issuing one request at a time (backend "threads").
    gap_bytes: merge two spans into one request when at most this many unneeded bytes lie between
        them (0: only adjacent rows merge; `flashnb.device.profile.coalescing_gap` gives a device's
        break-even gap).
    max_request_bytes: longer merged requests are split (bytes) so reads in flight can share them.
    backend: "aio" (Linux native AIO), "threads" (os.preadv from a thread pool), or "auto" (aio
        where the kernel allows it, else threads).
    direct: try O_DIRECT (False: buffered reads + fadvise eviction, e.g. for tests of the fallback).
    io_align: direct-I/O block size in bytes; None = probe (512 where the device accepts it, else 4096).
    verify: check every row read against the store's checksums (flashnb.core.integrity).
    """

    in_flight: int = IN_FLIGHT
    gap_bytes: int = 0
    max_request_bytes: int = MAX_REQUEST_BYTES
    backend: str = "auto"
    direct: bool = True
    io_align: int | None = None
    verify: bool = True


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
    in_flight: int
    direct: bool
    path: str  # "scatter" (straight into the caller's rows) or "staging" (aligned buffer + gather)
    gap_bytes: int
    chunk_sizes: np.ndarray = field(repr=False)  # bytes of each request, in file order
    backend: str = "threads"  # "aio" or "threads": how the requests were issued
    verify_seconds: float = 0.0  # checking the rows' checksums (inside wall_seconds)


@dataclass
class ReadResult:
    """rows: [len(ids), store.row_width] of store.row_dtype, row k = neuron ids[k]; stats."""

    rows: np.ndarray
    stats: ReadStats


class PendingRead:
    """The reads of one `NeuronReader.submit` call; `wait()` completes them (once) and returns the
    ReadResult. The reader takes no other call until then; a PendingRead dropped without `wait()` is
    completed when it is collected, so the reader is never left locked."""

    def __init__(self, reader: "NeuronReader", finish, flying: bool):
        self._reader, self._finish = reader, finish
        self._result: ReadResult | None = None
        self.flying = flying  # the reads are in the kernel's hands until wait() (False: already done)

    def wait(self) -> ReadResult:
        if self._result is None:
            reader, self._reader = self._reader, None
            if reader is None:
                raise FlashnbError("this read failed earlier; submit it again")
            try:
                self._result = self._finish()
            finally:
                reader._release()
        return self._result

    def __del__(self):
        if self._result is None and self._reader is not None:
            try:
                self.wait()
            except Exception:
                pass


class NeuronReader:
    """Reads neuron rows of a FlashStore with direct I/O. Use as a context manager or call `close()`."""

    def __init__(self, store: FlashStore | str | Path, config: ReaderConfig | None = None):
        self.store = store if isinstance(store, FlashStore) else FlashStore.open(store)
        self.store.check_unchanged()
        self.config = cfg = config or ReaderConfig()
        if not isinstance(cfg.in_flight, int) or cfg.in_flight < 1:
            raise FlashnbError(f"reads in flight must be a whole number >= 1, got {cfg.in_flight!r}")
        if cfg.backend not in BACKENDS:
            raise FlashnbError(f"reader backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
        if not isinstance(cfg.gap_bytes, int) or cfg.gap_bytes < 0:
            raise FlashnbError(f"gap_bytes must be a whole number of bytes >= 0, got {cfg.gap_bytes!r}")
        self.fd = -1
        self.fd, self.direct = open_for_reading(self.store.ffn_path, cfg.direct)
        self.io_align = cfg.io_align or (probe_io_align(self.fd) if self.direct else 512)
        self.gap_bytes = cfg.gap_bytes
        self.verify = cfg.verify and self.store.checksum_path is not None
        self._aio = None
        if cfg.backend in ("auto", "aio"):
            try:
                self._aio = aio.acquire(cfg.in_flight)
            except OSError as e:
                if cfg.backend == "aio":
                    os.close(self.fd)
                    self.fd = -1
                    raise FlashnbError(f"native AIO is unavailable here ({e.strerror}); use backend='threads'") from None
        self.backend = "aio" if self._aio is not None else "threads"
        self._pool = None if self._aio is not None else ThreadPoolExecutor(max(1, cfg.in_flight - 1),
                                                                            thread_name_prefix="flashnb-read")
        self._staging: AlignedBuffer | None = None
        regs = self.store.regions(0)
        self._sink = AlignedBuffer(self.gap_bytes + self.io_align + max(r.row_bytes for r in regs))
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread whose read is pending
        self._item = self.store.row_dtype.itemsize
        # region j's rows land at column part_col[j] (bytes) of an output row
        self._part_col = [self.store.parts.index(r.parts[0]) * self.store.row_format.part_bytes for r in regs]
        self._scatter_ok = all(r.row_bytes % self.io_align == 0 for r in regs) and \
            self.store.neuron_bytes % self.io_align == 0

    @property
    def io_mode(self) -> str:
        """How this reader reaches the disk, in words (for reports and the demo)."""
        if self.direct:
            return "direct I/O" + (" (native AIO)" if self.backend == "aio" else " (reader threads)")
        return "buffered (the file system refuses direct I/O; each read evicted from the page cache)"

    def close(self) -> None:
        if self.fd >= 0:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            if self._aio is not None:
                aio.release(self._aio)
                self._aio = None
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

    def read(self, layer: int, ids, out: np.ndarray | None = None) -> ReadResult:
        """Rows [len(ids), row_width] of neurons `ids` of `layer` as stored (flashnb.core.quant). `ids`: any
        integer sequence/array/tensor. `out`: optional C-contiguous destination of that shape and the
        store's row_dtype; block-aligned (e.g. `aligned_empty`) for the zero-copy path.
        """
        return self.submit(layer, ids, out).wait()

    def submit(self, layer: int, ids, out: np.ndarray | None = None) -> PendingRead:
        """Start `read(layer, ids, out)` and return at once: with native AIO the requests are in the
        kernel's hands, so the caller can compute while the disk works; `wait()` completes them and
        returns the ReadResult (the rows are in `out` only then). Without native AIO the reads are
        done here. One call is pending at a time (see the module doc)."""
        me = threading.get_ident()
        if not self._lock.acquire(blocking=False):
            if self._owner == me:
                raise FlashnbError("this thread already has a read pending on this NeuronReader: call wait() on "
                                   "the PendingRead that submit() returned before submitting another")
            self._lock.acquire()  # another thread's read: wait for it
        self._owner = me
        try:
            finish, flying = self._start(layer, ids, out)
        except BaseException:
            self._release()
            raise
        return PendingRead(self, finish, flying)

    def _release(self) -> None:
        self._owner = None
        self._lock.release()

    def _start(self, layer: int, ids, out: np.ndarray | None):
        """Validate, plan and issue the reads; returns the function that completes them, and whether the
        reads are still in flight (native AIO) or already done (reader threads, or nothing to read)."""
        t0 = time.perf_counter()
        if self.fd < 0:
            raise FlashnbError("this NeuronReader is closed; open a new one")
        if self._aio is not None and self._aio.closed:  # an interrupted wait closed it (aio.AioBatch.pump)
            self._aio = aio.acquire(self.config.in_flight)
        st = self.store
        regs = st.regions(layer)
        ids = st.file_rows(layer, as_ids(ids, st.ffn_dim, f"layer {layer} of {st.path}"))  # from here on: file rows
        n = ids.size
        if out is None:
            out = aligned_empty((n, st.row_width), st.row_dtype)
        elif (not isinstance(out, np.ndarray) or out.dtype != st.row_dtype or out.shape != (n, st.row_width)
              or not out.flags.c_contiguous or not out.flags.writeable):
            raise FlashnbError(f"out must be a writeable C-contiguous {st.row_dtype} array of shape "
                               f"{(n, st.row_width)}, got {getattr(out, 'dtype', type(out).__name__)} "
                               f"{getattr(out, 'shape', '')}")
        if n == 0:
            empty = ReadResult(out, self._stats(layer, 0, 0, np.zeros(0, np.int64), 0, t0, "scatter"))
            return (lambda: empty), False
        out_u8 = out.reshape(-1).view(np.uint8)
        uniq, first, inv, scatter, plan = self._plan(regs, ids, out_u8.ctypes.data % self.io_align == 0)
        dst = memoryview(out_u8) if scatter else self._staging_view(int(plan.req_len.sum()))
        base = out_u8.ctypes.data if scatter else self._staging.u8.ctypes.data
        try:
            run = self._start_run(plan, dst, base, scatter)
        except OSError as e:
            raise self._io_error(e) from None

        def finish() -> ReadResult:
            try:
                retries = run()
            except OSError as e:
                raise self._io_error(e) from None
            if not scatter:
                self._gather(plan, regs, uniq.size, first, out)
            verify_s = self._verify(layer, regs, uniq, first, out) if self.verify else 0.0
            if inv is not None and uniq.size < n:  # duplicates: copy from the first occurrence
                dup = np.ones(n, bool)
                dup[first] = False
                out[dup] = out[first[inv[dup]]]
            if not self.direct:
                lo = regs[0].offset
                evict(self.fd, lo, regs[-1].offset + regs[-1].size - lo)
            stats = self._stats(layer, n, uniq.size, plan.req_len, retries, t0, "scatter" if scatter else "staging")
            stats.verify_seconds = verify_s
            return ReadResult(out, stats)

        return finish, self._aio is not None

    def _io_error(self, e: OSError) -> FlashnbError:
        return FlashnbError(f"reading {self.store.ffn_path} failed ({e.strerror or e}): the disk or the kernel "
                            "reported an error; check the disk (dmesg) and the store (`flashnb verify "
                            f"{self.store.path}`), then try again")

    def _verify(self, layer: int, regs, uniq: np.ndarray, first: np.ndarray | None, out: np.ndarray) -> float:
        """Check every row just read against its checksum; seconds spent. One clear error naming the
        first damaged row otherwise."""
        t0 = time.perf_counter()
        for j, (r, sums) in enumerate(zip(regs, self.store.checksums(layer))):
            bad = check_rows(out, first, self._part_col[j], r.row_bytes, sums[uniq])
            if bad.size:
                raise FlashnbError(f"{self.store.ffn_path}: layer {layer} neuron {int(self.store.file_order(layer)[uniq[bad[0]]])} ({r.name}) does not "
                                   f"match its checksum ({bad.size} rows in this read): ffn.bin or its checksums "
                                   f"(ffn.sum) changed, or the disk returned bad data; `flashnb verify "
                                   f"{self.store.path}` says which, then re-create the store")
        return time.perf_counter() - t0

    def _plan(self, regs: tuple[Region, ...], ids: np.ndarray, out_aligned: bool):
        """Unique ids, first occurrences, inverse (None if already sorted and unique), path, plan."""
        n = ids.size
        if n > 1 and bool(np.all(ids[1:] > ids[:-1])):  # sorted and unique: the engine's usual case
            uniq, first, inv = ids, None, None   # first None: row k lands in destination row k
        else:
            uniq, first, inv = np.unique(ids, return_index=True, return_inverse=True)
        scatter = (not self.direct) or (self._scatter_ok and out_aligned)
        cfg = self.config
        plan = (plan_scatter(regs, uniq, first, self.store.neuron_bytes, self._part_col, self.gap_bytes,
                             cfg.max_request_bytes) if scatter
                else plan_staging(regs, uniq, self.io_align, self.gap_bytes, cfg.max_request_bytes))
        return uniq, first, inv, scatter, plan

    def prepare(self, layer: int, rows: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray | None,
                                                                               np.ndarray]:
        """What `submit(layer, ...)` hands the kernel to read the ascending file rows `rows` into the
        block-aligned `out` with direct I/O, built and not issued: the iocbs, the iovecs they point to if any (both
        must stay alive until the requests complete) and each request's bytes. The bench's bare engine
        (flashnb.bench.bare) prepares a token's reads this way before its clock starts."""
        out_u8 = out.reshape(-1).view(np.uint8)
        *_, scatter, plan = self._plan(self.store.regions(layer), rows, out_u8.ctypes.data % self.io_align == 0)
        if not (scatter and self.direct):
            raise FlashnbError(f"prepared reads go straight into their rows with direct I/O, which needs rows of whole "
                               f"blocks: this store's rows are {self.store.neuron_bytes} bytes, the disk's blocks "
                               f"{self.io_align}" + ("" if self.direct else ", and the file system refuses direct I/O"))
        return (*scatter_iocbs(self.fd, plan, out_u8.ctypes.data, self._sink.u8.ctypes.data), plan.req_len)

    def check(self, layer: int, rows: np.ndarray, out: np.ndarray) -> float:
        """Check the ascending file rows `rows` of `layer`, read into `out` in that order, against their
        checksums, as every read does; seconds spent, or one clear error naming the first damaged row."""
        return self._verify(layer, self.store.regions(layer), rows, None, out) if self.verify else 0.0

    def request_sizes(self, layer: int, ids, out_aligned: bool = True) -> np.ndarray:
        """Bytes of every request `read(layer, ids)` would issue: what `flashnb.core.simulate` counts."""
        return self.requests(layer, ids, out_aligned)[1]

    def requests(self, layer: int, ids, out_aligned: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(file offsets, bytes) of every request `read(layer, ids)` would issue (into a block-aligned `out`
        unless `out_aligned` is False), in file order, without reading anything."""
        ids = self.store.file_rows(layer, as_ids(ids, self.store.ffn_dim, f"layer {layer}"))
        plan = self._plan(self.store.regions(layer), ids, out_aligned)[4] if ids.size else None
        return ((np.asarray(plan.req_off, np.int64), np.asarray(plan.req_len, np.int64)) if plan is not None
                else (np.zeros(0, np.int64), np.zeros(0, np.int64)))

    def _stats(self, layer, n, n_u, req_len, retries, t0, path) -> ReadStats:
        return ReadStats(layer=layer, neurons_requested=int(n), neurons_unique=int(n_u), requests=int(req_len.size),
                         retries=int(retries), bytes_needed=int(n_u) * self.store.neuron_bytes,
                         bytes_read=int(req_len.sum()), wall_seconds=time.perf_counter() - t0,
                         in_flight=self.config.in_flight, direct=self.direct, path=path, gap_bytes=self.gap_bytes,
                         chunk_sizes=np.asarray(req_len, dtype=np.int64), backend=self.backend)

    def _staging_view(self, nbytes: int) -> memoryview:
        if self._staging is None or self._staging.nbytes < nbytes:
            self._staging = AlignedBuffer(max(nbytes, 1 << 20))
        return self._staging.view

    def _gather(self, plan: RequestPlan, regs, n_u: int, first: np.ndarray | None, out: np.ndarray) -> None:
        """Copy each unique row from staging into out[first occurrence] (out[k] with `first` None; one fancy index
        per region)."""
        stg = self._staging.u8
        first = slice(0, n_u) if first is None else first
        it = self._item
        for j, pos in plan.gather:
            rb = regs[j].row_bytes
            g = math.gcd(self.io_align, rb)  # every row starts on a multiple of g (see requests.plan_staging)
            rows = as_strided(stg.view(self.store.row_dtype), shape=((stg.size - rb) // g + 1, rb // it),
                              strides=(g, it), writeable=False)
            c0 = self._part_col[j] // it
            out[first, c0:c0 + rb // it] = rows[pos // g]

    # -- executing ---------------------------------------------------------------------------
    def _start_run(self, plan: RequestPlan, dst: memoryview, base: int, scatter: bool):
        """Issue the plan's requests (into `dst`, whose address is `base`); returns the function that
        waits for them and returns the retries (with threads, the reads are already done)."""
        stage = None if scatter else np.concatenate(([0], np.cumsum(plan.req_len)[:-1]))  # staging offsets
        if self._aio is not None:
            return self._start_aio(plan, dst, base, stage)
        retries = self._run_threads(plan, dst, stage)
        return lambda: retries

    def _start_aio(self, plan: RequestPlan, dst: memoryview, base: int, stage: np.ndarray | None):
        """All requests through one AIO context, `in_flight` of them in flight; the returned function waits for
        them, re-reads short or failed ones synchronously (which raises the clear error where the
        file really is short) and returns the retries."""
        if stage is None:  # scatter: iovecs, each run of rows, then its gap (into the sink) where it has one
            cbs, iov = scatter_iocbs(self.fd, plan, base, self._sink.u8.ctypes.data)
        else:
            cbs, iov = aio.pread_iocbs(self.fd, plan.req_off, base + stage, plan.req_len), None
        batch = self._aio.start(cbs)

        def wait() -> int:
            res = batch.wait()
            del batch.iocbs  # the kernel is done with the iocbs (and with `iov`, which they point to)
            bad = np.flatnonzero(res != plan.req_len).tolist()
            again = (lambda i: read_scatter(self.fd, plan, dst, self._sink.view, i, i + 1)) if stage is None \
                else (lambda i: read_staging(self.fd, plan, dst, stage, i, i + 1))
            return len(bad) + sum(again(i) for i in bad)

        wait.iov = iov  # keep the iovecs alive while the requests are in flight
        return wait

    def _run_threads(self, plan: RequestPlan, dst: memoryview, stage: np.ndarray | None) -> int:
        """Issue the plan's requests over the thread pool; returns the retries.

        The requests are cut into batches of similar bytes, in file order: one per thread when there are
        fewer than 4 requests per thread, else of at least 4 requests, up to 32 batches per thread. The
        threads pull batches from a shared counter until none is left, so a slow request delays only its
        own thread's next pull, not a fixed share of the work."""
        nreq = plan.req_off.size
        T = min(self.config.in_flight, nreq)
        nb = min(nreq, 32 * T, max(T, nreq // 4))  # small batches, but not of one request
        cum = np.cumsum(plan.req_len)
        cuts = np.searchsorted(cum, cum[-1] * np.arange(1, nb) / nb, side="left") + 1
        bounds = np.unique(np.concatenate(([0], np.minimum(cuts, nreq), [nreq]))).tolist()
        fd, sink = self.fd, self._sink.view

        def work(a: int, b: int) -> int:
            return read_scatter(fd, plan, dst, sink, a, b) if stage is None else read_staging(fd, plan, dst, stage, a, b)

        if T == 1:
            return work(0, nreq)
        batches = list(zip(bounds[:-1], bounds[1:]))
        counter = itertools.count()

        def pull() -> int:
            retries = 0
            while (i := next(counter)) < len(batches):  # next() on a count is atomic under the GIL
                retries += work(*batches[i])
            return retries

        futures = [self._pool.submit(pull) for _ in range(T - 1)]
        mine = pull()  # the calling thread is the T-th worker
        return mine + sum(f.result() for f in futures)
