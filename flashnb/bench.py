"""`flashnb bench`: every configuration side by side, in one process, as JSON and a table.

On the shipped model (or any Hugging Face folder with predictors), each configuration generates the
same number of tokens after the same prompt, reading its FFN with direct I/O (cold: nothing is
served from the page cache). The configurations take turns, one token each, so that a disk whose
speed drifts during the run slows them alike. Per generated token it reports I/O, memory management and compute
milliseconds, bytes read, requests, throughput and the ratio to naive, and beside each the cost
model's prediction (flashnb.costmodel) from the model shape, the policy statistics measured in the
same run and this machine's device profile.

Configurations (the paper's Table 2 ladder, then the peers):
    naive       the whole FFN of every layer read every token (large sequential reads)
    hybrid      as much of the FFN as the budget allows pinned in DRAM, the rest read every token
    predictor   + low-rank predictors: only predicted neurons, unbundled store (2 reads a neuron)
    windowing   + window of recent tokens' neurons kept in DRAM, unbundled
    all         + row-column bundling (1 read a neuron)
    mmap        the FFN memory-mapped, page cache dropped before each token (llama.cpp's regime)
    accelerate  transformers + accelerate disk offload of the whole checkpoint, cache dropped per token
"""

from __future__ import annotations

import platform
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from flashnb.errors import FlashnbError
from flashnb.reader import IN_FLIGHT

CONFIGS = ("naive", "hybrid", "predictor", "windowing", "all", "mmap", "accelerate")
LABELS = {"naive": "naive (whole FFN)", "hybrid": "hybrid", "predictor": "+predictor",
          "windowing": "+windowing", "all": "+bundling (all)", "mmap": "mmap streaming",
          "accelerate": "accelerate disk offload", "naive_model": "naive (whole model)"}


@dataclass
class BenchConfig:
    """What to run. Sizes in bytes; `memory` <= 1 is a fraction of the model's bytes."""

    model: str | None = None          # HF folder; None = the shipped model
    predictors: str | None = None     # predictor folder; None = the shipped set
    prompt: str = "Return a new list containing"
    tokens: int = 16
    window: int = 4
    memory: float = 0.5
    threads: int = IN_FLIGHT
    dir: str | None = None            # where the scratch stores go (None: system temp folder)
    configs: tuple[str, ...] = CONFIGS
    profile: str | None = None        # profile JSON; None = the saved default, else a quick profile
    replay: bool = False              # also replay the predictor run's sets at OPT 6.7B's shape (~17 GB of files)
    keep_replay: bool = False         # keep the replay files in `dir` for the next run
    progress: bool = True


ENGINE_CONFIGS = ("naive", "predictor", "windowing", "all")  # the flash engine under different policies


def _engine_run(name: str, cfg: BenchConfig):
    """(store layout, engine Policy) of an engine configuration: naive reads every neuron of the
    bundled store; +predictor and +windowing read predicted neurons from the unbundled store (the
    latter keeping a window); all = +windowing on the bundled store."""
    from flashnb.engine import Policy

    if name == "naive":
        return "bundled", Policy("none", 0, cfg.memory, cfg.threads)
    window = 0 if name == "predictor" else cfg.window
    return ("bundled" if name == "all" else "unbundled"), Policy("learned", window, cfg.memory, cfg.threads)


