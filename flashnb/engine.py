"""The flash engine: LLM in a flash's per-token loop.

Everything but the FFN weight matrices stays in DRAM. For every token and layer, `FlashFFN.forward`

    1. predicts the neurons this token needs        (low-rank predictor, oracle, or all of them)
    2. plans the neuron cache: hits, loads, evictions (windowing, `flashnb.cache`)
    3. reads the missing bundles from flash          (direct I/O, `flashnb.reader`), and while the
       reads are in flight computes the FFN of the neurons already cached
    4. deletes evicted rows / appends the new ones    (memory management, preallocated matrix)
    5. computes the FFN of the neurons just read      (only this token's neurons contribute)

and records what it did. `FlashEngine.generate` runs tokens one at a time through the model.
Memory is accounted in bytes: the budget covers the model's weights held in DRAM (resident
tensors, predictors, neuron caches); the KV cache is activations and is reported beside it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from flashnb.cache import NeuronCache, sorted_unique, split_needed
from flashnb.errors import FlashnbError
from flashnb.models.common import activation
from flashnb.reader import IN_FLIGHT, NeuronReader, ReaderConfig
from flashnb.resident import resident_model
from flashnb.store import FlashStore

PREDICTORS = ("learned", "oracle", "none")


def process_read_bytes() -> int:
    """Bytes this process has caused to be fetched from storage (/proc/self/io read_bytes; 0 where
    the kernel does not report it)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Policy:
    """How the engine loads the FFN.

    predictor: "learned" (low-rank predictors), "oracle" (the exact active set: a reference that
        needs the dense FFN, to prove the engine exact), "none" (every neuron, every token).
    window: keep the neurons needed by the previous `window` tokens in DRAM (0 = keep nothing).
    memory_budget: DRAM for the model's weights: a fraction of the model's bytes if <= 1, else bytes.
    threads: reads in flight: the AIO queue depth (reader threads where native AIO is unavailable).
    gap_bytes: the reader's coalescing gap (None = from the device profile).
    """

    predictor: str = "learned"
    window: int = 4
    memory_budget: float = 0.5
    threads: int = IN_FLIGHT
    gap_bytes: int | None = None

    def __post_init__(self):
        if self.predictor not in PREDICTORS:
            raise FlashnbError(f"predictor must be one of {PREDICTORS}, got {self.predictor!r}")
        if self.window < 0:
            raise FlashnbError(f"window must be >= 0 tokens, got {self.window}")
        if self.memory_budget <= 0:
            raise FlashnbError(f"memory budget must be > 0 (a fraction <= 1 or bytes), got {self.memory_budget}")


@dataclass
class LayerStep:
    """One layer of one token. Counts are neurons, bytes are bytes, times are seconds."""

    predicted: int
    cached: int
    read: int
    evicted: int
    bytes_read: int
    bytes_needed: int
    requests: int
    io_seconds: float
    mm_seconds: float
    overlap_seconds: float = 0.0  # compute done while this layer's reads were in flight (inside compute)


@dataclass
class TokenStep:
    """One token: its layers, and its wall time split into I/O, memory management and the rest."""

    token: int
    layers: list[LayerStep] = field(default_factory=list)
    wall_seconds: float = 0.0
    storage_read_bytes: int = 0  # what the kernel fetched from storage for this process (/proc/self/io)
    needed: list[np.ndarray] = field(default_factory=list)  # neuron ids each layer used: a trace for simulate

    @property
    def io_seconds(self) -> float:
        return sum(s.io_seconds for s in self.layers)

    @property
    def mm_seconds(self) -> float:
        return sum(s.mm_seconds for s in self.layers)

    @property
    def overlap_seconds(self) -> float:
        return sum(s.overlap_seconds for s in self.layers)

    @property
    def compute_seconds(self) -> float:
        """Everything that is neither I/O nor memory management: attention, predictors, FFN math."""
        return max(0.0, self.wall_seconds - self.io_seconds - self.mm_seconds)

    @property
    def bytes_read(self) -> int:
        return sum(s.bytes_read for s in self.layers)

    def totals(self) -> dict:
        keys = ("predicted", "cached", "read", "evicted", "bytes_read", "bytes_needed", "requests")
        out = {k: sum(getattr(s, k) for s in self.layers) for k in keys}
        out.update(token=self.token, io_seconds=self.io_seconds, mm_seconds=self.mm_seconds,
                   compute_seconds=self.compute_seconds, overlap_seconds=self.overlap_seconds,
                   wall_seconds=self.wall_seconds, storage_read_bytes=self.storage_read_bytes)
        return out


