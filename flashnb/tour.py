"""The measurements behind the tour notebooks: 00 quickstart, 06 end to end, 07 bring your own model.

Everything here drives flashnb's own engine, baselines, simulate and cost model, and labels what it
returns as flashnb.viz.style does: *measured* on this machine, *modeled* (cost model, fed statistics
measured or simulated in the same session), or *paper* (data/paper.json, with its table reference).
Figures for these results are in flashnb.viz.tour, widgets in flashnb.widgets.tour.

    device_profile      this disk's read profile: the saved one, or a short one measured now
    memory_text         where a run's DRAM goes (bytes, deterministic)
    table2_beside       the paper's Table 2 ladder beside a `run_bench` result (I/O per token)
    table3_beside       the paper's total latency (Figure 1 / Table 3) beside the same result
    budget_sweep        latency vs DRAM budget: engine runs at a few budgets, modeled curve between
    byo_model, dense_run, flash_run, compare, quick_predictors: notebook 07's steps
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flashnb.errors import FlashnbError

MB = 1e6
MiB = 1 << 20
KiB = 1 << 10

# A profile short enough for a notebook cell (a few seconds, most of it writing the 64 MiB scratch file):
# 5 chunk sizes x {1, the engine's default reads in flight} (threads=None), 0.1 s a cell. `flashnb profile`
# measures the full grid; save it and the notebooks use it instead.
SHORT_PROFILE = dict(size=64 * MiB, chunk_sizes=(4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB), threads=None,
                     seconds_per_cell=0.1, sequential_seconds=0.2)


def engine_threads() -> int:
    """The engine's default number of reads in flight (flashnb.engine.Policy.threads)."""
    from flashnb.engine import Policy

    return Policy().threads

# data/paper.json table2 row names for the bench's configurations
PAPER_ROW = {"naive": "naive", "hybrid": "hybrid", "predictor": "+predictor", "windowing": "+windowing",
             "all": "+bundling"}
LADDER = tuple(PAPER_ROW)

ENV_BYO_MODEL = "FLASHNB_BYO_MODEL"


# ----------------------------------------------------------------------------------------------
# This machine


def device_profile(dir: str | Path, use_saved: bool = True, progress: bool = False):
    """(Profile, source text, path of its JSON) for the disk holding `dir`.

    With `use_saved`, the profile `flashnb profile` saved (if any) is used; otherwise a short profile
    (SHORT_PROFILE) is measured in `dir` now and saved there as profile.json, so `run_bench` can take it.
    """
    from flashnb.profile import ProfileConfig, default_profile_path, load_default_profile, run_profile

    if use_saved:
        saved = load_default_profile()
        if saved is not None:
            return saved, f"saved profile {default_profile_path()} ({saved.data.get('date')})", default_profile_path()
    short = dict(SHORT_PROFILE)
    if short.get("threads") is None:
        short["threads"] = tuple(sorted({1, engine_threads()}))
    prof = run_profile(ProfileConfig.quick(dir=str(dir), progress=progress, **short))
    path = prof.save(Path(dir) / "profile.json")
    how = "direct I/O" if prof.direct else "buffered reads + fadvise(DONTNEED)"
    return prof, (f"short profile measured now in {Path(dir)} ({prof.data['seconds_total']:.1f} s, {how}); "
                  "`flashnb profile` measures the full grid"), path


def disk_text(profile) -> str:
    """One line on the measured device: disk, file system, sequential and 16 KiB random throughput."""
    m = profile.data.get("machine", {})
    disk = m.get("disk", {}) if isinstance(m.get("disk"), dict) else {}
    name = disk.get("device") or "unknown disk"
    fs = disk.get("fs_type") or ""
    t = int(profile.thread_counts[-1])
    return (f"{name}{' / ' + fs if fs else ''}: sequential {profile.sequential_throughput() / 1e9:.2f} GB/s, "
            f"random 16 KiB reads with {t} in flight {profile.throughput(16384, t) / 1e9:.2f} GB/s "
            f"({'direct I/O' if profile.direct else 'buffered + fadvise'}; measured). "
            "Paper's M1 Max: 6.1 GB/s sequential, 2.25 GB/s for 16 KiB bundles (Table 2).")


