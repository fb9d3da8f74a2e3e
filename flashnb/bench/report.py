"""The benchmark's result: typed records, their JSON, and the table `flashnb bench` prints."""

from __future__ import annotations

import re

from dataclasses import dataclass, field

from flashnb.lab.stats import TokenStats
from flashnb.text import wrap

LABELS = {"naive": "naive (whole FFN)", "hybrid": "hybrid", "predictor": "+predictor", "windowing": "+windowing",
          "all": "+bundling (all)", "pinned": "all + hot pinned",
          "lookahead": "all + lookahead", "reads": "all's reads alone (disk+kernel)",
          "bare": "all, bookkeeping free (bare)",
          "placed": "all, co-activation order",
          "int8": "all, int8 bundles", "q4": "all, q4 bundles", "int8-placed": "all, int8 bundles, co-activation order",
          "q4-placed": "all, q4 bundles, co-activation order",
          "mmap": "mmap streaming", "accelerate": "accelerate disk offload",
          "dense": "dense in DRAM", "floor": "floor (FFN in DRAM, no reads)", "naive_model": "naive (whole model)"}
SPARSE = ("predictor", "windowing", "all", "bare", "pinned", "lookahead", "placed", "int8", "q4", "int8-placed",
          "q4-placed", "floor")  # the configurations that use predictors


@dataclass
class ConfigResult:
    """One configuration of a bench run (per generated token)."""

    name: str
    label: str
    stats: TokenStats
    text: str                      # the generated text
    seconds: float                 # time spent in this configuration, prompt included
    dram_bytes: int | None         # weights held in DRAM
    budget_bytes: int | None
    modeled_io_ms: float | None    # the cost model's I/O for this run's requests on the device profile
    io_mode: str = ""              # how the runner reached the disk (direct I/O, or the buffered fallback)
    speedup_vs_naive: float | None = None
    floor_ms: float | None = None  # the same token's unavoidable work, measured in the same run
    pinned_rows: int | None = None  # hot neurons pinned per layer
    split_ms: dict | None = None    # the token split into SPLIT's parts (configurations with predictors)
    rows_note: str = ""             # the budget left a layer fewer rows than a token needed (lab.stats.window_advice)

    def to_json(self) -> dict:
        return {"label": self.label, "text": self.text, "seconds": self.seconds, "io_mode": self.io_mode,
                "dram_bytes": self.dram_bytes,
                "budget_bytes": self.budget_bytes, "modeled_io_ms": self.modeled_io_ms,
                "speedup_vs_naive": self.speedup_vs_naive, "floor_ms": self.floor_ms, "pinned_rows": self.pinned_rows,
                "split_ms": self.split_ms, "rows_note": self.rows_note, **self.stats.to_json()}


SPLIT = ("model_without_ffn", "predict", "window", "memory", "submit", "wait", "ffn", "rest")


def token_split(s: TokenStats, floor: TokenStats) -> dict[str, float]:
    """A token's milliseconds split into SPLIT's parts: the model without its FFNs (measured as the
    floor's total less its predictors and FFN math), the engine's phases, and the rest (what none of
    them covers: Python between the steps, the KV cache, the residual adds)."""
    model = floor.total_ms - floor.predict_ms - floor.ffn_ms
    phases = {k: getattr(s, f"{k}_ms") for k in SPLIT[1:-1]}
    return {"model_without_ffn": model, **phases, "rest": s.total_ms - model - sum(phases.values())}


@dataclass
class ReplayRow:
    """One configuration of the trace replay: measured I/O per token (no compute)."""

    name: str
    stats: TokenStats
    io_vs_naive: float | None = None
    io_vs_naive_model: float | None = None

    def to_json(self) -> dict:
        s = self.stats
        return {"io_ms": s.io_ms, "bytes_per_token": s.bytes_read, "requests_per_token": s.requests,
                "GBps": s.io_GBps, "tokens": s.tokens, "io_vs_naive": self.io_vs_naive,
                "io_vs_naive_model": self.io_vs_naive_model}


