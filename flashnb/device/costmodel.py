"""The paper's inference cost model: latency per token = flash I/O + DRAM memory management + compute.

Everything here is *modeled*: bytes come from a model shape and a policy, seconds from a device
(the paper's M1 Max as it reports it, or a `flashnb.device.profile.Profile` measured on this machine).

Bytes per token (B = bytes per value, F = FFN weight bytes = L * P * d * ffn * B, P = 2 or 3 FFN
matrices, T = all weight bytes, O = T - F = embeddings, attention, norms, biases, M = memory budget):

    naive                        T               read densely (sequentially) every token
    hybrid (no predictor)        about T - M     the budget's rows pinned (flashnb.core.memory.hybrid_plan),
                                                 the rest of the FFN streams densely
    predictor                    F * p           p = min(1, (1 - sparsity) * overselect): predicted neurons
    predictor + window           F * p * (1 - r) r = window_reuse: predicted neurons already cached

With the predictor the reads are sparse: one read of P * d * B bytes per neuron with bundling, P reads
of d * B bytes without. I/O seconds = bytes / device throughput at that read size. A run's measured
request statistics (mean request size, requests per reader call) can replace the derived reads.
DRAM resident = O (+ the window's rows, from the one budget split, flashnb.core.memory).
Memory management = bytes copied inside DRAM per token / copy rate: with a window, evicting as many
neurons as arrive copies that many rows (swap-with-last delete); reads land in place otherwise.
Compute = weight bytes a token's matrix-vector products touch / matvec rate (batch 1 is memory bound):
O minus the embedding tables (lm head counted) plus the FFN bytes used (F * p, or F without predictor).

For OPT 6.7B, half memory, on the paper's device this reproduces Table 2's I/O column (see `table2`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from flashnb.core.defaults import IN_FLIGHT, MEMORY_BUDGET
from flashnb.core.memory import MemoryShape, budget_bytes, hybrid_plan, plan_memory
from flashnb.core.records import per_token_mean
from flashnb.errors import FlashnbError
from flashnb.models.checkpoint import CONFIGS, ffn_matrix_names, meta_model
from flashnb.paths import data_dir

GB = 1e9


# ----------------------------------------------------------------------------------------------
# Model shape


@dataclass(frozen=True)
class ModelShape:
    """Where a model's weight bytes live. Counts are parameters; bytes_per_value is B (2 = fp16)."""

    name: str
    num_layers: int
    d_model: int
    ffn_dim: int
    parts: int              # FFN matrices per layer (2: OPT up/down, 3: gated gate/up/down)
    bytes_per_value: int
    ffn_params: int         # FFN weight matrices, all layers
    other_params: int       # everything else: embeddings, attention, norms, FFN biases
    embedding_params: int   # token + position tables (looked up, not multiplied)
    lm_head_params: int     # vocab x d of a tied output projection (the embedding table multiplied again);
                            # 0 when the model has its own lm_head, already in other_params

    @classmethod
    def from_config(cls, config, bytes_per_value: int = 2, name: str | None = None) -> "ModelShape":
        """Count the parameters of flashnb's model for `config` (built on the meta device: no memory)."""
        ffn_names = ffn_matrix_names(config)
        ffn = other = emb = 0
        own_head = False
        for n, p in meta_model(config).named_parameters():
            if n in ffn_names:
                ffn += p.numel()
            else:
                other += p.numel()
                emb += p.numel() if n.startswith("embed_") else 0
                own_head |= n.startswith("lm_head.")
        lm_head = 0 if own_head else config.vocab_size * getattr(config, "embed_dim", config.hidden_size)
        return cls(name or f"{config.model_type}-{config.hidden_size}x{config.num_hidden_layers}",
                   config.num_hidden_layers, config.hidden_size, config.ffn_dim, len(config.ffn_parts),
                   bytes_per_value, ffn, other, emb, lm_head)

    @classmethod
    def from_hf(cls, hf_config: dict, bytes_per_value: int = 2, name: str | None = None) -> "ModelShape":
        return cls.from_config(CONFIGS[hf_config["model_type"]].from_hf(hf_config, name or "config"),
                               bytes_per_value, name)

    def memory_shape(self) -> MemoryShape:
        """What a memory budget is split over for this shape (flashnb.core.memory)."""
        return MemoryShape(self.other_bytes, self.num_layers, self.ffn_dim, self.neuron_bytes)

    @property
    def total_bytes(self) -> int:
        return (self.ffn_params + self.other_params) * self.bytes_per_value

    @property
    def ffn_bytes(self) -> int:
        return self.ffn_params * self.bytes_per_value

    @property
    def other_bytes(self) -> int:
        return self.other_params * self.bytes_per_value

    @property
    def row_bytes(self) -> int:
        """One matrix's slice of one neuron: d_model values (bytes)."""
        return self.d_model * self.bytes_per_value

    @property
    def neuron_bytes(self) -> int:
        """A whole neuron (a bundle): parts x d_model values (bytes)."""
        return self.parts * self.row_bytes


