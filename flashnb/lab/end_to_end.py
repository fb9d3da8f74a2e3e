"""Lesson 06, end to end: every technique against naive, hybrid and the peers, the paper's Tables 2
and 3 beside ours, and the memory-latency trade-off.

Labels follow flashnb.viz.style: *measured* on this machine, *modeled* (cost model, fed statistics
measured or simulated in the same session), or *paper* (data/paper.json, with its table reference).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flashnb.bench.baselines import HybridEngine, hybrid_calls
from flashnb.bench.report import BenchResult, bound_text, cell
from flashnb.bench.run import take_turns
from flashnb.core.defaults import IN_FLIGHT, WINDOW
from flashnb.core.engine import FlashEngine, Policy
from flashnb.core.memory import hybrid_plan, min_budget, plan_memory
from flashnb.core.reader import NeuronReader, ReaderConfig
from flashnb.core.simulate import simulate
from flashnb.device.costmodel import as_device, paper_data, steps_io_ms, stream_ms
from flashnb.device.measure import ProfileConfig, run_profile
from flashnb.device.profile import coalescing_gap, default_profile_path, load_default_profile
from flashnb.errors import FlashnbError
from flashnb.lab.stats import TokenStats
from flashnb.text import MB, wrap

MiB, KiB = 1 << 20, 1 << 10

# A profile short enough for a notebook cell (a few seconds, most of it writing the 64 MiB scratch file):
# 5 chunk sizes x {1, the engine's default reads in flight}, 0.1 s a cell. `flashnb profile` measures the
# full grid; save it and the notebooks use it instead.
SHORT_PROFILE = dict(size=64 * MiB, chunk_sizes=(4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB),
                     in_flight=tuple(sorted({1, IN_FLIGHT})), seconds_per_cell=0.1, sequential_seconds=0.2)

# data/paper.json table2 row names for the bench's configurations
PAPER_ROW = {"naive": "naive", "hybrid": "hybrid", "predictor": "+predictor", "windowing": "+windowing",
             "all": "+bundling"}


def device_profile(dir: str | Path, use_saved: bool = True, progress: bool = False):
    """(Profile, source text, path of its JSON) for the disk holding `dir`.

    With `use_saved`, the profile `flashnb profile` saved (if any) is used; otherwise a short profile
    (SHORT_PROFILE) is measured in `dir` now and saved there as profile.json, so `run_bench` can take it.
    """
    if use_saved:
        saved = load_default_profile()
        if saved is not None:
            return (saved, wrap(f"saved profile {default_profile_path()} ({saved.data.get('date')})"),
                    default_profile_path())
    prof = run_profile(ProfileConfig.quick(dir=str(dir), progress=progress, **SHORT_PROFILE))
    path = prof.save(Path(dir) / "profile.json")
    how = "direct I/O" if prof.direct else "buffered reads + fadvise(DONTNEED)"
    return prof, wrap(f"short profile measured now in {Path(dir)} ({prof.data['seconds_total']:.1f} s, {how}); "
                      "`flashnb profile` measures the full grid"), path


def disk_text(profile) -> str:
    """One line on the measured device: disk, file system, sequential and 16 KiB random throughput."""
    m = profile.data.get("machine", {})
    disk = m.get("disk", {}) if isinstance(m.get("disk"), dict) else {}
    name = disk.get("device") or "unknown disk"
    fs = disk.get("fs_type") or ""
    t = int(profile.in_flight_counts[-1])
    return wrap(f"{name}{' / ' + fs if fs else ''}: sequential {profile.sequential_throughput() / 1e9:.2f} GB/s, "
                f"random 16 KiB reads with {t} in flight {profile.throughput(16384, t) / 1e9:.2f} GB/s "
                f"({'direct I/O' if profile.direct else 'buffered + fadvise'}; measured). "
                "Paper's M1 Max: 6.1 GB/s sequential, 2.25 GB/s for 16 KiB bundles (Table 2).")


# ----------------------------------------------------------------------------------------------
# The paper's tables beside a bench run


@dataclass(frozen=True)
class LadderRow:
    """One rung of Table 2: the paper's I/O (OPT 6.7B, M1 Max) beside ours, each relative to its naive."""

    name: str
    label: str
    paper_GB: float
    paper_io_ms: float
    paper_io_vs_naive: float
    mb_per_token: float
    io_ms: float
    io_vs_naive: float | None
    modeled_io_ms: float | None
    modeled_io_vs_naive: float | None


