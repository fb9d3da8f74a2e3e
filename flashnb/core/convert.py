"""Writing a flash store (format: flashnb.core.store) from a Hugging Face checkpoint folder.

`convert` streams the checkpoint one tensor at a time (a layer's FFN matrices at most) into a
temporary folder next to the destination and renames it when complete, so the destination is either
a whole store or absent; the source folder is only read. It never deletes what it did not write:
`--force` (overwrite) replaces only a flashnb store holding nothing but its own files, and never the
source or a folder that holds it; the leftovers of a killed convert are cleaned up by the next one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import xxhash

from flashnb.core.defaults import ALIGNMENT
from flashnb.core.integrity import ALGORITHM, DIGEST, FILE_ALGORITHM, row_digests
from flashnb.core.manifest import (CHECKSUM_FILE, DRAM_FILE, DTYPES, FFN_FILE, FORMAT, FORMAT_VERSION, LAYOUTS,
                                   MANIFEST, PLACEMENT_FILE, TOKENIZER, Region, align_up, flash_parts)
from flashnb.core.placement import Placement
from flashnb.core.quant import FFN_DTYPES, GROUP, RowFormat
from flashnb.errors import FlashnbError
from flashnb.models.checkpoint import (TensorIndex, ffn_matrix_names, ffn_param, meta_model, read_config,
                                       regular_file)
from flashnb.models.fingerprint import fingerprint
from flashnb.models.tokenizer import Tokenizer
from flashnb.paths import missing_folder, pid_alive
from flashnb.text import show_progress


@dataclass
class ConvertConfig:
    """Options of `convert`. layout: 'bundled' | 'unbundled' | 'gate-apart' (gated FFNs: the gate in DRAM);
    dtype: the FFN rows' 'fp16' | 'fp32', or 'int8' | 'q4' (quantized, flashnb.core.quant); dram: the DRAM
    tensors' (and the computation's) 'fp16' | 'fp32', None for `dtype` itself (fp16 for quantized rows);
    placement: the neurons' order on flash (flashnb.core.placement), None for neuron i at row i."""

    layout: str = "bundled"
    dtype: str = "fp16"
    overwrite: bool = False
    progress: bool = True
    placement: Placement | None = None
    dram: str | None = None

    @property
    def dram_dtype(self) -> str:
        return self.dram or (self.dtype if self.dtype in DTYPES else "fp16")


class _Hasher:
    """Writes bytes to a file while hashing them; pads with zeros to an alignment."""

    def __init__(self, f):
        self.f, self.pos = f, 0

    def write(self, data, *hashes) -> None:
        mv = memoryview(data).cast("B")
        for h in hashes:
            h.update(mv)
        self.f.write(mv)
        self.pos += mv.nbytes

    def pad_to(self, a: int) -> None:
        n = align_up(self.pos, a) - self.pos
        if n:
            self.f.write(b"\0" * n)
            self.pos += n


def _sample(samples: dict, name: str, w: torch.Tensor) -> None:
    """Keep what the model's fingerprint reads of weight `name`: its first and last two rows."""
    samples[name] = torch.cat([w[:2], w[-2:]]).clone()


def _layer_rows(index, config, layer: int, fmt: RowFormat, samples: dict, parts: list[str]) -> list[torch.Tensor]:
    """The FFN matrices `parts` of `layer`, each as [ffn, d] neuron-major rows stored in format `fmt`
    ([ffn, fmt.part_width] of fmt.dtype)."""
    d, f = config.hidden_size, config.ffn_dim
    out = []
    for part, orient in config.ffn_parts:
        if part not in parts:
            continue
        shape = (f, d) if orient == "row" else (d, f)
        w = index.get(config.hf_key(ffn_param(layer, part)), shape)
        _sample(samples, ffn_param(layer, part), w)
        out.append(torch.from_numpy(fmt.encode(w if orient == "row" else w.t())))
    return out


