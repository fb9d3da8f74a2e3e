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
SWIGLU_MODEL = "flashnb-llama-11m"  # the SwiGLU model flashnb ships beside it, run with gate thresholds


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


def shipped_folder(name: str) -> Path:
    """A folder given on the command line (--model, convert's HF_FOLDER, --predictors, --placement): the folder
    NAME, or, where there is none, the shipped model or predictors of that name (data/NAME, from anywhere)."""
    folder = Path(name)
    if not folder.exists() and "/" not in name and (data_dir() / name).is_dir():
        return data_dir() / name
    return folder


def predictors_beside(model: str | Path) -> Path:
    """MODEL-predictors beside the model folder: where `flashnb train-predictors` writes a model's predictors
    and where every command looks for them."""
    model = Path(model)
    return model.parent / f"{model.name}-predictors"


def shipped_predictors_dir() -> Path:
    """The folder of the shipped model's predictors and hot neurons (data/flashnb-opt-21m-predictors)."""
    return predictors_beside(data_dir() / SHIPPED_MODEL)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` may still run (another user's process, or a number no process can have: yes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def publish(tmp: Path, dst: Path) -> None:
    """Move the finished file `tmp` to `dst`, readable as any new file of this user (safetensors writes
    its files for the owner alone)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    Path(tmp).replace(dst)


def read_flashnb_file(path: Path, framework: str, what: str, fix: str) -> tuple[dict, dict]:
    """(header, tensors) of a safetensors file flashnb wrote (predictors, thresholds, placement, traces): its
    "flashnb" metadata as JSON ({} without it) and every tensor (`framework`: "pt" or "numpy"). A file that
    cannot be read is one clear error: f"{path} is not a readable {what} (...); {fix}"."""
    import json

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework=framework) as h:
            return json.loads((h.metadata() or {}).get("flashnb", "{}")), {k: h.get_tensor(k) for k in h.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise FlashnbError(f"{path} is not a readable {what} ({e}); {fix}") from None


SCRATCH_PREFIX = "flashnb-nb-"


def scratch_folder(dir: str | Path | None = None) -> tempfile.TemporaryDirectory:
    """A temporary folder for a notebook's stores (use `.name`), named flashnb-nb-PID-...: removed when the
    object goes or the process exits normally; the folders of earlier processes that are gone (a kernel
    killed or restarted before it could clean up) are removed here first."""
    base = Path(dir) if dir is not None else Path(tempfile.gettempdir())
    for old in base.glob(f"{SCRATCH_PREFIX}*-*"):
        pid = old.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)) and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=dir)


def file_in_the_way(path: str | Path) -> Path | None:
    """The nearest of `path` and its parents that exists, when it is a file where a folder must be; else None."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def missing_folder(folder: str | Path) -> str:
    """Why `folder` cannot take new files, in words: "X is a file, not a folder" for a file in the way
    (`file_in_the_way`), else "FOLDER does not exist"."""
    blocked = file_in_the_way(folder)
    return f"{blocked} is a file, not a folder" if blocked is not None else f"{folder} does not exist"


def work_folder(dir: str | Path | None) -> Path:
    """--dir of `flashnb bench`: a folder that exists (default: the system temp folder), or one clear error."""
    root = Path(dir or tempfile.gettempdir())
    if not root.is_dir():
        raise FlashnbError(f"--dir: {missing_folder(root)}; give an existing folder for the scratch stores")
    return root


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