def table2_beside(result: BenchResult) -> list[LadderRow]:
    """One row per ladder configuration present in a bench result."""
    paper = {r["name"]: r for r in paper_data()["table2"]["rows"]}
    res = result.results
    naive = res.get("naive")
    rows = []
    for name, row in PAPER_ROW.items():
        if name not in res:
            continue
        m, p = res[name], paper[row]
        ratio = lambda a, b: a / b if a and b else None  # noqa: E731
        rows.append(LadderRow(name, m.label, p["flash_to_dram_GB"], p["io_latency_ms"],
                              paper["naive"]["io_latency_ms"] / p["io_latency_ms"], m.stats.bytes_read / MB,
                              m.stats.io_ms, ratio(naive and naive.stats.io_ms, m.stats.io_ms), m.modeled_io_ms,
                              ratio(naive and naive.modeled_io_ms, m.modeled_io_ms)))
    return rows


def format_table2_beside(rows: list[LadderRow]) -> str:
    head = (f"{'configuration':<20} {'paper GB':>8} {'paper ms':>8} {'paper x':>7} | {'our MB':>7} {'our ms':>7} "
            f"{'our x':>6} {'model ms':>8} {'model x':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.label:<20} {r.paper_GB:8.1f} {r.paper_io_ms:8.0f} {r.paper_io_vs_naive:6.1f}x | "
                     f"{r.mb_per_token:7.2f} {cell(r.io_ms, '7.2f')} {cell(r.io_vs_naive, '5.1f', 'x')} "
                     f"{cell(r.modeled_io_ms, '8.2f')} {cell(r.modeled_io_vs_naive, '6.1f', 'x')}")
    lines.append(wrap("I/O per token. paper: OPT 6.7B fp16, half memory, M1 Max (Table 2); ours: measured on this "
                      "machine (direct I/O), model: the cost model for this run's requests on this disk's profile; "
                      "x = naive's I/O time / this row's."))
    return "\n".join(lines)


@dataclass(frozen=True)
class Totals:
    """Total latency per token, naive vs all techniques: the paper's (Figure 1 / Table 3) beside ours."""

    ref: str
    paper_cpu_naive_ms: float
    paper_cpu_all_ms: float
    paper_gpu_naive_ms: float
    paper_gpu_all_ms: float
    naive_ms: float | None
    all_ms: float | None

    @property
    def paper_cpu_speedup(self) -> float:
        return self.paper_cpu_naive_ms / self.paper_cpu_all_ms

    @property
    def paper_gpu_speedup(self) -> float:
        return self.paper_gpu_naive_ms / self.paper_gpu_all_ms

    @property
    def speedup(self) -> float | None:
        return self.naive_ms / self.all_ms if self.naive_ms and self.all_ms else None


def table3_beside(result: BenchResult) -> Totals:
    t = paper_data()["latency_totals_opt_6_7b_ms"]
    res = result.results
    ms = lambda n: res[n].stats.total_ms if n in res else None  # noqa: E731
    return Totals(t["ref"], t["cpu_naive"], t["cpu_ours"], t["gpu_rtx4090_naive"], t["gpu_rtx4090_ours"],
                  ms("naive"), ms("all"))


def format_table3_beside(t: Totals) -> str:
    lines = [f"paper, OPT 6.7B, half memory, M1 Max CPU: naive {t.paper_cpu_naive_ms} ms -> all techniques "
             f"{t.paper_cpu_all_ms} ms per token ({t.paper_cpu_speedup:.1f}x); RTX 4090: "
             f"{t.paper_gpu_naive_ms} -> {t.paper_gpu_all_ms} ms ({t.paper_gpu_speedup:.0f}x) ({t.ref})"]
    if t.speedup is not None:
        lines.append(f"ours, measured on this machine's CPU: naive {t.naive_ms:.1f} ms -> all techniques "
                     f"{t.all_ms:.1f} ms per token ({t.speedup:.1f}x)")
    else:
        lines.append("ours: run the bench with both 'naive' and 'all' to compare totals")
    return "\n".join(wrap(line) for line in lines)


# ----------------------------------------------------------------------------------------------
# Latency vs DRAM budget


