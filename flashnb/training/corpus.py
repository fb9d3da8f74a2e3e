"""The offline training corpus: docstrings that every machine with flashnb installed has.

What it collects, exactly:
  1. every module, class and function docstring (ast.get_docstring, so nothing is imported) in the
     Python standard library's *.py files, skipping site-packages, test suites, idlelib,
     lib2to3 and tkinter;
  2. the pydoc help topics (`pydoc_data.topics`, the text of `help("FOR")` and friends);
  3. every such docstring in the installed `torch` package (flashnb pins torch==2.13.0), skipping
     its test utilities.
Documents shorter than `MIN_CHARS` are dropped, exact duplicates are kept once, and order is sorted
by source path. The held-out split is chosen by the document's SHA-256, so it is the same on every
machine with the same Python and torch versions; the corpus SHA-256 in the training card says
whether a rebuild matched.
"""

from __future__ import annotations

import ast
import hashlib
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

MIN_CHARS = 40
SKIP_PARTS = {"site-packages", "test", "tests", "testing", "idlelib", "lib2to3", "tkinter", "__pycache__"}


def _docstrings(root: Path) -> list[str]:
    docs = []
    for path in sorted(root.rglob("*.py")):
        if SKIP_PARTS & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_CHARS:
                    docs.append(doc)
    return docs


@dataclass
class Corpus:
    train: list[str]
    heldout: list[str]
    sources: dict[str, str]

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for d in self.train + ["\0heldout\0"] + self.heldout:
            h.update(d.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()

    def chars(self) -> int:
        return sum(map(len, self.train)) + sum(map(len, self.heldout))


def collect(heldout_every: int = 32) -> Corpus:
    """Collect the corpus; about 1 document in `heldout_every` goes to the held-out split."""
    import pydoc_data.topics
    import torch

    docs = _docstrings(Path(sysconfig.get_paths()["stdlib"]))
    docs += [t for _, t in sorted(pydoc_data.topics.topics.items()) if len(t) >= MIN_CHARS]
    docs += _docstrings(Path(torch.__file__).parent)
    seen, unique = set(), []
    for d in docs:
        if d not in seen:
            seen.add(d)
            unique.append(d)
    train, heldout = [], []
    for d in unique:
        bucket = int.from_bytes(hashlib.sha256(d.encode("utf-8")).digest()[:4], "little") % heldout_every
        (heldout if bucket == 0 else train).append(d)
    sources = {"python": platform.python_version(), "torch": torch.__version__,
               "what": "docstrings of the stdlib (no tests/idlelib/lib2to3/tkinter), pydoc topics, "
                       "docstrings of the torch package (no testing)"}
    return Corpus(train, heldout, sources)