# ----------------------------------------------------------------------------------------------
# Policy


@dataclass(frozen=True)
class CostPolicy:
    """How tokens are served, for the cost model; fractions are of FFN neurons unless said otherwise.

    hybrid: keep the non-FFN weights (and, without a predictor, as many FFN rows as the budget
        allows) in DRAM.
    predictor: load only the predicted neurons: (1 - sparsity) * overselect of the FFN.
    window: tokens whose neurons stay cached (0 = none); window_reuse: fraction of a token's predicted
        neurons already cached; window_cached_fraction: FFN fraction the window's rows hold (None: what
        the budget split leaves them, flashnb.core.memory.plan_memory).
    bundling: one read per neuron (bundle) instead of one per matrix.
    memory_budget: fraction of the model's bytes allowed in DRAM.
    in_flight: reads in flight (used with measured profiles).
    """

    name: str = "custom"
    hybrid: bool = True
    predictor: bool = True
    sparsity: float = 0.97
    overselect: float = 3.5
    window: int = 0
    window_reuse: float = 0.0
    window_cached_fraction: float | None = None
    bundling: bool = False
    memory_budget: float = MEMORY_BUDGET
    in_flight: int = IN_FLIGHT
    # statistics measured by a run of this policy (0 = derive them from the fields above):
    request_bytes: int = 0        # mean bytes per flash request (alignment and coalescing included)
    requests_per_call: float = 0  # requests per reader call (one layer's part): the concurrency available
    predictor_bytes: int = 0      # predictor weights held and multiplied per token
    calls_per_layer: float = 1    # reader/compute calls per layer (a set bigger than the rows is served in parts)

    @property
    def predicted_fraction(self) -> float:
        return min(1.0, (1.0 - self.sparsity) * self.overselect)

    @property
    def loaded_fraction(self) -> float:
        """FFN fraction read from flash per token."""
        if not self.predictor:
            return 1.0
        return self.predicted_fraction * ((1.0 - self.window_reuse) if self.window else 1.0)


# ----------------------------------------------------------------------------------------------
# Devices


@dataclass(frozen=True)
class PaperDevice:
    """A device described by a dense read rate and sparse read rates at given read sizes (bytes/s).

    Between the given read sizes the sparse rate is interpolated in log2(size); outside it is held.
    memcpy / matvec rates (bytes/s) are optional: None leaves those terms out of the total.
    """

    name: str
    dense_bps: float
    sparse_points: tuple[tuple[int, float], ...]   # (read bytes, bytes/s), ascending
    memcpy_bps: float | None = None
    matvec_bps: float | None = None
    kind: str = "paper"

    def dense_throughput(self) -> float:
        return self.dense_bps

    def first_request_latency(self) -> float:
        """Seconds before a batch's first read completes: the paper gives none."""
        return 0.0

    def sparse_throughput(self, chunk_bytes: int, in_flight: int) -> float:
        xs = np.log2([p[0] for p in self.sparse_points])
        ys = [p[1] for p in self.sparse_points]
        return float(np.interp(np.log2(chunk_bytes), xs, ys))