@dataclass
class MemoryPlan:
    """DRAM accounting in bytes."""

    model_bytes: int          # all weights at the store's precision (DRAM part + FFN)
    budget_bytes: int
    resident_bytes: int       # DRAM tensors as held: embeddings, attention, norms, FFN biases
    predictor_bytes: int
    cache_bytes: int          # preallocated neuron rows and their pointer arrays
    capacity_rows: int        # rows per layer's cache (shared by all layers when window = 0)
    kv_cache_bytes: int       # activations, beside the budget

    @property
    def used_bytes(self) -> int:
        return self.resident_bytes + self.predictor_bytes + self.cache_bytes


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class FlashFFN(nn.Module):
    """A layer's FFN whose weights live on flash; see the module docstring for the five steps."""

    def __init__(self, engine: "FlashEngine", layer: int, biases: dict[str, torch.Tensor], cache: NeuronCache):
        super().__init__()
        self.engine, self.layer, self.cache = engine, layer, cache
        self.biases = biases
        c = engine.store.config
        self.act = activation(c.activation_function if c.model_type == "opt" else c.hidden_act, "config.json")
        self.gated = c.model_type != "opt"
        self.d = c.hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [1, 1, d_model], one token
        eng = self.engine
        needed = sorted_unique(eng.select(self.layer, x[0, -1]))          # 1. predict
        eng.steps[-1].needed.append(needed)
        y = torch.zeros_like(x)  # stays zero if the predictor selects no neuron
        for part in split_needed(needed, self.cache.capacity):           # (one part unless it overflows)
            t0 = time.perf_counter()
            plan = self.cache.plan(part)                                 # 2. window bookkeeping
            free_rows = self.cache.reserve(plan)                         #    delete evicted rows
            t1 = time.perf_counter()
            pending = eng.reader.submit(self.layer, plan.load, out=free_rows)  # 3. flash -> DRAM, in place ...
            t2 = time.perf_counter()
            try:
                y = y + self.compute(x, plan.hits, self.cache.slot[plan.hits])   # ... while the cached ones compute
            finally:
                t3 = time.perf_counter()
                got = pending.wait()
            t4 = time.perf_counter()
            self.cache.commit(plan)                                      # 4. append the new rows
            t5 = time.perf_counter()
            y = y + self.compute(x, plan.load, free_rows)                # 5. and the new ones
            eng.steps[-1].layers.append(LayerStep(
                predicted=plan.needed.size, cached=plan.hits.size, read=plan.load.size, evicted=plan.evict.size,
                bytes_read=got.stats.bytes_read, bytes_needed=got.stats.bytes_needed, requests=got.stats.requests,
                io_seconds=(t2 - t1) + (t4 - t3), mm_seconds=(t1 - t0) + (t5 - t4), overlap_seconds=t3 - t2))
        b2 = self.biases.get("fc2", self.biases.get("down_proj"))
        return y if b2 is None else y + b2

    def compute(self, x: torch.Tensor, ids: np.ndarray, rows) -> torch.Tensor | int:
        """The FFN output (without the down bias) of neurons `ids`, whose bundles are `rows`: cache
        slots to gather (the hits, anywhere in rows[:n]) or the block of rows just read (a numpy
        view, used in place). 0 when `ids` is empty."""
        if ids.size == 0:
            return 0
        if self.gated and "gate_proj" in self.biases:
            raise FlashnbError("gated FFNs with biases (mlp_bias) are not supported by the engine")
        if isinstance(rows, np.ndarray) and rows.ndim == 1:  # slots
            rows = torch.index_select(self.cache.rows, 0, torch.from_numpy(rows))
        else:
            rows = torch.from_numpy(rows)
        return sparse_ffn(x, rows, ids, self.biases.get("fc1"), self.act, self.gated, self.d)


