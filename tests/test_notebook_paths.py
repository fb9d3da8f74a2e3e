"""The notebooks' optional paths, which nbval never runs (it runs the CI path): each test executes the
notebook's own cell sources with the option switched on, on a configuration small enough for the suite."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def code_cells(name: str) -> list[str]:
    nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def cell(cells: list[str], starts: str) -> str:
    found = [c for c in cells if c.startswith(starts)]
    assert len(found) == 1, f"no single cell starts with {starts!r}"
    return found[0]


def switched(source: str, old: str, new: str) -> str:
    assert old in source, f"{old!r} is no longer in the cell: update this test with the notebook"
    return source.replace(old, new)


def test_02_optional_training_cell_trains_and_measures_predictors(monkeypatch, capsys):
    from flashnb.training import corpus
    from flashnb.models.tiny import TEXTS

    cells = code_cells("02_sparsity_and_predictors")
    ns: dict = {}
    exec(switched(cell(cells, "import numpy as np"), "N_TOKENS = 2048", "N_TOKENS = 256"), ns)
    exec(cell(cells, "trace = record("), ns)
    tiny = corpus.Corpus(train=[t + f" {i}" for i, t in enumerate(TEXTS * 40)], heldout=TEXTS[:2], sources={})
    monkeypatch.setattr(corpus, "collect", lambda: tiny)   # the real corpus takes a minute to collect
    train = switched(cell(cells, "TRAIN = False"), "TRAIN = False", "TRAIN = True")
    exec(switched(switched(train, "8192", "512"), "epochs=2", "epochs=1"), ns)
    mine = ns["mine"]
    assert len(mine.layers) == ns["model"].config.num_hidden_layers
    assert "recall=" in capsys.readouterr().out   # the Selection it prints, measured on the held-out trace


def test_01_full_profile_path_runs(monkeypatch, tmp_path):
    from flashnb.device import measure

    cells = code_cells("01_flash_characteristics")
    ns: dict = {}
    exec(switched(cell(cells, "import tempfile"), "QUICK = True", "QUICK = False"), ns)

    def small(**kw):   # the full grid's code path on a small file, few cells, short reads
        full = measure.ProfileConfig(**kw)
        return dataclasses.replace(full, dir=str(tmp_path), size=32 << 20, chunk_sizes=full.chunk_sizes[::4],
                                   in_flight=full.in_flight[::3], seconds_per_cell=0.02, sequential_seconds=0.05)

    ns["ProfileConfig"] = small
    exec(cell(cells, "# NBVAL_IGNORE_OUTPUT\nprofile = run_profile("), ns)
    profile = ns["profile"]
    assert profile.grid.shape == (len(measure.DEFAULT_IN_FLIGHT[::3]), len(measure.DEFAULT_CHUNKS[::4]))
    assert (profile.grid > 0).all()


@pytest.mark.parametrize("name", ["01_flash_characteristics", "02_sparsity_and_predictors"])
def test_the_options_are_still_there(name):
    source = "\n".join(code_cells(name))
    assert ("QUICK = True" in source) if name.startswith("01") else ("TRAIN = False" in source)


def test_scratch_folders_of_gone_kernels_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    from flashnb.paths import scratch_folder

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"flashnb-nb-{int(gone.stdout)}-abc"   # a kernel killed before it cleaned up
    alive = tmp_path / f"flashnb-nb-{os.getppid()}-def"     # another running process's folder
    other = tmp_path / "flashnb-nb-notapid"                 # not ours to judge
    for d in (dead, alive, other):
        (d / "store").mkdir(parents=True)
    work = scratch_folder(tmp_path)
    assert not dead.exists() and alive.exists() and other.exists()
    assert Path(work.name).name.startswith(f"flashnb-nb-{os.getpid()}-")
    work.cleanup()
    assert not Path(work.name).exists()
