"""`flashnb bench --scale NAME`: the engine itself at the shapes of the paper's models, on this disk.

This machine cannot hold OPT 6.7B's trained weights, but its disk can hold a store of that shape, and
its DRAM half of one. `scale_stores` writes such a store (both layouts) with deterministic random fp16
weights: matrices normal with std 0.02 (as OPT initialises them), LayerNorm weights 1, biases 0. The
DRAM part (embeddings, attention, norms, biases) is loaded and computed for real; the FFN is read from
flash and computed for the chosen neurons by the same `FlashEngine` that runs the shipped model.

Random weights carry no activation sparsity, so the neurons each token uses come from elsewhere: the
shipped model's predictors, run over held-out text, and mapped onto the wider FFN as the trace replay
maps them (flashnb.bench.replay.widen: each shipped neuron stands for `ffn_dim / 2048` neurons scattered
by a fixed permutation; layer l uses the shipped layer l * 6 // layers). `ReplayedSets` serves them to
the engine in order, after running a random low-rank predictor of the paper's rank, so a token pays what
a real predictor costs in time and DRAM. Every result says so in its `neuron_sets` line.
"""

from __future__ import annotations

import os
import time
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flashnb.bench.baselines import MmapEngine, WholeModelNaive
from flashnb.bench.replay import shipped_placement_widened, widen
from flashnb.bench.report import LABELS, BenchResult, ConfigResult
from flashnb.bench.run import VARIANTS, _profile, engine_setup, modeled_io_ms, same_dram, take_turns, variant
from flashnb.core.convert import ConvertConfig, write_store
from flashnb.core.engine import FlashEngine, Policy
from flashnb.core.generate import SamplingConfig
from flashnb.core.memory import MemoryShape, plan_memory
from flashnb.core.predictor import AllNeurons, LowRankPredictor, Predictor
from flashnb.core.quant import RowFormat
from flashnb.core.manifest import CHECKSUM_FILE, DRAM_FILE, FFN_FILE, MANIFEST, PLACEMENT_FILE
from flashnb.core.store import FlashStore
from flashnb.device.costmodel import ModelShape, as_device
from flashnb.device.measure import machine_info, process_rss
from flashnb.device.profile import coalescing_gap
from flashnb.errors import FlashnbError
from flashnb.lab.stats import TokenStats
from flashnb.models.checkpoint import ffn_matrix_names, meta_model
from flashnb.models.opt import OPTConfig
from flashnb.paths import work_folder
from flashnb.text import wrap

# OPT shapes (d_model, ffn_dim, layers, attention heads): the paper's OPT 6.7B and its smaller and larger kin.
SCALES = {"125m": (768, 3072, 12, 12), "1.3b": (2048, 8192, 24, 32), "2.7b": (2560, 10240, 32, 32),
          "6.7b": (4096, 16384, 32, 32), "13b": (5120, 20480, 40, 40)}
SEED = 0
WRITER = 2  # the version of SyntheticWeights and the shapes' configs
PREDICTOR_RANK = 128  # the paper's rank for most layers of OPT 6.7B (Section 3.1: 128, up to 1024 in the last)
VOCAB = 50272         # OPT's
SHIPPED_FFN = 2048    # the shipped model's FFN width, whose neuron sets are widened