def _write_dram(path: Path, index, config, items: list[tuple[str, tuple[int, ...]]],
                dtype: str, tick: Callable[[], None], samples: dict) -> tuple[str, str]:
    """Write the DRAM tensors as a safetensors file one tensor at a time; returns its sha256 and XXH3-64.

    safetensors' own save_file serializes everything in memory first (the DRAM part twice); writing
    the header ourselves lets a multi-GB model stream through with one tensor in memory at a time.
    """
    tdtype, npdtype, tag = DTYPES[dtype]
    header: dict[str, dict] = {"__metadata__": {"format": "pt", "writer": "flashnb"}}
    off = 0
    for name, shape in items:
        n = int(np.prod(shape, dtype=np.int64)) * npdtype.itemsize
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (align_up(len(hjson), 8) - len(hjson))
    h, x = hashlib.sha256(), xxhash.xxh3_64()
    with open(path, "wb") as f:
        w = _Hasher(f)
        w.write(struct.pack("<Q", len(hjson)), h, x)
        w.write(hjson, h, x)
        for name, shape in items:
            t = index.get(config.hf_key(name), shape)
            if name == "embed_tokens.weight" or name in ffn_matrix_names(config):
                _sample(samples, name, t)
            t = t.to(tdtype).contiguous()
            w.write(t.numpy().view(np.uint8) if t.numel() else b"", h, x)
            tick()
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest(), x.hexdigest()


def convert(src: str | Path, dst: str | Path, cfg: ConvertConfig | None = None) -> Path:
    """Convert the Hugging Face folder `src` into a flash store folder `dst`; returns `dst`.

    Reads one tensor at a time (a layer's FFN matrices at most), writes into a temporary folder next
    to `dst` and renames it when complete, so `dst` is either a whole store or absent. `src` is only
    read.
    """
    cfg = cfg or ConvertConfig()
    if cfg.layout not in LAYOUTS:
        raise FlashnbError(f"unknown layout {cfg.layout!r}; choose one of {', '.join(LAYOUTS)}")
    src, dst = Path(src), Path(os.path.abspath(dst))  # absolute: "." can be renamed as its full path
    config = read_config(src)
    index = TensorIndex(src)
    tokenizer = regular_file(src / TOKENIZER, "tokenizer.json") if (src / TOKENIZER).exists() else None
    if tokenizer is not None:   # a store gets the model's own tokenizer or none: checked before it is copied
        words = Tokenizer.from_folder(src).vocab_size
        if words > config.vocab_size:
            raise FlashnbError(f"{tokenizer} has {words} tokens, more than the model's vocabulary of "
                               f"{config.vocab_size} (config.json): it belongs to another model; put the model's "
                               "own tokenizer.json beside it")
    source = {"folder": str(src.resolve()), "files": [f.name for f in index.files]}
    return write_store(dst, config, json.loads((src / "config.json").read_text()), index, cfg, tokenizer, source,
                       check=lambda: check_destination(src, dst, cfg.overwrite))