def paper_device() -> PaperDevice:
    """The paper's M1 Max as Table 2 reports it: 6.1 GB/s dense, 1.25 / 2.25 GB/s at 8 / 16 KiB reads."""
    d = paper_data()["device_m1_max"]
    return PaperDevice("M1 Max (paper, Table 2)", d["dense_read_GBps"] * GB,
                       ((d["unbundled_chunk_bytes"], d["sparse_unbundled_GBps"] * GB),
                        (d["bundled_chunk_bytes"], d["sparse_bundled_GBps"] * GB)))


@dataclass(frozen=True)
class ProfileDevice:
    """A device measured by `flashnb profile` (rates in bytes/s from the fitted model)."""

    profile: object  # flashnb.device.profile.Profile
    name: str = "this machine (measured)"
    kind: str = "measured"

    def dense_throughput(self) -> float:
        """Best measured way to stream a big file: sequential, or random reads of >= 1 MiB."""
        p = self.profile
        big = p.grid[:, p.chunks >= (1 << 20)]
        return float(max(p.sequential_throughput(), big.max() if big.size else 0.0))

    def sparse_throughput(self, chunk_bytes: int, in_flight: int) -> float:
        return float(self.profile.throughput(chunk_bytes, in_flight))

    def first_request_latency(self) -> float:
        """Seconds before a batch's first read completes: the fitted latency at one request in flight."""
        return float(self.profile.fit.latency_s[0])

    @property
    def memcpy_bps(self) -> float | None:
        return (self.profile.data.get("memory") or {}).get("memcpy_bytes_per_s")

    @property
    def matvec_bps(self) -> float | None:
        return (self.profile.data.get("memory") or {}).get("matvec_fp32_bytes_per_s")


def as_device(device) -> PaperDevice | ProfileDevice:
    """Accept a PaperDevice/ProfileDevice, a flashnb.device.profile.Profile, or None (the paper's device)."""
    if device is None:
        return paper_device()
    if isinstance(device, (PaperDevice, ProfileDevice)):
        return device
    if hasattr(device, "throughput") and hasattr(device, "sequential_throughput"):
        return ProfileDevice(device)
    raise FlashnbError(f"unknown device {device!r}: pass a Profile, a PaperDevice or None")


# ----------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class TokenCost:
    """Modeled cost of one token. Bytes are bytes; seconds are seconds (None: rate unknown)."""

    policy: str
    device: str
    io_bytes: int
    read_bytes: int          # size of each flash read (bytes); 0 = dense streaming
    reads: int               # flash reads per token
    io_throughput: float     # bytes/s at that read size
    io_seconds: float
    mm_bytes: int
    mm_seconds: float | None
    compute_bytes: int
    compute_seconds: float | None
    dram_bytes: int
    budget_bytes: int

    @property
    def total_seconds(self) -> float:
        return self.io_seconds + (self.mm_seconds or 0.0) + (self.compute_seconds or 0.0)


def compute_bytes(shape: ModelShape, used_ffn_bytes: int) -> int:
    """Weight bytes one token multiplies: everything but the embedding tables (the lm head counted),
    plus the FFN bytes it uses."""
    return (shape.other_params - shape.embedding_params + shape.lm_head_params) * shape.bytes_per_value \
        + used_ffn_bytes


def cached_fraction(shape: ModelShape, policy: CostPolicy) -> float:
    """FFN fraction the window's rows hold: the policy's, or what the one budget split leaves."""
    if policy.window_cached_fraction is not None:
        return policy.window_cached_fraction
    plan = plan_memory(shape.memory_shape(), policy.memory_budget, policy.window, policy.predictor_bytes)
    return plan.caches * plan.capacity_rows / (shape.num_layers * shape.ffn_dim)