@dataclass(frozen=True)
class ScaleShape:
    name: str
    d_model: int
    ffn_dim: int
    layers: int
    heads: int

    @property
    def tag(self) -> str:
        return f"opt-{self.name}" if self.name in SCALES else f"d{self.d_model}-f{self.ffn_dim}-l{self.layers}"

    def config(self) -> OPTConfig:
        return OPTConfig(vocab_size=VOCAB, hidden_size=self.d_model, ffn_dim=self.ffn_dim,
                         num_hidden_layers=self.layers, num_attention_heads=self.heads,
                         max_position_embeddings=2048)

    def memory_shape(self, layout: str = "bundled") -> MemoryShape:
        """What a memory budget is split over on this shape's store of `layout` (FlashStore.memory_shape), known
        before the store is written: the resident tensors at fp16, plus a checksum of 8 bytes per row of each
        region (one bundle, or the up and down matrices unbundled)."""
        c = self.config()
        ffn = ffn_matrix_names(c)
        values = sum(p.numel() for n, p in meta_model(c).named_parameters() if n not in ffn)
        regions = 1 if layout == "bundled" else len(c.ffn_parts)
        return MemoryShape(2 * values + 8 * regions * self.layers * self.ffn_dim, self.layers, self.ffn_dim,
                           2 * len(c.ffn_parts) * self.d_model)

    def predictor_bytes(self, rank: int = PREDICTOR_RANK) -> int:
        """DRAM of the random low-rank predictors the engine configurations run (ReplayedSets), at fp16."""
        with torch.device("meta"):
            one = LowRankPredictor(self.d_model, self.ffn_dim, rank)
        return 2 * self.layers * sum(p.numel() for p in one.parameters())

    def bytes(self) -> tuple[int, int]:
        """(FFN bytes, everything else) at fp16, counted from the model (flashnb.device.costmodel.ModelShape)."""
        m = ModelShape.from_config(self.config(), 2, self.tag)
        return m.ffn_bytes, m.other_bytes


