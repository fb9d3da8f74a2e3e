"""Linux native asynchronous I/O (io_setup / io_submit / io_getevents) through ctypes.

What fio's `libaio` engine does, without a C extension: a batch of reads is described by numpy arrays
(file offset, destination iovecs), turned into kernel `struct iocb`s in one vectorized step, and kept
`depth` requests in flight with one io_submit and one io_getevents system call per round. With
O_DIRECT the kernel queues every request to the device at once, so per-request cost is a few
microseconds of kernel time instead of a Python thread's round trip.

`available()` says whether this kernel and architecture support it; flashnb.core.reader falls back
to its thread pool where it does not. Interrupted system calls (EINTR) are retried, and so is a
submission the kernel cannot take yet (EAGAIN); any other error is raised as OSError.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import os
import platform
import threading
import time

import numpy as np

from flashnb.core.defaults import IN_FLIGHT

# system call numbers (io_setup, io_destroy, io_submit, io_getevents)
_SYSCALLS = {"x86_64": (206, 207, 209, 208), "aarch64": (0, 1, 2, 4), "arm64": (0, 1, 2, 4)}
IOCB_CMD_PREAD, IOCB_CMD_PREADV = 0, 7

# struct iocb (linux/aio_abi.h, little-endian field order), struct io_event, struct iovec
IOCB = np.dtype([("data", "<u8"), ("key", "<u4"), ("rw_flags", "<i4"), ("opcode", "<u2"), ("reqprio", "<i2"),
                 ("fildes", "<u4"), ("buf", "<u8"), ("nbytes", "<u8"), ("offset", "<i8"), ("reserved2", "<u8"),
                 ("flags", "<u4"), ("resfd", "<u4")])
EVENT = np.dtype([("data", "<u8"), ("obj", "<u8"), ("res", "<i8"), ("res2", "<i8")])
IOVEC = np.dtype([("base", "<u8"), ("len", "<u8")])
assert IOCB.itemsize == 64 and EVENT.itemsize == 32 and IOVEC.itemsize == 16


def _libc():
    lib = ctypes.CDLL(None, use_errno=True)
    lib.syscall.restype = ctypes.c_long
    return lib


class AioContext:
    """One kernel AIO context holding up to `depth` requests in flight. `close()` releases it."""

    def __init__(self, depth: int = IN_FLIGHT):
        nums = _SYSCALLS.get(platform.machine())
        if nums is None or os.name != "posix" or platform.system() != "Linux":
            raise OSError(errno.ENOSYS, f"native AIO is not supported on {platform.system()} {platform.machine()}")
        self._setup, self._destroy, self._submit, self._getevents = nums
        self._lib = _libc()
        self.depth = int(depth)
        ctx = ctypes.c_ulong(0)
        if self._lib.syscall(ctypes.c_long(self._setup), ctypes.c_long(self.depth), ctypes.byref(ctx)) < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"io_setup({self.depth}) failed: {os.strerror(e)}")
        self._ctx = ctx.value
        self._events = np.zeros(self.depth, EVENT)
        self.outstanding = 0  # requests submitted and not yet reaped

    @property
    def closed(self) -> bool:
        return not self._ctx

    def close(self) -> None:
        """Destroy the context (the kernel waits for anything still in flight)."""
        if self._ctx:
            self._lib.syscall(ctypes.c_long(self._destroy), ctypes.c_ulong(self._ctx))
            self._ctx = 0

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def run(self, iocbs: np.ndarray) -> np.ndarray:
        """Submit every iocb (a numpy IOCB array; `data` = its index) keeping `depth` in flight and
        wait for all of them; returns each request's result (bytes read, or -errno), by index."""
        return self.start(iocbs).wait()

    def start(self, iocbs: np.ndarray) -> "AioBatch":
        """Submit the first `depth` iocbs and return at once; `AioBatch.wait()` submits the rest as
        earlier ones complete and returns the results. The caller may compute meanwhile, but must
        not start another batch on this context before waiting (the iocbs must stay alive too)."""
        batch = AioBatch(self, iocbs)
        batch.pump(block=False)
        return batch