@dataclass(frozen=True)
class BudgetPoint:
    """One budget (a fraction of the model's bytes) for 'all' or 'hybrid'; per generated token."""

    budget: float
    dram_bytes: int
    mb_per_token: float
    io_ms: float
    total_ms: float
    hit_share: float | None = None  # 'all': predicted neurons found in DRAM
    p10_ms: float | None = None     # measured points: the spread of their tokens' times
    p90_ms: float | None = None
    reader_calls: float | None = None  # 'all': reads issued per token (more than one a layer: a layer read in parts)


@dataclass
class BudgetSweep:
    """Latency per token vs DRAM budget for 'all' and 'hybrid'.

    measured[name]: engine runs at a few budgets. modeled[name]: a finer grid of budgets, each with the
    exact bytes and requests `simulate` finds for the first run's neuron sets ('all'; hybrid: the rows
    it streams), their I/O time from the cost model on this disk's profile, plus the CPU time
    (compute and memory management) measured in the run nearest in budget.
    """

    measured: dict[str, list[BudgetPoint]]
    modeled: dict[str, list[BudgetPoint]]
    model_bytes: int
    window: int
    tokens: int
    notes: list[str] = field(default_factory=list)

    def at(self, name: str, budget: float, source: str = "modeled") -> BudgetPoint | None:
        """The point of `name` nearest to `budget`."""
        rows = getattr(self, source).get(name) or []
        return min(rows, key=lambda r: abs(r.budget - budget)) if rows else None


def _measured_point(budget: float, runner, s: TokenStats) -> BudgetPoint:
    return BudgetPoint(budget, runner.memory.used_bytes, s.bytes_read / MB, s.io_ms, s.total_ms, s.window_hit_share,
                       s.p10_ms, s.p90_ms, s.reader_calls)


def budget_sweep(store, predictors, prompt_ids: list[int], profile, measured=(0.5, 0.75, 1.0),
                 modeled: int | list[float] = 12, tokens: int = 4, window: int = WINDOW,
                 in_flight: int = IN_FLIGHT) -> BudgetSweep:
    """Run 'all' (learned predictors, window, bundled store) and 'hybrid' at each budget in `measured`
    for `tokens` generated tokens after `prompt_ids` (the two taking turns, one token each), and model both on
    `modeled` budgets (a list, or a count spread from the smallest feasible budget to 1.0)."""
    st = store
    if st.layout != "bundled":
        raise FlashnbError(f"budget_sweep runs all techniques and needs a bundled store; {st.path} is {st.layout}")
    shape, neurons = st.memory_shape(), st.num_layers * st.ffn_dim
    pred_bytes = predictors.memory_bytes(st.np_dtype.itemsize)
    lo = min_budget(shape, window, pred_bytes)
    bad = [b for b in measured if not lo <= b <= 1]
    if bad:
        raise FlashnbError(f"budgets {bad} are outside [{lo:.3f}, 1]: below {lo:.3f} of the model the resident "
                           "tensors and predictors leave no room for neuron rows")
    gap, n_prompt = coalescing_gap(profile, in_flight), len(prompt_ids)
    meas: dict[str, list[BudgetPoint]] = {"all": [], "hybrid": []}
    cpu: dict[str, list[tuple[float, float]]] = {"all": [], "hybrid": []}  # (budget, measured CPU ms)
    sets = None
    for b in sorted(measured):
        with FlashEngine(st, predictors, Policy(window, b, in_flight, gap)) as eng, \
                HybridEngine(st, b, in_flight, gap) as hyb:
            take_turns({"all": eng.generate(prompt_ids, tokens), "hybrid": hyb.generate(prompt_ids, tokens)})
            for name, runner in (("all", eng), ("hybrid", hyb)):
                s = TokenStats.of(runner.steps[n_prompt:], neurons)
                meas[name].append(_measured_point(b, runner, s))
                cpu[name].append((b, s.total_ms - s.io_ms))
            sets = sets or [s.predicted_sets for s in eng.steps]
    # whole percents from the smallest feasible budget up, no stop within 1% of a measured one
    grid = sorted({float(x) for x in [lo, *np.round(np.linspace(lo, 1.0, modeled)[1:], 2)]
                   if x >= lo and all(abs(x - m) > 0.01 for m in measured)} | set(measured)) \
        if isinstance(modeled, int) else sorted(float(b) for b in modeled)
    device = as_device(profile)
    def near(name: str, b: float) -> float:   # the measured CPU ms, linear between the measured budgets
        xs, ys = zip(*sorted(cpu[name]))
        return float(np.interp(b, xs, ys))

    mod: dict[str, list[BudgetPoint]] = {"all": [], "hybrid": []}
    with NeuronReader(st, ReaderConfig(in_flight=in_flight, gap_bytes=gap)) as reader:   # plans requests, reads nothing
        for b in grid:
            steps = simulate(sets, st, Policy(window, b, in_flight, gap), pred_bytes)[n_prompt:]
            s, io = TokenStats.of(steps, neurons), steps_io_ms(device, steps, in_flight)
            used = plan_memory(shape, b, window, pred_bytes).used_bytes
            mod["all"].append(BudgetPoint(b, used, s.bytes_read / MB, io, io + near("all", b), s.window_hit_share,
                                          reader_calls=s.reader_calls))
            calls = hybrid_calls(st, b, reader)
            streamed = sum(nbytes for _, nbytes in calls)
            io = stream_ms(device, len(calls), streamed)
            mod["hybrid"].append(BudgetPoint(b, hybrid_plan(shape, b).used_bytes, streamed / MB, io,
                                             io + near("hybrid", b), reader_calls=len(calls)))
    notes = [f"measured: {tokens} generated tokens per run after a {n_prompt}-token prompt, direct I/O",
             "modeled 'all': the bytes and requests simulate finds at each budget for the first run's neuron sets, "
             "their I/O time from the cost model on this disk's profile (call by call, as flashnb bench models a "
             "run), plus the CPU time measured at the budgets around it (linear between them)",
             "modeled 'hybrid': the reader calls and bytes its reader makes for the rows the budget leaves "
             "streamed, at this disk's large-read rate plus a request's latency per call (as flashnb bench models "
             "it), plus the CPU time measured at the budgets around it (linear between them)"]
    return BudgetSweep(meas, mod, shape.model_bytes, window, tokens, notes)


