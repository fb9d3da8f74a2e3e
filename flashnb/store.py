"""The flash store: a model converted so that its FFN weights can be read neuron by neuron from flash.

A store is a folder:

    manifest.json      format version, the model's HF config, dtype, layout, alignment, and for every
                       layer the byte offset, size and sha256 of each FFN region in ffn.bin
    dram.safetensors   every tensor that stays in DRAM (embeddings, attention, norms, FFN biases),
                       under flashnb's parameter names
    ffn.bin            the FFN weight matrices, one region group per layer, each region starting on an
                       `alignment` (4096-byte) boundary so direct I/O can read it
    tokenizer.json     copied from the source folder (when it has one)

Neuron i of a layer is row i of the up projection(s) and column i of the down projection. The layout
decides where its values lie in ffn.bin:

    bundled    one region `bundles` of shape [ffn_dim, P * d_model]: neuron i's row is
               [up[i, :], down[:, i]] (OPT: fc1, fc2; Llama: gate, up, down; P = 2 or 3), so one
               contiguous read of P * d_model values fetches the whole neuron (row-column bundling).
    unbundled  one region per matrix, each [ffn_dim, d_model] neuron-major: the up matrices as in the
               checkpoint, the down matrix transposed. A neuron then costs P separate reads.

Either way a store row for neuron i, assembled part after part, is the same P * d_model vector; the
reader (flashnb.reader) returns exactly those rows.

`convert` writes a store (streaming one tensor at a time, into a temporary folder renamed when
complete; the source is never modified), `FlashStore.open` validates and opens one, `verify`
recomputes every checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from flashnb.checkpoint import CONFIGS, MODELS, TensorIndex, architecture, materialize, read_config
from flashnb.errors import FlashnbError

FORMAT = "flashnb-store"
FORMAT_VERSION = 1
ALIGNMENT = 4096  # bytes; every FFN region starts on a multiple of this (direct I/O needs it)
LAYOUTS = ("bundled", "unbundled")
MANIFEST, DRAM_FILE, FFN_FILE, TOKENIZER = "manifest.json", "dram.safetensors", "ffn.bin", "tokenizer.json"

# store dtype name -> (torch dtype, numpy dtype, safetensors dtype tag)
DTYPES: dict[str, tuple[torch.dtype, np.dtype, str]] = {
    "fp16": (torch.float16, np.dtype("<f2"), "F16"),
    "fp32": (torch.float32, np.dtype("<f4"), "F32"),
}

# The FFN weight matrices of each architecture, in bundle order: (name in the FFN module, orientation).
# "row": the matrix is [ffn, d] and neuron i is row i; "col": it is [d, ffn] and neuron i is column i.
FFN_PARTS: dict[str, tuple[tuple[str, str], ...]] = {
    "opt": (("fc1", "row"), ("fc2", "col")),
    "llama": (("gate_proj", "row"), ("up_proj", "row"), ("down_proj", "col")),
}

_COPY_CHUNK = 8 << 20  # bytes per piece when hashing or copying files


def ffn_param(layer: int, part: str) -> str:
    """flashnb's parameter name of FFN matrix `part` ("fc1", "down_proj", ...) of `layer`."""
    return f"layers.{layer}.ffn.{part}.weight"


