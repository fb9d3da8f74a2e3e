"""README's "Use it from Python" recipe runs as printed: the text stops at the end of sequence, the stats print."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_python_recipe_runs_as_printed(capsys, monkeypatch):
    monkeypatch.setenv("FLASHNB_TORCH_THREADS", "1")
    code = re.search(r"## Use it from Python\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    text, stats = capsys.readouterr().out.strip().split("\n")[-2:]
    assert len(text.split()) >= 3
    assert len(ns["eng"].steps) < len(ns["ids"]) + 20   # it stopped at the end of sequence, as the CLI does
    assert re.fullmatch(r"\d+\.\d\d MB read and \d+\.\d ms per token", stats), stats
    assert not Path(ns["store"].path).exists()   # the temporary store went with its folder


def test_the_front_door_keeps_its_names_after_any_import():
    """`from flashnb import shipped` is the function even after a module imported the one that defines it (a
    submodule named like a front-door name would shadow it)."""
    import importlib

    import flashnb

    for name, module in flashnb._FRONT_DOOR.items():
        importlib.import_module(module)
        assert callable(getattr(flashnb, name)) and not isinstance(getattr(flashnb, name), type(flashnb)), name