@dataclass
class ReplayResult:
    label: str
    shape: dict
    window: int
    cache_rows_per_layer: int
    memory_budget: float | int
    results: dict[str, ReplayRow]

    def to_json(self) -> dict:
        return {"label": self.label, "shape": self.shape, "window": self.window,
                "cache_rows_per_layer": self.cache_rows_per_layer, "memory_budget": self.memory_budget,
                "results": {k: r.to_json() for k, r in self.results.items()}}


@dataclass
class BenchResult:
    date: str
    machine: dict
    model: str
    model_bytes: int
    ffn_bytes: int
    settings: dict
    profile_source: str
    profile: dict
    results: dict[str, ConfigResult]
    skipped: dict[str, str] = field(default_factory=dict)
    replay: ReplayResult | None = None
    pinning: dict | None = None    # the split candidates simulated for the pinned configuration, and the choice
    scale: dict | None = None      # `flashnb bench --scale`: the shape, the weights, where the neuron sets come from
    io: str = ""

    def __post_init__(self):
        modes = "; ".join(sorted({r.io_mode for r in self.results.values() if r.io_mode})) or "none"
        self.io = f"flashnb's reader: {modes}; page cache dropped before each token for mmap and accelerate"
        naive = self.results.get("naive")
        floors = {True: self.results.get("floor"), False: self.results.get("dense")}
        for name, r in self.results.items():
            if name == "reads":  # not a configuration that generates: no ratio, no floor
                continue
            r.speedup_vs_naive = naive.stats.total_ms / r.stats.total_ms if naive and r.stats.total_ms else None
            floor = floors[name in SPARSE]
            r.floor_ms = floor.stats.total_ms if floor else None
            if floor and name in SPARSE and r.stats.predict_ms is not None:
                r.split_ms = token_split(r.stats, floor.stats)

    @property
    def lower_bound_ms(self) -> float | None:
        """What no engine issuing all's reads can beat on this machine, from three measurements of this run:
        the floor, plus all's reads alone (the disk and the kernel, layer by layer), less the floor's sparse
        FFN math, the only work that can run while a layer's reads fly (the layer's predictor must choose
        before they start, and the next layer needs the layer's output). None without the three."""
        reads, floor = self.results.get("reads"), self.results.get("floor")
        if not (reads and floor and "all" in self.results) or reads.stats.io_ms is None or floor.stats.ffn_ms is None:
            return None
        return floor.stats.total_ms + reads.stats.io_ms - floor.stats.ffn_ms

    def to_json(self) -> dict:
        return {"flashnb_bench_version": 2, "date": self.date, "machine": self.machine, "model": self.model,
                "model_bytes": self.model_bytes, "ffn_bytes": self.ffn_bytes, "settings": self.settings,
                "io": self.io, "profile_source": self.profile_source, "profile": self.profile,
                "results": {k: r.to_json() for k, r in self.results.items()}, "skipped": self.skipped,
                "replay": self.replay.to_json() if self.replay else None, "pinning": self.pinning,
                "scale": self.scale, "lower_bound_ms": self.lower_bound_ms}


def cell(x, spec: str, unit: str = "") -> str:
    """A fixed-width table cell: `x` in `spec` followed by `unit`, or a dash right-aligned in the same width
    where x is unknown."""
    if x is None:
        return "—".rjust(int(re.match(r"\d*", spec).group() or 0) + len(unit))
    return format(x, spec) + unit


def bound_text(result: BenchResult) -> str:
    """The lower bound of "all" in words, with what it allows against its floor and the peers (one line)."""
    res, b = result.results, result.lower_bound_ms
    floor = res["floor"].stats
    peers = ", ".join(f"{res[n].stats.total_ms / b:.1f}x as fast as {n}" for n in ("naive", "mmap", "accelerate")
                      if n in res and res[n].stats.total_ms)
    return (f"lower bound for all here: the floor {floor.total_ms:.2f} + all's reads alone {res['reads'].stats.io_ms:.2f} "
            f"- the floor's FFN math {floor.ffn_ms:.2f} (the only work that can run under a layer's reads) = {b:.2f} "
            f"ms a token (measured); all is {res['all'].stats.total_ms / b:.2f}x above it"
            + (f", all with its bookkeeping free (bare) {res['bare'].stats.total_ms / b:.2f}x" if "bare" in res else "")
            + ". An engine issuing these "
            f"reads stays at least {b / floor.total_ms:.2f}x its floor"
            + (f", and could be at most {peers}." if peers else "."))


