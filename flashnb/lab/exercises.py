"""The notebooks' "try this" cells: a learner's guess set against the number the notebook measured.

`check(guess, answer, ...)` returns one sentence (wrapped to flashnb.text.WIDTH): an invitation while the guess
is None, else the guess, the answer and how far apart they are, with a hint when the guess is off by more than
`within` (relative).
"""

from __future__ import annotations

from dataclasses import dataclass

from flashnb.text import wrap


@dataclass(frozen=True)
class Verdict:
    """A guess against the measured or computed answer."""

    guess: float | None
    answer: float
    within: float   # relative distance still counted as close

    @property
    def error(self) -> float | None:
        """guess / answer - 1 (None without a guess; the absolute difference when the answer is 0)."""
        if self.guess is None:
            return None
        return self.guess / self.answer - 1 if self.answer else float(self.guess - self.answer)

    @property
    def close(self) -> bool:
        return self.error is not None and abs(self.error) <= self.within


def check(guess: float | None, answer: float, what: str, unit: str = "", within: float = 0.25, hint: str = "") -> str:
    """One line comparing `guess` with `answer` (a number the notebook measured or computed)."""
    u = "x" if unit == "x" else f" {unit}" if unit else ""
    v = Verdict(None if guess is None else float(guess), float(answer), within)
    if v.guess is None:
        kind = {"x": " (a ratio: 2 for twice)", "": ""}.get(unit, f" (in {unit})")
        return wrap(f"{what}: set your guess above{kind} and run the cell that sets it, then run this cell again.")
    line = f"{what}: you guessed {v.guess:.3g}{u}, the answer is {v.answer:.3g}{u} ({v.error:+.0%})"
    if v.close:
        return wrap(line + f": within {within:.0%}, well judged.")
    return wrap(line + (f". Hint: {hint}" if hint else "."))
