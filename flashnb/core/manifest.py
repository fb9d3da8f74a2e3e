"""A flash store's manifest (see flashnb.core.store): its names, its regions, and the checks that a
manifest agrees with itself, with the model it describes, and with the files beside it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flashnb.core.defaults import ALIGNMENT
from flashnb.core.integrity import ALGORITHM, DIGEST
from flashnb.core.quant import FFN_DTYPES, GROUP, QUANTIZED, RowFormat
from flashnb.errors import FlashnbError
from flashnb.models.checkpoint import CONFIGS

FORMAT = "flashnb-store"
FORMAT_VERSION = 2  # 2: per-bundle checksums (ffn.sum), the DRAM file's XXH3, the model's fingerprint
LAYOUTS = ("bundled", "unbundled", "gate-apart")
MANIFEST, DRAM_FILE, FFN_FILE, TOKENIZER = "manifest.json", "dram.safetensors", "ffn.bin", "tokenizer.json"
PLACEMENT_FILE = "placement.bin"  # the neuron at each file row of every layer (flashnb.core.placement)
CHECKSUM_FILE = "ffn.sum"  # one 64-bit checksum per row of every region, in file order (flashnb.core.integrity)

# the DRAM tensors' dtype (and the FFN rows' unless ffn_dtype quantizes them, flashnb.core.quant) ->
# (torch dtype, numpy dtype, safetensors dtype tag)
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
# Validating


RECREATE = "`flashnb convert HF_FOLDER STORE --force`"  # how every repair hint re-creates a damaged store


def bad_store(path: Path, what: str) -> FlashnbError:
    said = f"{path} {what}" if what.startswith("is ") else f"{path}: {what}"
    return FlashnbError(f"{said}; re-create the store with {RECREATE}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def plain_name(mf: Path, value, what: str) -> str:
    """A file name from a manifest, which must name a file directly inside the store folder: no
    folders, no "..", no absolute path (a store is a closed world: it never points outside itself)."""
    if (not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value
            or "\0" in value):
        raise bad_store(mf, f"{what} {value!r} is not a plain file name inside the store folder")
    return value


def validate(p: Path, mf: Path, m: dict):
    """Check the manifest's fields and its agreement with the files; returns the model config."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise bad_store(mf, f"not a flashnb store manifest (format {m.get('format') if isinstance(m, dict) else m!r})")
    v = m.get("format_version")
    if not _is_int(v) or v != FORMAT_VERSION:
        raise FlashnbError(f"{mf}: store format version {v!r} is not supported (this flashnb reads version "
                           f"{FORMAT_VERSION}); re-create the store with this flashnb's {RECREATE}")
    if not isinstance(m.get("layout"), str) or m["layout"] not in LAYOUTS:
        raise FlashnbError(f"{mf}: unknown layout {m.get('layout')!r} (known: {', '.join(LAYOUTS)}); "
                           f"the store was written by another flashnb: re-create it with {RECREATE}")
    if not isinstance(m.get("dtype"), str) or m["dtype"] not in DTYPES:
        raise bad_store(mf, f"unknown dtype {m.get('dtype')!r} (known: {', '.join(DTYPES)})")
    fd = m.setdefault("ffn_dtype", m["dtype"])  # stores written before quantized rows: the FFN at `dtype`
    if not isinstance(fd, str) or fd not in FFN_DTYPES:
        raise bad_store(mf, f"unknown ffn_dtype {fd!r} (known: {', '.join(FFN_DTYPES)})")
    if fd in QUANTIZED and m.get("group") != GROUP:
        raise bad_store(mf, f"{fd} rows need group {GROUP} (values per scale), the manifest says {m.get('group')!r}")
    a = m.get("alignment")
    if not _is_int(a) or a < 512 or a & (a - 1):
        raise bad_store(mf, f"alignment {a!r} is not a power of two >= 512")
    kind = m.get("model_type")
    if not isinstance(kind, str) or kind not in CONFIGS:
        raise bad_store(mf, f"unknown model_type {kind!r}")
    if not isinstance(m.get("model_config"), dict):
        raise bad_store(mf, "model_config is missing")
    config = CONFIGS[kind].from_hf(m["model_config"], f"{mf} (model_config)")
    d, f_dim, L = config.hidden_size, config.ffn_dim, config.num_hidden_layers
    if (m.get("d_model"), m.get("ffn_dim"), m.get("num_layers")) != (d, f_dim, L):
        raise bad_store(mf, f"d_model/ffn_dim/num_layers {m.get('d_model')}/{m.get('ffn_dim')}/{m.get('num_layers')} "
                       f"disagree with model_config ({d}/{f_dim}/{L})")
    parts, dram_parts = flash_parts(config, m["layout"])
    if m.get("parts") != parts or m.get("dram_parts", []) != dram_parts:
        raise bad_store(mf, f"parts {m.get('parts')} (in DRAM: {m.get('dram_parts', [])}) are not {kind}'s FFN matrices "
                       f"{parts} (in DRAM: {dram_parts}) for layout {m['layout']!r}")
    end = _validate_regions(mf, m, config, parts)
    _validate_files(p, mf, m, align_up(end, a))
    return config