def _align(n: int, a: int = ALIGNMENT) -> int:
    return -(-n // a) * a


# ----------------------------------------------------------------------------------------------
# Manifest data


@dataclass(frozen=True)
class Region:
    """One contiguous, aligned span of ffn.bin holding one row per neuron of one layer.

    offset, size and row_bytes are in bytes; row r (neuron r) occupies
    [offset + r * row_bytes, offset + (r + 1) * row_bytes). `parts` names the FFN matrices whose
    neuron slices make up a row, in order (one for unbundled regions, all of them for `bundles`).
    """

    name: str
    offset: int
    size: int
    rows: int
    row_bytes: int
    parts: tuple[str, ...]
    sha256: str

    def to_json(self) -> dict:
        return {"name": self.name, "offset": self.offset, "size": self.size, "rows": self.rows,
                "row_bytes": self.row_bytes, "parts": list(self.parts), "sha256": self.sha256}


@dataclass(frozen=True)
class VerifyReport:
    """What `verify` checked: regions and bytes hashed, and how long it took (seconds)."""

    store: str
    regions: int
    bytes_hashed: int
    seconds: float


# ----------------------------------------------------------------------------------------------
# Converting


@dataclass
class ConvertConfig:
    """Options of `convert`. layout: 'bundled' | 'unbundled'; dtype: 'fp16' | 'fp32'."""

    layout: str = "bundled"
    dtype: str = "fp16"
    overwrite: bool = False
    progress: bool = True


def _meta_model(config) -> torch.nn.Module:
    with torch.device("meta"):
        return MODELS[config.model_type](config)


def _ffn_matrix_names(config) -> set[str]:
    return {ffn_param(i, p) for i in range(config.num_hidden_layers) for p, _ in FFN_PARTS[config.model_type]}


class _Hasher:
    """Writes bytes to a file while hashing them; pads with zeros to an alignment."""

    def __init__(self, f):
        self.f, self.pos = f, 0

    def write(self, data, h: "hashlib._Hash | None" = None) -> None:
        mv = memoryview(data).cast("B")
        if h is not None:
            h.update(mv)
        self.f.write(mv)
        self.pos += mv.nbytes

    def pad_to(self, a: int) -> None:
        n = _align(self.pos, a) - self.pos
        if n:
            self.f.write(b"\0" * n)
            self.pos += n


def _layer_rows(index: TensorIndex, arch, config, layer: int, tdtype: torch.dtype) -> list[torch.Tensor]:
    """The FFN matrices of `layer`, each as [ffn, d] neuron-major rows in the store dtype."""
    d, f = config.hidden_size, config.ffn_dim
    out = []
    for part, orient in FFN_PARTS[config.model_type]:
        shape = (f, d) if orient == "row" else (d, f)
        w = index.get(arch.hf_key(ffn_param(layer, part)), shape).to(tdtype)
        out.append(w.contiguous() if orient == "row" else w.t().contiguous())
    return out


def _write_dram(path: Path, index: TensorIndex, arch, items: list[tuple[str, tuple[int, ...]]],
                dtype: str, tick: Callable[[], None]) -> str:
    """Write the DRAM tensors as a safetensors file one tensor at a time; returns its sha256.

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
    hjson += b" " * (_align(len(hjson), 8) - len(hjson))
    h = hashlib.sha256()
    with open(path, "wb") as f:
        w = _Hasher(f)
        w.write(struct.pack("<Q", len(hjson)), h)
        w.write(hjson, h)
        for name, shape in items:
            t = index.get(arch.hf_key(name), shape).to(tdtype).contiguous()
            w.write(t.numpy().view(np.uint8) if t.numel() else b"", h)
            tick()
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def convert(src: str | Path, dst: str | Path, cfg: ConvertConfig | None = None) -> Path:
    """Convert the Hugging Face folder `src` into a flash store folder `dst`; returns `dst`.

    Reads one tensor at a time (a layer's FFN matrices at most), writes into a temporary folder next
    to `dst` and renames it when complete, so `dst` is either a whole store or absent. `src` is only
    read.
    """
    cfg = cfg or ConvertConfig()
    if cfg.layout not in LAYOUTS:
        raise FlashnbError(f"unknown layout {cfg.layout!r}; choose one of {', '.join(LAYOUTS)}")
    if cfg.dtype not in DTYPES:
        raise FlashnbError(f"unknown store dtype {cfg.dtype!r}; choose one of {', '.join(DTYPES)}")
    src, dst = Path(src), Path(os.path.abspath(dst))  # absolute: "." can be renamed as its full path
    config = read_config(src)
    hf_config = json.loads((src / "config.json").read_text())
    index = TensorIndex(src)
    if not dst.parent.is_dir():
        raise FlashnbError(f"folder {dst.parent} does not exist; create it first")
    _recover_interrupted(dst)
    check_destination(src, dst, cfg.overwrite)
    arch = architecture(config)
    ffn_names = _ffn_matrix_names(config)
    dram_items = [(n, tuple(p.shape)) for n, p in _meta_model(config).named_parameters() if n not in ffn_names]

    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
    except FileExistsError:
        raise FlashnbError(f"{tmp} already exists; remove it (a temporary folder of flashnb's) and convert "
                           "again") from None
    except OSError as e:
        raise FlashnbError(f"cannot create {tmp} ({e.strerror}); convert into a folder you can write to") from None
    try:
        from tqdm.auto import tqdm

        L = config.num_hidden_layers
        bar = tqdm(total=len(dram_items) + L, desc=f"convert {dst.name}", unit="tensor",
                   disable=not cfg.progress, leave=False)
        try:
            dram_sha = _write_dram(tmp / DRAM_FILE, index, arch, dram_items, cfg.dtype, lambda: bar.update(1))
            layers = _write_ffn(tmp / FFN_FILE, index, arch, config, cfg, lambda: bar.update(1))
        finally:
            bar.close()
        ffn_bytes = (tmp / FFN_FILE).stat().st_size
        tokenizer = None
        if (src / TOKENIZER).is_file():
            shutil.copyfile(src / TOKENIZER, tmp / TOKENIZER)
            tokenizer = TOKENIZER
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_type": config.model_type,
            "model_config": hf_config,
            "dtype": cfg.dtype,
            "layout": cfg.layout,
            "alignment": ALIGNMENT,
            "d_model": config.hidden_size,
            "ffn_dim": config.ffn_dim,
            "num_layers": config.num_hidden_layers,
            "parts": [p for p, _ in FFN_PARTS[config.model_type]],
            "ffn_file": {"name": FFN_FILE, "bytes": ffn_bytes},
            "dram_file": {"name": DRAM_FILE, "bytes": (tmp / DRAM_FILE).stat().st_size, "sha256": dram_sha,
                          "tensors": len(dram_items)},
            "tokenizer": tokenizer,
            "layers": [[r.to_json() for r in regs] for regs in layers],
            "source": {"folder": str(src.resolve()), "files": [f.name for f in index.files]},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        check_destination(src, dst, cfg.overwrite)  # again: the folder may have changed while we wrote
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
    for key in ("ffn_file", "dram_file"):
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
    files besides the store's own."""
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents:
        raise FlashnbError(f"store {dst} would be written inside the source folder {src}; choose a "
                           "store path outside it (the source checkpoint is never modified)")
    if d in s.parents:
        raise FlashnbError(f"store {dst} contains the source folder {src}; choose a store path that does "
                           "not hold the checkpoint (replacing it would delete the source)")
    if dst.is_symlink():
        raise FlashnbError(f"{dst} is a symbolic link; give the store's real path (flashnb does not "
                           "replace links)")
    if not dst.exists():
        return
    if not dst.is_dir():
        raise FlashnbError(f"{dst} is a file, not a store folder; choose another store path "
                           "(flashnb never replaces a file)")
    if not overwrite:
        raise FlashnbError(f"{dst} already exists; remove it, choose another store path, or pass --force "
                           "to replace the flashnb store there")
    own = _store_files(dst)
    if own is None:
        raise FlashnbError(f"{dst} exists and is not a flashnb store (no {MANIFEST} of format {FORMAT!r}); "
                           "--force replaces only a store: choose another path, or remove that folder yourself")
    extra = sorted(p.name for p in dst.iterdir() if p.name not in own or not p.is_file())
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise FlashnbError(f"{dst} is a flashnb store but also holds {shown}, which flashnb did not write; "
                           "--force will not delete them: move them out first, or choose another store path")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or a number no process can have: leave it alone
    return True


def _recover_interrupted(dst: Path) -> None:
    """Clean up after a convert to `dst` that was killed (SIGKILL, power loss) by a process no longer
    alive: its unfinished temporary folder `.NAME.tmp-PID` is removed; an old store it had moved
    aside (`.NAME.old-PID`) is put back when `dst` is missing, else removed. Only folders holding
    nothing but store files are touched; each is named on stderr."""
    import sys

    allowed = {MANIFEST, DRAM_FILE, FFN_FILE, TOKENIZER}
    for kind in ("tmp", "old"):
        for p in sorted(dst.parent.glob(f".{dst.name}.{kind}-*")):
            pid = p.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or _pid_alive(int(pid)) or not p.is_dir() or p.is_symlink():
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


def _write_ffn(path: Path, index: TensorIndex, arch, config, cfg: ConvertConfig,
               tick: Callable[[], None]) -> list[list[Region]]:
    """Write ffn.bin layer by layer; returns each layer's regions (offsets, sizes, sha256)."""
    tdtype, npdtype, _ = DTYPES[cfg.dtype]
    parts = [p for p, _ in FFN_PARTS[config.model_type]]
    d, f_dim = config.hidden_size, config.ffn_dim
    layers: list[list[Region]] = []
    with open(path, "wb") as f:
        w = _Hasher(f)
        for layer in range(config.num_hidden_layers):
            mats = _layer_rows(index, arch, config, layer, tdtype)  # each [ffn, d]
            if cfg.layout == "bundled":
                groups = [("bundles", tuple(parts), torch.cat(mats, dim=1))]
            else:
                groups = [(p, (p,), m) for p, m in zip(parts, mats)]
            regs = []
            for name, rparts, rows in groups:
                w.pad_to(ALIGNMENT)
                h = hashlib.sha256()
                off = w.pos
                w.write(rows.numpy().view(np.uint8), h)
                regs.append(Region(name, off, w.pos - off, f_dim, len(rparts) * d * npdtype.itemsize,
                                   rparts, h.hexdigest()))
            layers.append(regs)
            del mats, groups
            tick()
        w.pad_to(ALIGNMENT)  # aligned reads of the last rows never run past the end of the file
        f.flush()
        os.fsync(f.fileno())
    return layers


# ----------------------------------------------------------------------------------------------
# Opening and validating


def _bad(path: Path, what: str) -> FlashnbError:
    return FlashnbError(f"{path}: {what}; re-create the store with `flashnb convert HF_FOLDER STORE`")


class FlashStore:
    """An opened, validated store. The engine's view of it:

    - `config` (the architecture's config dataclass), `hf_config` (the HF config dict)
    - `dtype` / `np_dtype`, `layout`, `alignment` (bytes), `d_model`, `ffn_dim`, `num_layers`
    - `parts` (FFN matrices in row order), `row_values` = len(parts) * d_model values per neuron
    - `regions(layer)`: the layer's `Region`s in ffn.bin
    - `dram_tensors()`: the DRAM-resident tensors by flashnb parameter name
    - `ffn_path`: ffn.bin, for `flashnb.reader.NeuronReader`
    - `load_model()`: the dense model rebuilt from the store
    """

    def __init__(self, path: Path, manifest: dict, config) -> None:
        self.path = path
        self.manifest = manifest
        self.config = config
        self.hf_config: dict = manifest["model_config"]
        self.dtype_name: str = manifest["dtype"]
        self.dtype, self.np_dtype, _ = DTYPES[self.dtype_name]
        self.layout: str = manifest["layout"]
        self.alignment: int = manifest["alignment"]
        self.d_model: int = manifest["d_model"]
        self.ffn_dim: int = manifest["ffn_dim"]
        self.num_layers: int = manifest["num_layers"]
        self.parts: tuple[str, ...] = tuple(manifest["parts"])
        self.orientation = dict(FFN_PARTS[config.model_type])
        self.row_values = len(self.parts) * self.d_model
        self.neuron_bytes = self.row_values * self.np_dtype.itemsize
        self._layers = [tuple(Region(r["name"], r["offset"], r["size"], r["rows"], r["row_bytes"],
                                     tuple(r["parts"]), r["sha256"]) for r in regs)
                        for regs in manifest["layers"]]
        self.ffn_path = path / manifest["ffn_file"]["name"]
        self.dram_path = path / manifest["dram_file"]["name"]
        self.tokenizer_path = path / manifest["tokenizer"] if manifest.get("tokenizer") else None

    @classmethod
    def open(cls, path: str | Path) -> "FlashStore":
        """Open the store folder `path`, validating its manifest against the files (no hashing)."""
        p = Path(path)
        if not p.is_dir():
            raise FlashnbError(f"store {p} does not exist or is not a folder; create it with "
                               "`flashnb convert HF_FOLDER STORE`")
        mf = p / MANIFEST
        if not mf.is_file():
            raise FlashnbError(f"{mf} is missing: {p} is not a flashnb store (create one with "
                               "`flashnb convert HF_FOLDER STORE`)")
        try:
            m = json.loads(mf.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _bad(mf, f"not valid JSON ({e})") from None
        config = _validate(p, mf, m)
        return cls(p, m, config)

    def __repr__(self) -> str:
        return (f"FlashStore({str(self.path)!r}, {self.config.model_type}, {self.layout}, {self.dtype_name}, "
                f"{self.num_layers} layers x {self.ffn_dim} neurons x {self.neuron_bytes} B)")

    # -- what the engine reads -------------------------------------------------------------
    def regions(self, layer: int) -> tuple[Region, ...]:
        """The FFN regions of `layer` (one for bundled, one per matrix for unbundled)."""
        if not 0 <= layer < self.num_layers:
            raise FlashnbError(f"layer {layer} is out of range for store {self.path} "
                               f"({self.num_layers} layers: 0..{self.num_layers - 1})")
        return self._layers[layer]

    def dram_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every DRAM-resident tensor (flashnb parameter names), optionally cast to `dtype`."""
        try:
            with safe_open(self.dram_path, framework="pt") as h:
                return {k: (h.get_tensor(k) if dtype is None else h.get_tensor(k).to(dtype)) for k in h.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise _bad(self.dram_path, f"cannot be read ({e})") from None

    def split_rows(self, rows: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Split store rows [n, row_values] into each part's [n, d_model] neuron slices."""
        t = torch.as_tensor(rows)
        d = self.d_model
        return {p: t[:, j * d:(j + 1) * d] for j, p in enumerate(self.parts)}

    def ffn_rows(self, layer: int) -> np.ndarray:
        """All rows [ffn_dim, row_values] of `layer` read with ordinary buffered I/O (not the hot path)."""
        d, itemsize = self.d_model, self.np_dtype.itemsize
        out = np.empty((self.ffn_dim, self.row_values), dtype=self.np_dtype)
        with open(self.ffn_path, "rb") as f:
            for reg in self.regions(layer):
                j = self.parts.index(reg.parts[0])
                f.seek(reg.offset)
                buf = np.frombuffer(_read_exact(f, reg.size, self.ffn_path), dtype=self.np_dtype)
                out[:, j * d:(j + len(reg.parts)) * d] = buf.reshape(reg.rows, reg.row_bytes // itemsize)
        return out

    def ffn_matrix(self, layer: int, part: str) -> torch.Tensor:
        """FFN matrix `part` of `layer` in the checkpoint's orientation (e.g. fc2.weight is [d, ffn])."""
        if part not in self.parts:
            raise FlashnbError(f"{part!r} is not an FFN matrix of {self.config.model_type}; "
                               f"the store holds {', '.join(self.parts)}")
        rows = torch.from_numpy(self.ffn_rows(layer))
        m = self.split_rows(rows)[part]
        return m.contiguous() if self.orientation[part] == "row" else m.t().contiguous()

    def load_model(self, dtype: torch.dtype | None = None) -> torch.nn.Module:
        """The dense model rebuilt from the store (all FFN weights read back into DRAM)."""
        dtype = dtype or self.dtype
        c = self.config
        model = _meta_model(c)
        materialize(model, dtype)
        params = dict(model.named_parameters())
        dram = self.dram_tensors()
        with torch.no_grad():
            for name, t in dram.items():
                if name not in params or tuple(params[name].shape) != tuple(t.shape):
                    raise _bad(self.dram_path, f"tensor {name!r} {list(t.shape)} does not match the model")
                params[name].copy_(t.to(dtype))
            for layer in range(self.num_layers):
                rows = self.split_rows(torch.from_numpy(self.ffn_rows(layer)))
                for part, m in rows.items():
                    w = m if self.orientation[part] == "row" else m.t()
                    params[ffn_param(layer, part)].copy_(w.to(dtype))
        missing = set(params) - set(dram) - _ffn_matrix_names(c)
        if missing:
            raise _bad(self.dram_path, f"lacks tensors {sorted(missing)[:4]}")
        return model.eval()


def open_store(path: str | Path) -> FlashStore:
    """Open and validate the store folder `path` (see FlashStore)."""
    return FlashStore.open(path)


def _read_exact(f, n: int, path: Path) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise _bad(path, f"ended after {len(data)} of {n} bytes at offset {f.tell()} (truncated)")
    return data


def _validate(p: Path, mf: Path, m: dict):
    """Check the manifest's fields and its agreement with the files; returns the model config."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise _bad(mf, f"not a flashnb store manifest (format {m.get('format') if isinstance(m, dict) else m!r})")
    v = m.get("format_version")
    if v != FORMAT_VERSION:
        raise FlashnbError(f"{mf}: store format version {v!r} is not supported (this flashnb reads version "
                           f"{FORMAT_VERSION}); re-create the store with this flashnb's `flashnb convert`")
    if m.get("layout") not in LAYOUTS:
        raise FlashnbError(f"{mf}: unknown layout {m.get('layout')!r} (known: {', '.join(LAYOUTS)}); "
                           "the store was written by another flashnb: re-create it with `flashnb convert`")
    if m.get("dtype") not in DTYPES:
        raise _bad(mf, f"unknown dtype {m.get('dtype')!r} (known: {', '.join(DTYPES)})")
    a = m.get("alignment")
    if not isinstance(a, int) or a < 512 or a & (a - 1):
        raise _bad(mf, f"alignment {a!r} is not a power of two >= 512")
    kind = m.get("model_type")
    if kind not in CONFIGS or kind not in FFN_PARTS:
        raise _bad(mf, f"unknown model_type {kind!r}")
    if not isinstance(m.get("model_config"), dict):
        raise _bad(mf, "model_config is missing")
    config = CONFIGS[kind].from_hf(m["model_config"], f"{mf} (model_config)")
    d, f_dim, L = config.hidden_size, config.ffn_dim, config.num_hidden_layers
    if (m.get("d_model"), m.get("ffn_dim"), m.get("num_layers")) != (d, f_dim, L):
        raise _bad(mf, f"d_model/ffn_dim/num_layers {m.get('d_model')}/{m.get('ffn_dim')}/{m.get('num_layers')} "
                       f"disagree with model_config ({d}/{f_dim}/{L})")
    parts = [x for x, _ in FFN_PARTS[kind]]
    if m.get("parts") != parts:
        raise _bad(mf, f"parts {m.get('parts')} are not {kind}'s FFN matrices {parts}")
    itemsize = DTYPES[m["dtype"]][1].itemsize
    expect = ([("bundles", parts)] if m["layout"] == "bundled" else [(x, [x]) for x in parts])
    ffn = m.get("ffn_file") or {}
    ffn_path = p / str(ffn.get("name", FFN_FILE))
    layers = m.get("layers")
    if not isinstance(layers, list) or len(layers) != L:
        raise _bad(mf, f"lists {len(layers) if isinstance(layers, list) else 'no'} layers, the model has {L}")
    end = 0
    try:
        for i, regs in enumerate(layers):
            if [(r["name"], r["parts"]) for r in regs] != expect:
                raise _bad(mf, f"layer {i}: regions {[r['name'] for r in regs]} do not match layout "
                               f"{m['layout']!r} (expected {[e[0] for e in expect]})")
            for r in regs:
                where = f"layer {i} region {r['name']!r}"
                if r["offset"] % a or r["offset"] < end:
                    raise _bad(mf, f"{where}: offset {r['offset']} is not {a}-aligned or overlaps the previous region")
                rb = len(r["parts"]) * d * itemsize
                if r["rows"] != f_dim or r["row_bytes"] != rb or r["size"] != f_dim * rb:
                    raise _bad(mf, f"{where}: rows/row_bytes/size {r['rows']}/{r['row_bytes']}/{r['size']} "
                                   f"should be {f_dim}/{rb}/{f_dim * rb}")
                if not isinstance(r["sha256"], str) or len(r["sha256"]) != 64:
                    raise _bad(mf, f"{where}: sha256 is missing")
                end = r["offset"] + r["size"]
    except (KeyError, TypeError) as e:
        raise _bad(mf, f"a layer region entry is malformed ({e!r})") from None
    if ffn.get("bytes") != _align(end, a):
        raise _bad(mf, f"ffn_file bytes {ffn.get('bytes')} should be {_align(end, a)} for these regions")
    if not ffn_path.is_file():
        raise _bad(ffn_path, "is missing")
    size = ffn_path.stat().st_size
    if size != ffn["bytes"]:
        raise FlashnbError(f"{ffn_path} has {size} bytes but {mf} says {ffn['bytes']}: the file is truncated or "
                           "was replaced; re-create the store with `flashnb convert HF_FOLDER STORE`")
    dram = m.get("dram_file") or {}
    dram_path = p / str(dram.get("name", DRAM_FILE))
    if not dram_path.is_file():
        raise _bad(dram_path, "is missing")
    if dram_path.stat().st_size != dram.get("bytes"):
        raise FlashnbError(f"{dram_path} has {dram_path.stat().st_size} bytes but {mf} says {dram.get('bytes')}: "
                           "the file is truncated or was replaced; re-create the store with `flashnb convert`")
    if m.get("tokenizer") and not (p / m["tokenizer"]).is_file():
        raise _bad(p / m["tokenizer"], "is missing")
    return config


# ----------------------------------------------------------------------------------------------
# Verifying


def _hash_span(f, offset: int, size: int) -> str:
    h = hashlib.sha256()
    f.seek(offset)
    left = size
    while left:
        b = f.read(min(left, _COPY_CHUNK))
        if not b:
            break
        h.update(b)
        left -= len(b)
    return h.hexdigest()


def _spans(store: FlashStore) -> Iterator[tuple[str, Path, int, int, str]]:
    """(description, file, offset, size, expected sha256) for every checksummed span of a store."""
    d = store.manifest["dram_file"]
    yield "dram tensors", store.dram_path, 0, d["bytes"], d["sha256"]
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
                  disable=not progress, leave=False) as bar:
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
                           "re-create it with `flashnb convert HF_FOLDER STORE`")
    return VerifyReport(str(store.path), len(spans), total, time.perf_counter() - t0)