def memory_text(mem, name: str = "the model") -> str:
    """Where a FlashEngine's DRAM goes (its MemoryPlan): exact bytes, the same on every machine."""
    ffn = mem.model_bytes - mem.resident_bytes
    return (f"{name}: {mem.model_bytes / MB:.1f} MB of weights, {ffn / MB:.1f} MB of them FFN (on flash).\n"
            f"DRAM: resident tensors {mem.resident_bytes / MB:.1f} MB + predictors {mem.predictor_bytes / MB:.1f} MB"
            f" + neuron caches {mem.cache_bytes / MB:.1f} MB ({mem.capacity_rows} rows per cache)"
            f" = {mem.used_bytes / MB:.1f} MB, {mem.used_bytes / mem.model_bytes:.0%} of the model "
            f"(budget {mem.budget_bytes / MB:.1f} MB); KV cache {mem.kv_cache_bytes / MB:.1f} MB beside it.")


def ffn_bytes(store) -> int:
    """Bytes of the store's FFN weights (every layer's neuron bundles, without alignment padding)."""
    return store.num_layers * store.ffn_dim * store.neuron_bytes


def store_text(store) -> str:
    """What `flashnb.store.convert` wrote: the files and the FFN layout (bytes, deterministic)."""
    dram = store.dram_path.stat().st_size
    ffn = store.ffn_path.stat().st_size
    return (f"{store.layout} {store.dtype_name} store: {store.ffn_path.name} {ffn / MB:.2f} MB on flash = "
            f"{store.num_layers} layers x {store.ffn_dim} neurons x {store.neuron_bytes} B bundles "
            f"({' + '.join(store.parts)} of one neuron side by side, each layer's region {store.alignment} B-aligned); "
            f"{store.dram_path.name} {dram / MB:.2f} MB for DRAM (embeddings, attention, norms and any FFN biases)")


def token_means(steps, ffn_neurons: int) -> dict:
    """Per-token means of engine TokenSteps (flashnb.bench.summarize: ms, bytes, shares) plus the
    neurons predicted / found in the window cache / read per token."""
    from flashnb.bench import summarize

    out = summarize(steps, ffn_neurons)
    tot = [s.totals() for s in steps]
    for k in ("predicted", "cached", "read"):
        out[k] = float(np.mean([t[k] for t in tot])) if tot else 0.0
    return out


def quickstart_text(means: dict, ffn_bytes: int) -> str:
    """Notebook 00's summary of one run's per-token means, with the paper beside it."""
    total = means["total_ms"]
    io_share = means["io_ms"] / total if total else 0.0
    paper = _paper()["latency_totals_opt_6_7b_ms"]
    p_io = {r["name"]: r["io_latency_ms"] for r in _paper()["table2"]["rows"]}["+bundling"]
    return (f"per generated token (mean of {means['tokens']}, measured): "
            f"{means['bytes_read_per_token'] / MB:.3f} MB read from flash of a {ffn_bytes / MB:.1f} MB FFN "
            f"({means['bytes_read_per_token'] / ffn_bytes:.1%}); {means['predicted']:.0f} neurons predicted, "
            f"{means['cached']:.0f} already in DRAM ({means['window_hit_share']:.0%}), {means['read']:.0f} read. "
            f"Time: I/O {means['io_ms']:.1f} ms + memory management {means['mm_ms']:.1f} ms + compute "
            f"{means['compute_ms']:.1f} ms = {total:.1f} ms (I/O {io_share:.0%}).\n"
            f"Paper (OPT 6.7B, M1 Max CPU, all techniques): I/O {p_io} ms of {paper['cpu_ours']} ms per token "
            f"({p_io / paper['cpu_ours']:.0%}) (Table 2, Table 3).")


# ----------------------------------------------------------------------------------------------
# Notebook 06: the bench beside the paper


def _paper() -> dict:
    from flashnb.costmodel import paper_data

    return paper_data()


def table2_beside(result: dict) -> list[dict]:
    """One row per ladder configuration present in a `run_bench` result: the paper's Table 2 (OPT 6.7B,
    M1 Max) beside our I/O per token, measured and modeled, each also relative to its own naive."""
    paper = {r["name"]: r for r in _paper()["table2"]["rows"]}
    res = result["results"]
    p_naive = paper["naive"]["io_latency_ms"]
    ours_naive = res.get("naive", {}).get("io_ms")
    mod_naive = res.get("naive", {}).get("modeled", {}).get("io_ms")
    rows = []
    for name in LADDER:
        if name not in res:
            continue
        m, p = res[name], paper[PAPER_ROW[name]]
        rows.append({
            "name": name, "label": m["label"],
            "paper_GB": p["flash_to_dram_GB"], "paper_io_ms": p["io_latency_ms"],
            "paper_io_vs_naive": p_naive / p["io_latency_ms"],
            "mb_per_token": m["bytes_read_per_token"] / MB, "io_ms": m["io_ms"],
            "io_vs_naive": ours_naive / m["io_ms"] if ours_naive and m["io_ms"] else None,
            "modeled_io_ms": m["modeled"]["io_ms"],
            "modeled_io_vs_naive": mod_naive / m["modeled"]["io_ms"] if mod_naive and m["modeled"]["io_ms"] else None,
        })
    return rows


