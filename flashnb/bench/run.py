"""`flashnb bench`: every configuration side by side, in one process, as JSON and a table.

On the shipped model (or any Hugging Face folder with predictors), each configuration generates the
same number of tokens after the same prompt, reading its FFN with direct I/O (cold: nothing is
served from the page cache). The configurations take turns, one token each, so that a disk whose
speed drifts during the run slows them alike. Per generated token it reports I/O, memory management
and compute milliseconds (mean, median and spread), bytes read, requests, throughput and the ratio to
naive, and beside the I/O the cost model's I/O for the same requests on this disk's profile.

Configurations (the paper's Table 2 ladder, then the peers):
    naive       the whole FFN of every layer read every token (large sequential reads)
    hybrid      as much of the FFN as the budget allows pinned in DRAM, the rest read every token
    predictor   + low-rank predictors: only predicted neurons, unbundled store (2 reads a neuron)
    windowing   + window of recent tokens' neurons kept in DRAM, unbundled
    all         + row-column bundling (1 read a neuron)
    pinned      all + hot neurons pinned in DRAM (PowerInfer) beside the window, inside the same budget; the
                split chosen by simulating each on the calibration sets (PREDICTORS/hot_neurons.safetensors)
    lookahead   all + lookahead predictors (PREDICTORS/lookahead): each layer's reads start one layer early
    reads       all's reads alone: the same requests, layer by layer, planned before the clock starts and
                nothing computed: the disk's and the kernel's part of all's I/O (runs after all each round)
    bare        (opt-in) all with its bookkeeping free: each token's window, requests and iocbs planned before
                the clock starts, then the model, the predictors, the reads, the checksums and the FFN math
                as all runs them (flashnb.bench.bare; runs after all each round)
    placed      (opt-in) all on a bundled store in the co-activation order (PREDICTORS/placement.safetensors)
    int8, q4    (opt-in) all on a bundled store whose rows are quantized (flashnb.core.quant), in the same DRAM
                bytes as the fp16 configurations (the budget is a fraction of the fp16 model)
    int8-placed, q4-placed   (opt-in) both
    mmap        the FFN memory-mapped, page cache dropped before each token (llama.cpp's regime)
    accelerate  transformers + accelerate disk offload of the whole checkpoint, cache dropped per token
    dense       the whole model in DRAM: reads nothing, the reference (and the floor of the configurations
                that use every neuron)
    floor       the floor of the configurations with predictors: the model without its FFNs, the predictors
                and the sparse FFN math of the chosen neurons, the FFN in DRAM (no reads, no bookkeeping)

Each configuration's `floor_ms` is the floor (or, without predictors, dense) measured in the same run.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from flashnb.bench.bare import BareEngine
from flashnb.bench.baselines import AccelerateOffload, DenseInDram, FloorEngine, HybridEngine, MmapEngine, ReadsAlone
from flashnb.bench.report import LABELS, SPARSE, BenchResult, ConfigResult
from flashnb.core.convert import ConvertConfig, convert
from flashnb.core.defaults import DEMO_PROMPT, IN_FLIGHT, MEMORY_BUDGET, WINDOW
from flashnb.core.engine import FlashEngine, Policy
from flashnb.core.generate import SamplingConfig
from flashnb.core.memory import budget_bytes
from flashnb.core.pinning import HOT_FILE, HotNeurons
from flashnb.core.placement import FILE as PLACEMENT_FILE, load_placement
from flashnb.core.predictor import AllNeurons, load_predictors
from flashnb.core.simulate import choose_pinned
from flashnb.core.store import FlashStore
from flashnb.device.costmodel import ModelShape, as_device, steps_io_ms, stream_ms
from flashnb.device.measure import ProfileConfig, machine_info, run_profile
from flashnb.device.profile import Profile, coalescing_gap, load_default_profile
from flashnb.errors import FlashnbError
from flashnb.lab.stats import TokenStats, window_advice
from flashnb.models.checkpoint import read_config
from flashnb.models.tokenizer import Tokenizer
from flashnb.paths import predictors_beside, shipped_model_dir, temporary_folder, work_folder
from flashnb.text import show_progress

CONFIGS = ("naive", "hybrid", "predictor", "windowing", "all", "pinned", "lookahead", "reads", "mmap", "accelerate",
           "dense", "floor")
VARIANTS = ("placed", "int8", "q4", "int8-placed", "q4-placed")  # all, on another bundled store (see above)
OPT_IN = VARIANTS + ("bare",)  # run only when asked for (--configs)
FOLLOW = {"reads": ReadsAlone, "bare": BareEngine}  # the configurations that repeat all's tokens, after it
ENGINE_CONFIGS = ("naive", "predictor", "windowing", "all", "pinned", "lookahead") + VARIANTS


@dataclass
class BenchConfig:
    """What to run. `memory`: a fraction of the model's bytes (float) or bytes (int)."""

    model: str | None = None          # HF folder; None = the shipped model
    predictors: str | None = None     # predictor folder; None = MODEL-predictors beside it (the shipped set)
    prompt: str = DEMO_PROMPT
    tokens: int = 16
    window: int = WINDOW
    memory: float | int = MEMORY_BUDGET
    in_flight: int = IN_FLIGHT
    dir: str | None = None            # where the scratch stores go (None: system temp folder)
    configs: tuple[str, ...] = CONFIGS
    profile: str | None = None        # profile JSON; None = the saved default, else a quick profile
    replay: bool = False              # also replay the predictor run's sets at OPT 6.7B's shape (~17 GB of files)
    keep_replay: bool = False         # keep the replay files in `dir` for the next run
    scale: str | None = None          # run at an OPT shape on random weights instead (flashnb.bench.scale)
    keep: bool = False                # --scale: keep its stores in `dir` for the next run
    progress: bool = True