def write_store(dst: str | Path, config, model_config: dict, tensors, cfg: ConvertConfig,
                tokenizer: Path | None = None, source: dict | None = None, check=None) -> Path:
    """Write a store of `config`'s model at `dst` from `tensors` (anything with `get(key, shape)`
    returning a tensor for a Hugging Face key, as flashnb.models.checkpoint.TensorIndex does);
    `model_config` is the config.json the manifest keeps. Atomic: a temporary folder next to `dst`,
    renamed when complete; `check()` (default: refuse an existing `dst` unless cfg.overwrite allows
    replacing a store) runs before and after writing."""
    dst = Path(os.path.abspath(dst))
    flash_parts(config, cfg.layout)  # one clear error for a layout the model cannot have ...
    if cfg.dtype not in FFN_DTYPES:
        raise FlashnbError(f"unknown store dtype {cfg.dtype!r}; choose one of {', '.join(FFN_DTYPES)}")
    RowFormat(cfg.dtype, config.hidden_size)  # ... or a row format it cannot have
    if cfg.dram_dtype not in DTYPES:
        raise FlashnbError(f"unknown DRAM dtype {cfg.dram!r}; choose one of {', '.join(DTYPES)}")
    want = (config.num_hidden_layers, config.ffn_dim)
    if cfg.placement is not None and tuple(cfg.placement.order.shape) != want:
        raise FlashnbError(f"the placement orders {cfg.placement.order.shape[0]} layers x {cfg.placement.order.shape[1]} "
                           f"neurons, this model has {want[0]} x {want[1]}: it belongs to another model; learn one for "
                           "this model with `flashnb train-predictors --placement-only --model SOURCE`")
    check = check or (lambda: check_replaceable(dst, cfg.overwrite))
    if not dst.parent.is_dir():
        raise FlashnbError(f"cannot write the store {dst}: {missing_folder(dst.parent)}; give a path inside an "
                           "existing folder")
    _recover_interrupted(dst)
    check()
    tmp = _temporary_folder(dst)
    try:
        try:
            _write_store(tmp, config, model_config, tensors, cfg, dst.name, tokenizer, source or {})
        except OSError as e:
            raise _os_error(e, dst.parent) from None
        check()  # again: the folder may have changed while we wrote
        if dst.exists():  # overwrite: move the old store aside first so dst is never half-written
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _temporary_folder(dst: Path) -> Path:
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
    except FileExistsError:
        raise FlashnbError(f"{tmp} already exists; remove it (a temporary folder of flashnb's) and convert "
                           "again") from None
    except OSError as e:
        raise FlashnbError(f"cannot write the store {dst}: creating a folder in {dst.parent} failed ({e.strerror}); "
                           "convert into a folder you can write to") from None
    return tmp


def _write_store(out: Path, config, model_config: dict, index, cfg: ConvertConfig, name: str,
                 tokenizer_file: Path | None, source: dict) -> None:
    """Write every file of a store into the folder `out`: DRAM tensors, FFN and its checksums,
    tokenizer, manifest last."""
    from tqdm.auto import tqdm

    flash, in_dram = flash_parts(config, cfg.layout)
    ffn_names = ffn_matrix_names(config) - {ffn_param(i, p) for i in range(config.num_hidden_layers) for p in in_dram}
    dram_items = [(n, tuple(p.shape)) for n, p in meta_model(config).named_parameters() if n not in ffn_names]
    samples: dict[str, torch.Tensor] = {}
    with tqdm(total=len(dram_items) + config.num_hidden_layers, desc=f"convert {name}", unit="tensor",
              disable=not show_progress(cfg.progress), leave=False) as bar:
        dram_sha, dram_xxh = _write_dram(out / DRAM_FILE, index, config, dram_items, cfg.dram_dtype,
                                         lambda: bar.update(1), samples)
        layers, sums_sha = _write_ffn(out / FFN_FILE, out / CHECKSUM_FILE, index, config, cfg,
                                      lambda: bar.update(1), samples)
    model_fingerprint = fingerprint(config, samples.__getitem__)
    placement = None
    if cfg.placement is not None:
        mapped = cfg.placement.fingerprint is None and "synthetic" in source  # flashnb.bench.scale's random weights
        if cfg.placement.fingerprint != model_fingerprint and not mapped:
            raise FlashnbError(f"the placement belongs to another model (fingerprint {cfg.placement.fingerprint}, "
                               f"this one is {model_fingerprint}): learn one for this model with `flashnb "
                               "train-predictors --placement-only --model SOURCE`")
        data = cfg.placement.order.astype("<i4").tobytes()
        (out / PLACEMENT_FILE).write_bytes(data)
        placement = {"name": PLACEMENT_FILE, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                     "tokens": cfg.placement.tokens, "source": cfg.placement.source}
    tokenizer = None
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, out / TOKENIZER)
        tokenizer = TOKENIZER
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model_type": config.model_type,
        "model_config": model_config, "dtype": cfg.dram_dtype, "ffn_dtype": cfg.dtype,
        **({"group": GROUP} if cfg.dtype not in DTYPES else {}), "layout": cfg.layout,
        "alignment": ALIGNMENT, "d_model": config.hidden_size, "ffn_dim": config.ffn_dim,
        "num_layers": config.num_hidden_layers, "parts": flash, **({"dram_parts": in_dram} if in_dram else {}),
        "fingerprint": model_fingerprint, "placement": placement,
        "ffn_file": {"name": FFN_FILE, "bytes": (out / FFN_FILE).stat().st_size},
        "checksums": {"name": CHECKSUM_FILE, "algorithm": ALGORITHM, "bytes": (out / CHECKSUM_FILE).stat().st_size,
                      "sha256": sums_sha},
        "dram_file": {"name": DRAM_FILE, "bytes": (out / DRAM_FILE).stat().st_size, "sha256": dram_sha,
                      FILE_ALGORITHM: dram_xxh, "tensors": len(dram_items)},
        "tokenizer": tokenizer,
        "layers": [[r.to_json() for r in regs] for regs in layers],
        "source": source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _os_error(e: OSError, folder: Path) -> FlashnbError:
    """An OS error while writing a store, as one line naming the place and the fix."""
    fix = {errno.ENOSPC: "free some space or convert onto another disk",
           errno.EDQUOT: "free some of your disk quota or convert onto another disk",
           errno.EFBIG: "raise the file size limit (ulimit -f) or convert onto another file system",
           errno.EROFS: "the file system is read-only: convert into a folder on a writable disk",
           errno.EACCES: "convert into a folder you may write to",
           errno.EPERM: "convert into a folder you may write to"}.get(e.errno, "check the disk and the folder")
    where = e.filename or folder
    return FlashnbError(f"writing the store in {folder} failed at {where} ({e.strerror or e}); {fix}")