def format_table2_beside(rows: list[dict]) -> str:
    def f(x, spec):
        return "—" if x is None else format(x, spec)
    head = (f"{'configuration':<20} {'paper GB':>8} {'paper ms':>8} {'paper x':>7} | {'our MB':>7} {'our ms':>7} "
            f"{'our x':>6} {'model ms':>8} {'model x':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['label']:<20} {r['paper_GB']:8.1f} {r['paper_io_ms']:8.0f} {r['paper_io_vs_naive']:6.1f}x | "
                     f"{r['mb_per_token']:7.2f} {f(r['io_ms'], '7.2f')} {f(r['io_vs_naive'], '5.1f')}x "
                     f"{f(r['modeled_io_ms'], '8.2f')} {f(r['modeled_io_vs_naive'], '6.1f')}x")
    lines.append("I/O per token. paper: OPT 6.7B fp16, half memory, M1 Max (Table 2); ours: measured on this "
                 "machine (direct I/O), model: flashnb.costmodel with this run's statistics and profile; "
                 "x = naive's I/O time / this row's.")
    return "\n".join(lines)


def table3_beside(result: dict) -> dict:
    """Total latency per token, naive vs all techniques: the paper's (Figure 1 / Table 3) beside ours."""
    t = _paper()["latency_totals_opt_6_7b_ms"]
    res = result["results"]
    out = {"ref": t["ref"], "paper_cpu_naive_ms": t["cpu_naive"], "paper_cpu_all_ms": t["cpu_ours"],
           "paper_cpu_speedup": t["cpu_naive"] / t["cpu_ours"], "paper_gpu_naive_ms": t["gpu_rtx4090_naive"],
           "paper_gpu_all_ms": t["gpu_rtx4090_ours"],
           "paper_gpu_speedup": t["gpu_rtx4090_naive"] / t["gpu_rtx4090_ours"],
           "naive_ms": None, "all_ms": None, "speedup": None, "modeled_speedup": None}
    if "naive" in res and "all" in res:
        n, a = res["naive"], res["all"]
        out.update(naive_ms=n["total_ms"], all_ms=a["total_ms"], speedup=n["total_ms"] / a["total_ms"])
        if n["modeled"]["total_ms"] and a["modeled"]["total_ms"]:
            out["modeled_speedup"] = n["modeled"]["total_ms"] / a["modeled"]["total_ms"]
    return out


def format_table3_beside(t: dict) -> str:
    lines = [f"paper, OPT 6.7B, half memory, M1 Max CPU: naive {t['paper_cpu_naive_ms']} ms -> all techniques "
             f"{t['paper_cpu_all_ms']} ms per token ({t['paper_cpu_speedup']:.1f}x); RTX 4090: "
             f"{t['paper_gpu_naive_ms']} -> {t['paper_gpu_all_ms']} ms ({t['paper_gpu_speedup']:.0f}x) ({t['ref']})"]
    if t["speedup"] is not None:
        mod = "" if t["modeled_speedup"] is None else f"; modeled {t['modeled_speedup']:.1f}x"
        lines.append(f"ours, measured on this machine's CPU: naive {t['naive_ms']:.1f} ms -> all techniques "
                     f"{t['all_ms']:.1f} ms per token ({t['speedup']:.1f}x{mod})")
    else:
        lines.append("ours: run the bench with both 'naive' and 'all' to compare totals")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Notebook 06: latency vs DRAM budget


