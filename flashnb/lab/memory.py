"""Lesson 05, memory management (§3.3): preallocated rows with swap-with-last deletion, timed against
reallocating every token, replaying one layer's recorded neuron sets; and memory management's share of
whole engine runs beside the paper's."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from flashnb.core.memory import NeuronRows
from flashnb.core.window import Window
from flashnb.lab.stats import TokenStats, apart
from flashnb.text import wrap


@dataclass(frozen=True)
class MemoryTiming:
    """Seconds per token for one layer: the median of the runs, and every run (measured; the two schemes
    take turns, run after run, so the machine's drift slows both alike)."""

    window: int
    preallocated_s: float   # the paper's: one matrix, delete = copy the last rows over, append at the end
    naive_s: float          # a fresh matrix every token (torch.cat of the kept rows and the new ones)
    preallocated_runs: tuple[float, ...] = ()
    naive_runs: tuple[float, ...] = ()

    @property
    def ratio(self) -> float:
        return self.naive_s / self.preallocated_s

    @property
    def apart(self) -> bool:
        """Whether the two ranges of runs do not overlap: only then is the faster one surely faster."""
        return apart(self.preallocated_runs, self.naive_runs)


def time_memory_management(sets: list[np.ndarray], ffn_dim: int, width: int, window: int, capacity: int,
                           dtype=torch.float16, repeats: int = 5) -> MemoryTiming:
    """Both schemes follow the same window decisions and add the same rows (random values standing in
    for what the reader returns); only how DRAM is managed differs. `repeats` runs of each, taking turns."""
    pool = torch.randn(ffn_dim, width, generator=torch.Generator().manual_seed(0)).to(dtype)
    np_pool = pool.numpy()
    pre, naive = [], []
    for _ in range(repeats):
        win, rows = Window(ffn_dim, capacity, window), NeuronRows(ffn_dim, capacity, width, np_pool.dtype)
        t0 = time.perf_counter()
        for ids in sets:
            plan = win.plan(ids)
            rows.make_room(plan.evicted, plan.loaded.size)[:] = np_pool[: plan.loaded.size]
            rows.commit(plan.loaded)
            win.advance(plan)
        pre.append((time.perf_counter() - t0) / len(sets))

        win = Window(ffn_dim, capacity, window)  # the same decisions
        mat, held = torch.empty(0, width, dtype=dtype), np.zeros(0, np.int64)
        t0 = time.perf_counter()
        for ids in sets:
            plan = win.plan(ids)
            keep = ~np.isin(held, plan.evicted)
            mat = torch.cat([mat[torch.from_numpy(keep)], pool[: plan.loaded.size]])  # a new matrix every token
            held = np.concatenate([held[keep], plan.loaded])
            win.advance(plan)
        naive.append((time.perf_counter() - t0) / len(sets))
    return MemoryTiming(window, float(np.median(pre)), float(np.median(naive)), tuple(pre), tuple(naive))


def rows_kept(sets: list[np.ndarray], ffn_dim: int, window: int, capacity: int) -> float:
    """Mean rows a layer keeps from one token to the next: what reallocating copies every token."""
    win, kept = Window(ffn_dim, capacity, window), []
    for ids in sets:
        plan = win.plan(ids)
        kept.append(win.held().size - plan.evicted.size)
        win.advance(plan)
    return float(np.mean(kept[1:])) if len(kept) > 1 else 0.0


@dataclass(frozen=True)
class RowsSnapshot:
    """A layer's preallocated rows after one step: the neuron each row holds (-1: free) and what happened
    to the row in that step ("kept", "moved" into a hole, "new", "free")."""

    caption: str
    ids: tuple[int, ...]
    state: tuple[str, ...]


def swap_with_last_steps(start=(3, 12, 25, 40, 51, 64), delete=(12, 40), append=(7, 99),
                         capacity: int = 8) -> list[RowsSnapshot]:
    """Run flashnb's NeuronRows on a small matrix (each row holding its neuron's id as its value): the rows
    after filling them with `start`, after deleting `delete` (swap-with-last), after appending `append`."""
    rows = NeuronRows(max((*start, *delete, *append)) + 1, capacity, 1, np.int64)

    def snap(caption: str, before: np.ndarray | None, new: tuple[int, ...] = ()) -> RowsSnapshot:
        ids = np.full(capacity, -1, np.int64)
        ids[:rows.n] = rows.held()
        state = ["free" if i < 0 else "new" if i in new else
                 "moved" if before is not None and before[r] != i else "kept" for r, i in enumerate(ids)]
        return RowsSnapshot(caption, tuple(int(i) for i in ids), tuple(state))

    start, delete, append = (np.asarray(x, dtype=np.int64) for x in (start, delete, append))
    rows.append(start, start[:, None])
    out = [snap(f"{len(start)} neurons in rows 0..{len(start) - 1}", None)]
    before = np.array(out[-1].ids)
    rows.delete(delete)
    out.append(snap(f"delete {', '.join(map(str, delete))}: the last rows fill the holes", before))
    rows.append(append, append[:, None])
    out.append(snap(f"append {', '.join(map(str, append))} at the end", None, tuple(int(i) for i in append)))
    assert all(rows.slot[i] == r for r, i in enumerate(rows.held()))   # the pointer array agrees
    return out


@dataclass(frozen=True)
class MemoryShare:
    """Memory management beside flash I/O per generated token in whole engine runs (measured: each run's
    means), and the paper's OPT 6.7B figures (§4.1)."""

    window: int
    budget: float
    mm_ms: tuple[float, ...]      # window planning + deleting and adding rows, per run
    io_ms: tuple[float, ...]      # submitting and waiting for reads, per run
    total_ms: tuple[float, ...]   # the whole token, per run
    paper_mm_ms: float
    paper_io_ms: float

    @property
    def share(self) -> float:
        """Memory management's share of the memory-related time (memory management + I/O), median run."""
        return float(np.median([m / (m + i) for m, i in zip(self.mm_ms, self.io_ms)]))

    @property
    def paper_share(self) -> float:
        return self.paper_mm_ms / (self.paper_mm_ms + self.paper_io_ms)

    def text(self) -> str:
        med = lambda xs: float(np.median(xs))  # noqa: E731
        span = lambda xs: f"{min(xs):.2f}-{max(xs):.2f}"  # noqa: E731
        return wrap(f"window {self.window} at {self.budget:.0%}, per generated token (median of {len(self.mm_ms)} "
                    f"runs, range in brackets; measured): memory management {med(self.mm_ms):.2f} ms "
                    f"({span(self.mm_ms)}) beside I/O {med(self.io_ms):.2f} ms ({span(self.io_ms)}), "
                    f"{self.share:.0%} of the memory-related time; the whole token {med(self.total_ms):.1f} ms.\n"
                    f"Paper (OPT 6.7B at 32 bits, window 5, M1 Max, §4.1): memory management "
                    f"{self.paper_mm_ms:.0f} ms beside {self.paper_io_ms:.0f} ms of flash reads, "
                    f"{self.paper_share:.0%} of the memory-related time.")


def memory_share(store, predictors, prompt_ids: list[int], tokens: int, window: int, budget: float,
                 runs: int = 3) -> MemoryShare:
    """Run the engine `runs` times (generating `tokens` after the prompt) and set memory management's time
    per token beside I/O's, and beside the paper's (data/paper.json)."""
    from flashnb.core.engine import FlashEngine, Policy
    from flashnb.device.costmodel import paper_data

    mm, io, total = [], [], []
    for _ in range(runs):
        with FlashEngine(store, predictors, Policy(window=window, memory_budget=budget)) as eng:
            list(eng.generate(prompt_ids, tokens))
        s = TokenStats.of(eng.steps[len(prompt_ids):], store.num_layers * store.ffn_dim)
        mm.append(s.mm_ms)
        io.append(s.io_ms)
        total.append(s.total_ms)
    paper = paper_data()["memory_management_opt_6_7b"]
    return MemoryShare(window, budget, tuple(mm), tuple(io), tuple(total), paper["memory_management_ms"],
                       paper["flash_ms"])
