"""Trace replay at OPT 6.7B's shapes: real I/O on a big FFN file, driven by the shipped model's sets.

This machine cannot run OPT 6.7B's weights, but its disk can hold an FFN file of OPT 6.7B's shape:
32 layers x 16384 neurons, bundles of 2 x 4096 fp16 values (16 KiB; unbundled rows 8 KiB), about
8.6 GB per layout, filled with random bytes. The neuron sets come from a recorded run of the
shipped model (its predictors' selections), mapped onto the wider layers: wide layer l uses the
sets of shipped layer l * L_small // 32, and each shipped neuron j stands for 8 wide neurons
perm[8j .. 8j+7] of a fixed random permutation (so sparsity and reuse across tokens are kept, and
contiguity is not flattered). Each configuration then reads, with the engine's reader and cache
logic, exactly what the engine would read; only I/O is measured (no compute): label it
*trace replay*, the closest this machine comes to the paper's Table 2.

`widened_placement` carries the shipped co-activation placement onto a wider FFN the same way, each
shipped neuron's copies a block of rows apart (flashnb bench --scale's `placed`).

Two naive rows: flashnb's naive reads every layer's whole FFN (8.6 GB a token); the paper's Table 2
naive moves the whole model (13.3 GB at this shape: "naive" loads everything that is not in DRAM, and nothing is).
The second is measured too: with each layer's FFN, the same large reads fetch that layer's share of
OPT 6.7B's other weights (attention, embeddings, head: 4.7 GB in all) from the unbundled file, which
stands in for them (its bytes are random too).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from flashnb.bench.report import ReplayResult, ReplayRow
from flashnb.core.defaults import ALIGNMENT, IN_FLIGHT, MEMORY_BUDGET, WINDOW
from flashnb.core.io import aligned_empty
from flashnb.core.manifest import FORMAT, FORMAT_VERSION
from flashnb.core.memory import plan_memory
from flashnb.core.reader import NeuronReader, ReaderConfig
from flashnb.core.records import LayerStep, TokenStep
from flashnb.core.store import FlashStore
from flashnb.core.window import Window
from flashnb.device.costmodel import opt_6_7b
from flashnb.device.profile import coalescing_gap
from flashnb.errors import FlashnbError
from flashnb.lab.stats import TokenStats
from flashnb.models.opt import OPTConfig
from flashnb.text import show_progress


@dataclass
class ReplayShape:
    layers: int = 32
    d_model: int = 4096
    ffn_dim: int = 16384
    itemsize: int = 2  # fp16


def _manifest(shape: ReplayShape, layout: str) -> tuple[dict, int]:
    parts = ["fc1", "fc2"]
    layers, off = [], 0
    groups = [("bundles", parts)] if layout == "bundled" else [(p, [p]) for p in parts]
    for _ in range(shape.layers):
        regs = []
        for name, rparts in groups:
            row = len(rparts) * shape.d_model * shape.itemsize
            size = shape.ffn_dim * row
            regs.append({"name": name, "offset": off, "size": size, "rows": shape.ffn_dim, "row_bytes": row,
                         "parts": rparts, "sha256": ""})
            off = -(-(off + size) // ALIGNMENT) * ALIGNMENT
        layers.append(regs)
    cfg = OPTConfig(vocab_size=50272, hidden_size=shape.d_model, ffn_dim=shape.ffn_dim,
                    num_hidden_layers=shape.layers, num_attention_heads=32, max_position_embeddings=2048)
    m = {"format": FORMAT, "format_version": FORMAT_VERSION, "layout": layout, "dtype": "fp16",
         "alignment": ALIGNMENT, "model_type": "opt", "model_config": cfg.to_hf(), "d_model": shape.d_model,
         "ffn_dim": shape.ffn_dim, "num_layers": shape.layers, "parts": parts, "layers": layers,
         "ffn_file": {"name": "ffn.bin", "bytes": off}, "dram_file": {"name": "dram.safetensors"}}
    return m, off


def replay_store(folder: str | Path, layout: str, shape: ReplayShape | None = None,
                 progress: bool = True) -> FlashStore:
    """An FFN-only store of random fp16 bytes at `shape` (default OPT 6.7B) in `folder`/`layout`;
    created on first use (about 8.6 GB for OPT 6.7B), reused afterwards."""
    shape = shape or ReplayShape()
    manifest, nbytes = _manifest(shape, layout)
    d = Path(folder) / f"replay-{layout}-{shape.layers}x{shape.ffn_dim}x{shape.d_model}"
    f = d / "ffn.bin"
    if not (f.is_file() and f.stat().st_size == nbytes):
        d.mkdir(parents=True, exist_ok=True)
        free = os.statvfs(d).f_bavail * os.statvfs(d).f_frsize
        if free < nbytes + (1 << 30):
            raise FlashnbError(f"trace replay needs {nbytes / 1e9:.1f} GB free in {d} (has {free / 1e9:.1f} GB); "
                               "pass --dir on a larger disk")
        block = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8).tobytes()
        tmp = f.with_suffix(".tmp")
        with open(tmp, "wb") as out, tqdm(total=nbytes, unit="B", unit_scale=True, disable=not show_progress(progress),
                                          desc=f"replay store ({layout})") as bar:
            left = nbytes
            while left:
                n = min(left, len(block))
                out.write(block[:n])
                left -= n
                bar.update(n)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(f)
    config = OPTConfig.from_hf(manifest["model_config"])
    return FlashStore(d, manifest, config)


def widen(sets_small: list[list[np.ndarray]], small_ffn: int, shape, seed: int = 0) -> list[list[np.ndarray]]:
    """Map per-token, per-layer neuron sets of a small model onto `shape` (`layers`, `ffn_dim`; see the
    module doc): small neuron j stands for the wide neurons perm[j * F // f : (j + 1) * F // f] (F / f of
    them, rounded), so the share of active neurons is kept."""
    F = shape.ffn_dim
    if F < small_ffn:
        raise FlashnbError(f"the wide FFN ({F}) must be at least as wide as the traced FFN ({small_ffn})")
    perm = np.random.default_rng(seed).permutation(F)
    bounds = np.arange(small_ffn + 1, dtype=np.int64) * F // small_ffn
    L = len(sets_small[0])
    out = []
    for token in sets_small:
        layers = []
        for wl in range(shape.layers):
            ids = np.asarray(token[wl * L // shape.layers], dtype=np.int64)
            lo, hi = bounds[ids], bounds[ids + 1]
            n = hi - lo
            wide = np.repeat(lo, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
            layers.append(np.sort(perm[wide]))
        out.append(layers)
    return out


def widened_placement(placement, small_ffn: int, shape, seed: int = 0):
    """The shipped model's co-activation placement (flashnb.core.placement) carried onto `shape`'s wider FFN
    as `widen` maps its neurons, keeping the copies apart: small neuron j's copies are perfectly co-active
    (they stand for the same neuron), so placing them side by side would make runs no real model has. Wide
    file row c * small_ffn + r holds copy c of the small neuron at row r: each block of small_ffn rows is
    the learned order once, and a neuron's copies lie a block apart, where no read merges them."""
    from flashnb.core.placement import Placement

    F = shape.ffn_dim
    perm = np.random.default_rng(seed).permutation(F)
    bounds = np.arange(small_ffn + 1, dtype=np.int64) * F // small_ffn
    copies = np.diff(bounds)
    L = placement.order.shape[0]
    order = []
    for wl in range(shape.layers):
        small = placement.order[wl * L // shape.layers]
        rows = [perm[bounds[small[copies[small] > c]] + c] for c in range(int(copies.max()))]
        order.append(np.concatenate(rows))
    return Placement(np.stack(order), None, placement.tokens,
                     f"{placement.source}, carried x{F / small_ffn:g} onto a {F}-neuron FFN, copies a block apart")


def shipped_placement_widened(shape):
    """The shipped model's co-activation placement carried onto `shape` (`widened_placement`)."""
    from flashnb.core.placement import load_placement
    from flashnb.paths import shipped_predictors_dir

    placement = load_placement(shipped_predictors_dir())
    return widened_placement(placement, placement.order.shape[1], shape)


def _step(io_s: float, reads) -> TokenStep:
    """A replayed token as an engine record: its reads' bytes and requests, its I/O time."""
    step = TokenStep(-1, wall_seconds=io_s)
    step.layers = [LayerStep(0, 0, 0, 0, st.bytes_read, st.bytes_needed, st.requests) for st in reads]
    step.layers[0].wait_s = io_s
    return step


def replay(store: FlashStore, sets: list[list[np.ndarray]] | None, window: int, capacity: int,
           in_flight: int = IN_FLIGHT, gap_bytes: int = 0) -> TokenStats:
    """Read what the engine would read for each token (sets None = every neuron: naive), with the
    engine's windows and reader; per-token statistics of the I/O (measured, direct I/O). The first
    token, which finds the windows empty, is left out when there are more than two."""
    L, F = store.num_layers, store.ffn_dim
    windows = [Window(F, capacity, window) for _ in range(L)]
    buf = aligned_empty((F, store.row_width), store.row_dtype)
    every = np.arange(F)
    steps = []
    with NeuronReader(store, ReaderConfig(in_flight=in_flight, gap_bytes=gap_bytes)) as reader:
        for token in (sets if sets is not None else [None] * 2):
            t_io, reads = 0.0, []
            for layer in range(L):
                plan = windows[layer].plan(every if token is None else token[layer])
                t0 = time.perf_counter()
                reads.append(reader.read(layer, plan.loaded, out=buf[: plan.loaded.size]).stats)
                t_io += time.perf_counter() - t0
                windows[layer].advance(plan)
            steps.append(_step(t_io, reads))
    return TokenStats.of(steps[1:] if len(steps) > 2 else steps, L * F)


def replay_whole_model(ffn_store: FlashStore, other_store: FlashStore, other_bytes: int, tokens: int = 2,
                       in_flight: int = IN_FLIGHT) -> TokenStats:
    """The paper's naive: every token reads the whole model, layer by layer: the layer's FFN from
    `ffn_store` and other_bytes / layers more, as rows of `other_store` read by the same reader
    (large coalesced requests). Per-token statistics like `replay` (measured, direct I/O)."""
    L, F = ffn_store.num_layers, ffn_store.ffn_dim
    rows = int(min(other_store.ffn_dim, -(-other_bytes // (L * other_store.neuron_bytes))))
    buf = aligned_empty((F, ffn_store.row_width), ffn_store.row_dtype)
    extra = aligned_empty((rows, other_store.row_width), other_store.row_dtype)
    every, first = np.arange(F), np.arange(rows)
    steps = []
    cfg = ReaderConfig(in_flight=in_flight)
    with NeuronReader(ffn_store, cfg) as ffn, NeuronReader(other_store, cfg) as other:
        for _ in range(tokens):
            t_io, reads = 0.0, []
            for layer in range(L):
                t0 = time.perf_counter()
                reads += [ffn.read(layer, every, out=buf).stats, other.read(layer, first, out=extra).stats]
                t_io += time.perf_counter() - t0
            steps.append(_step(t_io, reads))
    return TokenStats.of(steps, L * F)


def run_replay(sets_small: list[list[np.ndarray]], small_ffn: int, folder: str | Path, window: int = WINDOW,
               memory: float | int = MEMORY_BUDGET, in_flight: int = IN_FLIGHT, tokens: int = 8, profile=None,
               progress: bool = True) -> ReplayResult:
    """naive / +predictor / +windowing / +bundling replayed at OPT 6.7B's shape (see the module doc).

    The windows get the rows a `memory` budget leaves of OPT 6.7B's bytes after its DRAM-resident
    part (the one budget split, flashnb.core.memory.plan_memory), like the paper's half-memory setting.
    """
    shape = ReplayShape()
    big = opt_6_7b()
    capacity = plan_memory(big.memory_shape(), memory, window).capacity_rows
    wide = widen(sets_small[: tokens + 1], small_ffn, shape)
    stores = {layout: replay_store(folder, layout, shape, progress) for layout in ("bundled", "unbundled")}
    most = max(1, max(len(ids) for t in wide for ids in t))
    gap = coalescing_gap(profile, in_flight)
    runs = {"naive": (stores["bundled"], None, 0, shape.ffn_dim),
            "predictor": (stores["unbundled"], wide, 0, most),
            "windowing": (stores["unbundled"], wide, window, max(capacity, most)),
            "all": (stores["bundled"], wide, window, max(capacity, most))}
    out = {"naive_model": ReplayRow("naive_model", replay_whole_model(stores["bundled"], stores["unbundled"],
                                                                      big.other_bytes, 2, in_flight))}
    for name, (store, sets, w, cap) in runs.items():
        out[name] = ReplayRow(name, replay(store, sets, w, cap, in_flight, gap))
        if progress:
            print(f"  replay {name:<11} {out[name].stats.io_ms:9.1f} ms I/O per token", flush=True)
    naive, naive_model = out["naive"].stats.io_ms, out["naive_model"].stats.io_ms
    for r in out.values():
        r.io_vs_naive = naive / r.stats.io_ms if r.stats.io_ms else None
        r.io_vs_naive_model = naive_model / r.stats.io_ms if r.stats.io_ms else None
    return ReplayResult("trace replay: I/O only, random weights at OPT 6.7B's shape, the shipped model's predicted "
                        f"sets widened x{shape.ffn_dim // small_ffn}",
                        {"layers": shape.layers, "d_model": shape.d_model, "ffn_dim": shape.ffn_dim, "dtype": "fp16"},
                        window, capacity, memory, out)