@dataclass
class BudgetSweep:
    """Latency per token vs DRAM budget (fraction of the model's bytes) for 'all' and 'hybrid'.

    measured[name]: one row per engine run; modeled[name]: one row per budget of a finer grid. A row:
    budget, dram_bytes, io_ms, mm_ms, compute_ms (None where the model has no rate), total_ms,
    mb_per_token. 'all' rows also carry hit_share (neurons found in the window cache). `modeled`
    for 'all' is the cost model fed the window hit share `flashnb.simulate` finds at that budget for
    the neuron sets the first measured run recorded; for 'hybrid' it is the cost model alone (the
    budget stays resident, the rest of the FFN streams every token).
    """

    measured: dict[str, list[dict]]
    modeled: dict[str, list[dict]]
    model_bytes: int
    window: int
    tokens: int
    device: str
    notes: list[str] = field(default_factory=list)

    def budgets(self, name: str, source: str = "modeled") -> list[float]:
        return [r["budget"] for r in getattr(self, source)[name]]

    def at(self, name: str, budget: float, source: str = "modeled") -> dict | None:
        """The row of `name` nearest to `budget`."""
        rows = getattr(self, source).get(name) or []
        return min(rows, key=lambda r: abs(r["budget"] - budget)) if rows else None


def predictor_bytes(predictors, store) -> int:
    """Bytes the engine holds for `predictors` (their weights at the store's precision)."""
    return sum(p.numel() * store.np_dtype.itemsize for layer in predictors.layers for p in layer.parameters())


def min_budget(store, window: int, predictor_bytes: int) -> float:
    """The smallest budget fraction (to 0.001) at which the engine fits one neuron row per cache."""
    from flashnb.engine import Policy, memory_plan

    lo, hi = 0.0, 1.0
    for _ in range(12):
        mid = (lo + hi) / 2
        try:
            memory_plan(store, Policy("learned", window, mid), predictor_bytes)
            hi = mid
        except FlashnbError:
            lo = mid
    return float(np.ceil(hi * 1000) / 1000)


def _ms(x):
    return None if x is None else x * 1e3


def _cost_row(budget: float, cost) -> dict:
    return {"budget": budget, "dram_bytes": cost.dram_bytes, "io_ms": _ms(cost.io_seconds),
            "mm_ms": _ms(cost.mm_seconds), "compute_ms": _ms(cost.compute_seconds),
            "total_ms": _ms(cost.total_seconds), "mb_per_token": cost.io_bytes / MB}