def sparse_ffn(x: torch.Tensor, rows: torch.Tensor, ids: np.ndarray, up_bias: torch.Tensor | None, act,
               gated: bool, d: int) -> torch.Tensor:
    """One token's FFN output (without the down bias) from the bundles `rows` of neurons `ids`.

    rows: [n, P * d] bundles (up | down, or gate | up | down when `gated`). The up projection runs
    at the rows' precision; the down projection only over the neurons whose activation is not zero
    (a ReLU zero contributes nothing), upcast to float32, because half-precision vector-matrix
    products of this shape are slow on CPUs without native fp16 arithmetic.
    """
    if gated:
        h = act(F.linear(x, rows[:, :d])) * F.linear(x, rows[:, d:2 * d])
        col = 2 * d
    else:
        h = act(F.linear(x, rows[:, :d], None if up_bias is None else up_bias.index_select(0, torch.from_numpy(ids))))
        col = d
    h = h.reshape(-1)
    live = torch.nonzero(h).reshape(-1)
    down = torch.index_select(rows, 0, live)[:, col:].float()
    y = h.index_select(0, live).float() @ down
    return y.to(x.dtype).reshape(x.shape)


class TokenLoop:
    """Runs `self.model` one token at a time and keeps a `TokenStep` per token in `self.steps`.

    Subclasses build `self.model` (a resident model whose FFNs append LayerSteps) and `self.limit`.
    """

    model: nn.Module
    steps: list[TokenStep]

    @torch.no_grad()
    def step(self, token: int, kv) -> torch.Tensor:
        """Run one token through the model; returns its logits [vocab] (float32)."""
        self.steps.append(TokenStep(token))
        self.before_token()
        r0, t0 = process_read_bytes(), time.perf_counter()
        logits = self.model(torch.tensor([[token]]), kv)[0, -1]
        self.steps[-1].wall_seconds = time.perf_counter() - t0
        self.steps[-1].storage_read_bytes = process_read_bytes() - r0
        return logits

    def before_token(self) -> None:
        """Hook run before each token, outside its timing (baselines evict the page cache here)."""

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling=None,
                 eos_id: int | None = None) -> Iterator[int]:
        """Yield new token ids; the prompt runs token by token too, so every step is recorded."""
        from flashnb.generate import check_context, decode

        check_context(prompt_ids, max_new_tokens, self.model.config.max_position_embeddings)
        kv = self.model.new_cache(1, len(prompt_ids) + max_new_tokens)
        return decode(lambda ids: [self.step(t, kv) for t in ids][-1], prompt_ids, max_new_tokens, sampling, eos_id)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FlashEngine(TokenLoop):
    """A model run from a flash store under a memory budget, token by token.

    `predictors`: a LowRankPredictors set for policy.predictor == "learned" (ignored otherwise).
    `profile`: a device profile (flashnb.profile.Profile) for the reader's coalescing gap.
    """

    def __init__(self, store: FlashStore | str, policy: Policy | None = None, predictors=None, profile=None):
        self.store = store if isinstance(store, FlashStore) else FlashStore.open(store)
        self.policy = policy = policy or Policy()
        st = self.store
        self.dtype = st.dtype
        self.predictors = self._select_predictors(predictors)
        self.memory = self._plan_memory()
        shared = None
        if policy.window == 0:  # nothing survives a layer, so every layer uses the same rows
            shared = NeuronCache(st.ffn_dim, self.memory.capacity_rows, st.row_values, 0, self.dtype)
        caches = [shared or NeuronCache(st.ffn_dim, self.memory.capacity_rows, st.row_values, policy.window,
                                        self.dtype) for _ in range(st.num_layers)]
        self.model = resident_model(st, lambda i, b: FlashFFN(self, i, b, caches[i]), dtype=self.dtype)
        self.reader = NeuronReader(st, ReaderConfig(threads=policy.threads, gap_bytes=policy.gap_bytes), profile)
        self.steps: list[TokenStep] = []
        self._all = np.arange(st.ffn_dim, dtype=np.int64)

    # -- set-up -------------------------------------------------------------------------------
    def _select_predictors(self, predictors):
        kind = self.policy.predictor
        if kind == "oracle":
            from flashnb.predictor import OraclePredictor

            return OraclePredictor(self.store.load_model(dtype=self.dtype))
        if kind == "learned":
            if predictors is None:
                raise FlashnbError("policy.predictor is 'learned' but no predictors were given; pass "
                                   "predictors=load_predictors(FOLDER) or use predictor='oracle'/'none'")
            c = self.store.config
            if (predictors.n_layers, predictors.d_model, predictors.ffn_dim) != (
                    c.num_hidden_layers, c.hidden_size, c.ffn_dim):
                raise FlashnbError(f"the predictors cover {predictors.n_layers} layers, d_model "
                                   f"{predictors.d_model}, ffn_dim {predictors.ffn_dim}; the store's model has "
                                   f"{c.num_hidden_layers}, {c.hidden_size}, {c.ffn_dim}: use predictors "
                                   "trained for this model")
            for p in predictors.layers:
                p.to(self.dtype)
        return predictors

    def _plan_memory(self) -> MemoryPlan:
        pred_bytes = 0
        if self.policy.predictor == "learned":
            pred_bytes = sum(_tensor_bytes(p.parameters()) for p in self.predictors.layers)
        return memory_plan(self.store, self.policy, pred_bytes)

    # -- the token loop ----------------------------------------------------------------------
    def select(self, layer: int, x: torch.Tensor) -> np.ndarray:
        """Neuron ids (int64, ascending) that `layer` loads for FFN input x [d_model]."""
        if self.policy.predictor == "none":
            return self._all
        return self.predictors.predict_ids(layer, x).numpy()

    def close(self) -> None:
        self.reader.close()


