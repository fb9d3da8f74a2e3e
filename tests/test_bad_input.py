"""A bad model folder gives one clear error naming the file — never a traceback from deep inside."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
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


def test_pickle_only_folder_is_refused(folder, capsys):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(FlashnbError, match="never unpickles"):
        load_model(folder)
    assert main(["demo", "--model", str(folder), "-n", "2"]) == 2   # said before the predictors are looked for
    assert "never unpickles" in capsys.readouterr().err


def test_missing_tokenizer(folder, capsys):
    (folder / "tokenizer.json").unlink()
    assert "tokenizer.json is missing" in cli_error(capsys, folder)


def test_not_a_folder(tmp_path, capsys):
    assert "does not exist" in cli_error(capsys, tmp_path / "nope")


def test_source_folder_untouched_by_loading(tiny_opt_dir):
    before = {p.name: p.read_bytes() for p in tiny_opt_dir.iterdir()}
    load_model(tiny_opt_dir)
    assert {p.name: p.read_bytes() for p in tiny_opt_dir.iterdir()} == before


def _convert_error(folder, tmp_path, capsys, words: str) -> str:
    """`flashnb convert` on the folder: one line naming the problem, and nothing left behind."""
    assert main(["convert", str(folder), str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flashnb: error: ") and "\n" not in err and words in err, err
    assert not (tmp_path / "store").exists() and not list(tmp_path.glob(".store.*"))
    return err


def _retensor(folder, name, fn):
    f = folder / "model.safetensors"
    tensors = load_file(f)
    tensors[name] = fn(tensors[name])
    save_file(tensors, f, metadata={"format": "pt"})


def test_an_integer_weight_is_refused(folder, tmp_path, capsys):
    _retensor(folder, "model.decoder.layers.0.fc1.weight", lambda t: (t * 100).to(torch.int32))
    _convert_error(folder, tmp_path, capsys, "is torch.int32, not a floating-point weight")


@pytest.mark.parametrize("bad,words", [(float("nan"), "inf or nan"), (float("inf"), "inf or nan"),
                                       (3e7, "far beyond a trained model's weights")])
def test_non_finite_or_absurd_weights_are_refused(folder, tmp_path, capsys, bad, words):
    def poison(t):
        t = t.clone()
        t[0, 0] = bad
        return t

    _retensor(folder, "model.decoder.layers.1.fc2.weight", poison)
    _convert_error(folder, tmp_path, capsys, words)


def test_a_stale_shard_is_refused(folder, tmp_path, capsys):
    tensors = load_file(folder / "model.safetensors")
    save_file({"model.decoder.layers.0.fc1.weight": tensors["model.decoder.layers.0.fc1.weight"] * 2},
              folder / "model-old.safetensors", metadata={"format": "pt"})
    _convert_error(folder, tmp_path, capsys, "is in both")
    index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in tensors}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _convert_error(folder, tmp_path, capsys, "does not list: stale shards?")


@pytest.mark.parametrize("key,value", [("num_hidden_layers", -1), ("num_hidden_layers", 2.0), ("ffn_dim", "64"),
                                       ("num_attention_heads", 0), ("hidden_size", [32]), ("vocab_size", True)])
def test_absurd_config_values_are_refused_before_writing(folder, tmp_path, capsys, key, value):
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    _convert_error(folder, tmp_path, capsys, key)
    assert key in cli_error(capsys, folder)      # dense generate too: no text from a 0-layer model


def test_a_gated_ffn_with_biases_is_refused_before_any_work(tmp_path, capsys):
    """mlp_bias: the engine's bundle math has no gate or up bias, so convert and train-predictors refuse the
    model at once, where the dense model in DRAM still runs it."""
    from conftest import make_tiny_llama

    model = make_tiny_llama(tmp_path / "biased", mlp_bias=True)
    capsys.readouterr()   # (transformers' progress bar while saving it)
    words = "gated FFN has biases on its gate and up projections (mlp_bias in config.json)"
    _convert_error(model, tmp_path, capsys, words)
    for argv in (["train-predictors", "--model", str(model), "--out", str(tmp_path / "p")],
                 ["demo", "--model", str(model), "-n", "2"]):
        assert main(argv) == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    assert main(["generate", "--model", str(model), "--prompt", "hi", "-n", "2"]) == 0


def test_a_fifo_in_the_source_is_refused_not_read(folder, tmp_path, capsys):
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")      # reading it would block forever
    _convert_error(folder, tmp_path, capsys, "is not a regular file")


def test_a_tokenizer_of_another_model_is_one_line(folder, capsys):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = 64                         # the tokenizer produces ids up to 299
    (folder / "config.json").write_text(json.dumps(cfg))
    f = folder / "model.safetensors"
    t = load_file(f)
    t["model.decoder.embed_tokens.weight"] = t["model.decoder.embed_tokens.weight"][:64].contiguous()
    save_file(t, f, metadata={"format": "pt"})
    assert main(["generate", "--model", str(folder), "--prompt", "Return the number of items", "-n", "2"]) == 2
    assert "outside the model's vocabulary of 64" in capsys.readouterr().err
    _convert_error(folder, folder.parent, capsys, "tokens, more than the model's vocabulary of 64 (config.json): it "
                                                  "belongs to another model")   # never copied into a store
    (folder / "tokenizer.json").write_text("not a tokenizer")
    _convert_error(folder, folder.parent, capsys, "cannot be read as a tokenizers file")


def test_os_errors_while_converting_are_one_line(folder, tmp_path, capsys):
    """A folder nobody may write into (root may write into read-only folders, not into /proc): the error
    names the store asked for, not flashnb's temporary folder beside it."""
    if os.geteuid() == 0:
        if not os.path.isdir("/proc/self"):
            pytest.skip("root writes into read-only folders, and there is no /proc here")
        target = Path("/proc/flashnb-store")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = ro / "store"
    assert main(["convert", str(folder), str(target)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the store {target}: creating a folder in {target.parent} failed" in err
    assert "convert into a folder you can write to" in err and ".tmp" not in err


def test_a_full_disk_is_one_line(folder, tmp_path, capsys, monkeypatch):
    import errno

    from flashnb.core import convert as convert_mod

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".store.tmp" / "ffn.bin"))

    monkeypatch.setattr(convert_mod, "_write_ffn", full)
    _convert_error(folder, tmp_path, capsys, "No space left on device); free some space or convert onto another disk")


def test_a_notebook_shows_a_flashnb_error_as_one_line():
    """In IPython (JupyterLab's kernel) bad input is one line naming the fix, not flashnb's frames; other
    errors keep their traceback. (A subprocess: an IPython shell changes the process it runs in.)"""
    import subprocess
    import sys

    code = ("from IPython.core.interactiveshell import InteractiveShell\n"
            "shell = InteractiveShell.instance()\n"
            "shell.run_cell(\"from flashnb import shipped\\nshipped('no-such-model')\")\n"
            "print('--')\n"
            "shell.run_cell('1 / 0')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    flashnb_part, other = out.split("--\n")
    assert flashnb_part.strip() == "FlashnbError: flashnb ships flashnb-opt-21m and flashnb-llama-11m, not 'no-such-model'"
    assert "Traceback" in other and "ZeroDivisionError" in other