def budget_sweep(store, predictors, prompt_ids: list[int], profile, measured=(0.5, 0.75, 1.0),
                 modeled: int | list[float] = 12, tokens: int = 4, window: int = 4, threads: int | None = None,
                 bench: dict | None = None, calibration=None, progress=None) -> BudgetSweep:
    """Run 'all' (learned predictors, window, bundled store) and 'hybrid' at each budget in `measured`
    for `tokens` generated tokens after `prompt_ids`, and model both on `modeled` budgets (a list, or
    a count spread from the smallest feasible budget to 1.0). Budgets are fractions of the model's bytes.

    `bench`: a `run_bench` result of the same model, prompt, window, threads and token count: its 'all'
    and 'hybrid' runs join the measured rows at its budget instead of being run again, and its calibration
    (flashnb.calibrate: this machine's compute and memory-management constants) feeds the cost model
    unless `calibration` is given. `threads`: reads in flight (None: the bench's, else the engine's default)."""
    from dataclasses import replace

    from flashnb import costmodel as cm
    from flashnb.baselines import HybridEngine
    from flashnb.engine import FlashEngine, Policy, memory_plan
    from flashnb.simulate import simulate
    from flashnb.store import FlashStore

    st = store if isinstance(store, FlashStore) else FlashStore.open(store)
    if st.layout != "bundled":
        raise FlashnbError(f"budget_sweep runs all techniques and needs a bundled store; {st.path} is {st.layout}")
    if threads is None:
        threads = bench["settings"]["threads"] if bench is not None else engine_threads()
    if calibration is None and bench is not None and bench.get("calibration"):
        from flashnb.calibrate import Calibration

        calibration = Calibration(**bench["calibration"])
    ffn_neurons = st.num_layers * st.ffn_dim
    pred_bytes = predictor_bytes(predictors, st)
    lo = min_budget(st, window, pred_bytes)
    bad = [b for b in measured if b < lo or b > 1]
    if bad:
        raise FlashnbError(f"budgets {bad} are outside [{lo:.3f}, 1]: below {lo:.3f} of the model the DRAM tensors "
                           "and predictors leave no room for neuron rows")
    n_prompt = len(prompt_ids)
    meas: dict[str, list[dict]] = {"all": [], "hybrid": []}
    if bench is not None:
        meas = _bench_rows(bench, window, tokens, threads)
        measured = [b for b in measured if all(abs(b - r["budget"]) > 1e-9 for r in meas["all"])]
        if not measured:
            raise FlashnbError("budget_sweep needs at least one budget to run besides the bench's (it records "
                               "the neuron sets the modeled curve replays)")
    needed = None
    for b in measured:
        with FlashEngine(st, Policy("learned", window, b, threads), predictors=predictors, profile=profile) as eng:
            list(eng.generate(prompt_ids, tokens))
            m = token_means(eng.steps[n_prompt:], ffn_neurons)
            meas["all"].append({"budget": b, "dram_bytes": eng.memory.used_bytes, "io_ms": m["io_ms"],
                                "mm_ms": m["mm_ms"], "compute_ms": m["compute_ms"], "total_ms": m["total_ms"],
                                "mb_per_token": m["bytes_read_per_token"] / MB, "hit_share": m["window_hit_share"]})
            if needed is None:
                needed = [s.needed for s in eng.steps]
        with HybridEngine(st, b, threads, profile) as hyb:
            list(hyb.generate(prompt_ids, tokens))
            m = token_means(hyb.steps[n_prompt:], ffn_neurons)
            meas["hybrid"].append({"budget": b, "dram_bytes": hyb.used_bytes, "io_ms": m["io_ms"], "mm_ms": m["mm_ms"],
                                   "compute_ms": m["compute_ms"], "total_ms": m["total_ms"],
                                   "mb_per_token": m["bytes_read_per_token"] / MB, "pinned_rows": hyb.pinned})
        if progress:
            progress(b)
    for rows in meas.values():
        rows.sort(key=lambda r: r["budget"])
    if isinstance(modeled, int):  # a grid from the smallest feasible budget to 1, through the measured ones
        spread = {float(x) for x in np.round(np.linspace(lo, 1.0, modeled), 3)}
        grid = sorted(spread | {float(r["budget"]) for r in meas["all"]})
    else:
        grid = sorted(float(b) for b in modeled)
    device = cm.as_device(profile)
    shape = cm.ModelShape.from_config(st.config, st.np_dtype.itemsize, st.path.name)
    mod: dict[str, list[dict]] = {"all": [], "hybrid": []}
    gen = slice(n_prompt, None)
    for b in grid:
        pol = Policy("learned", window, b, threads)
        sim = [s.totals() for s in simulate(needed, st, pol, pred_bytes, profile)[gen]]
        mean = {k: float(np.mean([t[k] for t in sim])) for k in ("predicted", "cached", "requests", "bytes_read")}
        hit = mean["cached"] / mean["predicted"] if mean["predicted"] else 0.0
        cap = memory_plan(st, pol, pred_bytes).capacity_rows
        base = cm.Policy(name="all", predictor=True, sparsity=1.0 - mean["predicted"] / ffn_neurons, overselect=1.0,
                         window=window, window_reuse=hit, window_cached_fraction=cap / st.ffn_dim, bundling=True,
                         memory_budget=b, threads=threads, predictor_bytes=pred_bytes)
        if mean["requests"]:  # the request sizes the reader would issue (simulate plans them as it does)
            base = replace(base, request_bytes=int(mean["bytes_read"] / mean["requests"]),
                           requests_per_call=mean["requests"] / st.num_layers)
        mod["all"].append(dict(_cost_row(b, cm.token_cost(shape, base, device, calibration)), hit_share=hit))
        hyb = cm.Policy(name="hybrid", predictor=False, memory_budget=b, threads=threads)
        mod["hybrid"].append(_cost_row(b, cm.token_cost(shape, hyb, device, calibration)))
    notes = [f"measured: {tokens} generated tokens per run after a {n_prompt}-token prompt, direct I/O"
             + (" (the bench's runs at its budget)" if bench is not None else ""),
             "modeled 'all': cost model with the window hit share and request sizes simulate finds at each budget"
             + (", compute and memory management calibrated on this machine" if calibration is not None else ""),
             "modeled 'hybrid': cost model, the budget resident and the rest of the FFN streamed"]
    return BudgetSweep(meas, mod, shape.total_bytes, window, tokens, device.name, notes)


