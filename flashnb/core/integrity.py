"""A store's integrity while it is used: a checksum per bundle, checked as each bundle is read; the
DRAM file's checksum, checked when it is loaded; and the files' identity, so that a store whose files
changed since it was opened is refused instead of read with a stale manifest.

The bundle checksum is a multilinear hash over the row's 64-bit words, h = sum_i w_i * x_i mod 2^64,
with fixed odd multipliers w_i (SplitMix64 of the word index): a universal hash family (Carter and
Wegman) that detects every single-bit or single-word error and misses random corruption with
probability about 2^-64. Its point is speed where the reader needs it: numpy computes it for every row
of a read in one vectorized call (einsum over uint64, about 16 GB/s here), where a per-row call of a
library hash (XXH3 through Python: 0.5 µs a row) would cost naive's 12,288 rows per token 6 ms. Whole
files (the DRAM tensors) are checked with XXH3-64 (the `xxhash` library, 20+ GB/s); `flashnb verify`
recomputes the manifest's SHA-256. These detect corruption (a flipped bit, a torn or misplaced write, a
file rewritten underneath), not tampering.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from flashnb.errors import FlashnbError

ALGORITHM = "multilinear64"   # the bundles' checksum (see the module doc)
FILE_ALGORITHM = "xxh3_64"    # whole files
DIGEST = np.dtype("<u8")
_CHUNK = 8 << 20


@functools.lru_cache(maxsize=16)
def _multipliers(n: int) -> np.ndarray:
    """n fixed odd 64-bit multipliers: SplitMix64 of 1..n (deterministic everywhere)."""
    with np.errstate(over="ignore"):
        x = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x | np.uint64(1)


def row_digests(rows: np.ndarray) -> np.ndarray:
    """The checksum of every row of a 2-D array (any dtype); a row whose bytes are not a whole number of
    64-bit words (a quantized row of a small model, flashnb.core.quant) is hashed as if zeros filled it up."""
    words = np.ascontiguousarray(rows).view(np.uint8).reshape(rows.shape[0], -1)
    if words.shape[1] % 8:
        words = np.pad(words, ((0, 0), (0, -words.shape[1] % 8)))
    words = words.view(DIGEST)
    return np.einsum("ij,j->i", words, _multipliers(words.shape[1]))


def check_rows(out: np.ndarray, first: np.ndarray | None, col_bytes: int, row_bytes: int,
               expected: np.ndarray) -> np.ndarray:
    """Positions k where bytes [col_bytes, col_bytes + row_bytes) of row first[k] of `out` (row k when
    `first` is None) do not match the checksum expected[k] (empty when every bundle is intact)."""
    b = out.view(np.uint8).reshape(out.shape[0], -1)[:, col_bytes:col_bytes + row_bytes]
    rows = b[:expected.size] if first is None else b[first]  # rows in order need no gather
    return np.flatnonzero(row_digests(rows) != expected)


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
