"""This machine's compute and memory-management constants, measured for the cost model.

The cost model (flashnb.costmodel) needs, besides the disk's profile, what a token's arithmetic and
the neuron cache's bookkeeping cost on this CPU. They are measured here with the same kernels the
engine runs, on synthetic inputs of the benchmarked model's shapes, never by timing the
configurations the model is then compared with:

- everything but the FFN: the dense model decoding in DRAM with every FFN replaced by zeros
  (`no_ffn_token_s`), and with its real FFNs (`dense_token_s`, the reference floor). Their
  difference gives a weight-bytes rate (`compute_bps`) for models the engine does not run.
- one layer's sparse FFN (flashnb.engine.sparse_ffn on random bundles): `ffn_call_s + neurons x
  ffn_neuron_s`, from two set sizes; one predictor call (`predictor_call_s`, when predictors are given).
- one layer's cache step (plan, evict with swap-with-last, append): `mm_call_s + neurons x
  mm_neuron_s`, from a NeuronCache of the model's bundle width stepped with random sets of two sizes.

`engine_cpu_seconds` measures the engine's whole CPU side per policy (compute, memory management
and the reader's own work per call, with the store's FFN file held in RAM), for the benchmark's
modeled column: there the device profile predicts the disk's part of the I/O, and the CPU terms are
these measurements.

A model whose weights take more than DENSE_SHARE of the available memory is not decoded densely
(the dense terms are 0), and a store bigger than RAM_STORE_SHARE of it is not copied to tmpfs: the
machine must not be pushed into swapping to calibrate a model that runs from flash because it is big.

Everything here is *measured*; the cost model's use of it is *modeled*.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


@dataclass
class Calibration:
    """Seconds and bytes/s measured on this machine (see the module doc)."""

    compute_fixed_s: float     # per token, what does not scale with weight bytes
    compute_bps: float         # weight bytes per second through matrix-vector products
    dense_token_s: float       # the dense model in DRAM, per token (measured)
    no_ffn_token_s: float      # the same with every FFN replaced by zeros (measured)
    mm_call_s: float           # one layer's cache step, fixed part
    mm_neuron_s: float         # ... per neuron planned
    torch_threads: int
    ffn_call_s: float = 0.0    # one layer's sparse FFN, fixed part
    ffn_neuron_s: float = 0.0  # ... per neuron computed
    predictor_call_s: float = 0.0  # one layer's predictor (0: none measured)

    def summary(self) -> dict:
        return asdict(self)


DENSE_SHARE = 0.4  # the dense model is timed only if its weights take at most this share of available memory
RAM_STORE_SHARE = 0.25  # a store is copied to tmpfs for engine_cpu_seconds only up to this share


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable; 0 where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _ZeroFFN(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def _token_seconds(model: nn.Module, tokens: int, vocab: int) -> float:
    """Median seconds per decoded token (batch 1, KV cache), after two warm-up tokens."""
    kv = model.new_cache(1, tokens + 2)
    ids = np.random.default_rng(0).integers(4, vocab, tokens + 2).tolist()
    times = []
    with torch.no_grad():
        for i, t in enumerate(ids):
            t0 = time.perf_counter()
            model(torch.tensor([[t]]), kv)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _mm_seconds(ffn_dim: int, width: int, needed: int, capacity: int, window: int, calls: int,
                dtype: torch.dtype) -> float:
    """Median seconds of one NeuronCache step (plan + reserve + commit) for random sets of `needed`."""
    from flashnb.cache import NeuronCache

    rng = np.random.default_rng(1)
    cache = NeuronCache(ffn_dim, capacity, width, window, dtype)
    times = []
    for _ in range(calls):
        ids = np.sort(rng.choice(ffn_dim, needed, replace=False))
        t0 = time.perf_counter()
        plan = cache.plan(ids)
        cache.reserve(plan)
        cache.commit(plan)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[2:]))


def _median_seconds(fn, calls: int) -> float:
    times = []
    for _ in range(calls + 2):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[2:]))


def _line(n_small: int, t_small: float, n_big: int, t_big: float) -> tuple[float, float]:
    """(fixed, per-unit) of the line through two timings, both clamped at >= 0."""
    per = max(0.0, (t_big - t_small) / max(1, n_big - n_small))
    return max(0.0, t_small - n_small * per), per


def calibrate(model_dir: str | Path, shape, window: int = 4, tokens: int = 12, predictors=None) -> Calibration:
    """Measure the constants for the Hugging Face folder `model_dir` of cost-model shape `shape`
    (flashnb.costmodel.ModelShape) at the store's precision; `predictors` (LowRankPredictors) adds
    the predictor's cost per layer."""
    from flashnb.checkpoint import load_model
    from flashnb.costmodel import compute_bytes
    from flashnb.engine import sparse_ffn
    from flashnb.models.common import activation

    from flashnb.checkpoint import read_config

    dtype = torch.float16 if shape.bytes_per_value == 2 else torch.float32
    c = read_config(model_dir)
    if shape.total_bytes <= DENSE_SHARE * available_memory():
        model = load_model(model_dir, dtype=dtype).eval()
        vocab = c.vocab_size
        dense = _token_seconds(model, tokens, vocab)
        for block in model.layers:
            block.ffn = _ZeroFFN()
        no_ffn = _token_seconds(model, tokens, vocab)
        del model
        rate = shape.ffn_bytes / max(dense - no_ffn, 1e-9)
        fixed = max(0.0, no_ffn - compute_bytes(shape, 0) / rate)
    else:  # the model does not fit comfortably in DRAM (that is why it runs from flash): not timed
        dense = no_ffn = fixed = 0.0
        rate = float("inf")

    gated = c.model_type != "opt"
    act = activation(c.hidden_act if gated else c.activation_function, "config.json")
    d, width = shape.d_model, shape.parts * shape.d_model
    rng = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, d, generator=rng).to(dtype)
    bias = None if gated else torch.randn(shape.ffn_dim, generator=rng).to(dtype) * 0.1
    small = max(1, shape.ffn_dim // 20)  # about a predicted set
    timings = {}
    for n in (small, shape.ffn_dim):
        rows = (torch.randn(n, width, generator=rng) * 0.05).to(dtype)
        ids = np.sort(np.random.default_rng(n).choice(shape.ffn_dim, n, replace=False))
        timings[n] = _median_seconds(lambda: sparse_ffn(x, rows, ids, bias, act, gated, d), 30 if n == small else 8)
    ffn_call, ffn_neuron = _line(small, timings[small], shape.ffn_dim, timings[shape.ffn_dim])
    pred = 0.0
    if predictors is not None:
        for p in predictors.layers:  # as the engine holds them
            p.to(dtype)
        xs = x[0, -1]
        pred = _median_seconds(lambda: predictors.predict_ids(0, xs), 30)

    t_small = _mm_seconds(shape.ffn_dim, width, small, 2 * small, window, 40, dtype)
    t_all = _mm_seconds(shape.ffn_dim, width, shape.ffn_dim, shape.ffn_dim, 0, 12, dtype)
    mm_call, mm_neuron = _line(small, t_small, shape.ffn_dim, t_all)
    return Calibration(fixed, rate, dense, no_ffn, mm_call, mm_neuron, torch.get_num_threads(),
                       ffn_call, ffn_neuron, pred)


def engine_cpu_seconds(store_dirs: dict, policies: dict, prompt_ids: list[int], tokens: int = 8,
                       predictors=None, warm_runners: dict | None = None) -> dict[str, dict]:
    """The CPU's part of each benchmarked configuration, without the disk (measured).

    For each named engine policy: the mean compute, memory-management and reader seconds per
    generated token of a FlashEngine whose store is a copy in RAM (tmpfs: its reads are memory
    copies), and `ram_read_bps`, the rate at which the reader moves that copy in large requests
    (`_ram_read_rate`); `store_dirs[name]` is the store folder to copy, `policies[name]` the Policy. Skipped
    where no tmpfs (/dev/shm) is available or the store is too big for it.
    For each of `warm_runners` (baselines built with `cold=False`, e.g. MmapEngine, AccelerateOffload:
    the prompt pages their weights in and they stay in the page cache): `warm_s`, its mean seconds
    per generated token.
    All of them take turns, one token each, as the benchmark's runs on the disk do, so each meets
    the CPU caches the others leave, as it does there.
    """
    import shutil
    import tempfile

    from flashnb.engine import FlashEngine
    from flashnb.generate import take_turns

    warm_runners = warm_runners or {}
    shm = Path("/dev/shm")
    size = sum(f.stat().st_size for d in set(map(str, store_dirs.values())) for f in Path(d).iterdir() if f.is_file())
    if not shm.is_dir() or not os.access(shm, os.W_OK) or size > RAM_STORE_SHARE * available_memory():
        policies = {}  # no tmpfs, or a model too big for DRAM: its store stays on disk
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="flashnb-calibrate-", dir=shm if policies else None) as tmp, \
            ExitStack() as stack:
        copies: dict[Path, Path] = {}
        runners = {}
        for name, policy in policies.items():
            src = Path(store_dirs[name])
            if src not in copies:
                copies[src] = Path(shutil.copytree(src, Path(tmp) / f"store{len(copies)}"))
            runners[name] = stack.enter_context(FlashEngine(copies[src], policy, predictors=predictors))
        ram_bps = _ram_read_rate(next(iter(copies.values()))) if copies else None
        runners.update(warm_runners)
        first = {name: len(r.steps) + len(prompt_ids) for name, r in runners.items()}
        take_turns({name: iter(r.generate(prompt_ids, tokens)) for name, r in runners.items()})
        for name, r in runners.items():
            steps = r.steps[first[name]:]
            if name in warm_runners:
                out[name] = {"warm_s": float(np.mean([s.wall_seconds for s in steps])), "tokens": len(steps)}
                continue
            out[name] = {"compute_s": float(np.mean([s.compute_seconds for s in steps])),
                         "mm_s": float(np.mean([s.mm_seconds for s in steps])),
                         "io_s_in_ram": float(np.mean([s.io_seconds for s in steps])),
                         "overlap_s": float(np.mean([s.overlap_seconds for s in steps])),
                         "bytes_read": float(np.mean([s.bytes_read for s in steps])), "tokens": len(steps),
                         "ram_read_bps": ram_bps}
    return out


def _ram_read_rate(store_dir: Path) -> float:
    """Bytes/s at which a NeuronReader moves a store held in RAM (tmpfs) when its requests are large:
    every neuron of every layer, best of two passes. The time the engine's reads take in RAM beyond
    bytes / this rate is the reader's own work (planning, submitting), which direct I/O pays too."""
    from flashnb.reader import NeuronReader, aligned_empty

    with NeuronReader(store_dir) as reader:
        st = reader.store
        buf = aligned_empty((st.ffn_dim, st.row_values), st.np_dtype)
        every = np.arange(st.ffn_dim)
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            for layer in range(st.num_layers):
                reader.read(layer, every, out=buf)
            best = min(best, time.perf_counter() - t0)
    return st.num_layers * st.ffn_dim * st.neuron_bytes / best
