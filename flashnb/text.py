"""Printed text, in a notebook cell or on a terminal: lines of at most WIDTH characters, broken between words.

JupyterLab breaks a long printed line wherever the cell's edge falls, in the middle of a word or a
number; flashnb wraps its own sentences and table notes instead, so a line break is always a space.
"""

from __future__ import annotations

import sys
import textwrap

WIDTH = 100  # characters: fits the notebook area at a 1280 px window with the file browser open
MB = 1e6     # bytes: the decimal megabyte that every printed table and figure reports (MiB = 2**20 is written MiB)


def wrap(text: str, indent: str = "  ") -> str:
    """`text` with each of its lines wrapped to WIDTH between words; continuation lines get `indent`.
    Words longer than a line (paths) stay whole."""
    return "\n".join(textwrap.fill(line, WIDTH, subsequent_indent=indent, break_long_words=False,
                                   break_on_hyphens=False) if line else "" for line in text.split("\n"))


def size_text(n: float) -> str:
    """4096 -> '4 KiB', 1.5 MiB -> '1.5 MiB', 280 -> '280 B'."""
    n = float(n)
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            v = n / div
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n:.0f} B"


def fmt(x: float, spec: str) -> str:
    """format(x, spec), without a sign on a number that rounds to zero: a perplexity 4e-6 below dense's reads
    "0.0%", neither "-0.0%" nor a "+0.0%" that reads as a rise."""
    out = format(x, spec)
    if out[:1] in "+-" and not any(c in "123456789" for c in out.split("e")[0]):
        out = out[1:]
    return out


def show_progress(wanted: bool = True) -> bool:
    """Whether to draw a progress bar: when `wanted` and someone watches it, on a terminal or in a notebook
    (where tqdm.auto draws a widget); never into a log file or a pipe, which would get a carriage return
    and a redrawn line for every update."""
    err = sys.stderr
    return bool(wanted) and (_in_notebook() or (err is not None and err.isatty()))


def _in_notebook() -> bool:
    """Whether this code runs in a Jupyter kernel (whose stderr is no terminal, but whose bars are widgets)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return type(shell).__name__ == "ZMQInteractiveShell"