def parse_scale(text: str, small_ffn: int = SHIPPED_FFN) -> ScaleShape:
    """One of SCALES, or a custom 'd_model,ffn_dim,layers' (heads: d_model / 64)."""
    if text in SCALES:
        return ScaleShape(text, *SCALES[text])
    try:
        d, f, n = (int(x) for x in text.split(","))
    except ValueError:
        raise FlashnbError(f"--scale {text!r}: give one of {', '.join(SCALES)} or 'd_model,ffn_dim,layers' "
                           "(e.g. 64,2048,2)") from None
    if d < 64 or d % 64 or n < 1 or f < small_ffn:
        raise FlashnbError(f"--scale {text!r}: d_model must be a multiple of 64 (heads of 64), layers >= 1, and "
                           f"ffn_dim at least {small_ffn} (the shipped model's FFN, whose neuron sets are widened "
                           "onto it)")
    return ScaleShape(text, d, f, n, d // 64)


class SyntheticWeights:
    """A deterministic random checkpoint, tensor by tensor (what `write_store` reads): LayerNorm weights
    1, biases 0, matrices normal with std 0.02, each cut from one shared block of random values at an
    offset given by its name (fast to make at any size; no two matrices alike)."""

    def __init__(self, seed: int = SEED, block_values: int = 1 << 24):
        g = torch.Generator().manual_seed(seed)
        self.block = (torch.randn(block_values, generator=g) * 0.02).to(torch.float16)

    def get(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        n = int(np.prod(shape, dtype=np.int64))
        if key.endswith(".bias"):
            return torch.zeros(shape, dtype=torch.float16)
        if "layer_norm" in key and key.endswith(".weight"):
            return torch.ones(shape, dtype=torch.float16)
        start = zlib.crc32(key.encode()) % self.block.numel()
        reps = -(-(start + n) // self.block.numel())
        flat = self.block.repeat(reps)[start:start + n] if reps > 1 else self.block[start:start + n]
        return flat.reshape(shape).clone()


def _free_bytes(folder: Path) -> int:
    s = os.statvfs(folder)
    return s.f_bavail * s.f_frsize


def _valid(path: Path, shape: ScaleShape) -> FlashStore | None:
    try:
        st = FlashStore.open(path)
    except FlashnbError:
        return None
    return st if st.manifest.get("source") == _source(shape) else None


def _source(shape: ScaleShape) -> dict:
    """What a scale store's manifest says it is (a store written by another version is written again)."""
    return {"synthetic": shape.tag, "seed": SEED, "writer": WRITER}


def scale_stores(root: str | Path, shape: ScaleShape, progress: bool = True, log=print,
                 extra: tuple[str, ...] = ()) -> dict[str, FlashStore]:
    """Both layouts of a random-weight store of `shape` in root/flashnb-scale-TAG/ (reused when already
    there and valid), and the bundled stores of the configurations (flashnb.bench.run.VARIANTS) named in
    `extra`, keyed by name: "int8" and "q4" with rows of that format, "placed" in the shipped placement's
    order carried onto this shape (`widened_placement`), "q4-placed" both; stores of equal DRAM files share
    one (a hard link), so a process holds it once."""
    folder = Path(root) / f"flashnb-scale-{shape.tag}"
    ffn, other = shape.bytes()
    layouts = ("bundled", "unbundled") + tuple(extra)
    kinds = {k: variant(k) if k in extra else ("fp16", False) for k in layouts}
    size = {k: ffn * RowFormat(kinds[k][0], shape.d_model).part_bytes // (2 * shape.d_model) + other for k in layouts}
    stores = {k: _valid(folder / k, shape) for k in layouts}   # None: still to write
    todo = [k for k, st in stores.items() if st is None]
    weights, spare = sum(size[k] for k in todo), 1 << 28          # every store still to write, before the first
    free = _free_bytes(folder if folder.is_dir() else Path(root)) if todo else 0
    if todo and free < weights + spare:
        raise FlashnbError(f"the {shape.tag} stores to write ({', '.join(todo)}) need {(weights + spare) / 1e9:.2f} GB "
                           f"free in {Path(root)} ({weights / 1e9:.2f} GB of weights and {spare / 1e9:.2f} GB to "
                           f"spare), which has {free / 1e9:.2f} GB: free some space, pass --dir on a larger disk, or "
                           "run fewer --configs")
    folder.mkdir(parents=True, exist_ok=True)
    for layout in layouts:
        st = stores[layout]
        if st is None:
            dtype, placed = kinds[layout]
            log(f"writing the {layout} store of {shape.tag} ({size[layout] / 1e9:.2f} GB of random weights) in "
                f"{folder} ...")
            write_store(folder / layout, shape.config(), shape.config().to_hf(), SyntheticWeights(),
                        ConvertConfig(layout="unbundled" if layout == "unbundled" else "bundled", dtype=dtype,
                                      overwrite=True, progress=progress,
                                      placement=shipped_placement_widened(shape) if placed else None),
                        source=_source(shape))
            st = FlashStore.open(folder / layout)
        stores[layout] = st
    a = stores["bundled"].dram_path
    for name, st in stores.items():
        if not os.path.samefile(a, st.dram_path) and stores["bundled"].manifest["dram_file"] == st.manifest["dram_file"]:
            tmp = st.dram_path.with_name(DRAM_FILE + ".link")
            os.link(a, tmp)
            os.replace(tmp, st.dram_path)
            stores[name] = FlashStore.open(folder / name)
    return stores


def remove_scale_stores(root: str | Path, shape: ScaleShape) -> None:
    """Delete what `scale_stores` wrote (only its own files)."""
    folder = Path(root) / f"flashnb-scale-{shape.tag}"
    for layout in ("bundled", "unbundled") + SCALE_OPT_IN:
        for name in (MANIFEST, DRAM_FILE, FFN_FILE, CHECKSUM_FILE, PLACEMENT_FILE):
            p = folder / layout / name
            if p.is_file():
                p.unlink()
        if (folder / layout).is_dir() and not any((folder / layout).iterdir()):
            (folder / layout).rmdir()
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


class ReplayedSets(Predictor):
    """Serves recorded neuron sets (sets[token][layer]) in order, one token after another, after running
    a random low-rank predictor of `rank` on the token (its output unused), so that the token pays a
    real predictor's time and the budget its DRAM."""

    name = "replayed sets"

    def __init__(self, sets: list[list[np.ndarray]], d_model: int, ffn_dim: int, rank: int = PREDICTOR_RANK,
                 seed: int = SEED):
        torch.manual_seed(seed)
        self.sets, self.ffn_dim = sets, ffn_dim
        self.layers = [LowRankPredictor(d_model, ffn_dim, rank).to(torch.float16).eval() for _ in sets[0]]
        self.count = [0] * len(self.layers)

    @torch.no_grad()
    def select(self, layer: int, x: torch.Tensor) -> np.ndarray:
        self.layers[layer](x.to(torch.float16))  # what a predictor of this rank costs
        t = self.count[layer]
        self.count[layer] += 1
        return self.sets[t % len(self.sets)][layer]

    def memory_bytes(self, itemsize: int) -> int:
        return itemsize * sum(p.numel() for m in self.layers for p in m.parameters())


def shipped_sets(tokens: int) -> tuple[list[list[np.ndarray]], int]:
    """The shipped predictors' neuron sets for the first `tokens` held-out tokens (one context), and
    the shipped model's FFN width."""
    from flashnb.core.simulate import sets_from_trace
    from flashnb.shipped_models import shipped
    from flashnb.training.build_predictors import load_heldout
    from flashnb.training.traces import record

    m = shipped()
    ids = load_heldout(m.predictors_folder, tokens)
    return sets_from_trace(record(m.dense(), ids, context=max(tokens, 1)), m.predictors), m.config.ffn_dim


SCALE_CONFIGS = ("naive", "naive_model", "predictor", "windowing", "all", "mmap")
SCALE_OPT_IN = VARIANTS  # all on quantized bundles (in the fp16 model's budget) or in the shipped co-activation
                         # order (widened_placement), or both: only when named
SWEEP = ("shipped", "125m", "1.3b", "2.7b", "6.7b")


def _runner(name: str, stores: dict, sets, shape: ScaleShape, policy: Policy):
    if name == "mmap":
        return MmapEngine(stores["bundled"])
    if name in ("naive", "naive_model"):
        everything = AllNeurons(shape.ffn_dim)
        pol = Policy(0, policy.memory_budget, policy.in_flight, policy.gap_bytes)
        cls = WholeModelNaive if name == "naive_model" else FlashEngine
        return cls(stores["bundled"], everything, pol)
    memory = same_dram(name, policy.memory_budget, stores)  # quantized: the fp16 model's DRAM
    layout, pol = engine_setup(name, policy.window, memory, policy.in_flight, policy.gap_bytes)
    return FlashEngine(stores[layout], ReplayedSets(sets, shape.d_model, shape.ffn_dim), pol)


def run_scale(cfg, log=print):
    """`flashnb bench --scale`: SCALE_CONFIGS (those of cfg.configs that are among them) at cfg.scale's
    shape, taking turns, as a BenchResult (JSON like `flashnb bench --out`)."""
    shape = parse_scale(cfg.scale)
    configs = list(cfg.configs)
    unknown = sorted(set(configs) - set(SCALE_CONFIGS) - set(SCALE_OPT_IN))
    if unknown:
        raise FlashnbError(f"--scale runs {', '.join(SCALE_CONFIGS + SCALE_OPT_IN)} only: drop {', '.join(unknown)} from "
                           "--configs")
    if cfg.tokens < 1:
        raise FlashnbError(f"--tokens must be >= 1, got {cfg.tokens}")
    for name in configs:   # a budget too small for a configuration is said before gigabytes are written
        if name not in ("mmap", "naive", "naive_model"):
            layout, pol = engine_setup(name if name in SCALE_CONFIGS else "all", cfg.window, cfg.memory,
                                       cfg.in_flight, 0)
            plan_memory(shape.memory_shape(layout), pol.memory_budget, pol.window, shape.predictor_bytes())
        elif name != "mmap":
            plan_memory(shape.memory_shape(), cfg.memory, 0)
    root = work_folder(cfg.dir)
    profile, profile_source = _profile(cfg, root)
    device, gap = as_device(profile), coalescing_gap(profile, cfg.in_flight)
    prompt_len = 2
    small, small_ffn = shipped_sets(prompt_len + cfg.tokens + 1)
    sets = widen(small, small_ffn, shape)
    prompt = [2, 133][:prompt_len]  # any ids: the weights are random, the sets replayed
    results: dict[str, ConfigResult] = {}
    try:  # (a store written before a failure is removed too, unless --keep)
        stores = scale_stores(root, shape, cfg.progress, log, tuple(c for c in SCALE_OPT_IN if c in configs))
        config = stores["bundled"].config
        mshape = ModelShape.from_config(config, 2, shape.tag)
        policy = Policy(cfg.window, cfg.memory, cfg.in_flight, gap)
        with ExitStack() as stack:
            runners = {}
            for name in configs:
                runners[name] = r = _runner(name, stores, sets, shape, policy)
                stack.callback(r.close)
            streams = {k: iter(r.generate(prompt, cfg.tokens + 1, SamplingConfig())) for k, r in runners.items()}
            _, spent = take_turns(streams, cfg.progress)
            rss_now, rss_peak = process_rss()
            c = stores["bundled"].config   # keys and values, every layer, each position the run generated
            kv_bytes = 2 * c.num_hidden_layers * c.hidden_size * 2 * (len(prompt) + cfg.tokens + 1)
            for name, r in runners.items():
                steps = r.steps[len(prompt):]
                stats = TokenStats.of(steps, shape.layers * shape.ffn_dim, split=name != "mmap")
                mem = getattr(r, "memory", None)
                results[name] = ConfigResult(
                    name, LABELS[name], stats, "", spent[name], mem.used_bytes if mem else None,
                    mem.budget_bytes if mem else None,
                    modeled_io_ms("naive" if name == "naive_model" else name, steps, stats, mshape, cfg.in_flight,
                                  device),
                    r.reader.io_mode if hasattr(r, "reader") else "")
    finally:
        if not cfg.keep:
            remove_scale_stores(root, shape)
    ffn, other = shape.bytes()
    scale = {"shape": {"name": shape.tag, "d_model": shape.d_model, "ffn_dim": shape.ffn_dim, "layers": shape.layers,
                       "heads": shape.heads, "dtype": "fp16"},
             "weights": "random (normal, std 0.02; LayerNorm weights 1, biases 0), deterministic",
             "neuron_sets": f"the shipped model's predicted sets, widened x{shape.ffn_dim / small_ffn:g} onto this FFN "
                            f"(scattered), with a random rank-{PREDICTOR_RANK} predictor run for its cost",
             "process_rss_bytes": rss_now, "process_peak_rss_bytes": rss_peak, "kv_cache_bytes": kv_bytes,
             "kept_stores": bool(cfg.keep)}
    settings = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__ if k != "progress"}
    return BenchResult(time.strftime("%Y-%m-%dT%H:%M:%S%z"), {**machine_info(root), "torch": torch.__version__,
                                                             "torch_threads": torch.get_num_threads()},
                       shape.tag, ffn + other, ffn, settings, profile_source, profile.summary(), results, {},
                       None, None, scale=scale)


@dataclass
class SweepPoint:
    """One model size of the sweep: per-token totals measured in one run (taking turns), and the
    speed-up of 'all' modeled as measured non-I/O time plus the cost model's I/O."""

    name: str
    model_bytes: int
    naive_ms: float
    all_ms: float
    mmap_ms: float | None
    all_vs_naive: float
    all_vs_mmap: float | None
    modeled_all_vs_naive: float | None


def sweep_point(name: str, result) -> SweepPoint:
    r = result.results
    naive, best, mm = r["naive"], r["all"], r.get("mmap")

    def modeled(c):
        s = c.stats
        return None if c.modeled_io_ms is None or s.io_ms is None else s.total_ms - s.io_ms + c.modeled_io_ms
    mn, ma = modeled(naive), modeled(best)
    return SweepPoint(name, result.model_bytes, naive.stats.total_ms, best.stats.total_ms,
                      mm.stats.total_ms if mm else None, naive.stats.total_ms / best.stats.total_ms,
                      mm.stats.total_ms / best.stats.total_ms if mm else None,
                      mn / ma if mn and ma else None)


WINDOW_SHARE = 0.24  # of the FFN held in DRAM by the paper's window at half memory (Section 4.1)


def sweep_budget(name: str) -> float:
    """The sweep's DRAM budget for a size, as a fraction of its model: the resident tensors, the
    predictors and WINDOW_SHARE of the FFN, as the paper's half memory was for OPT 6.7B (51% by this
    rule); a half-memory budget would leave smaller models, whose embeddings weigh more, no rows."""
    if name == "shipped":
        from flashnb.device.costmodel import ModelShape
        from flashnb.shipped_models import shipped

        m = shipped()
        shape = ModelShape.from_config(m.config, 2)
        ffn, other, pred = shape.ffn_bytes, shape.other_bytes, m.predictors.memory_bytes(2)
    else:
        shape = parse_scale(name)
        ffn, other = shape.bytes()
        pred = 2 * shape.layers * PREDICTOR_RANK * (shape.d_model + shape.ffn_dim)
    return min(1.0, (other + pred + WINDOW_SHARE * ffn) / (other + ffn))


def run_sweep(cfg, sizes=SWEEP, log=print) -> tuple[list[SweepPoint], dict]:
    """naive, all and mmap at each size ('shipped' = the shipped model, else a --scale name), one run
    per size; returns the points and each run's BenchResult."""
    from dataclasses import replace

    from flashnb.bench.run import run_bench

    points, runs = [], {}
    for name in sizes:
        budget = sweep_budget(name)
        log(f"sweep: {name}, DRAM budget {budget:.1%} of the model (its resident tensors, predictors and a "
            f"quarter of its FFN) ...")
        if name == "shipped":
            res = run_bench(replace(cfg, scale=None, configs=("naive", "all", "mmap"), memory=budget))
        else:
            res = run_scale(replace(cfg, scale=name, configs=("naive", "all", "mmap"), memory=budget), log=log)
        runs[name] = res
        points.append(sweep_point(name, res))
    return points, runs


def format_sweep(points: list[SweepPoint]) -> str:
    head = (f"{'model':<16} {'GB':>7} {'naive ms':>9} {'all ms':>8} {'mmap ms':>8} {'all vs naive':>12} "
            f"{'all vs mmap':>11} {'modeled':>8}")
    lines = [head, "-" * len(head)]
    for p in points:
        lines.append(f"{p.name:<16} {p.model_bytes / 1e9:7.2f} {p.naive_ms:9.1f} {p.all_ms:8.1f} "
                     f"{'' if p.mmap_ms is None else f'{p.mmap_ms:8.1f}':>8} {p.all_vs_naive:11.2f}x "
                     f"{'' if p.all_vs_mmap is None else f'{p.all_vs_mmap:10.2f}x':>11} "
                     f"{'' if p.modeled_all_vs_naive is None else f'{p.modeled_all_vs_naive:7.2f}x':>8}")
    lines.append(wrap("ms per generated token, measured; each size one run with naive, all and mmap taking turns; "
                      "the shipped model is trained, the others are random weights at OPT shapes with the shipped "
                      "model's neuron sets widened. 'modeled': all vs naive with each one's measured compute plus the "
                      "cost model's I/O for its requests."))
    return "\n".join(lines)


def pays_text(points: list[SweepPoint]) -> str:
    """One sentence: from which size on all techniques beat naive by 2x and mmap at all, on this machine."""
    pts = sorted(points, key=lambda p: p.model_bytes)
    twice = next((p for p in pts if p.all_vs_naive >= 2), None)
    beats = next((p for p in pts if p.all_vs_mmap and p.all_vs_mmap > 1), None)
    top = pts[-1]
    parts = [f"all techniques are {top.all_vs_naive:.1f}x faster per token than naive at {top.name} "
             f"({top.model_bytes / 1e9:.2f} GB)"]
    parts.append(f"at least 2x from {twice.name} on" if twice else "never 2x at these sizes")
    parts.append(f"and beat mmap streaming from {beats.name} on" if beats else "and never beat mmap streaming here")
    return wrap("On this machine " + ", ".join(parts[:2]) + ", " + parts[2] + " (measured, one run per size).")