def memory_plan(store: FlashStore, policy: Policy, predictor_bytes: int = 0) -> MemoryPlan:
    """Split the budget: DRAM tensors and predictors first, the rest to neuron caches (one per layer,
    or one shared when window = 0). Raises a clear error when too little is left."""
    st = store
    item = st.np_dtype.itemsize
    dram_bytes = _dram_file_bytes(st)  # held at the store's precision
    ffn_bytes = st.num_layers * st.ffn_dim * st.neuron_bytes
    model_bytes = dram_bytes + ffn_bytes
    budget = int(policy.memory_budget * model_bytes) if policy.memory_budget <= 1 else int(policy.memory_budget)
    row_bytes = st.neuron_bytes + 3 * 8  # the row plus its pointer-array entries (ids, slot, last use)
    free = budget - dram_bytes - predictor_bytes
    caches = 1 if policy.window == 0 else st.num_layers
    capacity = min(st.ffn_dim, max(0, free) // (caches * row_bytes))
    need = 1  # a token needing more neurons than a cache holds is served in parts (cache.split_needed)
    c = st.config
    kv = 2 * c.num_hidden_layers * c.num_kv_heads * c.head_dim * c.max_position_embeddings * item
    if capacity < need:
        fits = (dram_bytes + predictor_bytes + need * caches * row_bytes) / model_bytes
        raise FlashnbError(
            f"memory budget of {budget / 2**20:.2f} MiB ({_pct(budget, model_bytes)} of the model's "
            f"{model_bytes / 2**20:.2f} MiB) is too small: DRAM tensors take {dram_bytes / 2**20:.2f} MiB, "
            f"predictors {predictor_bytes / 2**20:.2f} MiB, leaving room for {capacity} neuron rows per cache "
            f"where at least {need} are needed; raise the budget to at least {min(1.0, fits):.2f} of the model")
    return MemoryPlan(model_bytes, budget, dram_bytes, predictor_bytes, caches * capacity * row_bytes, capacity, kv)


def _pct(a: float, b: float) -> str:
    return f"{100 * a / b:.0f}%"


def _dram_file_bytes(store: FlashStore) -> int:
    """Bytes of the DRAM-resident tensors at the store's precision (from the safetensors header)."""
    from safetensors import safe_open

    total = 0
    with safe_open(store.dram_path, framework="pt") as h:
        for k in h.keys():
            s = h.get_slice(k)
            total += int(np.prod(s.get_shape())) * store.np_dtype.itemsize
    return total
