"""The flash engine: LLM in a flash's per-token loop.

Everything but the FFN weight matrices stays in DRAM. For every token and layer, `FlashFFN.forward`

    1. predicts the neurons this token needs           (a predictor, §3.1); with pinned rows, the
       hot ones among them are already in DRAM for the whole run (PowerInfer's hot neurons)
    2. plans the window: hits, loads, evictions         (windowing, §3.1)
    3. deletes the evicted rows, making room            (memory management, §3.3)
    4. reads the missing bundles from flash into place  (direct I/O, §3.2), and while the reads
       are in flight computes the FFN of the neurons already in DRAM
    5. appends the new rows                             (memory management, §3.3)
    6. computes the FFN of the neurons just read        (only this token's neurons contribute)
    7. with lookahead predictors, guesses the next layer's neurons and starts their reads, which fly
       while the next layer's attention computes (its exact step 2 then loads only what the guess missed)

`FlashEngine.generate` runs tokens one at a time through the model. Timing and statistics reach a
`Recorder` (flashnb.core.records) through the steps it wraps; the loop itself holds no clock.
Memory is accounted in bytes (flashnb.core.memory): the budget covers the model's weights held in
DRAM (resident tensors, predictors, neuron rows); the KV cache is activations, reported beside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from flashnb.core.defaults import IN_FLIGHT, MEMORY_BUDGET, WINDOW
from flashnb.core.ffn import layer_math
from flashnb.core.generate import SamplingConfig, check_context, decode
from flashnb.core.memory import MemoryPlan, NeuronRows, budget_bytes, plan_memory
from flashnb.core.pinning import HotNeurons, pinned_ids
from flashnb.core.predictor import LowRankPredictors, Predictor
from flashnb.core.reader import NeuronReader, PendingRead, ReaderConfig
from flashnb.core.records import Recorder, TokenStep
from flashnb.core.resident import resident_model
from flashnb.core.store import FlashStore
from flashnb.core.thresholds import GateThresholds, Thresholds, check_thresholds
from flashnb.core.window import Window, WindowPlan, check_lookahead_window, in_file_order, split_predicted
from flashnb.errors import FlashnbError


@dataclass(frozen=True)
class Policy:
    """How the engine keeps and reads the FFN.

    window: keep the neurons needed by the previous `window` tokens in DRAM (0 = keep nothing).
    memory_budget: DRAM for the model's weights: a fraction of the model's bytes (a float in (0, 1])
        or bytes (an int).
    in_flight: reads in flight: the AIO queue depth (reader threads where native AIO is unavailable).
    gap_bytes: the reader's coalescing gap (`flashnb.device.profile.coalescing_gap` gives a device's).
    pinned: rows per layer that hold the layer's hot neurons for the whole run (PowerInfer), taken from
        the budget before the window's rows (`flashnb.core.simulate.choose_pinned` picks a split).
    """

    window: int = WINDOW
    memory_budget: float | int = MEMORY_BUDGET
    in_flight: int = IN_FLIGHT
    gap_bytes: int = 0
    pinned: int = 0

    def __post_init__(self):
        if isinstance(self.window, bool) or not isinstance(self.window, (int, np.integer)) or self.window < 0:
            raise FlashnbError(f"window must be a whole number of tokens >= 0, got {self.window!r}")
        budget_bytes(self.memory_budget, 1)  # a fraction in (0, 1] or bytes: one clear error otherwise
        if isinstance(self.in_flight, bool) or not isinstance(self.in_flight, (int, np.integer)) or self.in_flight < 1:
            raise FlashnbError(f"reads in flight must be a whole number >= 1, got {self.in_flight!r}")
        if isinstance(self.gap_bytes, bool) or not isinstance(self.gap_bytes, (int, np.integer)) or self.gap_bytes < 0:
            raise FlashnbError(f"gap_bytes must be a whole number of bytes >= 0, got {self.gap_bytes!r}")
        if isinstance(self.pinned, bool) or not isinstance(self.pinned, (int, np.integer)) or self.pinned < 0:
            raise FlashnbError(f"pinned rows must be a whole number >= 0, got {self.pinned!r}")


class FlashFFN(nn.Module):
    """One layer's FFN whose weights live on flash; see the module docstring for the seven steps."""

    def __init__(self, engine: "FlashEngine", layer: int, biases: dict[str, torch.Tensor], window: Window,
                 rows: NeuronRows, pinned: NeuronRows | None):
        super().__init__()
        self.layer, self.rows, self.pinned = layer, rows, pinned
        self.placed = engine.store.placed_rows(layer)  # each neuron's row on flash, when a placement moves them
        self.is_pinned = None if pinned is None else pinned.slot >= 0
        self.math = layer_math(engine.store, layer, biases, engine.thresholds)
        rec = engine.recorder
        self.predict = rec.timed("predict", engine.predictor.select)
        self.plan, self.advance = rec.timed("window", window.plan), rec.timed("window", window.advance)
        self.split_pinned = rec.timed("window", self._split_pinned)
        self.make_room, self.commit = rec.timed("memory", rows.make_room), rec.timed("memory", rows.commit)
        self.submit, self.wait = rec.timed("submit", engine.reader.submit), rec.timed("wait", PendingRead.wait)
        self.compute, self.compute_held = rec.timed("ffn", self._compute), rec.timed("ffn", self._compute_held)
        self.record, self.record_set, self.record_read = rec.layer, rec.predicted, rec.read
        self.window, self.engine = window, engine
        self.prefetched: tuple[PendingRead, WindowPlan] | None = None  # reads a lookahead started for this layer
        self.guess = rec.timed("predict", engine.lookahead.select) if engine.lookahead else None
        self.plan_prefetch, self.admit = rec.timed("window", window.plan_prefetch), rec.timed("window", window.admit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [1, 1, d_model], one token
        predicted = self.predict(self.layer, x[0, -1])                     # 1. predict
        self.record_set(predicted)
        hot, predicted = self.split_pinned(predicted)                      #    (hot neurons stay pinned in DRAM)
        landed = self.land()                                               #    (the reads a lookahead started)
        y = torch.zeros_like(x)
        for part in split_predicted(predicted, self.rows.capacity, self.placed):  # (one part unless it overflows)
            plan = self.plan(part)                                         # 2. window: hits, loads, evictions
            loaded = in_file_order(plan.loaded, self.placed)               #    (in the order they lie on flash)
            free = self.make_room(plan.evicted, loaded.size)               # 3. delete the evicted rows
            pending = self.submit(self.layer, loaded, out=free)            # 4. flash -> DRAM, in place ...
            try:
                y += self.compute_held(x, plan.cached, hot)                #    ... while the held ones compute
            finally:
                got = self.wait(pending)
            self.commit(loaded)                                            # 5. append the new rows
            self.advance(plan)
            y += self.compute(x, loaded, free)                             # 6. compute the new ones
            self.record_read(got.stats)
            self.record(plan, hot.size, landed)
            hot = hot[:0]
        self.look_ahead(x)                                                 # 7. start the next layer's reads
        return self.math.finish(y)

    def land(self) -> np.ndarray | None:
        """Commit the rows a lookahead read for this layer and return their neurons (None without one)."""
        if self.prefetched is None:
            return None
        pending, plan = self.prefetched
        self.prefetched = None
        self.record_read(self.wait(pending).stats)
        self.commit(plan.loaded)
        self.admit(plan)
        return plan.loaded

    def look_ahead(self, x: torch.Tensor) -> None:
        """Guess the next layer's neurons from this layer's FFN input and start reading the missing ones,
        so that they fly while the next layer's attention computes (Deja Vu's lookahead)."""
        nxt = self.engine.ffns[self.layer + 1] if self.guess and self.layer + 1 < len(self.engine.ffns) else None
        if nxt is None:
            return
        guessed = self.guess(self.layer, x[0, -1])
        self.engine.recorder.guessed(self.layer + 1, guessed)
        plan = nxt.plan_prefetch(nxt.split_pinned(guessed)[1])
        plan = replace(plan, loaded=in_file_order(plan.loaded, nxt.placed))
        free = nxt.make_room(plan.evicted, plan.loaded.size)
        nxt.prefetched = (self.submit(nxt.layer, plan.loaded, out=free), plan)

    def _split_pinned(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the pinned ones of `ids`, the rest), both ascending."""
        if self.pinned is None:
            return ids[:0], ids
        hot = self.is_pinned[ids]
        return ids[hot], ids[~hot]

    def _compute(self, x: torch.Tensor, ids: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        """The FFN contribution of neurons `ids` from the rows just read into `rows`."""
        return self.math.partial(x, torch.from_numpy(rows), ids)

    def _compute_held(self, x: torch.Tensor, cached: np.ndarray, hot: np.ndarray) -> torch.Tensor:
        """The FFN contribution of neurons in DRAM: `cached` in the window's rows, `hot` in the pinned rows."""
        block = torch.index_select(self.rows.rows, 0, torch.from_numpy(self.rows.slot[cached]))
        if hot.size:
            pinned = torch.index_select(self.pinned.rows, 0, torch.from_numpy(self.pinned.slot[hot]))
            block, cached = torch.cat((block, pinned)), np.concatenate((cached, hot))
        return self.math.partial(x, block, cached)


class TokenLoop:
    """Runs `self.model` one token at a time; `self.recorder` keeps a TokenStep per token.

    Subclasses build `self.model` (a resident model whose FFNs record their layers) and `self.recorder`.
    """

    model: nn.Module
    recorder: Recorder

    @property
    def steps(self) -> list[TokenStep]:
        return self.recorder.steps

    @torch.no_grad()
    def step(self, token: int, kv) -> torch.Tensor:
        """Run one token through the model; returns its logits [vocab] (float32)."""
        self.before_token()
        self.recorder.start_token(token)
        try:
            self.within_token()
            logits = self.model(torch.tensor([[token]]), kv)[0, -1]
        except BaseException:
            self.abandon()
            raise
        self.recorder.end_token()
        return logits

    def abandon(self) -> None:
        """A token failed half way: settle what it left in flight and in DRAM (FlashEngine.abandon)."""

    def before_token(self) -> None:
        """Hook run before each token, outside its timing (baselines evict the page cache here)."""

    def within_token(self) -> None:
        """Hook run at the start of each token, inside its timing (the paper's naive moves the rest of the
        model here)."""

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig | None = None,
                 eos_id: int | None = None) -> Iterator[int]:
        """Yield new token ids; the prompt runs token by token too, so every step is recorded."""
        check_context(prompt_ids, max_new_tokens, self.model.config)
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

    `predictor`: which neurons each token loads (flashnb.core.predictor: LowRankPredictors,
    OraclePredictor, AllNeurons). `policy`: window, memory budget, reads in flight, coalescing gap.
    `lookahead`: lookahead predictors (LowRankPredictors trained with `flashnb train-predictors
    --lookahead`), which start each layer's reads one layer early; they need a window of at least 1.
    `hot`: the hot neurons (flashnb.core.pinning.HotNeurons) that `policy.pinned` rows per layer hold;
    they are read once, here.
    `thresholds`: a SwiGLU model's (flashnb.core.thresholds): the engine then runs the thresholded model
    (taken from the predictor when it is `GateThresholds`).
    """

    def __init__(self, store: FlashStore | str | Path, predictor: Predictor, policy: Policy | None = None,
                 lookahead: LowRankPredictors | None = None, hot: HotNeurons | None = None,
                 thresholds: Thresholds | None = None):
        self.store = st = store if isinstance(store, FlashStore) else FlashStore.open(store)
        if thresholds is None and isinstance(predictor, GateThresholds):
            thresholds = predictor.thresholds
        if thresholds is not None:
            check_thresholds(thresholds, st.config)
        self.thresholds = thresholds
        self.policy = policy = policy or Policy()
        self.predictor = _checked(predictor, st)
        self.lookahead = _checked(lookahead, st, lookahead=True) if lookahead is not None else None
        if self.lookahead is not None:
            check_lookahead_window(policy.window)
        held = self.predictor.memory_bytes(st.np_dtype.itemsize) + (
            self.lookahead.memory_bytes(st.np_dtype.itemsize) if self.lookahead is not None else 0)
        pins = pinned_ids(hot, policy.pinned, st.num_layers, st.ffn_dim)
        self.memory: MemoryPlan = plan_memory(st.memory_shape(), policy.memory_budget, policy.window, held,
                                              policy.pinned)
        cap = self.memory.capacity_rows
        if policy.window == 0:  # nothing survives a layer, so every layer uses the same rows
            shared = (Window(st.ffn_dim, cap, 0), NeuronRows(st.ffn_dim, cap, st.row_width, st.row_dtype))
            dram = [shared] * st.num_layers
        else:
            dram = [(Window(st.ffn_dim, cap, policy.window), NeuronRows(st.ffn_dim, cap, st.row_width, st.row_dtype))
                    for _ in range(st.num_layers)]
        self.recorder = Recorder()
        self.reader = NeuronReader(st, ReaderConfig(in_flight=policy.in_flight, gap_bytes=policy.gap_bytes))
        try:
            pinned = [self._read_pinned(layer, ids) if ids.size else None for layer, ids in enumerate(pins)]
            self.ffns: list[FlashFFN] = []
            self.model = resident_model(st, lambda i, b: self._ffn(FlashFFN(self, i, b, *dram[i], pinned[i])),
                                        dtype=st.dtype)
        except BaseException:
            self.reader.close()   # its file and AIO context, which a failed constructor would leave open
            raise

    def _read_pinned(self, layer: int, ids: np.ndarray) -> NeuronRows:
        """A layer's pinned rows, read from flash once."""
        st = self.store
        rows = NeuronRows(st.ffn_dim, ids.size, st.row_width, st.row_dtype)
        self.reader.read(layer, ids, out=rows.make_room(ids[:0], ids.size))
        rows.commit(ids)
        return rows

    def _ffn(self, ffn: FlashFFN) -> FlashFFN:
        self.ffns.append(ffn)
        return ffn

    def abandon(self) -> None:
        """A token stopped half way (an error, or Ctrl-C in a notebook): its reads are landed, and every
        layer's window and rows are emptied, since a layer may have deleted rows its window still counts;
        the next token starts with nothing in DRAM but the pinned rows, and stays exact."""
        try:
            for ffn in self.ffns:
                ffn.land()
        finally:
            for ffn in self.ffns:
                ffn.prefetched = None
                ffn.window.clear()
                ffn.rows.clear()

    def close(self) -> None:
        self.reader.close()


