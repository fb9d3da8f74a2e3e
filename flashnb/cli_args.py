"""The types of the `flashnb` command line's options: each checks its value before any work and
answers bad input with one line that names the option and what it takes."""

from __future__ import annotations

import argparse
import math
import sys

from flashnb.core.defaults import IN_FLIGHT, MEMORY_BUDGET

MAX_IN_FLIGHT = 1024  # the kernel's AIO queue rarely allows more; more only queues in Python


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as flashnb's one line."""

    def error(self, message: str):
        where = self.prog.removeprefix("flashnb").strip()
        print(f"flashnb: error: {where + ': ' if where else ''}{message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


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


def real(lo: float, hi: float, lo_open: bool = False, what: str = "a number"):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {what} in "
                                             f"{'(' if lo_open else '['}{lo:g}, {hi:g}]")
        return v
    return parse


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def memory_budget(text: str) -> float | int:
    """--memory: a fraction of the model's bytes (0.5) or bytes (20000000, 20MB, 19MiB)."""
    t = text.strip().upper().replace(" ", "")
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    if unit in _UNITS and num.isdigit() and (unit or not num.startswith("0")):
        v = int(num) * _UNITS[unit]
        if not unit and 1 <= v < 1 << 20:
            raise argparse.ArgumentTypeError(
                f"{text!r} is ambiguous: as bytes it is less than 1 MiB, no model's budget; give a fraction of the "
                f"model in (0, 1] with a point (0.5, or 1.0 for all of it) or bytes with a unit ({text}MB, {text}GiB)")
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


def utf8_text(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("the text is not valid UTF-8; pass it in your terminal's UTF-8 "
                                         "encoding") from None
    return text


def pinned_rows(text: str) -> int | str:
    return "auto" if text == "auto" else whole(0, None, "a whole number or 'auto'")(text)


def add_in_flight(parser, what: str = "", unset: bool = False) -> None:
    """--in-flight; `unset`: None when not given (the command tells an engine default from a choice)."""
    parser.add_argument("--in-flight", type=whole(1, MAX_IN_FLIGHT), default=None if unset else IN_FLIGHT,
                        help=f"reads in flight{' ' + what if what else ''}: the AIO queue depth, or reader "
                             f"threads where AIO is unavailable (default: {IN_FLIGHT})")


def add_memory(parser, unset: bool = False) -> None:
    """--memory; `unset`: None when not given."""
    parser.add_argument("--memory", type=memory_budget, default=None if unset else MEMORY_BUDGET,
                        help="DRAM budget for weights: a fraction of the model's bytes (0.5) or bytes (20000000, "
                             f"20MB, 19MiB) (default: {MEMORY_BUDGET})")
