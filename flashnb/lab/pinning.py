"""Notebook 06's experiment on hot neurons: one DRAM budget, split between pinned hot neurons and the window.

PowerInfer keeps the neurons that fire on most tokens (the "hot" ones) in fast memory for good; the
paper's window keeps whatever recent tokens used. Both spend the same DRAM rows. `split_sweep`
simulates every split at a few budgets on the predictors' calibration sets (held-out tokens) with the
cost model's I/O as the score (`flashnb.core.simulate.choose_pinned`), then confirms the largest
budget's choice with the engine: pinned and unpinned taking turns, measured.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from flashnb.bench.run import take_turns
from flashnb.core.defaults import IN_FLIGHT, WINDOW
from flashnb.core.engine import FlashEngine, Policy
from flashnb.core.pinning import HotNeurons, PinningChoice
from flashnb.core.simulate import choose_pinned
from flashnb.device.costmodel import steps_io_ms
from flashnb.device.profile import coalescing_gap
from flashnb.lab.stats import TokenStats
from flashnb.text import MB


@dataclass
class SplitSweep:
    """choices[budget]: every simulated split at that budget and the chosen one. measured: the engine at
    `confirm_budget`, unpinned and with the chosen split ('pinned'), the same tokens, taking turns."""

    choices: dict[float, PinningChoice]
    window: int
    confirm_budget: float
    measured: dict[str, TokenStats]
    tokens: int

    def shares(self) -> list[float]:
        """The pinned share of each candidate split (as the largest budget spaces them)."""
        c = self.choices[max(self.choices)]
        return [p / (p + w) for p, w in zip(c.pinned_rows, c.window_rows)]


def split_sweep(store, predictors, hot: HotNeurons, profile, prompt_ids: list[int], budgets=(0.5, 0.7, 0.9),
                window: int = WINDOW, tokens: int = 8, in_flight: int = IN_FLIGHT) -> SplitSweep:
    """Simulate each split at each budget; run the engine at the largest budget with and without its
    chosen split for `tokens` tokens after `prompt_ids`."""
    gap = coalescing_gap(profile, in_flight)
    held = predictors.memory_bytes(store.np_dtype.itemsize)
    choices = {}
    for b in budgets:
        choices[b] = choose_pinned(hot, store, Policy(window, b, in_flight, gap), held,
                                   io_ms=lambda steps: steps_io_ms(profile, steps, in_flight))
    top = max(budgets)
    policy = Policy(window, top, in_flight, gap)
    with FlashEngine(store, predictors, policy) as plain, \
            FlashEngine(store, predictors, replace(policy, pinned=choices[top].chosen), hot=hot) as pinned:
        runners = {"unpinned": plain, "pinned": pinned}
        take_turns({k: iter(r.generate(prompt_ids, tokens + 1)) for k, r in runners.items()})
        neurons = store.num_layers * store.ffn_dim
        measured = {k: TokenStats.of(r.steps[len(prompt_ids):], neurons) for k, r in runners.items()}
    return SplitSweep(choices, window, top, measured, tokens)


def split_text(sweep: SplitSweep, share: float) -> str:
    """One paragraph for the split slider: at each budget, the split nearest to `share` beside pinning
    nothing and beside the chosen split (simulated); then the engine's confirmation (measured)."""
    parts = []
    for b, c in sorted(sweep.choices.items()):
        i = min(range(len(c.pinned_rows)),
                key=lambda j: abs(c.pinned_rows[j] / (c.pinned_rows[j] + c.window_rows[j]) - share))
        k = c.pinned_rows.index(c.chosen)
        parts.append(f"Budget {b:.0%}: {c.pinned_rows[i]} pinned + {c.window_rows[i]} window rows per layer read "
                     f"{c.bytes_per_token[i] / MB:.3f} MB per token, I/O {c.score[i]:.2f} ms (none pinned: "
                     f"{c.bytes_per_token[0] / MB:.3f} MB, {c.score[0]:.2f} ms; chosen: {c.chosen} pinned, "
                     f"{c.score[k]:.2f} ms).")
    m = sweep.measured
    u, p = m["unpinned"], m["pinned"]
    return "\n".join(
        ["Simulated on the calibration sets, I/O from the cost model; the chosen split has the least I/O among "
         "those that add at most 1% reader calls (a token split into more parts pays each call's fixed cost):",
         *parts,
         f"Measured at {sweep.confirm_budget:.0%} over {sweep.tokens} tokens: unpinned {u.bytes_read / MB:.3f} MB and "
         f"{u.io_ms:.2f} ms of I/O per token (total {u.total_ms:.1f} ms), the chosen split {p.bytes_read / MB:.3f} MB "
         f"and {p.io_ms:.2f} ms (total {p.total_ms:.1f} ms)."])
