"""A store's integrity while it is used: a checksum per bundle, checked as each bundle is read; the
DRAM file's checksum, checked when it is loaded; and the files' identity, so that a store whose files
changed since it was opened is refused instead of read with a stale manifest.

The checksum is XXH3-64 (the `xxhash` library): about 20 GB/s per core and a C call per bundle, so
checking the ~330 bundles the shipped model reads per token costs a fraction of a millisecond, where
SHA-256 (the manifest's, for `flashnb verify`) would cost ten times that. CRC32C runs at a similar rate
only with hardware support; XXH3 is as fast everywhere. It detects corruption (a flipped bit, a torn or
misplaced write, a file rewritten underneath), not tampering: that is `verify`'s SHA-256.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from flashnb.errors import FlashnbError

ALGORITHM = "xxh3_64"
DIGEST = np.dtype("<u8")
_CHUNK = 8 << 20


def bundle_digests(rows: np.ndarray) -> np.ndarray:
    """XXH3-64 of every row of a C-contiguous 2-D array (one bundle, or one matrix's slice, per row)."""
    b = np.ascontiguousarray(rows).view(np.uint8).reshape(-1)
    n = rows.shape[0]
    step = b.size // n if n else 0
    mv = memoryview(b)
    return np.fromiter((xxhash.xxh3_64_intdigest(mv[i * step:(i + 1) * step]) for i in range(n)), DIGEST, n)


def check_rows(out: np.ndarray, first: np.ndarray, col_bytes: int, row_bytes: int, expected: np.ndarray) -> np.ndarray:
    """Positions k where the bytes [col_bytes, col_bytes + row_bytes) of row first[k] of `out` do not
    hash to expected[k] (empty when every bundle is intact)."""
    mv = memoryview(out.reshape(-1).view(np.uint8))
    stride = out.shape[1] * out.itemsize
    digest = xxhash.xxh3_64_intdigest
    got = np.fromiter((digest(mv[s:s + row_bytes]) for s in (first * stride + col_bytes).tolist()), DIGEST,
                      first.size)
    return np.flatnonzero(got != expected)


def file_digest(path: Path) -> str:
    """XXH3-64 of a whole file, as 16 hex digits."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class FileIdentity:
    """What says a file is still the one that was opened: size, modification time, inode."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> "FileIdentity":
        st = os.stat(path)
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


def check_identity(path: Path, then: FileIdentity, store: Path) -> None:
    """One clear error unless `path` is still the file recorded as `then` when the store was opened."""
    try:
        now = FileIdentity.of(path)
    except OSError as e:
        raise FlashnbError(f"{path} is gone since store {store} was opened ({e.strerror}); open the store "
                           "again") from None
    if now != then:
        raise FlashnbError(f"{path} changed since store {store} was opened (re-converted or rewritten); open "
                           "the store again (flashnb.open_store) before using it")
