"""Direct I/O basics: page-aligned buffers and the file operations the reader and the profile share.

The store's FFN file is opened with os.O_DIRECT (no page cache: the paper's F_NOCACHE), which needs
buffers, offsets and lengths aligned to the device's block (512 B or 4 KiB). Where the file system
refuses O_DIRECT, reads fall back to buffered I/O and the caller evicts what it read with
posix_fadvise(POSIX_FADV_DONTNEED), so that every read still comes from the device.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from flashnb.errors import FlashnbError

PAGE = mmap.PAGESIZE
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
O_DIRECT = getattr(os, "O_DIRECT", 0)


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


def preadv_full(fd: int, iov: list[memoryview], offset: int) -> int:
    """Read exactly sum(len(iov)) bytes at `offset` into the buffers `iov`; returns the retries.

    Short reads continue where they stopped; EINTR and EAGAIN are retried. Raises FlashnbError at end
    of file.
    """
    want = sum(v.nbytes for v in iov)
    done = retries = 0
    while True:
        try:
            n = os.preadv(fd, iov, offset + done)
        except (InterruptedError, BlockingIOError):
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
    if direct and O_DIRECT:
        try:
            return os.open(path, os.O_RDONLY | O_DIRECT), True
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
