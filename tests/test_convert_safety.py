"""`flashnb convert` never deletes what it did not write: --force replaces only a flashnb store that
holds nothing else, never the source or a folder holding it; killed runs are cleaned up next time."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flashnb.cli import main
from flashnb.core.convert import ConvertConfig, convert
from flashnb.core.store import FlashStore

from conftest import cli_refuses as _refused


def _tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256): what must survive a refused convert."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_force_never_deletes_the_source_folder_it_sits_in(tmp_path, tiny_opt_dir, capsys):
    x = tmp_path / "x"
    shutil.copytree(tiny_opt_dir, x / "src")
    before = _tree(x)
    _refused(capsys, ["convert", str(x / "src"), str(x), "--force"], "contains the source folder")
    _refused(capsys, ["convert", str(x / "src"), str(x / "src"), "--force"], "inside the source folder")
    _refused(capsys, ["convert", str(x / "src"), str(x / "src" / "store"), "--force"], "inside the source folder")
    assert _tree(x) == before


def test_force_never_deletes_a_folder_that_is_not_a_store(tmp_path, tiny_opt_dir, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    _refused(capsys, ["convert", str(tiny_opt_dir), str(mine), "--force"], "is not a flashnb store")
    assert (mine / "notes.txt").read_text() == "my notes"
    (tmp_path / "file").write_text("data")
    _refused(capsys, ["convert", str(tiny_opt_dir), str(tmp_path / "file"), "--force"], "is a file")
    assert (tmp_path / "file").read_text() == "data"


def test_a_folder_that_is_not_a_store_is_refused_without_suggesting_force(tmp_path, tiny_opt_dir, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    err = _refused(capsys, ["convert", str(tiny_opt_dir), str(mine)], "is not a flashnb store")
    assert "--force" not in err and (mine / "notes.txt").read_text() == "my notes"


def test_an_empty_folder_becomes_the_store(tmp_path, tiny_opt_dir, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tiny_opt_dir), str(tmp_path / "empty")]) == 0
    assert FlashStore.open(tmp_path / "empty").layout == "bundled"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_force_replaces_a_store_whose_manifest_is_damaged_and_nothing_else(tmp_path, tiny_opt_dir, capsys):
    dst = convert(tiny_opt_dir, tmp_path / "store", ConvertConfig(progress=False))
    (dst / "manifest.json").write_text("{not json")
    assert main(["verify", str(dst)]) == 2
    hint = capsys.readouterr().err
    assert "flashnb convert HF_FOLDER STORE --force" in hint          # the hint, followed, works:
    assert main(["convert", str(tiny_opt_dir), str(dst), "--force"]) == 0
    assert main(["verify", str(dst)]) == 0
    capsys.readouterr()
    # a folder merely holding files with a store's common names is not a store
    look = tmp_path / "look"
    look.mkdir()
    for name in ("manifest.json", "tokenizer.json"):
        (look / name).write_text("{}")
    before = _tree(look)
    _refused(capsys, ["convert", str(tiny_opt_dir), str(look), "--force"], "is not a flashnb store")
    assert _tree(look) == before


def test_a_store_given_as_a_model_folder_and_a_model_folder_as_a_store_are_named(tmp_path, tiny_opt_dir, capsys):
    dst = convert(tiny_opt_dir, tmp_path / "store", ConvertConfig(progress=False))
    for argv in (["convert", str(dst), str(tmp_path / "again")], ["demo", "--model", str(dst), "-n", "1"]):
        _refused(capsys, argv, f"{dst} is a flashnb store, not a Hugging Face model folder")
    _refused(capsys, ["generate", "--store", str(tiny_opt_dir), "--prompt", "a"],
             f"{tiny_opt_dir} is a Hugging Face model folder, not a flash store")


def test_force_on_cwd_that_is_not_a_store_is_refused(tmp_path, tiny_opt_dir, capsys, monkeypatch):
    (tmp_path / "keep.txt").write_text("keep")
    monkeypatch.chdir(tmp_path)
    _refused(capsys, ["convert", str(tiny_opt_dir), ".", "--force"], "is not a flashnb store")
    assert (tmp_path / "keep.txt").read_text() == "keep"


def test_force_keeps_a_store_that_holds_other_files(tmp_path, tiny_opt_dir, capsys):
    dst = convert(tiny_opt_dir, tmp_path / "store", ConvertConfig(progress=False))
    (dst / "results.json").write_text("{}")
    before = _tree(dst)
    _refused(capsys, ["convert", str(tiny_opt_dir), str(dst), "--force"], "results.json")
    assert _tree(dst) == before


def test_force_replaces_a_store(tmp_path, tiny_opt_dir, capsys):
    dst = convert(tiny_opt_dir, tmp_path / "store", ConvertConfig(progress=False))
    assert main(["convert", str(tiny_opt_dir), str(dst), "--force", "--layout", "unbundled"]) == 0
    assert FlashStore.open(dst).layout == "unbundled"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_a_symlink_destination_is_refused(tmp_path, tiny_opt_dir, capsys):
    dst = convert(tiny_opt_dir, tmp_path / "store", ConvertConfig(progress=False))
    (tmp_path / "link").symlink_to(dst)
    _refused(capsys, ["convert", str(tiny_opt_dir), str(tmp_path / "link"), "--force"], "symbolic link")
    assert FlashStore.open(dst).layout == "bundled"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_a_killed_convert_are_cleaned_up(tmp_path, tiny_opt_dir, capsys):
    pid = _dead_pid()
    stale = tmp_path / f".store.tmp-{pid}"
    stale.mkdir()
    (stale / "ffn.bin").write_bytes(b"\0" * 4096)
    unrelated = tmp_path / f".store.tmp-{pid + 1}x"  # not a flashnb name: left alone
    unrelated.mkdir()
    convert(tiny_opt_dir, tmp_path / "store", ConvertConfig(progress=False))
    assert not stale.exists() and unrelated.exists()
    assert "interrupted convert" in capsys.readouterr().err


def test_a_store_moved_aside_by_a_killed_convert_is_put_back(tmp_path, tiny_opt_dir):
    dst = convert(tiny_opt_dir, tmp_path / "store", ConvertConfig(progress=False))
    aside = tmp_path / f".store.old-{_dead_pid()}"
    os.replace(dst, aside)  # the moment a replacing convert was killed: the old store moved aside
    convert(tiny_opt_dir, tmp_path / "other", ConvertConfig(progress=False))  # another store: not touched
    assert aside.exists()
    with pytest.raises(Exception, match="is a flashnb store already"):
        convert(tiny_opt_dir, dst, ConvertConfig(progress=False))  # restored first, then refused without force
    assert not aside.exists() and FlashStore.open(dst).layout == "bundled"
