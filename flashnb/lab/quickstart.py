"""Lesson 00, the quickstart: what the flash store holds, where a run's DRAM goes, and what one
generated token moves and costs, with the paper's numbers beside ours."""

from __future__ import annotations

import statistics

from flashnb.core.memory import MemoryPlan
from flashnb.device.costmodel import paper_data
from flashnb.lab.stats import TokenStats
from flashnb.text import MB, wrap


def ffn_bytes(store) -> int:
    """Bytes of the store's FFN weights (every layer's neuron bundles, without alignment padding)."""
    return store.memory_shape().ffn_bytes


def store_text(store) -> str:
    """What `flashnb.core.convert` wrote: the files and the FFN layout (bytes, deterministic)."""
    dram = store.dram_path.stat().st_size
    ffn = store.ffn_path.stat().st_size
    return wrap(f"{store.layout} {store.dtype_name} store: {store.ffn_path.name} {ffn / MB:.2f} MB on flash = "
                f"{store.num_layers} layers x {store.ffn_dim} neurons x {store.neuron_bytes} B bundles "
                f"({' + '.join(store.parts)} of one neuron side by side, each layer's region {store.alignment} "
                f"B-aligned); {store.dram_path.name} {dram / MB:.2f} MB for DRAM (embeddings, attention, norms and "
                "any FFN biases)")


def memory_text(mem: MemoryPlan, name: str = "the model") -> str:
    """Where a FlashEngine's DRAM goes (its MemoryPlan): exact bytes, the same on every machine."""
    ffn = mem.model_bytes - mem.resident_bytes
    return wrap(f"{name}: {mem.model_bytes / MB:.1f} MB of weights, {ffn / MB:.1f} MB of them FFN (on flash).\n"
                f"DRAM: resident tensors with the bundles' checksums {mem.resident_bytes / MB:.1f} MB + predictors "
                f"{mem.predictor_bytes / MB:.1f} MB + the engine's per-neuron maps {mem.bookkeeping_bytes / MB:.1f} MB"
                + (f" + pinned rows {mem.pinned_bytes / MB:.1f} MB" if mem.pinned_rows else "")
                + f" + neuron caches {mem.cache_bytes / MB:.1f} MB ({mem.capacity_rows} rows per cache)"
                f" = {mem.used_bytes / MB:.1f} MB, {mem.used_bytes / mem.model_bytes:.0%} of the model "
                f"(budget {mem.budget_bytes / MB:.1f} MB); KV cache {mem.kv_cache_bytes / MB:.1f} MB beside it.")


def quickstart_text(s: TokenStats, ffn: int, steps=None) -> str:
    """Notebook 00's summary of one run's per-token statistics, with the paper beside it; with the run's
    `steps`, also the I/O share of the median token (a single slow token moves the means)."""
    io_share = s.io_ms / s.total_ms if s.total_ms else 0.0
    shares = [t.io_seconds / t.wall_seconds for t in steps or () if t.wall_seconds > 0]
    typical = f"; of the median token {statistics.median(shares):.0%}" if shares else ""
    paper = paper_data()["latency_totals_opt_6_7b_ms"]
    p_io = {r["name"]: r["io_latency_ms"] for r in paper_data()["table2"]["rows"]}["+bundling"]
    return wrap(f"per generated token (mean of {s.tokens}, measured; median {s.median_ms:.1f} ms, 10-90% "
                f"{s.p10_ms:.1f}-{s.p90_ms:.1f} ms): {s.bytes_read / MB:.3f} MB read from flash of a "
                f"{ffn / MB:.1f} MB FFN ({s.bytes_read / ffn:.1%}); {s.predicted:.0f} neurons predicted, "
                f"{s.cached:.0f} already in DRAM ({s.window_hit_share:.0%}), {s.loaded:.0f} read. "
                f"Time: I/O {s.io_ms:.1f} ms + memory management {s.mm_ms:.1f} ms + compute "
                f"{s.compute_ms:.1f} ms = {s.total_ms:.1f} ms (means; I/O {io_share:.0%}{typical}).\n"
                f"Paper (OPT 6.7B, M1 Max CPU, all techniques): I/O {p_io} ms of {paper['cpu_ours']} ms per token "
                f"({p_io / paper['cpu_ours']:.0%}) (Table 2, Table 3).")