def _has(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def _mean(xs) -> float:
    xs = list(xs)
    return float(np.mean(xs)) if xs else 0.0


def summarize(steps, model_ffn_neurons: int, have_split: bool = True) -> dict:
    """Per-token means over `steps` (TokenStep list): ms, bytes, counts. `have_split`: the runner
    records I/O and memory time per layer (mmap and accelerate cannot separate them from compute)."""
    tot = [s.totals() for s in steps]
    io = _mean(t["io_seconds"] for t in tot)
    mm = _mean(t["mm_seconds"] for t in tot)
    wall = _mean(t["wall_seconds"] for t in tot)
    walls = [t["wall_seconds"] * 1e3 for t in tot]
    out = {"tokens": len(steps), "total_ms": wall * 1e3,
           "median_ms": float(np.median(walls)) if walls else 0.0, "token_ms": walls,
           "io_ms": io * 1e3 if have_split else None, "mm_ms": mm * 1e3 if have_split else None,
           "compute_ms": (wall - io - mm) * 1e3 if have_split else None,
           "bytes_read_per_token": _mean(t["bytes_read"] for t in tot) if have_split else None,
           "storage_read_bytes_per_token": _mean(t["storage_read_bytes"] for t in tot),
           "requests_per_token": _mean(t["requests"] for t in tot) if have_split else None,
           "overlap_ms": _mean(t["overlap_seconds"] for t in tot) * 1e3 if have_split else None,
           "reader_calls_per_token": _mean(len(s.layers) for s in steps) if have_split else None}
    if have_split:
        out["io_throughput_GBps"] = (out["bytes_read_per_token"] / io / 1e9) if io > 0 else None
        pred = _mean(t["predicted"] for t in tot)
        out["predicted_share"] = pred / model_ffn_neurons
        out["window_hit_share"] = _mean(t["cached"] for t in tot) / pred if pred else 0.0
        out["neurons_read_per_token"] = _mean(t["read"] for t in tot)
    return out


def _modeled(name: str, shape, measured: dict, runner, cfg: BenchConfig, device, calibration,
             cpu: dict | None = None, warm: dict | None = None) -> dict:
    """The cost model's prediction for configuration `name`, fed the policy statistics measured in
    this run (predicted share, window hits, request sizes) and this machine's device profile and
    calibration (flashnb.calibrate). `cpu`: the engine's compute and memory-management seconds per
    token measured with the store in RAM (calibrate.engine_cpu_seconds); they replace the modeled
    CPU terms, so that the model's job is the I/O. `warm` (mmap, accelerate: `_warm_runners`): their
    seconds per token with the page cache warm, plus the modeled time to page their files in cold."""
    from flashnb import costmodel as cm

    if warm:
        io_s = cm.page_cache_read_seconds(warm["file_bytes"], warm["readahead_bytes"], device)
        return {"io_ms": io_s * 1e3, "mm_ms": 0.0, "compute_ms": warm["warm_s"] * 1e3,
                "total_ms": (io_s + warm["warm_s"]) * 1e3, "bytes_read_per_token": int(sum(warm["file_bytes"])),
                "cpu_terms": "measured with the page cache warm"}

    other = shape.other_bytes / shape.total_bytes
    base = cm.Policy(name=name, memory_budget=other, threads=cfg.threads)
    if measured.get("requests_per_token"):
        calls = measured["reader_calls_per_token"] or shape.num_layers
        base = replace(base, request_bytes=int(measured["bytes_read_per_token"] / measured["requests_per_token"]),
                       requests_per_call=measured["requests_per_token"] / calls)
    if measured.get("reader_calls_per_token"):
        base = replace(base, calls_per_layer=measured["reader_calls_per_token"] / shape.num_layers)
    if getattr(runner, "predictors", None) is not None and runner.policy.predictor == "learned":
        base = replace(base, predictor_bytes=runner.memory.predictor_bytes)
    if name in ("naive", "mmap"):
        pol = replace(base, predictor=False)
    elif name == "hybrid":
        pinned = runner.pinned * shape.num_layers * shape.neuron_bytes
        pol = replace(base, predictor=False, memory_budget=(shape.other_bytes + pinned) / shape.total_bytes)
    elif name == "accelerate":
        pol = replace(base, hybrid=False, predictor=False)
    else:
        share = measured["predicted_share"]
        pol = replace(base, sparsity=1.0 - share, overselect=1.0, bundling=(name == "all"))
        if name in ("windowing", "all"):
            cached = runner.memory.capacity_rows / shape.ffn_dim
            pol = replace(pol, window=cfg.window, window_reuse=measured["window_hit_share"],
                          window_cached_fraction=cached)
    if name in ("mmap", "accelerate"):  # the dense model's kernels, not the engine's sparse ones
        calibration = replace(calibration, ffn_call_s=0.0, ffn_neuron_s=0.0)
    c = cm.token_cost(shape, pol, device, None if name == "accelerate" else calibration)
    if name == "mmap":  # the page cache does mmap's bookkeeping: no neuron cache steps
        c = replace(c, mm_seconds=c.mm_bytes / device.memcpy_bps if c.mm_bytes and device.memcpy_bps else 0.0)
    if cpu:
        # the reader's CPU work per token (planning, submitting): its time with the store in RAM
        # minus the memory copies that direct I/O does not make (at the rate the reader moves the
        # RAM copy in large requests)
        rate = cpu.get("ram_read_bps") or device.memcpy_bps
        copy_s = cpu["bytes_read"] / rate if rate else 0.0
        reader_cpu = max(0.0, cpu["io_s_in_ram"] - copy_s)
        # the engine computes the cached neurons while a layer's reads are in flight: that much of
        # the disk's time is hidden (the compute itself is in compute_s)
        hidden = min(c.io_seconds, cpu.get("overlap_s", 0.0))
        c = replace(c, io_seconds=c.io_seconds - hidden + reader_cpu, compute_seconds=cpu["compute_s"],
                    mm_seconds=cpu["mm_s"])
    ms = lambda s: None if s is None else s * 1e3  # noqa: E731
    return {"io_ms": ms(c.io_seconds), "mm_ms": ms(c.mm_seconds), "compute_ms": ms(c.compute_seconds),
            "total_ms": ms(c.total_seconds), "bytes_read_per_token": c.io_bytes,
            "cpu_terms": "measured with the store in RAM" if cpu else "calibrated kernels"}


def _token_stream(runner, prompt: list[int], tokens: int, sampling) -> Iterator[int]:
    """A configuration's generated tokens, one model step per `next()`: the first call also runs the
    prompt. After `tokens + 1` calls the runner has recorded `tokens` generated steps."""
    return iter(runner.generate(prompt, tokens + 1, sampling))


def _runner(name: str, cfg: BenchConfig, stores: dict, model_dir: Path, work: str, predictors=None, profile=None,
            cold: bool = True):
    """The runner of configuration `name`. cold=False (mmap, accelerate only): the page cache stays
    warm, for their CPU's part."""
    from flashnb.baselines import AccelerateOffload, HybridEngine, MmapEngine
    from flashnb.engine import FlashEngine

    if name in ENGINE_CONFIGS:
        layout, policy = _engine_run(name, cfg)
        return FlashEngine(stores[layout], policy, predictors=predictors, profile=profile)
    if name == "hybrid":
        return HybridEngine(stores["bundled"], cfg.memory, cfg.threads, profile)
    if name == "mmap":
        return MmapEngine(stores["bundled"], cold=cold)
    return AccelerateOffload(model_dir, dtype=torch.float16, cold=cold,
                             offload_dir=str(Path(work) / ("offload" if cold else "offload-warm")))


def _warm_runners(cfg: BenchConfig, stores: dict, model_dir: Path, work: str) -> tuple[dict, dict]:
    """mmap and accelerate built with the page cache left warm, for their CPU's part
    (flashnb.calibrate.engine_cpu_seconds), and for each the files the kernel pages in for it when
    cold (bytes each) with the readahead window of the disk holding them."""
    from flashnb.profile import readahead_bytes

    runners, files = {}, {}
    for name in ("mmap", "accelerate"):
        if name not in cfg.configs or (name == "accelerate" and not _has("transformers", "accelerate")):
            continue
        runners[name] = r = _runner(name, cfg, stores, model_dir, work, cold=False)
        if name == "mmap":
            sizes = [sum(g.size for g in r.store.regions(i)) for i in range(r.store.num_layers)]
            files[name] = {"file_bytes": sizes, "readahead_bytes": readahead_bytes(r.store.path)}
        else:
            files[name] = {"file_bytes": [f.stat().st_size for f in r.files], "readahead_bytes": readahead_bytes(r.dir)}
    return runners, files


def run_bench(cfg: BenchConfig) -> dict:
    """Run every configuration in `cfg.configs`; returns the JSON-ready result."""
    from flashnb.checkpoint import read_config
    from flashnb.costmodel import ModelShape, as_device
    from flashnb.generate import SamplingConfig, take_turns
    from flashnb.paths import data_dir, shipped_model_dir
    from flashnb.predictor import load_predictors
    from flashnb.profile import Profile, ProfileConfig, load_default_profile, machine_info, run_profile
    from flashnb.store import ConvertConfig, convert
    from flashnb.tokenizer import Tokenizer

    unknown = set(cfg.configs) - set(CONFIGS)
    if unknown:
        raise FlashnbError(f"unknown configurations {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    if cfg.tokens < 1:
        raise FlashnbError(f"--tokens must be >= 1, got {cfg.tokens}")
    model_dir = Path(cfg.model) if cfg.model else shipped_model_dir()
    pred_dir = Path(cfg.predictors) if cfg.predictors else data_dir() / f"{model_dir.name}-predictors"
    config = read_config(model_dir)
    tok = Tokenizer.from_folder(model_dir, bos_id=config.bos_token_id)
    prompt = tok.encode(cfg.prompt)
    workroot = Path(cfg.dir or tempfile.gettempdir())
    if not workroot.is_dir():
        raise FlashnbError(f"--dir {workroot} does not exist; create it or pick another folder")
    if cfg.profile:
        profile = Profile.load(cfg.profile)
        profile_source = cfg.profile
    else:
        profile = load_default_profile()
        profile_source = "saved default"
        if profile is None:
            profile = run_profile(ProfileConfig.quick(dir=str(workroot), progress=cfg.progress))
            profile_source = "quick profile measured by this run"
    device = as_device(profile)
    shape = ModelShape.from_config(config, 2, model_dir.name)

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="flashnb-bench-", dir=workroot) as work:
        stores = {}
        for layout in ("bundled", "unbundled"):
            stores[layout] = convert(model_dir, Path(work) / layout, ConvertConfig(layout=layout, progress=False))
        predictors = None
        if {"predictor", "windowing", "all"} & set(cfg.configs):
            predictors = load_predictors(pred_dir)
        from flashnb.calibrate import calibrate, engine_cpu_seconds

        calibration = calibrate(model_dir, shape, cfg.window, predictors=predictors)
        cpu_runs = {k: _engine_run(k, cfg) for k in ENGINE_CONFIGS
                    if k in cfg.configs and (predictors or k == "naive")}
        warm_runners, warm_files = _warm_runners(cfg, stores, model_dir, work)
        try:
            cpu = engine_cpu_seconds({k: stores[lay] for k, (lay, _) in cpu_runs.items()},
                                     {k: pol for k, (_, pol) in cpu_runs.items()}, prompt, cfg.tokens + 1,
                                     predictors, warm_runners)
        finally:
            for r in warm_runners.values():
                r.close()
        engine_cpu = {k: v for k, v in cpu.items() if k in cpu_runs}
        warm = {k: {**cpu[k], **warm_files[k]} for k in warm_files if k in cpu}
        sampling = SamplingConfig()
        skipped: dict[str, str] = {}
        with ExitStack() as stack:
            runners, streams = {}, {}
            for name in cfg.configs:
                if name == "accelerate" and not _has("transformers", "accelerate"):
                    skipped[name] = "transformers and accelerate are not installed: pip install 'flashnb[bench]'"
                    if cfg.progress:
                        print(f"  {LABELS[name]:<24} skipped: {skipped[name]}", flush=True)
                    continue
                runner = _runner(name, cfg, stores, model_dir, work, predictors, profile)
                stack.callback(runner.close)
                runners[name] = runner
                streams[name] = _token_stream(runner, prompt, cfg.tokens, sampling)
            texts, spent = take_turns(streams, cfg.progress)
            for name, runner in runners.items():
                generated = runner.steps[len(prompt):]
                m = summarize(generated, shape.ffn_dim * shape.num_layers, name not in ("mmap", "accelerate"))
                m["label"] = LABELS[name]
                m["text"] = tok.decode(texts[name][:cfg.tokens])
                m["seconds"] = spent[name]
                if hasattr(runner, "memory"):
                    m["dram_bytes"] = runner.memory.used_bytes
                    m["budget_bytes"] = runner.memory.budget_bytes
                elif hasattr(runner, "used_bytes"):
                    m["dram_bytes"], m["budget_bytes"] = runner.used_bytes, runner.budget_bytes
                m["modeled"] = _modeled(name, shape, m, runner, cfg, device, calibration,
                                        engine_cpu.get("naive" if name == "hybrid" else name), warm.get(name))
                results[name] = m
                if name == "predictor":  # its sets drive the replay
                    replay_sets = [s.needed for s in generated]
                if cfg.progress:
                    print(f"  {LABELS[name]:<24} {m['total_ms']:9.2f} ms/token", flush=True)
        replay = None
        if cfg.replay:
            from flashnb.replay import run_replay

            if "predictor" not in cfg.configs:
                raise FlashnbError("--replay replays the +predictor run's neuron sets: include 'predictor' in --configs")
            replay_dir = Path(work) if not cfg.keep_replay else workroot
            replay = run_replay(replay_sets, config.ffn_dim, replay_dir, cfg.window, cfg.memory, cfg.threads,
                                tokens=cfg.tokens, profile=profile, progress=cfg.progress)
    naive = results.get("naive", {}).get("total_ms")
    for m in results.values():
        m["speedup_vs_naive"] = naive / m["total_ms"] if naive else None
        mod = m["modeled"]["total_ms"]
        m["model_vs_measured"] = mod / m["total_ms"] if mod else None
        m["model_vs_median"] = mod / m["median_ms"] if mod and m["median_ms"] else None
    return {"flashnb_bench_version": 1, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {**machine_info(workroot), "python": platform.python_version(), "torch": torch.__version__,
                        "torch_threads": torch.get_num_threads()},
            "model": str(model_dir), "model_bytes": shape.total_bytes, "ffn_bytes": shape.ffn_bytes,
            "settings": {k: v for k, v in asdict(cfg).items() if k != "progress"},
            "io": "direct I/O (O_DIRECT) for flashnb's reader; page cache dropped before each token for "
                  "mmap and accelerate",
            "profile_source": profile_source, "profile": profile.summary(),
            "calibration": calibration.summary(), "engine_cpu_in_ram": engine_cpu, "page_cache_warm": warm,
            "dense_in_dram_ms": calibration.dense_token_s * 1e3, "results": results,
            "skipped": skipped, "replay": replay}


def format_table(result: dict) -> str:
    """The result as a fixed-width text table (ms per token; MB = 1e6 bytes)."""
    def f(x, spec):
        return "—" if x is None else format(x, spec)
    head = (f"{'configuration':<24} {'I/O':>8} {'mem':>7} {'compute':>8} {'total':>8} {'median':>7} {'MB/token':>9} "
            f"{'GB/s':>6} {'vs naive':>8} {'modeled':>8}")
    lines = [head, "-" * len(head)]
    for m in result["results"].values():
        mb = m["bytes_read_per_token"] if m["bytes_read_per_token"] is not None else m["storage_read_bytes_per_token"]
        lines.append(f"{m['label']:<24} {f(m['io_ms'], '8.2f')} {f(m['mm_ms'], '7.2f')} {f(m['compute_ms'], '8.2f')} "
                     f"{m['total_ms']:8.2f} {m['median_ms']:7.2f} {mb / 1e6:9.3f} {f(m.get('io_throughput_GBps'), '6.2f')} "
                     f"{f(m['speedup_vs_naive'], '7.1f')}x {f(m['modeled']['total_ms'], '8.2f')}")
    for name, why in result.get("skipped", {}).items():
        lines.append(f"{LABELS[name]:<24} skipped: {why}")
    if result.get("dense_in_dram_ms"):
        lines.append(f"{'dense in DRAM (reference)':<24} {'':>8} {'':>7} {'':>8} {result['dense_in_dram_ms']:8.2f}"
                     "    (the whole model in memory: the floor)")
    lines.append("ms per generated token (mean; median beside it), measured on this machine; 'modeled' = "
                 "flashnb.costmodel: the disk's I/O "
                 "from this run's request statistics and the device profile, CPU terms (the reader's own work, "
                 "memory management, compute) from flashnb.calibrate, measured with the store in RAM; for mmap and "
                 "accelerate, their time with the page cache warm plus their files paged in at the profile's rate "
                 "for readahead-sized reads, one in flight. The configurations take turns, one token each. "
                 "MB/token for mmap/accelerate = bytes the kernel read.")
    rp = result.get("replay")
    if rp:
        lines += ["", rp["label"] + f"; window {rp['window']}, {rp['cache_rows_per_layer']} cache rows per layer",
                  f"{'configuration':<24} {'I/O ms':>9} {'MB/token':>9} {'requests':>9} {'GB/s':>6} {'vs naive':>8} "
                  f"{'vs model':>8}"]
        for name, m in rp["results"].items():
            vs_model = m.get("io_vs_naive_model")
            lines.append(f"{LABELS[name]:<24} {m['io_ms']:9.1f} {m['bytes_per_token'] / 1e6:9.1f} "
                         f"{m['requests_per_token']:9.0f} {m['GBps']:6.2f} {m['io_vs_naive']:7.1f}x "
                         + (f"{vs_model:7.1f}x" if vs_model else "       —"))
        lines.append("vs naive: against reading every layer's whole FFN; vs model: against reading the whole model "
                     "(13.4 GB), the naive of the paper's Table 2")
        lines.append("paper, OPT 6.7B on an M1 Max (Table 2), I/O ms: naive 2196, +predictor 738, +windowing 164, "
                     "+bundling 87 (25.2x vs its naive, the whole model)")
    return "\n".join(lines)