def _checked(predictor: Predictor, store: FlashStore, lookahead: bool = False) -> Predictor:
    """The predictor, checked against the store's model (and held at the store's precision)."""
    if not isinstance(predictor, Predictor):
        raise FlashnbError(f"predictor must be a flashnb predictor (LowRankPredictors, OraclePredictor or "
                           f"AllNeurons), got {type(predictor).__name__}")
    c = store.config
    if lookahead and not (isinstance(predictor, LowRankPredictors) and predictor.lookahead):
        raise FlashnbError("lookahead must be lookahead predictors (flashnb train-predictors --lookahead writes them "
                           "to PREDICTORS/lookahead)")
    if not lookahead and getattr(predictor, "lookahead", False):
        raise FlashnbError("these are lookahead predictors (each guesses the next layer): pass them as lookahead=, "
                           "and the same-layer set as the predictor")
    if isinstance(predictor, LowRankPredictors):
        if (predictor.n_layers + lookahead, predictor.d_model, predictor.ffn_dim) != (
                c.num_hidden_layers, c.hidden_size, c.ffn_dim):
            raise FlashnbError(f"the predictors cover {predictor.n_layers} layers, d_model {predictor.d_model}, "
                               f"ffn_dim {predictor.ffn_dim}; the store's model has {c.num_hidden_layers}, "
                               f"{c.hidden_size}, {c.ffn_dim}: use predictors trained for this model")
        if store.fingerprint and predictor.fingerprint != store.fingerprint:
            raise FlashnbError(f"the predictors belong to another model (fingerprint {predictor.fingerprint}; the store "
                               f"{store.path} holds {store.fingerprint}): train predictors for this model with "
                               "`flashnb train-predictors --model HF_FOLDER`")
        predictor.hold_as(store.dtype)
    elif getattr(predictor, "ffn_dim", c.ffn_dim) != c.ffn_dim:
        raise FlashnbError(f"the predictor selects among {predictor.ffn_dim} neurons per layer; the store's model "
                           f"has {c.ffn_dim}")
    return predictor