def _io(shape: ModelShape, policy: CostPolicy, dev) -> tuple[int, int, int, float, float, int]:
    """(bytes, read size (0 = dense), reads, bytes/s, seconds, DRAM bytes) of one token's flash I/O."""
    T, F, O = shape.total_bytes, shape.ffn_bytes, shape.other_bytes
    if not policy.hybrid:                       # naive: stream the whole model every token
        return T, 0, 1, dev.dense_throughput(), T / dev.dense_throughput(), 0
    if not policy.predictor:                    # hybrid: pinned rows stay, the rest streams
        plan = hybrid_plan(shape.memory_shape(), policy.memory_budget)
        io = (shape.ffn_dim - plan.pinned_rows) * shape.num_layers * shape.neuron_bytes
        return io, 0, 1, dev.dense_throughput(), io / dev.dense_throughput(), O + plan.pinned_bytes
    frac = policy.loaded_fraction
    io = int(round(F * frac))
    chunk = shape.neuron_bytes if policy.bundling else shape.row_bytes
    reads = int(round(frac * shape.num_layers * shape.ffn_dim * (1 if policy.bundling else shape.parts)))
    dram = O + policy.predictor_bytes + (int(F * cached_fraction(shape, policy)) if policy.window else 0)
    if policy.request_bytes and policy.requests_per_call and io:
        # measured requests: per layer call, requests_per_call reads of request_bytes (coalescing and
        # alignment included), min(reads in flight, requests) of them in flight, after one request's latency
        chunk = int(policy.request_bytes)
        calls = shape.num_layers * max(1.0, policy.calls_per_layer)
        reads = int(round(calls * policy.requests_per_call))
        seconds = calls_seconds(dev, calls, policy.requests_per_call, chunk, policy.in_flight)
        return reads * chunk, chunk, reads, reads * chunk / seconds, seconds, dram
    thr = dev.sparse_throughput(chunk, policy.in_flight)
    return io, chunk, reads, thr, io / thr if io else 0.0, dram


def calls_seconds(device, calls: float, requests_per_call: float, request_bytes: int, in_flight: int) -> float:
    """Seconds for `calls` reader calls of `requests_per_call` random requests of `request_bytes`
    each: per call one request's latency, then the bytes at the device's rate for that read size with
    min(in_flight, requests per call) reads in flight."""
    dev = as_device(device)
    depth = max(1, min(in_flight, int(round(requests_per_call))))
    return calls * (dev.first_request_latency()
                    + requests_per_call * request_bytes / dev.sparse_throughput(request_bytes, depth))