def _bench_rows(result: dict, window: int, tokens: int, threads: int) -> dict[str, list[dict]]:
    """The 'all' and 'hybrid' runs of a run_bench result as BudgetSweep measured rows."""
    st = result["settings"]
    if (st["window"], st["tokens"], st["threads"]) != (window, tokens, threads):
        raise FlashnbError(f"the bench ran window {st['window']}, {st['tokens']} tokens, "
                           f"{st['threads']} reads in flight; "
                           f"the sweep asks for {window}, {tokens}, {threads}: run both with the same settings")
    out: dict[str, list[dict]] = {"all": [], "hybrid": []}
    for name in out:
        m = result["results"].get(name)
        if m is None:
            continue
        row = {"budget": st["memory"], "dram_bytes": m.get("dram_bytes"), "io_ms": m["io_ms"], "mm_ms": m["mm_ms"],
               "compute_ms": m["compute_ms"], "total_ms": m["total_ms"],
               "mb_per_token": m["bytes_read_per_token"] / MB, "from": "run_bench"}
        if name == "all":
            row["hit_share"] = m["window_hit_share"]
        out[name].append(row)
    return out


def budget_text(sweep: BudgetSweep, budget: float) -> str:
    """One paragraph for the budget slider: modeled at `budget`, measured nearest to it, the paper."""
    a, h = sweep.at("all", budget), sweep.at("hybrid", budget)
    ma, mh = sweep.at("all", budget, "measured"), sweep.at("hybrid", budget, "measured")

    def ms(x):
        return "n/a" if x is None else f"{x:.1f} ms"
    text = (f"DRAM budget {budget:.0%} of the model ({budget * sweep.model_bytes / MB:.1f} MB). "
            f"Modeled: all techniques {ms(a['total_ms'])} per token ({a['mb_per_token']:.2f} MB read, "
            f"{a['hit_share']:.0%} of the predicted neurons already in DRAM); hybrid {ms(h['total_ms'])} "
            f"({h['mb_per_token']:.2f} MB read).")
    if ma is not None:
        text += (f" Measured at {ma['budget']:.0%}: all techniques {ms(ma['total_ms'])}, hybrid {ms(mh['total_ms'])} "
                 "per token.")
    return text + (" Paper: about half of OPT 6.7B in DRAM (Table 2); more DRAM holds a longer window "
                   "and reads less per token.")


# ----------------------------------------------------------------------------------------------
# Notebook 07: bring your own model


TINY_BYO = dict(hidden_size=256, ffn_dim=1024, num_hidden_layers=4, num_attention_heads=4, word_embed_proj_dim=256,
                max_position_embeddings=128)


def byo_model(path: str | None, workdir: str | Path) -> tuple[Path, bool, str]:
    """(model folder, is_user_model, what it is). `path` empty: the `FLASHNB_BYO_MODEL` variable; both
    empty: a tiny random OPT (TINY_BYO) is built in `workdir`."""
    from flashnb.checkpoint import read_config

    path = (path or os.environ.get(ENV_BYO_MODEL, "")).strip()
    if path:
        folder = Path(path).expanduser()
        config = read_config(folder)  # a clear error if this is not a model folder flashnb runs
        return folder, True, f"your model: {folder} ({config.model_type}, {_params(config) / 1e6:.3g} M parameters)"
    from flashnb.tiny import make_tiny_opt

    folder = make_tiny_opt(Path(workdir) / "tiny-random-opt", backend="flashnb", **TINY_BYO)
    config = read_config(folder)
    return folder, False, (f"no model folder given (text box empty, {ENV_BYO_MODEL} unset): built a tiny RANDOM OPT "
                           f"({_params(config) / 1e6:.1f} M parameters: d_model {config.hidden_size}, ffn "
                           f"{config.ffn_dim}, {config.num_hidden_layers} layers) in a temporary folder. Its text is "
                           "gibberish and about half of its FFN neurons fire per token (a trained OPT: a few percent); "
                           "it shows the steps, not the savings.")


def _params(config) -> int:
    from flashnb.costmodel import ModelShape

    s = ModelShape.from_config(config)
    return s.ffn_params + s.other_params


def load_tokenizer(folder: str | Path, config):
    """flashnb's Tokenizer from tokenizer.json; without one (facebook/opt-* ship vocab.json and merges.txt)
    transformers' fast tokenizer for the folder, converted in memory (the folder is not modified)."""
    from flashnb.tokenizer import Tokenizer

    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_folder(folder, bos_id=config.bos_token_id)
    from flashnb.tiny import has_transformers

    if not has_transformers():
        raise FlashnbError(f"{folder / 'tokenizer.json'} is missing and transformers is not installed to read "
                           "vocab.json/merges.txt: pip install transformers, or save tokenizer.json with "
                           "AutoTokenizer.from_pretrained(folder).save_pretrained(folder)")
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    return Tokenizer(fast.backend_tokenizer, config.bos_token_id)