STORE_NAMES = frozenset({MANIFEST, DRAM_FILE, FFN_FILE, CHECKSUM_FILE, TOKENIZER, PLACEMENT_FILE})  # what convert writes


def _store_files(folder: Path) -> set[str] | None:
    """The file names a store folder's manifest lists (manifest.json included), or None when `folder`
    holds no readable flashnb manifest."""
    try:
        m = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return None
    names = {MANIFEST}
    for key in ("ffn_file", "dram_file", "checksums", "placement"):
        entry = m.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            names.add(entry["name"])
    if isinstance(m.get("tokenizer"), str):
        names.add(m["tokenizer"])
    return names


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse, with one clear error, every destination whose replacement could lose a file that
    flashnb did not write: the source folder, a folder inside it or holding it, a file, a symbolic
    link, and (even with --force) any existing folder that is not a flashnb store or that holds
    files besides the store's own. An empty folder is used as it is."""
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents:
        raise FlashnbError(f"store {dst} would be written inside the source folder {src}; choose a "
                           "store path outside it (the source checkpoint is never modified)")
    if d in s.parents:
        raise FlashnbError(f"store {dst} contains the source folder {src}; choose a store path that does "
                           "not hold the checkpoint (replacing it would delete the source)")
    check_replaceable(dst, overwrite)