def format_table(result: BenchResult) -> str:
    """The result as a fixed-width text table (ms per token; MB = 1e6 bytes)."""
    w = max([24] + [len(r.label) for r in result.results.values()])
    head = (f"{'configuration':<{w}} {'I/O':>7} {'mem':>6} {'compute':>8} {'total':>8} {'median':>7} {'p10-p90':>13} "
            f"{'MB/token':>9} {'GB/s':>5} {'vs naive':>8} {'model I/O':>9} {'x floor':>7}")
    lines = [head, "-" * len(head)]
    for r in result.results.values():
        s = r.stats
        lines.append(f"{r.label:<{w}} {cell(s.io_ms, '7.2f')} {cell(s.mm_ms, '6.2f')} {cell(s.compute_ms, '8.2f')} "
                     f"{s.total_ms:8.2f} {s.median_ms:7.2f} {f'{s.p10_ms:.1f}-{s.p90_ms:.1f}':>13} "
                     f"{s.bytes_per_token / 1e6:9.3f} {cell(s.io_GBps, '5.2f')} {cell(r.speedup_vs_naive, '7.1f', 'x')} "
                     f"{cell(r.modeled_io_ms, '9.2f')} {cell(r.floor_ms and s.total_ms / r.floor_ms, '6.2f', 'x')}")
    for name, why in result.skipped.items():
        lines.append(wrap(f"{LABELS[name]:<{w}} skipped: {why}"))
    for r in result.results.values():
        if r.rows_note:   # why a configuration with predictors can fall behind naive at a small budget
            lines.append(wrap(" ".join(r.rows_note.split()).replace("note:", f"{r.label}:", 1)))
    if result.pinning:
        p = result.pinning
        timed = p["score_name"].endswith("ms per token")   # else the score is the bytes themselves
        splits = "; ".join(f"{n} pinned: {b / 1e6:.3f} MB" + (f" and {c:.2f} ms" if timed else "") for n, b, c in
                           zip(p["pinned_rows"], p["bytes_per_token"], p["score"]))
        only = " (the budget leaves no row to pin beside a token's neurons)" if len(p["pinned_rows"]) == 1 else ""
        lines.append(wrap(f"{LABELS['pinned']}: {p['chosen']} hot neurons pinned per layer{only}, the split with the "
                          f"least {p['score_name']} among those adding at most 1% reader calls, simulated on the "
                          f"predictors' calibration sets (held-out tokens, not this run's), per token: {splits}"))
    checked = result.results.get("all")
    if checked and checked.stats.verify_ms is not None and checked.stats.total_ms:
        v = checked.stats.verify_ms
        lines.append(wrap(f"checking every bundle read against its checksum: {v:.3f} ms per token in "
                          f"{checked.label} ({v / checked.stats.total_ms:.1%} of its total)"))
    if result.lower_bound_ms:
        lines.append(wrap(bound_text(result)))
    lines.append(wrap(result.io))
    lines.append(wrap("ms per generated token, measured on this machine: mean, median and the 10th-90th percentile "
                      "of the tokens; the configurations take turns, one token each. 'model I/O': the cost model's I/O "
                      "time for this run's requests on the device profile (modeled). MB/token for mmap and "
                      "accelerate: bytes the kernel read. 'x floor': total / the same token's unavoidable work "
                      "measured in this run (the floor: the model without FFNs, the predictors and the sparse FFN "
                      "math with the FFN in DRAM; dense for the configurations without predictors). GB/s: bytes read "
                      "per second of I/O. —: not measured in this run (vs naive without naive, x floor without floor "
                      "or dense, I/O apart from compute for mmap and accelerate)."))
    if result.scale:
        lines += scale_lines(result)
    rp = result.replay
    if rp:
        lines += ["", rp.label + f"; window {rp.window}, {rp.cache_rows_per_layer} rows per layer",
                  f"{'configuration':<24} {'I/O ms':>9} {'MB/token':>9} {'requests':>9} {'GB/s':>6} {'vs naive':>8} "
                  f"{'vs model':>8}"]
        for name, m in rp.results.items():
            s = m.stats
            lines.append(f"{LABELS[name]:<24} {s.io_ms:9.1f} {s.bytes_read / 1e6:9.1f} {s.requests:9.0f} "
                         f"{cell(s.io_GBps, '6.2f')} {cell(m.io_vs_naive, '7.1f', 'x')} {cell(m.io_vs_naive_model, '7.1f', 'x')}")
        lines.append(wrap("vs naive: against reading every layer's whole FFN; vs model: against reading the whole "
                          "model (13.3 GB in fp16 at this shape), the naive of the paper's Table 2"))
        lines.append(wrap("paper, OPT 6.7B on an M1 Max (Table 2), I/O ms: naive 2196, +predictor 738, +windowing 164, "
                          "+bundling 87 (25.2x vs its naive, the whole model)"))
    return "\n".join(lines)