def sample_text(chars: int = 4000) -> str:
    """Real text for prompts and predictor training: the shipped predictors' held-out slice (docstrings),
    decoded with the shipped tokenizer; any tokenizer can encode it."""
    from flashnb.checkpoint import read_config
    from flashnb.paths import data_dir, shipped_model_dir
    from flashnb.predictor_build import load_heldout
    from flashnb.tokenizer import Tokenizer

    folder = shipped_model_dir()
    tok = Tokenizer.from_folder(folder, bos_id=read_config(folder).bos_token_id)
    ids = load_heldout(data_dir() / f"{folder.name}-predictors", tokens=max(64, chars // 2))
    return tok.decode([int(i) for i in ids])[:chars]


@dataclass
class Run:
    """One greedy generation, token at a time. logits: float32 [new tokens, vocab], the logits each new
    token was chosen from. means: per generated token (ms, bytes; flashnb.bench.summarize keys)."""

    name: str
    tokens: list[int]
    logits: torch.Tensor
    means: dict
    dram_bytes: int


def _greedy(step, prompt_ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    logits = None
    for t in prompt_ids:
        logits = step(t)
    out, rows = [], []
    for i in range(n):
        rows.append(logits.float())
        out.append(int(torch.argmax(logits)))
        if i + 1 < n:
            logits = step(out[-1])
    return out, torch.stack(rows)


@torch.no_grad()
def dense_run(folder: str | Path, prompt_ids: list[int], n: int, dtype: torch.dtype = torch.float16) -> Run:
    """The whole model in DRAM (flashnb's dense reference model), greedy, one token per forward pass;
    all of its time is compute."""
    from flashnb.checkpoint import load_model

    model = load_model(folder, dtype)
    kv = model.new_cache(1, len(prompt_ids) + n)
    walls: list[float] = []

    def step(t: int) -> torch.Tensor:
        t0 = time.perf_counter()
        y = model(torch.tensor([[t]]), kv)[0, -1]
        walls.append(time.perf_counter() - t0)
        return y

    out, logits = _greedy(step, prompt_ids, n)
    gen = walls[len(prompt_ids):]
    wall = float(np.mean(gen)) * 1e3 if gen else 0.0
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    means = {"tokens": len(gen), "total_ms": wall, "io_ms": 0.0, "mm_ms": 0.0, "compute_ms": wall,
             "bytes_read_per_token": 0.0}
    return Run("dense", out, logits, means, nbytes)


def flash_run(store, policy, prompt_ids: list[int], n: int, predictors=None, profile=None, name: str = "flash") -> Run:
    """FlashEngine greedy generation under `policy`; per-token means over the generated tokens."""
    from flashnb.engine import FlashEngine

    with FlashEngine(store, policy, predictors=predictors, profile=profile) as eng:
        kv = eng.model.new_cache(1, len(prompt_ids) + n)
        out, logits = _greedy(lambda t: eng.step(t, kv), prompt_ids, n)
        st = eng.store
        means = token_means(eng.steps[len(prompt_ids):], st.num_layers * st.ffn_dim)
        return Run(name, out, logits, means, eng.memory.used_bytes)


def compare(ref: Run, run: Run, rounding: float = 1e-2) -> dict:
    """Tokens and logits of `run` against `ref` (both greedy after the same prompt). Logits are compared
    up to and including the first position where the chosen tokens differ (after it the contexts differ).

    `rounding_only`: the runs agree up to rounding: the logits differ by at most `rounding` of the largest
    logit (fp16 keeps about 3 significant digits), and the tokens are the same or, at the first difference,
    the two tokens' logits in `ref` lie within twice that difference (a near tie that rounding flipped).
    """
    n = min(len(ref.tokens), len(run.tokens))
    diverge = next((i for i in range(n) if ref.tokens[i] != run.tokens[i]), None)
    upto = n if diverge is None else diverge + 1
    diff = (ref.logits[:upto] - run.logits[:upto]).abs()
    worst = diff.max().item() if upto else 0.0
    scale = ref.logits[:upto].abs().max().item() or 1.0
    margin = None
    if diverge is not None:
        row = ref.logits[diverge]
        margin = (row[ref.tokens[diverge]] - row[run.tokens[diverge]]).item()
    return {"tokens": n, "same_tokens": diverge is None, "first_difference": diverge,
            "max_abs_logit_diff": worst, "max_rel_logit_diff": worst / scale,
            "margin_at_difference": margin,
            "rounding_only": worst <= rounding * scale and (diverge is None or margin <= 2 * worst)}


def compare_text(name: str, c: dict) -> str:
    if c["same_tokens"]:
        same = f"all {c['tokens']} greedy tokens identical"
    else:
        margin = c["margin_at_difference"]
        why = (f"a near tie: the dense model's two candidates {margin:.2g} apart" if c["rounding_only"]
               else f"the dense model preferred its token by {margin:.2g}")
        same = f"tokens identical up to position {c['first_difference']} of {c['tokens']} ({why})"
    return (f"{name} vs dense: {same}; largest logit difference {c['max_abs_logit_diff']:.2g} "
            f"({c['max_rel_logit_diff']:.1e} of the largest logit)")


def quick_predictors(folder: str | Path, ids: list[int], rank: int = 32, epochs: int = 3, threshold: float = 0.5,
                     heldout: float = 0.25, context: int | None = None, seed: int = 0):
    """Low-rank predictors trained here, quickly, on the FFN activations of `folder`'s model over `ids`
    (the first 1 - heldout of them; flashnb.predictor_train), and their selection metrics on the rest.
    Returns (LowRankPredictors, metrics dict: recall, precision, over_selection, active_share,
    selected_share, train_tokens, heldout_tokens, seconds)."""
    from flashnb.checkpoint import load_model
    from flashnb.predictor import mean_selection, selection_metrics
    from flashnb.predictor_train import PredictorTrainConfig, train_predictors
    from flashnb.traces import record

    t0 = time.perf_counter()
    model = load_model(folder)
    ctx = min(context or 256, model.config.max_position_embeddings)
    k = int(len(ids) * (1 - heldout))
    if k < 16 or len(ids) - k < 8:
        raise FlashnbError(f"quick_predictors needs more tokens: got {len(ids)}, want at least 16 to train on "
                           "and 8 held out")
    train = record(model, ids[:k], context=ctx)
    held = record(model, ids[k:], context=ctx)
    cfg = PredictorTrainConfig(rank=rank, epochs=epochs, threshold=threshold, batch_size=128, seed=seed)
    preds = train_predictors(model, train, cfg, progress=False)
    sel = mean_selection(selection_metrics(preds, held)).to_dict()
    sel.update(train_tokens=k, heldout_tokens=len(ids) - k, rank=rank, epochs=epochs,
               seconds=time.perf_counter() - t0)
    return preds, sel


def predictor_text(m: dict) -> str:
    return (f"learned predictors (rank {m['rank']}, {m['epochs']} epochs on {m['train_tokens']} tokens, "
            "trained just now): "
            f"on {m['heldout_tokens']} held-out tokens recall {m['recall']:.1%}, over-selection "
            f"{m['over_selection']:.2f}x; {m['active_share']:.1%} of the FFN fires per token, they select "
            f"{m['selected_share']:.1%}. Paper (OPT 6.7B): 5% false negatives, ~3x over-selection (Section 3.1).")


def costs_table(runs: list[Run]) -> list[dict]:
    """Per-token costs of several runs side by side (ms; MB = 1e6 bytes read per token and held in DRAM)."""
    return [{"name": r.name, "io_ms": r.means["io_ms"], "mm_ms": r.means["mm_ms"], "compute_ms": r.means["compute_ms"],
             "total_ms": r.means["total_ms"], "mb_per_token": r.means["bytes_read_per_token"] / MB,
             "dram_mb": r.dram_bytes / MB} for r in runs]


def format_costs(rows: list[dict]) -> str:
    head = f"{'run':<28} {'I/O':>7} {'mem':>7} {'compute':>8} {'total':>8} {'MB/token':>9} {'DRAM MB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<28} {r['io_ms']:7.2f} {r['mm_ms']:7.2f} {r['compute_ms']:8.2f} {r['total_ms']:8.2f} "
                     f"{r['mb_per_token']:9.3f} {r['dram_mb']:9.1f}")
    lines.append("ms per generated token, measured on this machine (direct I/O for the flash runs)")
    return "\n".join(lines)