def steps_io_ms(device, steps, in_flight: int) -> float:
    """The cost model's I/O per token, in ms, for recorded or simulated `steps` (TokenSteps): each
    reader call's requests at their mean size, with `in_flight` reads in flight."""
    return 1e3 * per_token_mean(steps, lambda s: sum(calls_seconds(device, 1, layer.requests,
                                                                  layer.bytes_read // layer.requests, in_flight)
                                                     for layer in s.layers if layer.requests))


def stream_ms(device, calls: float, nbytes: float) -> float:
    """The cost model's I/O, in ms, for `calls` reader calls that stream `nbytes` in file order (whole layers,
    no predictor: naive and hybrid): one request's latency per call, then the bytes at the device's
    large-read rate."""
    dev = as_device(device)
    return (calls * dev.first_request_latency() + nbytes / dev.dense_throughput()) * 1e3


def token_cost(shape: ModelShape, policy: CostPolicy, device=None) -> TokenCost:
    """Latency per token of `shape` served with `policy` on `device` (see the module doc)."""
    dev = as_device(device)
    if not 0 <= policy.sparsity <= 1 or policy.overselect <= 0 or not 0 <= policy.window_reuse <= 1:
        raise FlashnbError(f"policy {policy.name!r}: sparsity must be in [0, 1], overselect > 0 and "
                           "window_reuse in [0, 1]")
    io, chunk, reads, thr, io_s, dram = _io(shape, policy, dev)
    mm_bytes = io if (policy.predictor and policy.hybrid and policy.window) else 0
    mm_s = mm_bytes / dev.memcpy_bps if dev.memcpy_bps else (0.0 if mm_bytes == 0 else None)
    used_ffn = int(shape.ffn_bytes * policy.predicted_fraction) if (policy.predictor and policy.hybrid) \
        else shape.ffn_bytes
    comp_bytes = compute_bytes(shape, used_ffn) + policy.predictor_bytes
    comp_s = comp_bytes / dev.matvec_bps if dev.matvec_bps else None
    return TokenCost(policy.name, dev.name, io, chunk, reads, thr, io_s, mm_bytes, mm_s, comp_bytes, comp_s,
                     dram, budget_bytes(policy.memory_budget, shape.total_bytes))


# ----------------------------------------------------------------------------------------------
# The paper's numbers


@lru_cache(maxsize=1)
def paper_data() -> dict:
    """data/paper.json: the paper's figures with table references."""
    p = data_dir() / "paper.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise FlashnbError(f"{p} is missing; check out the repository's data/ folder") from None


def opt_6_7b() -> ModelShape:
    """OPT 6.7B in fp16, counted from its config (32 layers, d 4096, ffn 16384)."""
    return ModelShape.from_hf(paper_data()["opt_6_7b_config"], 2, "OPT 6.7B")


def paper_policies() -> list[CostPolicy]:
    """Table 2's five configurations, with the policy inputs of data/paper.json (opt_6_7b_policy)."""
    p = paper_data()["opt_6_7b_policy"]
    base = CostPolicy(sparsity=p["sparsity"], overselect=p["overselect"], memory_budget=p["memory_budget"])
    win = dict(window=p["window"], window_reuse=p["window_reuse"], window_cached_fraction=p["window_cached_fraction"])
    return [replace(base, name="naive", hybrid=False, predictor=False),
            replace(base, name="hybrid", predictor=False),
            replace(base, name="+predictor"),
            replace(base, name="+windowing", **win),
            replace(base, name="+bundling", bundling=True, **win)]


@dataclass(frozen=True)
class Table2Row:
    """One configuration of Table 2, modeled beside the paper's (GB = 1e9 bytes, ms)."""

    name: str
    flash_to_dram_GB: float
    read_bytes: int          # bytes per read; 0 = dense streaming
    throughput_GBps: float
    io_ms: float
    dram_GB: float
    paper_flash_to_dram_GB: float
    paper_io_ms: float

    @property
    def rel_error(self) -> float:
        """Modeled I/O time relative to the paper's, minus one."""
        return self.io_ms / self.paper_io_ms - 1.0


def table2(device=None, shape: ModelShape | None = None) -> list[Table2Row]:
    """Table 2 modeled beside the paper, one row per configuration. With device=None this is the
    reproduction on the paper's own device; pass a Profile to see the same policies on this machine."""
    shape = shape or opt_6_7b()
    paper_rows = {r["name"]: r for r in paper_data()["table2"]["rows"]}
    out = []
    for pol in paper_policies():
        c = token_cost(shape, pol, device)
        ref = paper_rows[pol.name]
        out.append(Table2Row(pol.name, c.io_bytes / GB, c.read_bytes, c.io_throughput / GB, c.io_seconds * 1e3,
                             c.dram_bytes / GB, ref["flash_to_dram_GB"], ref["io_latency_ms"]))
    return out


def page_cache_read_seconds(file_bytes, readahead: int, device=None) -> float:
    """Seconds for the kernel to page in cold files of `file_bytes` (bytes each) as a program touching
    them in order makes it: per file one request's latency, then the bytes in readahead-sized reads
    with one in flight (the faulting thread waits for each window). Windows of 1 MiB or more go at
    the device's large-read rate (`dense_throughput`), smaller ones at its rate for that size with
    one read in flight (modeled, from the device)."""
    dev = as_device(device)
    total = 0.0
    for n in file_bytes:
        if n > 0:
            chunk = int(min(n, readahead))
            rate = dev.dense_throughput() if chunk >= (1 << 20) else dev.sparse_throughput(chunk, 1)
            total += dev.first_request_latency() + n / rate
    return total


def time_to_read(nbytes: float, chunk_bytes: int, in_flight: int, device=None) -> float:
    """Seconds to read `nbytes` in random `chunk_bytes` reads with `in_flight` reads in flight on `device`."""
    dev = as_device(device)
    return nbytes / dev.sparse_throughput(chunk_bytes, in_flight)
