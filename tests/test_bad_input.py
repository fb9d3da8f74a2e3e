"""A bad model folder gives one clear error naming the file — never a traceback from deep inside."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from flashnb import FlashnbError
from flashnb.models.checkpoint import load_model
from flashnb.cli import main


@pytest.fixture
def folder(tmp_path, tiny_opt_dir):
    dst = tmp_path / "model"
    shutil.copytree(tiny_opt_dir, dst)
    return dst


def cli_error(capsys, folder) -> str:
    """Run `flashnb generate` on the folder; assert exit status 2 and a one-line message; return it."""
    assert main(["generate", "--model", str(folder), "--prompt", "hi", "-n", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flashnb: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_config(folder, capsys):
    (folder / "config.json").unlink()
    assert "config.json is missing" in cli_error(capsys, folder)


def test_config_not_json(folder, capsys):
    (folder / "config.json").write_text("{not json")
    assert "config.json is not valid JSON" in cli_error(capsys, folder)


def test_unknown_architecture(folder, capsys):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(cfg))
    err = cli_error(capsys, folder)
    assert "unknown architecture model_type='gpt2'" in err and "config.json" in err


def test_missing_tensor(folder, capsys):
    f = folder / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.decoder.layers.1.fc2.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    err = cli_error(capsys, folder)
    assert "'model.decoder.layers.1.fc2.weight'" in err and "model.safetensors" in err
    assert "missing" in err


def test_misshaped_tensor(folder, capsys):
    f = folder / "model.safetensors"
    tensors = load_file(f)
    tensors["model.decoder.layers.0.fc1.weight"] = tensors["model.decoder.layers.0.fc1.weight"][:10]
    save_file(tensors, f, metadata={"format": "pt"})
    err = cli_error(capsys, folder)
    assert "model.decoder.layers.0.fc1.weight" in err and "[10, 32]" in err and "[64, 32]" in err


def test_corrupt_safetensors_header(folder, capsys):
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32  # garble the JSON header
    f.write_bytes(bytes(data))
    err = cli_error(capsys, folder)
    assert "model.safetensors" in err and "not a readable safetensors file" in err


def test_pickle_only_folder_is_refused(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(FlashnbError, match="never unpickles"):
        load_model(folder)


def test_missing_tokenizer(folder, capsys):
    (folder / "tokenizer.json").unlink()
    assert "tokenizer.json is missing" in cli_error(capsys, folder)


def test_not_a_folder(tmp_path, capsys):
    assert "does not exist" in cli_error(capsys, tmp_path / "nope")


def test_source_folder_untouched_by_loading(tiny_opt_dir):
    before = {p.name: p.read_bytes() for p in tiny_opt_dir.iterdir()}
    load_model(tiny_opt_dir)
    assert {p.name: p.read_bytes() for p in tiny_opt_dir.iterdir()} == before