def take_turns(streams: dict[str, Iterator[int]],
               progress: bool = False) -> tuple[dict[str, list[int]], dict[str, float]]:
    """Advance every named token stream (e.g. one `generate` per configuration) one token in turn
    until all are done, so that a disk whose speed drifts during the run (shared and virtual disks
    do, by tens of percent within a minute) slows every configuration alike and their ratios stay
    comparable; each also runs with the CPU caches the others leave, as a model much bigger than
    the caches would. Returns each stream's tokens and the seconds spent in it."""
    texts: dict[str, list[int]] = {k: [] for k in streams}
    spent = dict.fromkeys(streams, 0.0)
    live = dict(streams)
    with tqdm(desc="one token of each configuration in turn", unit=" round", disable=not show_progress(progress),
              leave=False) as bar:
        while live:
            advanced = False   # (the last pass only finds the ends: not a round)
            for name, stream in list(live.items()):
                t0 = time.perf_counter()
                try:
                    texts[name].append(next(stream))
                    advanced = True
                except StopIteration:  # end of text: that configuration has fewer tokens
                    del live[name]
                spent[name] += time.perf_counter() - t0
            bar.update(int(advanced))
    return texts, spent


def engine_setup(name: str, window: int, memory: float | int, in_flight: int, gap_bytes: int,
                 pinned: int = 0) -> tuple[str, Policy]:
    """(store layout, Policy) of an engine configuration: naive reads every neuron of the bundled
    store; +predictor and +windowing read predicted neurons from the unbundled store (the latter
    keeping a window); all = +windowing on the bundled store; pinned = all with `pinned` rows per layer;
    the VARIANTS = all on a bundled store of their `variant` (give `memory` in bytes to hold the DRAM equal)."""
    if name in VARIANTS:
        return name, Policy(window, memory, in_flight, gap_bytes)
    layout = "bundled" if name in ("naive", "all", "pinned", "lookahead") else "unbundled"
    keep = 0 if name in ("naive", "predictor") else window
    return layout, Policy(keep, memory, in_flight, gap_bytes, pinned if name == "pinned" else 0)


def variant(name: str) -> tuple[str, bool]:
    """(FFN row format, co-activation order or not) of the store a VARIANTS configuration runs "all" on."""
    head = name.removesuffix("-placed")
    return ("fp16" if head == "placed" else head), name.endswith("placed")


def same_dram(name: str, memory: float | int, stores: dict) -> float | int:
    """The budget of configuration `name`: a quantized store's in bytes of the fp16 model (stores["bundled"]),
    so that every row format gets the same DRAM."""
    if name in VARIANTS and variant(name)[0] != "fp16":
        return budget_bytes(memory, stores["bundled"].memory_shape().model_bytes)
    return memory


