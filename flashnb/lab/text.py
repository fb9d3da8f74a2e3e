"""Printed text for a notebook cell: lines of at most WIDTH characters, broken between words.

JupyterLab breaks a long printed line wherever the cell's edge falls, in the middle of a word or a
number; the lessons wrap their own sentences instead, so a line break is always a space.
"""

from __future__ import annotations

import textwrap

WIDTH = 100  # characters: fits the notebook area at a 1280 px window with the file browser open


def wrap(text: str, indent: str = "  ") -> str:
    """`text` with each of its lines wrapped to WIDTH between words; continuation lines get `indent`.
    Words longer than a line (paths) stay whole."""
    return "\n".join(textwrap.fill(line, WIDTH, subsequent_indent=indent, break_long_words=False,
                                   break_on_hyphens=False) if line else "" for line in text.split("\n"))