def budget_label(budget: float) -> str:
    """A budget as the slider and its text both write it: '50%', or '55.3%' when it is not a whole percent."""
    return f"{budget:.0%}" if round(budget * 100, 6) == round(budget * 100) else f"{budget:.1%}"


def budget_text(sweep: BudgetSweep, budget: float) -> str:
    """One paragraph for the budget slider: modeled at `budget`, measured nearest to it, the paper."""
    a, h = sweep.at("all", budget), sweep.at("hybrid", budget)
    ma, mh = sweep.at("all", budget, "measured"), sweep.at("hybrid", budget, "measured")
    text = (f"DRAM budget {budget_label(budget)} of the model ({budget * sweep.model_bytes / MB:.1f} MB). "
            f"Modeled: all techniques {a.total_ms:.1f} ms per token ({a.mb_per_token:.2f} MB read in "
            f"{a.reader_calls:.0f} reader calls, {a.hit_share:.0%} of the predicted neurons already in DRAM); "
            f"hybrid {h.total_ms:.1f} ms "
            f"({h.mb_per_token:.2f} MB read).")
    if ma is not None:
        text += (f"\nMeasured at {budget_label(ma.budget)}: all techniques {ma.total_ms:.1f} ms per token (p10-p90 "
                 f"{ma.p10_ms:.1f}-{ma.p90_ms:.1f}), hybrid {mh.total_ms:.1f} ms ({mh.p10_ms:.1f}-{mh.p90_ms:.1f}).")
    return text + ("\nPaper: about half of OPT 6.7B in DRAM (Table 2); more DRAM holds a longer window "
                   "and reads less per token.")


def floor_text(result: BenchResult, names=("all", "pinned")) -> str:
    """One line per configuration with a token split: its total against its floor, and the split; then the
    lower bound of "all" when the run measured its reads alone."""
    lines = []
    for name in names:
        r = result.results.get(name)
        if r is None or not r.split_ms:
            continue
        s = r.stats
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in r.split_ms.items())
        lines.append(f"{r.label}: {s.total_ms:.1f} ms per token (median {s.median_ms:.1f}, p10-p90 {s.p10_ms:.1f}-"
                     f"{s.p90_ms:.1f}) = {s.total_ms / r.floor_ms:.2f}x its floor of {r.floor_ms:.1f} ms (measured); "
                     f"ms: {parts}")
    if result.lower_bound_ms:
        lines.append(bound_text(result))
    return "\n".join(wrap(line) for line in lines)

