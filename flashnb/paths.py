"""Where the files flashnb ships live (the repository's data/ folder)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from flashnb.errors import FlashnbError

SHIPPED_MODEL = "flashnb-opt-21m"


def data_dir() -> Path:
    """The data/ folder: $FLASHNB_DATA if set, else data/ beside the flashnb package (a checkout)."""
    env = os.environ.get("FLASHNB_DATA")
    d = Path(env) if env else Path(__file__).resolve().parent.parent / "data"
    if not d.is_dir():
        raise FlashnbError(f"flashnb's data folder {d} is missing; install flashnb from a clone of the "
                           "repository (pip install -e .) or set FLASHNB_DATA to the clone's data/ folder")
    return d


def shipped_model_dir() -> Path:
    """The folder of the model flashnb ships (a Hugging Face OPT folder)."""
    d = data_dir() / SHIPPED_MODEL
    if not (d / "model.safetensors").is_file():
        raise FlashnbError(f"the shipped model {d} is missing; check out the repository's data/ folder "
                           "(it is committed) or rebuild it with `flashnb train`")
    return d


def shipped_predictors_dir() -> Path:
    """The folder of the shipped model's predictors and hot neurons (data/flashnb-opt-21m-predictors)."""
    return data_dir() / f"{SHIPPED_MODEL}-predictors"


# Temporary folders in use (scratch stores of `flashnb demo` and `flashnb bench`): the command line's
# SIGTERM handler removes them before the process ends, wherever the signal lands.
TEMPORARY: list[Path] = []


@contextlib.contextmanager
def temporary_folder(prefix: str, dir: str | Path | None = None) -> Iterator[Path]:
    """A temporary folder, removed on exit and (through the command line) on SIGTERM."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    TEMPORARY.append(path)
    try:
        yield path
    finally:
        TEMPORARY.remove(path)
        shutil.rmtree(path, ignore_errors=True)


def remove_temporary_folders() -> None:
    for path in list(TEMPORARY):
        shutil.rmtree(path, ignore_errors=True)