def check_replaceable(dst: Path, overwrite: bool) -> None:
    """Refuse a store path that is a file or a link, or an existing folder that is not a flashnb store
    holding only its own files (and any store without `overwrite`). An empty folder is accepted; so is,
    with `overwrite`, a store whose manifest is damaged when it holds nothing but store file names."""
    if dst.is_symlink():
        raise FlashnbError(f"{dst} is a symbolic link; give the store's real path (flashnb does not "
                           "replace links)")
    if not dst.exists():
        return
    if not dst.is_dir():
        raise FlashnbError(f"{dst} is a file, not a store folder; choose another store path "
                           "(flashnb never replaces a file)")
    if not any(dst.iterdir()):
        return  # an empty folder: nothing in it to lose
    own = _store_files(dst)
    if own is None and (dst / FFN_FILE).is_file() and (dst / MANIFEST).is_file() and all(
            f.is_file() and f.name in STORE_NAMES for f in dst.iterdir()):
        own = STORE_NAMES  # a store whose manifest is damaged: its files, and nothing else
    if own is None:
        raise FlashnbError(f"{dst} exists and is not a flashnb store (no {MANIFEST} of format {FORMAT!r}); "
                           "flashnb replaces only its own stores: choose another store path")
    if not overwrite:
        raise FlashnbError(f"{dst} is a flashnb store already; pass --force to replace it, or choose another "
                           "store path")
    extra = sorted(p.name for p in dst.iterdir() if p.name not in own or not p.is_file())
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise FlashnbError(f"{dst} is a flashnb store but also holds {shown}, which flashnb did not write; "
                           "--force will not delete them: move them out first, or choose another store path")


def _recover_interrupted(dst: Path) -> None:
    """Clean up after a convert to `dst` that was killed (SIGKILL, power loss) by a process no longer
    alive: its unfinished temporary folder `.NAME.tmp-PID` is removed; an old store it had moved
    aside (`.NAME.old-PID`) is put back when `dst` is missing, else removed. Only folders holding
    nothing but store files are touched; each is named on stderr."""
    allowed = STORE_NAMES
    for kind in ("tmp", "old"):
        for p in sorted(dst.parent.glob(f".{dst.name}.{kind}-*")):
            pid = p.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or pid_alive(int(pid)) or not p.is_dir() or p.is_symlink():
                continue
            if any(not f.is_file() or f.name not in allowed for f in p.iterdir()):
                continue
            if kind == "old" and not dst.exists() and not dst.is_symlink():
                os.replace(p, dst)
                print(f"flashnb: restored the store {dst} that an interrupted convert (process {pid}) had "
                      "moved aside", file=sys.stderr)
            else:
                shutil.rmtree(p)
                print(f"flashnb: removed {p}, left by an interrupted convert (process {pid})", file=sys.stderr)


def _write_ffn(path: Path, sums_path: Path, index, config, cfg: ConvertConfig,
               tick: Callable[[], None], samples: dict) -> tuple[list[list[Region]], str]:
    """Write ffn.bin layer by layer and every row's checksum into `sums_path`; returns each layer's
    regions (offsets, sizes, sha256) and the checksum file's sha256."""
    parts = flash_parts(config, cfg.layout)[0]
    d, f_dim = config.hidden_size, config.ffn_dim
    fmt = RowFormat(cfg.dtype, d)
    layers: list[list[Region]] = []
    digests = []
    with open(path, "wb") as f:
        w = _Hasher(f)
        for layer in range(config.num_hidden_layers):
            mats = _layer_rows(index, config, layer, fmt, samples, parts)  # each [ffn, part_width]
            if cfg.placement is not None:  # file row r holds neuron order[r]
                order = torch.from_numpy(cfg.placement.order[layer])
                mats = [m.index_select(0, order) for m in mats]
            if cfg.layout != "unbundled":
                groups = [("bundles", tuple(parts), torch.cat(mats, dim=1))]
            else:
                groups = [(p, (p,), m) for p, m in zip(parts, mats)]
            regs = []
            for name, rparts, rows in groups:
                w.pad_to(ALIGNMENT)
                h = hashlib.sha256()
                off = w.pos
                w.write(rows.numpy().view(np.uint8), h)
                digests.append(row_digests(rows.numpy()))
                regs.append(Region(name, off, w.pos - off, f_dim, len(rparts) * fmt.part_bytes,
                                   rparts, h.hexdigest()))
            layers.append(regs)
            del mats, groups
            tick()
        w.pad_to(ALIGNMENT)  # aligned reads of the last rows never run past the end of the file
        f.flush()
        os.fsync(f.fileno())
    table = np.concatenate(digests).astype(DIGEST).tobytes()
    sums_path.write_bytes(table)
    return layers, hashlib.sha256(table).hexdigest()
