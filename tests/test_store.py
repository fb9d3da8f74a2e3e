"""The flash store: conversion round trips, layout, validation and checksums."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_llama, make_tiny_opt
from flash_helpers import reference_rows
from flashnb.models.checkpoint import load_model
from flashnb.cli import main
from flashnb.errors import FlashnbError
from flashnb.core.convert import ConvertConfig, convert
from flashnb.core.defaults import ALIGNMENT
from flashnb.core.manifest import DTYPES
from flashnb.core.store import FlashStore
from flashnb.core.verify import verify

MODELS = ("opt", "llama")
COMBOS = [(m, lay, dt) for m in MODELS for lay in ("bundled", "unbundled") for dt in ("fp16", "fp32")]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("src")
    return {"opt": make_tiny_opt(base / "opt"), "llama": make_tiny_llama(base / "llama")}


@pytest.fixture(scope="module")
def stores(sources, tmp_path_factory) -> dict[tuple, Path]:
    base = tmp_path_factory.mktemp("stores")
    return {(m, lay, dt): convert(sources[m], base / f"{m}-{lay}-{dt}", ConvertConfig(lay, dt, progress=False))
            for m, lay, dt in COMBOS}


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("model,layout,dtype", COMBOS)
def test_round_trip_matrices_and_dense_model(sources, stores, model, layout, dtype):
    src, s = sources[model], FlashStore.open(stores[(model, layout, dtype)])
    assert (s.layout, s.dtype_name, s.config.model_type) == (layout, dtype, model)
    parts = 2 if model == "opt" else 3
    assert s.row_values == parts * s.d_model                      # a bundle: 2 d (OPT) / 3 d (gated)
    assert s.neuron_bytes == parts * s.d_model * DTYPES[dtype][1].itemsize
    for layer in range(s.num_layers):
        assert np.array_equal(s.ffn_rows(layer), reference_rows(src, layer, dtype))
        regs = s.regions(layer)
        assert [r.name for r in regs] == (["bundles"] if layout == "bundled" else list(s.parts))
        assert all(r.offset % ALIGNMENT == 0 for r in regs)
    # the dense model rebuilt from the store equals the checkpoint cast to the store dtype
    ref = load_model(src, torch.float32)
    got = s.load_model(torch.float32)
    tdt = DTYPES[dtype][0]
    for (n, a), (n2, b) in zip(ref.named_parameters(), got.named_parameters()):
        assert n == n2 and torch.equal(a.to(tdt).float(), b), n
    ids = torch.tensor([[2, 5, 7, 11]])
    assert torch.equal(got(ids), s.load_model(torch.float32)(ids))


def test_dram_file_holds_everything_but_ffn_matrices(stores):
    s = FlashStore.open(stores[("opt", "bundled", "fp16")])
    dram = s.dram_tensors()
    assert not [k for k in dram if k.endswith(("fc1.weight", "fc2.weight"))]
    assert "layers.0.ffn.fc1.bias" in dram and "layers.1.ffn.fc2.bias" in dram   # biases stay in DRAM
    assert "embed_tokens.weight" in dram and all(t.dtype == torch.float16 for t in dram.values())
    ls = FlashStore.open(stores[("llama", "unbundled", "fp32")])
    assert not [k for k in ls.dram_tensors() if "_proj.weight" in k and ".ffn." in k]
    assert (ls.path / "tokenizer.json").is_file() and ls.tokenizer_path is not None


def test_source_untouched_and_no_temporary_left(sources, tmp_path):
    before = _digest(sources["opt"])
    dst = convert(sources["opt"], tmp_path / "s", ConvertConfig(progress=False))
    assert _digest(sources["opt"]) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    assert sorted(p.name for p in dst.iterdir()) == ["dram.safetensors", "ffn.bin", "ffn.sum", "manifest.json",
                                                     "tokenizer.json"]
    with pytest.raises(FlashnbError, match="is a flashnb store already; pass --force"):
        convert(sources["opt"], dst, ConvertConfig(progress=False))
    convert(sources["opt"], dst, ConvertConfig(layout="unbundled", overwrite=True, progress=False))
    assert FlashStore.open(dst).layout == "unbundled"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_failed_convert_leaves_nothing(sources, tmp_path):
    src = tmp_path / "broken"
    src.mkdir()
    (src / "config.json").write_text((sources["opt"] / "config.json").read_text())
    from safetensors.torch import load_file, save_file
    t = load_file(sources["opt"] / "model.safetensors")
    t.pop(next(k for k in t if k.endswith("layers.1.fc2.weight")))
    save_file(t, src / "model.safetensors")
    with pytest.raises(FlashnbError, match="fc2.weight"):
        convert(src, tmp_path / "out", ConvertConfig(progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_bad_options(sources, tmp_path):
    with pytest.raises(FlashnbError, match="unknown layout 'diagonal'"):
        convert(sources["opt"], tmp_path / "x", ConvertConfig(layout="diagonal"))
    with pytest.raises(FlashnbError, match="unknown store dtype"):
        convert(sources["opt"], tmp_path / "x", ConvertConfig(dtype="int4"))
    with pytest.raises(FlashnbError, match="inside the source folder"):
        convert(sources["opt"], sources["opt"] / "store", ConvertConfig(progress=False))
    with pytest.raises(FlashnbError, match="is a Hugging Face model folder, not a flash store"):
        FlashStore.open(sources["opt"])


def _copy(store: Path, tmp_path: Path) -> Path:
    import shutil
    return Path(shutil.copytree(store, tmp_path / store.name))


def test_verify_names_the_damaged_layer_and_region(stores, tmp_path):
    p = _copy(stores[("opt", "unbundled", "fp16")], tmp_path)
    assert verify(p, progress=False).regions == 2 + 2 * 2          # DRAM file, checksum file, 2 layers x 2 regions
    s = FlashStore.open(p)
    reg = s.regions(1)[1]                              # layer 1, region 'fc2'
    with open(s.ffn_path, "r+b") as f:
        f.seek(reg.offset + 100)
        b = f.read(1)
        f.seek(reg.offset + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    FlashStore.open(p)                                 # sizes still agree: opening does not hash
    with pytest.raises(FlashnbError, match=r"layer 1 region 'fc2'") as e:
        verify(p, progress=False)
    assert "layer 0" not in str(e.value) and "re-create" in str(e.value)


def test_truncated_ffn_file(stores, tmp_path):
    p = _copy(stores[("llama", "bundled", "fp16")], tmp_path)
    ffn = p / "ffn.bin"
    size = ffn.stat().st_size
    with open(ffn, "r+b") as f:
        f.truncate(size - 4096)
    with pytest.raises(FlashnbError, match=f"ffn.bin has {size - 4096} bytes but .* says {size}.*truncated"):
        FlashStore.open(p)


@pytest.mark.parametrize("field,value,message", [
    ("format_version", 99, "format version 99 is not supported"),
    ("layout", "zigzag", "unknown layout 'zigzag'"),
    ("dtype", "fp8", "unknown dtype 'fp8'"),
    ("alignment", 1000, "alignment 1000"),
    ("num_layers", 3, "disagree with model_config"),
])
def test_manifest_validation(stores, tmp_path, field, value, message):
    p = _copy(stores[("opt", "bundled", "fp32")], tmp_path)
    m = json.loads((p / "manifest.json").read_text())
    m[field] = value
    (p / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FlashnbError, match=message) as e:
        FlashStore.open(p)
    assert "manifest.json" in str(e.value)


def test_manifest_region_mismatch(stores, tmp_path):
    p = _copy(stores[("opt", "bundled", "fp16")], tmp_path)
    m = json.loads((p / "manifest.json").read_text())
    m["layers"][1][0]["offset"] += 512
    (p / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FlashnbError, match="layer 1 region 'bundles'.*aligned"):
        FlashStore.open(p)
    (p / "manifest.json").write_text("{not json")
    with pytest.raises(FlashnbError, match="not valid JSON"):
        FlashStore.open(p)


def test_cli_convert_and_verify(sources, tmp_path, capsys):
    dst = tmp_path / "cli-store"
    assert main(["convert", str(sources["llama"]), str(dst), "--layout", "unbundled", "--dtype", "fp32"]) == 0
    assert "unbundled fp32" in capsys.readouterr().out
    assert main(["verify", str(dst)]) == 0
    assert ": OK, 8 checksums" in capsys.readouterr().out
    with open(dst / "ffn.bin", "r+b") as f:
        f.seek(8)
        f.write(b"\x01\x02")
    assert main(["verify", str(dst)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]  # (the rest: progress bar)
    assert len(err) == 1 and err[0].startswith("flashnb: error:") and "layer 0 region 'gate_proj'" in err[0]
    assert main(["convert", str(sources["llama"]), str(dst)]) == 2
    assert "is a flashnb store already; pass --force" in capsys.readouterr().err
