"""`flashnb verify`: recompute every SHA-256 a store's manifest records, and say which span is damaged."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from flashnb.core.manifest import HASH_CHUNK, RECREATE
from flashnb.core.store import FlashStore
from flashnb.errors import FlashnbError
from flashnb.text import show_progress


@dataclass(frozen=True)
class VerifyReport:
    """What `verify` checked: regions and bytes hashed, and how long it took (seconds)."""

    store: str
    regions: int
    bytes_hashed: int
    seconds: float


def _hash_span(f, offset: int, size: int) -> str:
    h = hashlib.sha256()
    f.seek(offset)
    left = size
    while left:
        b = f.read(min(left, HASH_CHUNK))
        if not b:
            break
        h.update(b)
        left -= len(b)
    return h.hexdigest()


def _spans(store: FlashStore) -> Iterator[tuple[str, Path, int, int, str]]:
    """(description, file, offset, size, expected sha256) for every checksummed span of a store."""
    d = store.manifest["dram_file"]
    yield "dram tensors", store.dram_path, 0, d["bytes"], d["sha256"]
    c = store.manifest["checksums"]
    yield "bundle checksums", store.checksum_path, 0, c["bytes"], c["sha256"]
    if store.placement_path is not None:
        p = store.manifest["placement"]
        yield "placement", store.placement_path, 0, p["bytes"], p["sha256"]
    for i in range(store.num_layers):
        for r in store.regions(i):
            yield f"layer {i} region {r.name!r} (bytes {r.offset}..{r.offset + r.size})", store.ffn_path, \
                r.offset, r.size, r.sha256


def verify(path: str | Path, progress: bool = True) -> VerifyReport:
    """Recompute every checksum of the store at `path`; one FlashnbError lists all mismatches."""
    from tqdm.auto import tqdm

    store = FlashStore.open(path)
    t0 = time.perf_counter()
    spans = list(_spans(store))
    bad, total = [], 0
    files: dict[Path, object] = {}
    try:
        with tqdm(total=sum(s[3] for s in spans), unit="B", unit_scale=True, desc=f"verify {store.path.name}",
                  disable=not show_progress(progress), leave=False) as bar:
            for what, fpath, off, size, sha in spans:
                f = files.get(fpath) or files.setdefault(fpath, open(fpath, "rb"))
                if _hash_span(f, off, size) != sha:
                    bad.append(f"{fpath.name} {what}")
                total += size
                bar.update(size)
    finally:
        for f in files.values():
            f.close()
    if bad:
        raise FlashnbError(f"store {store.path}: checksum mismatch in {'; '.join(bad)}: the store is damaged; "
                           f"re-create it with {RECREATE}")
    return VerifyReport(str(store.path), len(spans), total, time.perf_counter() - t0)
