"""The flash store: a model converted so that its FFN weights can be read neuron by neuron from flash.

A store is a folder:

    manifest.json      format version, the model's HF config, dtype, layout, alignment, and for every
                       layer the byte offset, size and sha256 of each FFN region in ffn.bin
    dram.safetensors   every tensor that stays in DRAM (embeddings, attention, norms, FFN biases),
                       under flashnb's parameter names
    ffn.bin            the FFN weight matrices, one region group per layer, each region starting on an
                       `alignment` (4096-byte) boundary so direct I/O can read it
    ffn.sum            a 64-bit checksum of every row of every region, checked as rows are read
    tokenizer.json     copied from the source folder (when it has one)
    placement.bin      with co-activation placement (flashnb.core.placement): int32 [layers, ffn_dim],
                       the neuron at each file row; without it neuron i lies at row i

Neuron i of a layer is row i of the up projection(s) and column i of the down projection. The layout
decides where its values lie in ffn.bin:

    bundled    one region `bundles` of shape [ffn_dim, P * d_model]: neuron i's row is
               [up[i, :], down[:, i]] (OPT: fc1, fc2; Llama: gate, up, down; P = 2 or 3), so one
               contiguous read of P * d_model values fetches the whole neuron (row-column bundling).
    unbundled  one region per matrix, each [ffn_dim, d_model] neuron-major: the up matrices as in the
               checkpoint, the down matrix transposed. A neuron then costs P separate reads.
    gate-apart for gated (SwiGLU) FFNs run with thresholds (flashnb.core.thresholds): the gate matrix
               stays in DRAM (in dram.safetensors, where the memory budget counts it) and decides the
               neurons; ffn.bin holds one region `bundles` of [up[i, :], down[:, i]] rows (P = 2).

Either way a store row for neuron i, assembled part after part, is the same P * d_model vector; the
reader (flashnb.core.reader) returns exactly those rows.

`flashnb.core.convert` writes a store; here `FlashStore.open` validates and opens one;
`flashnb.core.verify` recomputes every checksum.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from flashnb.core.defaults import ALIGNMENT
from flashnb.core.integrity import ALGORITHM, DIGEST, FILE_ALGORITHM, FileIdentity, check_identity, file_digest
from flashnb.core.memory import MemoryShape
from flashnb.core.placement import positions
from flashnb.errors import FlashnbError
from flashnb.models.checkpoint import CONFIGS, ffn_matrix_names, ffn_param, materialize, meta_model

FORMAT = "flashnb-store"
FORMAT_VERSION = 2  # 2: per-bundle checksums (ffn.sum), the DRAM file's XXH3, the model's fingerprint
LAYOUTS = ("bundled", "unbundled", "gate-apart")
MANIFEST, DRAM_FILE, FFN_FILE, TOKENIZER = "manifest.json", "dram.safetensors", "ffn.bin", "tokenizer.json"
PLACEMENT_FILE = "placement.bin"  # the neuron at each file row of every layer (flashnb.core.placement)
CHECKSUM_FILE = "ffn.sum"  # one 64-bit checksum per row of every region, in file order (flashnb.core.integrity)

# store dtype name -> (torch dtype, numpy dtype, safetensors dtype tag)
DTYPES: dict[str, tuple[torch.dtype, np.dtype, str]] = {
    "fp16": (torch.float16, np.dtype("<f2"), "F16"),
    "fp32": (torch.float32, np.dtype("<f4"), "F32"),
}

HASH_CHUNK = 8 << 20  # bytes per piece when hashing files


def align_up(n: int, a: int = ALIGNMENT) -> int:
    """`n` rounded up to a multiple of `a` (bytes)."""
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


# ----------------------------------------------------------------------------------------------
# Opening and validating


def _bad(path: Path, what: str) -> FlashnbError:
    return FlashnbError(f"{path}: {what}; re-create the store with `flashnb convert HF_FOLDER STORE`")


class FlashStore:
    """An opened, validated store. The engine's view of it:

    - `config` (the architecture's config dataclass), `hf_config` (the HF config dict)
    - `dtype` / `np_dtype`, `layout`, `alignment` (bytes), `d_model`, `ffn_dim`, `num_layers`
    - `parts` (FFN matrices on flash, in row order), `row_values` = len(parts) * d_model values per neuron;
      `dram_parts`: FFN matrices kept in DRAM instead (the gate, for layout "gate-apart")
    - `regions(layer)`: the layer's `Region`s in ffn.bin
    - `dram_tensors()`: the DRAM-resident tensors by flashnb parameter name
    - `ffn_path`: ffn.bin, for `flashnb.core.reader.NeuronReader`
    - `checksums(layer)`: each region's per-row checksums, checked by the reader as it reads
    - `load_model()`: the dense model rebuilt from the store
    - `fingerprint`: the model's (flashnb.models.fingerprint), which predictors must match
    - `file_rows(layer, ids)`: the file rows of neurons `ids` (themselves without a placement);
      `file_order(layer)`: the neuron at each file row

    The files' identity (size, mtime, inode) is recorded when the store is opened; using a store whose
    files changed since is refused (`check_unchanged`).
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
        self.dram_parts: tuple[str, ...] = tuple(manifest.get("dram_parts", ()))
        self.orientation = dict(config.ffn_parts)
        self.row_values = len(self.parts) * self.d_model
        self.neuron_bytes = self.row_values * self.np_dtype.itemsize
        self._layers = [tuple(Region(r["name"], r["offset"], r["size"], r["rows"], r["row_bytes"],
                                     tuple(r["parts"]), r["sha256"]) for r in regs)
                        for regs in manifest["layers"]]
        self.ffn_path = path / manifest["ffn_file"]["name"]    # plain names: checked by _validate
        self.dram_path = path / manifest["dram_file"]["name"]
        self.tokenizer_path = path / manifest["tokenizer"] if manifest.get("tokenizer") else None
        self.checksum_path = path / manifest["checksums"]["name"] if manifest.get("checksums") else None
        self.placement_path = path / manifest["placement"]["name"] if manifest.get("placement") else None
        self.fingerprint: str | None = manifest.get("fingerprint")
        self._identity = {f: FileIdentity.of(f) for f in (self.ffn_path, self.dram_path, self.checksum_path,
                                                             self.placement_path) if f is not None and f.exists()}
        self._resident_bytes: int | None = None
        self._checksums: np.ndarray | None = None
        self._dram_checked = False
        self._placed: tuple[np.ndarray, np.ndarray] | None = None  # (order, position), read on first use

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

    @property
    def gate_in_dram(self) -> bool:
        """True when the gate matrices stay in DRAM (layout "gate-apart")."""
        return bool(self.dram_parts)

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

    def check_unchanged(self) -> None:
        """One clear error if a file of the store changed since it was opened."""
        for f, then in self._identity.items():
            check_identity(f, then, self.path)

    def _placement(self) -> tuple[np.ndarray, np.ndarray]:
        """(order, position) [layers, ffn_dim], read once and checked to be permutations."""
        if self._placed is None:
            self.check_unchanged()
            order = np.fromfile(self.placement_path, "<i4").astype(np.int64).reshape(self.num_layers, self.ffn_dim)
            if not bool(np.all(np.sort(order, axis=1) == np.arange(self.ffn_dim))):
                raise _bad(self.placement_path, "does not hold a permutation of each layer's neurons")
            self._placed = order, positions(order)
        return self._placed

    def placed_rows(self, layer: int) -> np.ndarray | None:
        """Each neuron's row in the layer's regions when a placement moves them, else None (neuron i at row i)."""
        return None if self.placement_path is None else self._placement()[1][layer]

    def file_rows(self, layer: int, ids: np.ndarray) -> np.ndarray:
        """The rows of ffn.bin's layer regions that hold neurons `ids` (int64 array)."""
        return ids if self.placement_path is None else self.placed_rows(layer)[ids]

    def file_order(self, layer: int) -> np.ndarray:
        """The neuron at each row of the layer's regions (0, 1, 2, ... without a placement)."""
        return np.arange(self.ffn_dim) if self.placement_path is None else self._placement()[0][layer]

    def checksums(self, layer: int) -> list[np.ndarray] | None:
        """The checksum of every row of each region of `layer` (uint64 [ffn_dim] per region); None for a
        store without them. Read once (8 bytes per row: kept in DRAM, counted in `resident_bytes`)."""
        if self.checksum_path is None:
            return None
        if self._checksums is None:
            self.check_unchanged()
            n = len(self._layers[0])
            self._checksums = np.fromfile(self.checksum_path, DIGEST).reshape(self.num_layers, n, self.ffn_dim)
        return list(self._checksums[layer])

    def dram_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every DRAM-resident tensor (flashnb parameter names), optionally cast to `dtype`; the file's
        XXH3-64 is checked against the manifest's the first time."""
        self.check_unchanged()
        want = self.manifest["dram_file"].get(FILE_ALGORITHM)
        if want and not self._dram_checked:
            if file_digest(self.dram_path) != want:
                raise _bad(self.dram_path, "does not match its checksum: the file is damaged")
            self._dram_checked = True
        try:
            with safe_open(self.dram_path, framework="pt") as h:
                return {k: (h.get_tensor(k) if dtype is None else h.get_tensor(k).to(dtype)) for k in h.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise _bad(self.dram_path, f"cannot be read ({e})") from None

    @property
    def resident_bytes(self) -> int:
        """Bytes that always stay in DRAM: the resident tensors at the store's precision (from the
        safetensors header) and the bundles' checksums."""
        if self._resident_bytes is None:
            try:
                with safe_open(self.dram_path, framework="pt") as h:
                    n = sum(int(np.prod(h.get_slice(k).get_shape(), dtype=np.int64)) for k in h.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise _bad(self.dram_path, f"cannot be read ({e})") from None
            sums = self.checksum_path.stat().st_size if self.checksum_path is not None else 0
            self._resident_bytes = n * self.np_dtype.itemsize + sums
        return self._resident_bytes

    def memory_shape(self) -> MemoryShape:
        """What a memory budget is split over for this store."""
        c = self.config
        kv = 2 * c.num_hidden_layers * c.num_kv_heads * c.head_dim * c.max_position_embeddings * self.np_dtype.itemsize
        return MemoryShape(self.resident_bytes, self.num_layers, self.ffn_dim, self.neuron_bytes, kv)

    def split_rows(self, rows: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Split store rows [n, row_values] into each part's [n, d_model] neuron slices."""
        t = torch.as_tensor(rows)
        d = self.d_model
        return {p: t[:, j * d:(j + 1) * d] for j, p in enumerate(self.parts)}

    def ffn_rows(self, layer: int) -> np.ndarray:
        """All rows [ffn_dim, row_values] of `layer` read with ordinary buffered I/O (not the hot path)."""
        d, itemsize = self.d_model, self.np_dtype.itemsize
        out = np.empty((self.ffn_dim, self.row_values), dtype=self.np_dtype)
        neuron = self.file_order(layer)  # file row r holds neuron neuron[r]
        with open(self.ffn_path, "rb") as f:
            for reg in self.regions(layer):
                j = self.parts.index(reg.parts[0])
                f.seek(reg.offset)
                buf = np.frombuffer(_read_exact(f, reg.size, self.ffn_path), dtype=self.np_dtype)
                out[neuron, j * d:(j + len(reg.parts)) * d] = buf.reshape(reg.rows, reg.row_bytes // itemsize)
        return out

    def load_model(self, dtype: torch.dtype | None = None) -> torch.nn.Module:
        """The dense model rebuilt from the store (all FFN weights read back into DRAM)."""
        dtype = dtype or self.dtype
        c = self.config
        model = materialize(meta_model(c), dtype)
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
        missing = set(params) - set(dram) - ffn_matrix_names(c)
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


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def plain_name(mf: Path, value, what: str) -> str:
    """A file name from a manifest, which must name a file directly inside the store folder: no
    folders, no "..", no absolute path (a store is a closed world: it never points outside itself)."""
    if (not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value
            or "\0" in value):
        raise _bad(mf, f"{what} {value!r} is not a plain file name inside the store folder")
    return value


def _validate(p: Path, mf: Path, m: dict):
    """Check the manifest's fields and its agreement with the files; returns the model config."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise _bad(mf, f"not a flashnb store manifest (format {m.get('format') if isinstance(m, dict) else m!r})")
    v = m.get("format_version")
    if not _is_int(v) or v != FORMAT_VERSION:
        raise FlashnbError(f"{mf}: store format version {v!r} is not supported (this flashnb reads version "
                           f"{FORMAT_VERSION}); re-create the store with this flashnb's `flashnb convert`")
    if not isinstance(m.get("layout"), str) or m["layout"] not in LAYOUTS:
        raise FlashnbError(f"{mf}: unknown layout {m.get('layout')!r} (known: {', '.join(LAYOUTS)}); "
                           "the store was written by another flashnb: re-create it with `flashnb convert`")
    if not isinstance(m.get("dtype"), str) or m["dtype"] not in DTYPES:
        raise _bad(mf, f"unknown dtype {m.get('dtype')!r} (known: {', '.join(DTYPES)})")
    a = m.get("alignment")
    if not _is_int(a) or a < 512 or a & (a - 1):
        raise _bad(mf, f"alignment {a!r} is not a power of two >= 512")
    kind = m.get("model_type")
    if not isinstance(kind, str) or kind not in CONFIGS:
        raise _bad(mf, f"unknown model_type {kind!r}")
    if not isinstance(m.get("model_config"), dict):
        raise _bad(mf, "model_config is missing")
    config = CONFIGS[kind].from_hf(m["model_config"], f"{mf} (model_config)")
    d, f_dim, L = config.hidden_size, config.ffn_dim, config.num_hidden_layers
    if (m.get("d_model"), m.get("ffn_dim"), m.get("num_layers")) != (d, f_dim, L):
        raise _bad(mf, f"d_model/ffn_dim/num_layers {m.get('d_model')}/{m.get('ffn_dim')}/{m.get('num_layers')} "
                       f"disagree with model_config ({d}/{f_dim}/{L})")
    parts, dram_parts = flash_parts(config, m["layout"])
    if m.get("parts") != parts or m.get("dram_parts", []) != dram_parts:
        raise _bad(mf, f"parts {m.get('parts')} (in DRAM: {m.get('dram_parts', [])}) are not {kind}'s FFN matrices "
                       f"{parts} (in DRAM: {dram_parts}) for layout {m['layout']!r}")
    end = _validate_regions(mf, m, config, parts)
    _validate_files(p, mf, m, align_up(end, a))
    return config


def flash_parts(config, layout: str) -> tuple[list[str], list[str]]:
    """(the FFN matrices a store of `layout` keeps on flash, those it keeps in DRAM) for `config`'s model."""
    parts = [x for x, _ in config.ffn_parts]
    if layout != "gate-apart":
        return parts, []
    if not config.gated:
        raise FlashnbError(f"layout 'gate-apart' keeps a gated FFN's gate in DRAM; this {config.model_type} model's "
                           "FFN has no gate: use layout 'bundled'")
    return parts[1:], parts[:1]


def _validate_regions(mf: Path, m: dict, config, parts: list[str]) -> int:
    """Check every layer's regions (names, aligned non-overlapping offsets, sizes); returns where the
    last one ends (bytes)."""
    d, f_dim, L, a = config.hidden_size, config.ffn_dim, config.num_hidden_layers, m["alignment"]
    itemsize = DTYPES[m["dtype"]][1].itemsize
    expect = ([("bundles", parts)] if m["layout"] != "unbundled" else [(x, [x]) for x in parts])
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
                if not all(_is_int(r[k]) for k in ("offset", "size", "rows", "row_bytes")):
                    raise _bad(mf, f"{where}: offset, size, rows and row_bytes must be whole numbers")
                if r["offset"] % a or r["offset"] < end:
                    raise _bad(mf, f"{where}: offset {r['offset']} is not {a}-aligned or overlaps the previous region")
                rb = len(r["parts"]) * d * itemsize
                if r["rows"] != f_dim or r["row_bytes"] != rb or r["size"] != f_dim * rb:
                    raise _bad(mf, f"{where}: rows/row_bytes/size {r['rows']}/{r['row_bytes']}/{r['size']} "
                                   f"should be {f_dim}/{rb}/{f_dim * rb}")
                if not isinstance(r["sha256"], str) or len(r["sha256"]) != 64:
                    raise _bad(mf, f"{where}: sha256 is missing")
                end = r["offset"] + r["size"]
    except (KeyError, TypeError, AttributeError) as e:
        raise _bad(mf, f"a layer region entry is malformed ({e!r})") from None
    return end


def _validate_files(p: Path, mf: Path, m: dict, ffn_bytes: int) -> None:
    """Check that the files the manifest names lie inside the store and have the sizes it says."""
    for key in ("ffn_file", "dram_file"):
        if not isinstance(m.get(key), dict):
            raise _bad(mf, f"{key} is missing")
    ffn, dram = m["ffn_file"], m["dram_file"]
    ffn_path = p / plain_name(mf, ffn.get("name"), "ffn_file name")
    dram_path = p / plain_name(mf, dram.get("name"), "dram_file name")
    if ffn.get("bytes") != ffn_bytes:
        raise _bad(mf, f"ffn_file bytes {ffn.get('bytes')} should be {ffn_bytes} for these regions")
    for path, entry in ((ffn_path, ffn), (dram_path, dram)):
        if not path.is_file():
            raise _bad(path, "is missing")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise FlashnbError(f"{path} has {size} bytes but {mf} says {entry.get('bytes')}: the file is truncated "
                               "or was replaced; re-create the store with `flashnb convert HF_FOLDER STORE`")
    sums = m.get("checksums")
    if not isinstance(sums, dict) or sums.get("algorithm") != ALGORITHM:
        raise _bad(mf, f"the per-bundle checksums ({ALGORITHM}) are missing")
    sums_path = p / plain_name(mf, sums.get("name"), "checksums name")
    rows = sum(len(regs) for regs in m["layers"]) * m["ffn_dim"]
    if sums.get("bytes") != rows * DIGEST.itemsize or not sums_path.is_file() \
            or sums_path.stat().st_size != sums["bytes"]:
        raise _bad(sums_path, f"should hold {rows} checksums of {DIGEST.itemsize} bytes")
    if not isinstance(m.get("fingerprint"), str):
        raise _bad(mf, "the model's fingerprint is missing")
    if m.get("placement") is not None:
        pl = m["placement"]
        path = p / plain_name(mf, pl.get("name") if isinstance(pl, dict) else None, "placement name")
        want = m["num_layers"] * m["ffn_dim"] * 4
        if pl.get("bytes") != want or not path.is_file() or path.stat().st_size != want:
            raise _bad(path, f"should hold {m['num_layers']} x {m['ffn_dim']} int32 neuron ids (the placement)")
    if m.get("tokenizer") is not None:
        tok = p / plain_name(mf, m["tokenizer"], "tokenizer")
        if not tok.is_file():
            raise _bad(tok, "is missing")
