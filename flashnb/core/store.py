"""The flash store: a model converted so that its FFN weights can be read neuron by neuron from flash.

A store is a folder:

    manifest.json      format version, the model's HF config, dtype (of the DRAM tensors), ffn_dtype (of
                       the FFN rows: fp16, fp32, or quantized int8 / q4, flashnb.core.quant), layout,
                       alignment, and for every layer the byte offset, size and sha256 of each FFN
                       region in ffn.bin (flashnb.core.manifest checks them)
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

Either way a store row for neuron i, assembled part after part, is the same P slices of d_model values
(each stored in the row format, flashnb.core.quant); the reader (flashnb.core.reader) returns exactly
those rows, and `FlashStore.row_format.part` turns a part of them into values.

`flashnb.core.convert` writes a store; here `FlashStore.open` validates and opens one;
`flashnb.core.verify` recomputes every checksum.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from flashnb.core.integrity import DIGEST, FILE_ALGORITHM, FileIdentity, check_identity, file_digest
from flashnb.core.manifest import DTYPES, MANIFEST, Region, bad_store, validate
from flashnb.core.memory import MemoryShape
from flashnb.core.placement import positions
from flashnb.core.quant import RowFormat
from flashnb.errors import FlashnbError
from flashnb.models.checkpoint import ffn_matrix_names, ffn_param, materialize, meta_model

# ----------------------------------------------------------------------------------------------
# Opening


class FlashStore:
    """An opened, validated store. The engine's view of it:

    - `config` (the architecture's config dataclass), `hf_config` (the HF config dict)
    - `dtype` / `np_dtype` (the DRAM tensors' and the computation's), `layout`, `alignment` (bytes),
      `d_model`, `ffn_dim`, `num_layers`
    - `row_format` (the FFN rows': flashnb.core.quant), a stored row = `row_width` elements of `row_dtype`,
      `neuron_bytes` bytes
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
        self.dtype, self.np_dtype, _ = DTYPES[self.dtype_name]  # the DRAM tensors' and the computation's
        self.row_format = RowFormat(manifest.get("ffn_dtype", self.dtype_name), manifest["d_model"])  # the FFN rows
        self.layout: str = manifest["layout"]
        self.alignment: int = manifest["alignment"]
        self.d_model: int = manifest["d_model"]
        self.ffn_dim: int = manifest["ffn_dim"]
        self.num_layers: int = manifest["num_layers"]
        self.parts: tuple[str, ...] = tuple(manifest["parts"])
        self.dram_parts: tuple[str, ...] = tuple(manifest.get("dram_parts", ()))
        self.orientation = dict(config.ffn_parts)
        self.row_values = len(self.parts) * self.d_model  # values of a neuron
        self.neuron_bytes = len(self.parts) * self.row_format.part_bytes  # bytes of its bundle on flash
        self.row_dtype = self.row_format.dtype  # a stored row's elements: [row_width] of row_dtype
        self.row_width = self.neuron_bytes // self.row_dtype.itemsize
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
        if not mf.is_file() and (p / "config.json").is_file():
            raise FlashnbError(f"{p} is a Hugging Face model folder, not a flash store: convert it first with "
                               f"`flashnb convert {p} STORE` and give STORE")
        if not mf.is_file():
            raise FlashnbError(f"{mf} is missing: {p} is not a flashnb store (create one with "
                               "`flashnb convert HF_FOLDER STORE`)")
        try:
            m = json.loads(mf.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad_store(mf, f"not valid JSON ({e})") from None
        config = validate(p, mf, m)
        return cls(p, m, config)

    @property
    def gate_in_dram(self) -> bool:
        """True when the gate matrices stay in DRAM (layout "gate-apart")."""
        return bool(self.dram_parts)

    def __repr__(self) -> str:
        return (f"FlashStore({str(self.path)!r}, {self.config.model_type}, {self.layout}, {self.row_format.name}, "
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
                raise bad_store(self.placement_path, "does not hold a permutation of each layer's neurons")
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
                raise bad_store(self.dram_path, "does not match its checksum: the file is damaged")
            self._dram_checked = True
        try:
            with safe_open(self.dram_path, framework="pt") as h:
                return {k: (h.get_tensor(k) if dtype is None else h.get_tensor(k).to(dtype)) for k in h.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise bad_store(self.dram_path, f"cannot be read ({e})") from None

    @property
    def resident_bytes(self) -> int:
        """Bytes that always stay in DRAM: the resident tensors at the store's precision (from the
        safetensors header) and the bundles' checksums."""
        if self._resident_bytes is None:
            try:
                with safe_open(self.dram_path, framework="pt") as h:
                    n = sum(int(np.prod(h.get_slice(k).get_shape(), dtype=np.int64)) for k in h.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise bad_store(self.dram_path, f"cannot be read ({e})") from None
            sums = self.checksum_path.stat().st_size if self.checksum_path is not None else 0
            self._resident_bytes = n * self.np_dtype.itemsize + sums
        return self._resident_bytes

    def memory_shape(self) -> MemoryShape:
        """What a memory budget is split over for this store."""
        c = self.config
        kv = 2 * c.num_hidden_layers * c.num_kv_heads * c.head_dim * c.max_position_embeddings * self.np_dtype.itemsize
        return MemoryShape(self.resident_bytes, self.num_layers, self.ffn_dim, self.neuron_bytes, kv)

    def split_rows(self, rows: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Split store rows [n, row_width] into each part's [n, d_model] values (dequantized)."""
        t = torch.as_tensor(rows)
        return {p: self.row_format.part(t, j) for j, p in enumerate(self.parts)}

    def ffn_rows(self, layer: int) -> np.ndarray:
        """All rows [ffn_dim, row_width] of `layer` as stored, read with buffered I/O (not the hot path)."""
        w, itemsize = self.row_format.part_width, self.row_dtype.itemsize
        out = np.empty((self.ffn_dim, self.row_width), dtype=self.row_dtype)
        neuron = self.file_order(layer)  # file row r holds neuron neuron[r]
        with open(self.ffn_path, "rb") as f:
            for reg in self.regions(layer):
                j = self.parts.index(reg.parts[0])
                f.seek(reg.offset)
                buf = np.frombuffer(_read_exact(f, reg.size, self.ffn_path), dtype=self.row_dtype)
                out[neuron, j * w:(j + len(reg.parts)) * w] = buf.reshape(reg.rows, reg.row_bytes // itemsize)
        return out

    def load_model(self, dtype: torch.dtype | None = None) -> torch.nn.Module:
        """The dense model rebuilt from the store (all FFN weights read back into DRAM, dequantized)."""
        dtype = dtype or self.dtype
        c = self.config
        model = materialize(meta_model(c), dtype)
        params = dict(model.named_parameters())
        dram = self.dram_tensors()
        with torch.no_grad():
            for name, t in dram.items():
                if name not in params or tuple(params[name].shape) != tuple(t.shape):
                    raise bad_store(self.dram_path, f"tensor {name!r} {list(t.shape)} does not match the model")
                params[name].copy_(t.to(dtype))
            for layer in range(self.num_layers):
                rows = self.split_rows(torch.from_numpy(self.ffn_rows(layer)))
                for part, m in rows.items():
                    w = m if self.orientation[part] == "row" else m.t()
                    params[ffn_param(layer, part)].copy_(w.to(dtype))
        missing = set(params) - set(dram) - ffn_matrix_names(c)
        if missing:
            raise bad_store(self.dram_path, f"lacks tensors {sorted(missing)[:4]}")
        return model.eval()


def open_store(path: str | Path) -> FlashStore:
    """Open and validate the store folder `path` (see FlashStore)."""
    return FlashStore.open(path)


def _read_exact(f, n: int, path: Path) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise bad_store(path, f"ended after {len(data)} of {n} bytes at offset {f.tell()} (truncated)")
    return data