def check_runs_from_flash(config) -> None:
    """One clear error for a model the engine cannot run from flash, before anything is written or trained for
    it: a gated FFN with biases on its gate and up projections (mlp_bias), which the bundles' math leaves out."""
    if config.gated and getattr(config, "mlp_bias", False):
        raise FlashnbError(f"this {config.model_type} model's gated FFN has biases on its gate and up projections "
                           "(mlp_bias in config.json), which flashnb's engine does not compute: it cannot run from "
                           "flash (`flashnb generate --model FOLDER` runs it in DRAM)")


def flash_parts(config, layout: str) -> tuple[list[str], list[str]]:
    """(the FFN matrices a store of `layout` keeps on flash, those it keeps in DRAM) for `config`'s model."""
    check_runs_from_flash(config)
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
    part_bytes = RowFormat(m["ffn_dtype"], d).part_bytes
    expect = ([("bundles", parts)] if m["layout"] != "unbundled" else [(x, [x]) for x in parts])
    layers = m.get("layers")
    if not isinstance(layers, list) or len(layers) != L:
        raise bad_store(mf, f"lists {len(layers) if isinstance(layers, list) else 'no'} layers, the model has {L}")
    end = 0
    try:
        for i, regs in enumerate(layers):
            if [(r["name"], r["parts"]) for r in regs] != expect:
                raise bad_store(mf, f"layer {i}: regions {[r['name'] for r in regs]} do not match layout "
                               f"{m['layout']!r} (expected {[e[0] for e in expect]})")
            for r in regs:
                where = f"layer {i} region {r['name']!r}"
                if not all(_is_int(r[k]) for k in ("offset", "size", "rows", "row_bytes")):
                    raise bad_store(mf, f"{where}: offset, size, rows and row_bytes must be whole numbers")
                if r["offset"] % a or r["offset"] < end:
                    raise bad_store(mf, f"{where}: offset {r['offset']} is not {a}-aligned or overlaps the previous region")
                rb = len(r["parts"]) * part_bytes
                if r["rows"] != f_dim or r["row_bytes"] != rb or r["size"] != f_dim * rb:
                    raise bad_store(mf, f"{where}: rows/row_bytes/size {r['rows']}/{r['row_bytes']}/{r['size']} "
                                   f"should be {f_dim}/{rb}/{f_dim * rb}")
                if not isinstance(r["sha256"], str) or len(r["sha256"]) != 64:
                    raise bad_store(mf, f"{where}: sha256 is missing")
                end = r["offset"] + r["size"]
    except (KeyError, TypeError, AttributeError) as e:
        raise bad_store(mf, f"a layer region entry is malformed ({e!r})") from None
    return end


def _validate_files(p: Path, mf: Path, m: dict, ffn_bytes: int) -> None:
    """Check that the files the manifest names lie inside the store and have the sizes it says."""
    for key in ("ffn_file", "dram_file"):
        if not isinstance(m.get(key), dict):
            raise bad_store(mf, f"{key} is missing")
    ffn, dram = m["ffn_file"], m["dram_file"]
    ffn_path = p / plain_name(mf, ffn.get("name"), "ffn_file name")
    dram_path = p / plain_name(mf, dram.get("name"), "dram_file name")
    if ffn.get("bytes") != ffn_bytes:
        raise bad_store(mf, f"ffn_file bytes {ffn.get('bytes')} should be {ffn_bytes} for these regions")
    for path, entry in ((ffn_path, ffn), (dram_path, dram)):
        if not path.is_file():
            raise bad_store(path, "is missing")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise FlashnbError(f"{path} has {size} bytes but {mf} says {entry.get('bytes')}: the file is truncated "
                               f"or was replaced; re-create the store with {RECREATE}")
    sums = m.get("checksums")
    if not isinstance(sums, dict) or sums.get("algorithm") != ALGORITHM:
        raise bad_store(mf, f"the per-bundle checksums ({ALGORITHM}) are missing")
    sums_path = p / plain_name(mf, sums.get("name"), "checksums name")
    if not sums_path.is_file():
        raise bad_store(sums_path, "is missing (the per-bundle checksums)")
    rows = sum(len(regs) for regs in m["layers"]) * m["ffn_dim"]
    if sums.get("bytes") != rows * DIGEST.itemsize or sums_path.stat().st_size != sums["bytes"]:
        raise bad_store(sums_path, f"should hold {rows} checksums of {DIGEST.itemsize} bytes")
    if not isinstance(m.get("fingerprint"), str):
        raise bad_store(mf, "the model's fingerprint is missing")
    if m.get("placement") is not None:
        pl = m["placement"]
        path = p / plain_name(mf, pl.get("name") if isinstance(pl, dict) else None, "placement name")
        want = m["num_layers"] * m["ffn_dim"] * 4
        if pl.get("bytes") != want or not path.is_file() or path.stat().st_size != want:
            raise bad_store(path, f"should hold {m['num_layers']} x {m['ffn_dim']} int32 neuron ids (the placement)")
    if m.get("tokenizer") is not None:
        tok = p / plain_name(mf, m["tokenizer"], "tokenizer")
        if not tok.is_file():
            raise bad_store(tok, "is missing")
