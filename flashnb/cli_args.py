"""The types of the `flashnb` command line's options: each checks its value before any work and
answers bad input with one line that names the option and what it takes."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from flashnb.core.defaults import IN_FLIGHT, MEMORY_BUDGET
from flashnb.paths import missing_folder

MAX_IN_FLIGHT = 1024  # the kernel's AIO queue rarely allows more; more only queues in Python


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as flashnb's one line."""

    def error(self, message: str):
        where = self.prog.removeprefix("flashnb").strip()
        print(f"flashnb: error: {where + ': ' if where else ''}{message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an unknown option is said by the command it was given to (and its --help)."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(parsed, "command", None)
            prog = f"{self.prog} {command}" if command else self.prog
            Parser(prog=prog).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def whole(lo: int, hi: int | None = None, what: str = "a whole number"):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range: give {what} "
                                             + (f"from {lo} to {hi}" if hi is not None else f"of {lo} or more"))
        return v
    return parse


def real(lo: float, hi: float, lo_open: bool = False, what: str = "a number", hi_open: bool = False):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {what} in "
                                             f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")
        return v
    return parse


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def _split_unit(text: str) -> tuple[str, str]:
    """(number, unit) of a size such as '20MB' or '19 MiB' (upper case, spaces dropped)."""
    t = text.strip().upper().replace(" ", "")
    num = t.rstrip("KMGTIB")
    return num, t[len(num):]


def _bytes(num: str, unit: str) -> int | None:
    """Bytes of a number and a unit from `_split_unit`: a whole number, or a decimal one with a unit
    (0.5GiB); None if it is neither."""
    if unit not in _UNITS:
        return None
    if num.isdigit():
        return int(num) * _UNITS[unit]
    if unit and num.count(".") == 1 and num.replace(".", "").isdigit():
        return int(float(num) * _UNITS[unit])
    return None


def byte_count(lo: int, hi: int):
    """Bytes from `lo` to `hi`, as a whole number with an optional unit (268435456, 256MiB, 1GB)."""
    def parse(text: str) -> int:
        v = _bytes(*_split_unit(text))
        if v is None:
            raise argparse.ArgumentTypeError(f"{text!r} is not bytes: give a whole number with an optional unit "
                                             "(268435456, 256MiB, 1GB, 0.5GiB)")
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {lo >> 20} MiB to {hi >> 30} GiB")
        return v
    return parse


def memory_budget(text: str) -> float | int:
    """--memory: a fraction of the model's bytes (0.5) or bytes (20000000, 20MB, 19MiB)."""
    num, unit = _split_unit(text)
    v = _bytes(num, unit) if unit or not num.startswith("0") else None
    if v is not None:
        if not unit and 1 <= v < 1 << 20:
            raise argparse.ArgumentTypeError(
                f"{text!r} is ambiguous: a bare number under 1 MiB; give a fraction of the model in (0, 1] with a "
                f"point (0.5, or 1.0 for as many bytes as the model) or bytes with a unit ({text}B for {text} "
                f"byte{'' if text.strip() == '1' else 's'})")
        if v >= 1:
            return v
    try:
        f = float(text)
    except ValueError:
        f = float("nan")
    if math.isfinite(f) and 0 < f <= 1 and "." in text:
        return f
    raise argparse.ArgumentTypeError(f"{text!r} is neither a fraction of the model in (0, 1] (e.g. 0.5) nor bytes "
                                     "(e.g. 20000000, 20MB or 19MiB)")


def policy_name(text: str) -> str:
    """generate --policy, with the word it had before: 'all' read every neuron, which is 'every' now."""
    if text == "all":
        raise argparse.ArgumentTypeError("'all' is now 'every' (every neuron read: naive), so that it is not "
                                         "confused with bench's 'all' (every technique)")
    return text


def out_file(text: str) -> str:
    """--out FILE, checked before any work: a file name (not a folder) in a folder that exists."""
    p = Path(text).expanduser()
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name, e.g. {p / 'result.json'}")
    if not p.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {missing_folder(p.parent)}; give a path inside an existing "
                                         "folder")
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text} cannot be written (permissions); choose another path")
    if p.exists() and not _flashnb_result(p):
        raise argparse.ArgumentTypeError(f"{text} exists and is not a flashnb result (flashnb replaces only a JSON "
                                         "file it wrote); choose another path, or move that file away")
    return str(p)


def _flashnb_result(p: Path) -> bool:
    """Whether `p` holds a JSON object that flashnb wrote (a bench result or a device profile: a
    flashnb_..._version key)."""
    try:
        with open(p, "rb") as f:
            data = json.loads(f.read(64 << 20))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and any(k.startswith("flashnb_") and k.endswith("_version") for k in data)


def utf8_text(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("the text is not valid UTF-8; pass it in your terminal's UTF-8 "
                                         "encoding") from None
    return text


def pinned_rows(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return whole(0)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'auto' nor a whole number of rows >= 0") from None


def add_in_flight(parser, what: str = "", unset: bool = False) -> None:
    """--in-flight; `unset`: None when not given (the command tells an engine default from a choice)."""
    parser.add_argument("--in-flight", type=whole(1, MAX_IN_FLIGHT), default=None if unset else IN_FLIGHT,
                        help=f"reads in flight{' ' + what if what else ''}: the AIO queue depth, or reader "
                             f"threads where AIO is unavailable (default: {IN_FLIGHT})")


def add_memory(parser, unset: bool = False) -> None:
    """--memory; `unset`: None when not given."""
    parser.add_argument("--memory", type=memory_budget, default=None if unset else MEMORY_BUDGET,
                        help="DRAM budget for the weights kept in DRAM (resident tensors and neuron rows), the "
                             "predictors and the engine's per-neuron maps: a fraction of the model's bytes (0.5) or "
                             f"bytes (20000000, 20MB, 19MiB) (default: {MEMORY_BUDGET})")