class AioBatch:
    """Requests of one AioContext in flight (see `AioContext.start`)."""

    def __init__(self, ctx: AioContext, iocbs: np.ndarray):
        self.ctx, self.iocbs = ctx, iocbs
        self.n = iocbs.size
        self.res = np.zeros(self.n, np.int64)
        self.ptrs = iocbs.ctypes.data + IOCB.itemsize * np.arange(self.n, dtype=np.uint64)
        self.sub = self.done = 0

    def pump(self, block: bool = True) -> None:
        """Keep `depth` requests in flight; with `block`, until every one has completed, else only
        submit (one system call) and return."""
        c = self.ctx
        lib, ctx, ev = c._lib, ctypes.c_ulong(c._ctx), c._events
        busy = 0
        try:
            while self.done < self.n:
                k = min(self.n - self.sub, c.depth - (self.sub - self.done))
                if k > 0:
                    r = lib.syscall(ctypes.c_long(c._submit), ctx, ctypes.c_long(k),
                                    ctypes.c_void_p(self.ptrs.ctypes.data + 8 * self.sub))
                    if r < 0:
                        e = ctypes.get_errno()
                        if e not in (errno.EAGAIN, errno.EINTR):
                            raise OSError(e, f"io_submit failed: {os.strerror(e)}")
                        if self.sub == self.done:  # nothing in flight to wait for: try again shortly
                            busy += 1
                            if busy > 1000:
                                raise OSError(e, f"io_submit failed: {os.strerror(e)} (1000 retries)")
                            time.sleep(0.0001)
                            continue
                    else:
                        self.sub += r
                        c.outstanding += r
                if not block:
                    return
                got = lib.syscall(ctypes.c_long(c._getevents), ctx, ctypes.c_long(1),
                                  ctypes.c_long(c.depth), ctypes.c_void_p(ev.ctypes.data), None)
                if got < 0:
                    e = ctypes.get_errno()
                    if e == errno.EINTR:
                        continue
                    raise OSError(e, f"io_getevents failed: {os.strerror(e)}")
                self.res[ev["data"][:got].astype(np.int64)] = ev["res"][:got]
                self.done += got
                c.outstanding -= got
        except BaseException:
            if self.sub > self.done:  # requests still reference our buffers: let the kernel finish them first
                c.close()
            raise

    def wait(self) -> np.ndarray:
        """Complete every request; each one's result (bytes read, or -errno), by index."""
        self.pump(block=True)
        return self.res


# Destroying a context waits for the kernel (io_destroy took ~35 ms here), so contexts are kept for
# reuse: a reader takes one with `acquire` and gives it back with `release`.
_IDLE: dict[int, list[AioContext]] = {}
_IDLE_MAX = 4
_IDLE_LOCK = threading.Lock()


def acquire(depth: int) -> AioContext:
    """An AIO context of `depth`: an idle one if there is one, else a new one."""
    with _IDLE_LOCK:
        idle = _IDLE.get(depth)
        if idle:
            return idle.pop()
    return AioContext(depth)


def release(ctx: AioContext) -> None:
    """Give back a context; one with requests still in flight, or broken, is closed instead."""
    with _IDLE_LOCK:
        idle = _IDLE.setdefault(ctx.depth, [])
        if not ctx.closed and not ctx.outstanding and len(idle) < _IDLE_MAX:
            idle.append(ctx)
            return
    ctx.close()


@atexit.register
def _close_idle() -> None:
    with _IDLE_LOCK:
        for idle in _IDLE.values():
            for ctx in idle:
                ctx.close()
        _IDLE.clear()


def available() -> bool:
    """True where a native AIO context can be created (Linux x86-64 / arm64 with io_setup allowed)."""
    try:
        release(acquire(1))
        return True
    except OSError:
        return False


def pread_iocbs(fd: int, offsets: np.ndarray, addrs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """IOCBs reading lengths[i] bytes at offsets[i] into the buffer at address addrs[i]."""
    cb = np.zeros(offsets.size, IOCB)
    cb["data"] = np.arange(offsets.size)
    cb["opcode"] = IOCB_CMD_PREAD
    cb["fildes"] = fd
    cb["buf"] = addrs
    cb["nbytes"] = lengths
    cb["offset"] = offsets
    return cb


def preadv_iocbs(fd: int, offsets: np.ndarray, iov: np.ndarray, iov_start: np.ndarray) -> np.ndarray:
    """IOCBs reading at offsets[i] into the iovecs iov[iov_start[i]:iov_start[i + 1]] (an IOVEC array
    that must stay alive until the requests complete)."""
    n = offsets.size
    cb = np.zeros(n, IOCB)
    cb["data"] = np.arange(n)
    cb["opcode"] = IOCB_CMD_PREADV
    cb["fildes"] = fd
    cb["buf"] = iov.ctypes.data + IOVEC.itemsize * iov_start[:-1].astype(np.uint64)
    cb["nbytes"] = np.diff(iov_start)
    cb["offset"] = offsets
    return cb