def _has(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def _runner(name: str, cfg: BenchConfig, stores: dict, model_dir: Path, work: str, predictors, extra: dict, gap: int):
    if name in ENGINE_CONFIGS:
        pinning = extra.get("pinning")
        memory = same_dram(name, cfg.memory, stores)
        layout, policy = engine_setup(name, cfg.window, memory, cfg.in_flight, gap, pinning.chosen if pinning else 0)
        pred = AllNeurons(stores[layout].ffn_dim) if name == "naive" else predictors
        return FlashEngine(stores[layout], pred, policy, lookahead=extra.get(name) if name == "lookahead" else None,
                           hot=extra.get("hot") if name == "pinned" else None)
    if name == "hybrid":
        return HybridEngine(stores["bundled"], cfg.memory, cfg.in_flight, gap)
    if name == "mmap":
        return MmapEngine(stores["bundled"])
    if name == "dense":
        return DenseInDram(stores["bundled"])
    if name == "floor":
        return FloorEngine(stores["bundled"], predictors)
    return AccelerateOffload(model_dir, dtype=torch.float16, offload_dir=str(Path(work) / "offload"))


def _extras(cfg: BenchConfig, pred_dir: Path, store: FlashStore, predictors, gap: int,
            device) -> tuple[dict, dict]:
    """What the pinned and lookahead configurations need, when the predictor folder has it: the hot
    neurons and the chosen split, the lookahead predictors; and why each missing one is skipped."""
    extra, missing = {}, {}
    if "pinned" in cfg.configs:
        if (pred_dir / HOT_FILE).is_file():
            extra["hot"] = hot = HotNeurons.load(pred_dir)
            _, policy = engine_setup("all", cfg.window, cfg.memory, cfg.in_flight, gap)
            extra["pinning"] = choose_pinned(hot, store, policy, predictors.memory_bytes(store.np_dtype.itemsize),
                                             io_ms=lambda steps: steps_io_ms(device, steps, cfg.in_flight))
        else:
            missing["pinned"] = f"no {HOT_FILE} in {pred_dir.name}: flashnb train-predictors --hot-neurons-only writes it"
    for name in set(cfg.configs) & set(VARIANTS):
        if variant(name)[1] and not (pred_dir / PLACEMENT_FILE).is_file():
            missing[name] = f"no {PLACEMENT_FILE} in {pred_dir.name}: flashnb train-predictors --placement-only writes it"
    if "lookahead" in cfg.configs:
        if (pred_dir / "lookahead" / "predictors.safetensors").is_file():
            extra["lookahead"] = load_predictors(pred_dir / "lookahead")
        else:
            missing["lookahead"] = f"no lookahead predictors in {pred_dir.name}/lookahead: flashnb train-predictors " \
                               "--lookahead writes them"
    return extra, missing


def modeled_io_ms(name: str, steps, stats: TokenStats, shape: ModelShape, in_flight: int, device) -> float | None:
    """The cost model's I/O per token for this run's `steps` (TokenSteps of the generated tokens) on the
    device profile: each reader call's requests at their mean size (`steps_io_ms`, the score that
    chooses the pinned split too); None for the runners whose I/O is not measured apart (mmap,
    accelerate). Without a predictor the requests cover whole layers in file order: a sequential stream."""
    if stats.requests is None:
        return None
    if not stats.requests:
        return 0.0
    if name in ("naive", "hybrid"):
        return stream_ms(device, stats.reader_calls or shape.num_layers, stats.bytes_read)
    return steps_io_ms(device, steps, in_flight)


def _profile(cfg: BenchConfig, workroot: Path) -> tuple[Profile, str]:
    if cfg.profile:
        return Profile.load(cfg.profile), cfg.profile
    saved = load_default_profile()
    if saved is not None:
        return saved, "saved default"
    return run_profile(ProfileConfig.quick(dir=str(workroot), progress=cfg.progress)), "quick profile measured by this run"


def run_bench(cfg: BenchConfig) -> BenchResult:
    """Run every configuration in `cfg.configs`, taking turns; returns the result (`.to_json()`)."""
    unknown = set(cfg.configs) - set(CONFIGS) - set(OPT_IN)
    if unknown:
        raise FlashnbError(f"unknown configurations {sorted(unknown)}; choose from {', '.join(CONFIGS + OPT_IN)}")
    if cfg.tokens < 1:
        raise FlashnbError(f"--tokens must be >= 1, got {cfg.tokens}")
    for name, what in (("reads", "repeats the reads of 'all' alone"), ("bare", "runs 'all' with its bookkeeping free")):
        if name in cfg.configs and "all" not in cfg.configs:
            raise FlashnbError(f"'{name}' {what}: include all in --configs")
    if cfg.replay and "predictor" not in cfg.configs:
        raise FlashnbError("--replay replays the +predictor run's neuron sets: include 'predictor' in --configs")
    model_dir = Path(cfg.model) if cfg.model else shipped_model_dir()
    pred_dir = Path(cfg.predictors) if cfg.predictors else predictors_beside(model_dir)
    config = read_config(model_dir)
    tok = Tokenizer.from_folder(model_dir)
    prompt = tok.encode(cfg.prompt)
    room = config.max_position_embeddings - len(prompt) - 1  # each run also generates the prompt's next token
    if cfg.tokens > room:
        raise FlashnbError(f"--tokens {cfg.tokens}: the prompt ({len(prompt)} tokens), the token it predicts and "
                           f"{cfg.tokens} more exceed the model's context of {config.max_position_embeddings}; give "
                           f"--tokens {max(1, room)} or fewer, or a shorter prompt")
    workroot = work_folder(cfg.dir)
    profile, profile_source = _profile(cfg, workroot)
    device = as_device(profile)
    gap = coalescing_gap(profile, cfg.in_flight)
    shape = ModelShape.from_config(config, 2, model_dir.name)
    neurons = shape.ffn_dim * shape.num_layers
    results: dict[str, ConfigResult] = {}
    skipped: dict[str, str] = {}
    replay = None
    with temporary_folder("flashnb-bench-", workroot) as work:
        stores = {lay: FlashStore.open(convert(model_dir, Path(work) / lay, ConvertConfig(layout=lay, progress=False)))
                  for lay in ("bundled", "unbundled")}
        predictors = load_predictors(pred_dir) if set(SPARSE) & set(cfg.configs) else None
        extra, missing = _extras(cfg, pred_dir, stores["bundled"], predictors, gap, device)
        for name in sorted(set(VARIANTS) & set(cfg.configs) - set(missing)):  # missing: no placement file
            dtype, placed = variant(name)
            stores[name] = FlashStore.open(convert(model_dir, Path(work) / name, ConvertConfig(
                dtype=dtype, progress=False, placement=load_placement(pred_dir / PLACEMENT_FILE) if placed else None)))
        with ExitStack() as stack:
            runners, streams = {}, {}
            for name in sorted(cfg.configs, key=lambda n: n in FOLLOW):  # after all, whose tokens they follow
                if name in FOLLOW:
                    try:
                        runners[name] = r = FOLLOW[name](runners["all"])
                    except FlashnbError as e:  # no direct I/O through native AIO here
                        skipped[name] = str(e)
                        continue
                    stack.callback(r.close)
                    streams[name] = iter(r.generate(prompt, cfg.tokens + 1))
                    continue
                if name == "accelerate" and not _has("transformers", "accelerate"):
                    gone = [m for m in ("transformers", "accelerate") if not _has(m)]
                    skipped[name] = (f"{' and '.join(gone)} {'is' if len(gone) == 1 else 'are'} not installed: "
                                     "pip install 'flashnb[bench]'")
                    continue
                if name in missing:
                    skipped[name] = missing[name]
                    continue
                runners[name] = r = _runner(name, cfg, stores, model_dir, work, predictors, extra, gap)
                stack.callback(r.close)
                streams[name] = iter(r.generate(prompt, cfg.tokens + 1, SamplingConfig()))  # +1: the prompt's step
            if not streams:
                raise FlashnbError("none of the configurations can run here: "
                                   + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
            texts, spent = take_turns(streams, cfg.progress)
            for name, r in sorted(runners.items(), key=lambda kv: cfg.configs.index(kv[0])):
                steps = r.steps[len(prompt):]
                stats = TokenStats.of(steps, neurons, split=name not in ("mmap", "accelerate"))
                mem = getattr(r, "memory", None)
                results[name] = ConfigResult(
                    name, LABELS[name], stats, tok.decode(texts[name][:cfg.tokens]), spent[name],
                    mem.used_bytes if mem else getattr(r, "bytes", None), mem.budget_bytes if mem else None,
                    modeled_io_ms(name, steps, stats, shape, cfg.in_flight, device),
                    r.reader.io_mode if hasattr(r, "reader") else "", pinned_rows=mem.pinned_rows if mem else None,
                    rows_note=window_advice(stats, mem, r.store.num_layers) if mem and name in SPARSE else "")
                if name == "predictor":  # its sets drive the replay
                    replay_sets = [s.predicted_sets for s in steps]
        if cfg.replay:
            from flashnb.bench.replay import run_replay

            replay = run_replay(replay_sets, config.ffn_dim, Path(work) if not cfg.keep_replay else workroot,
                                cfg.window, cfg.memory, cfg.in_flight, tokens=cfg.tokens, profile=profile,
                                progress=cfg.progress)
    settings = {k: getattr(cfg, k) for k in BenchConfig.__dataclass_fields__ if k != "progress"}
    return BenchResult(time.strftime("%Y-%m-%dT%H:%M:%S%z"), {**machine_info(workroot), "torch": torch.__version__,
                                                             "torch_threads": torch.get_num_threads()},
                       str(model_dir), shape.total_bytes, shape.ffn_bytes, settings, profile_source,
                       profile.summary(), results, skipped, replay,
                       asdict(extra["pinning"]) if "pinning" in extra else None)