def scale_lines(result: BenchResult) -> list[str]:
    """What a `--scale` run is (shape, weights, neuron sets), its DRAM against the budget, and the paper."""
    sc, res = result.scale, result.results
    sh = sc["shape"]
    lines = ["", f"scale: {sh['name']} ({sh['layers']} layers, d_model {sh['d_model']}, ffn {sh['ffn_dim']}, fp16, "
                 f"{result.model_bytes / 1e9:.2f} GB, FFN {result.ffn_bytes / 1e9:.2f} GB); weights {sc['weights']}",
             f"neuron sets: {sc['neuron_sets']}"]
    budgets = [r for r in res.values() if r.budget_bytes]
    if budgets:
        worst = max(budgets, key=lambda r: r.dram_bytes / r.budget_bytes)
        lines.append(f"DRAM for weights per configuration (accounted): at most {worst.dram_bytes / 1e9:.2f} GB of a "
                     f"{worst.budget_bytes / 1e9:.2f} GB budget ({worst.label}); the process, every configuration "
                     f"at once (resident tensors shared, each its own rows, mmap's pages): {sc['process_rss_bytes'] / 1e9:.2f}"
                     f" GB resident now, {sc['process_peak_rss_bytes'] / 1e9:.2f} GB at its peak; beside the budget, "
                     f"the KV cache this run used: {sc['kv_cache_bytes'] / 1e6:.1f} MB per configuration")
    naive, best = res.get("naive_model") or res.get("naive"), res.get("all")
    if naive and best and best.stats.total_ms and best.stats.io_ms:
        lines.append(f"all vs {naive.label}: {naive.stats.total_ms / best.stats.total_ms:.1f}x per token, compute "
                     f"included; its I/O {naive.stats.io_ms / best.stats.io_ms:.1f}x")
    if sh["name"] == "opt-6.7b":
        from flashnb.device.costmodel import paper_data

        p = paper_data()
        t, io = p["latency_totals_opt_6_7b_ms"], {r["name"]: r["io_latency_ms"] for r in p["table2"]["rows"]}
        lines.append(f"paper, OPT 6.7B, half the model in DRAM, M1 Max CPU ({p['latency_totals_opt_6_7b_ms']['ref']}): "
                     f"{t['cpu_naive']} ms per token naive, {t['cpu_ours']} ms with every technique "
                     f"({t['cpu_naive'] / t['cpu_ours']:.1f}x); I/O ({p['table2']['ref'].split(':')[0]}): "
                     f"{io['naive']} ms naive (the whole model), {io['+bundling']} ms with every technique "
                     f"({io['naive'] / io['+bundling']:.1f}x)")
    return [wrap(line) for line in lines]
