"""The bench's bare engine: "all" with its own bookkeeping free, measured.

Between "all" and its lower bound (the floor, plus its reads alone, less the floor's FFN math) lies the
engine's own work around each read: planning the window, moving rows, planning the requests and building
their iocbs, the recorder, Python between the steps. How much of that gap would an engine close whose
bookkeeping cost nothing (a compiled one, say)? `BareEngine` answers by measurement. It follows "all" (a
FlashEngine) token by token, and before each token's clock starts it does all of that token's bookkeeping:
the window's hits and loads of every reader call "all" made (from the neuron sets "all" recorded, through
windows of its own, as `flashnb.core.simulate` does), each call's requests as the kernel iocbs "all" submitted,
and where the rows land. Then it runs the token: the model without its FFNs, every layer's predictor (run
for its time; the sets it chooses are known), and per reader call the prepared iocbs submitted, the FFN math
of the neurons already in DRAM while they fly, the completions, the checksums, and the FFN math of the
neurons read. What is left is what no bookkeeping can remove.

Its logits equal all's bit for bit: the same neurons, the same rows, the same sums in the same order. The
rows of the neurons in DRAM are gathered from the whole FFN held in DRAM (the same gather "all" does from its
window's rows), so it holds more than the budget: a measuring device, not an engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from flashnb.core import aio
from flashnb.core.engine import FlashEngine, TokenLoop
from flashnb.core.ffn import layer_math
from flashnb.core.io import aligned_empty
from flashnb.core.reader import NeuronReader, ReaderConfig, ReadStats
from flashnb.core.records import Recorder
from flashnb.core.resident import resident_model
from flashnb.core.window import WindowPlan, layer_windows, reader_calls
from flashnb.errors import FlashnbError


@dataclass
class PreparedCall:
    """One reader call of all's, its bookkeeping done: what stays, what is read, and the kernel requests."""

    plan: WindowPlan            # the window's hits (plan.cached: the neurons in DRAM), loads and evictions
    held_index: torch.Tensor    # the rows of plan.cached in the layer's whole FFN
    loaded: np.ndarray          # neurons read, in the order they lie on flash
    file_rows: np.ndarray       # ... their rows in the FFN file
    rows: np.ndarray            # where they land: [loaded, row_width], block-aligned
    iocbs: np.ndarray           # the requests, as all submitted them (empty when nothing is read)
    iov: np.ndarray | None      # the iovecs the iocbs point to
    lengths: np.ndarray         # bytes of each request
    stats: ReadStats            # what the call read, for the records
    batch: aio.AioBatch | None = field(default=None, repr=False)

    @property
    def flying(self) -> bool:   # the recorder counts FFN math as overlap while reads fly
        return self.batch is not None


class BareFFN(nn.Module):
    """One layer's FFN, every reader call prepared before the token: submit, compute, wait, compute."""

    def __init__(self, eng: "BareEngine", layer: int, biases: dict[str, torch.Tensor]):
        super().__init__()
        self.layer, self.eng = layer, eng
        self.math = layer_math(eng.store, layer, biases, eng.source.thresholds)
        self.ffn = torch.from_numpy(eng.store.ffn_rows(layer))  # the layer's whole FFN, in DRAM
        rec = eng.recorder
        self.predict = rec.timed("predict", eng.predictor.select)
        self.submit, self.wait = rec.timed("submit", eng.start), rec.timed("wait", eng.finish)
        self.compute, self.compute_held = rec.timed("ffn", self._compute), rec.timed("ffn", self._compute_held)
        self.record, self.record_read = rec.layer, rec.read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.predict(self.layer, x[0, -1])                  # its sets are known: run for its time
        y = torch.zeros_like(x)
        for call in self.eng.prepared[self.layer]:
            self.submit(call)
            try:
                y += self.compute_held(x, call)
            finally:
                self.wait(call)
            y += self.compute(x, call)
            self.record_read(call.stats)
            self.record(call.plan)
        return self.math.finish(y)

    def _compute_held(self, x: torch.Tensor, call: PreparedCall) -> torch.Tensor:
        return self.math.partial(x, torch.index_select(self.ffn, 0, call.held_index), call.plan.cached)

    def _compute(self, x: torch.Tensor, call: PreparedCall) -> torch.Tensor:
        return self.math.partial(x, torch.from_numpy(call.rows), call.loaded)


class BareEngine(TokenLoop):
    """`source` ("all", a FlashEngine) with its bookkeeping done before each token's clock starts (see the
    module doc). `generate` catches up with the tokens the source has run since the last step."""

    def __init__(self, source: FlashEngine):
        self.source, self.store, policy = source, source.store, source.policy
        st = self.store
        if policy.pinned or source.lookahead is not None:
            raise FlashnbError("the bare engine mirrors an engine's window only: run it on an engine without pinned "
                               "rows or lookahead predictors")
        self.reader = NeuronReader(st, ReaderConfig(in_flight=policy.in_flight, gap_bytes=policy.gap_bytes))
        try:
            if self.reader.backend != "aio" or not self.reader.direct:
                raise FlashnbError("the bare engine needs direct I/O through Linux native AIO, which this store's "
                                   "file system or this machine does not offer")
            self.cap = source.memory.capacity_rows
            self.buffer = aligned_empty((self.cap, st.row_width), st.row_dtype)  # where reads land, a call at a time
            self.reader.prepare(0, np.arange(1), self.buffer[:1])  # one clear error where rows cannot go straight in
            self.ctx = aio.acquire(policy.in_flight)
        except BaseException:
            self.reader.close()
            raise
        self.predictor = source.predictor
        self.windows = layer_windows(st.num_layers, st.ffn_dim, self.cap, policy.window)
        self.placed = [st.placed_rows(layer) for layer in range(st.num_layers)]
        self.prepared: list[list[PreparedCall]] = []
        self.recorder = Recorder()
        self.model = resident_model(st, lambda i, b: BareFFN(self, i, b), dtype=st.dtype)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling=None, eos_id: int | None = None):
        """Run, once per step of the caller, the tokens the source has run since the last step; yields the last."""
        kv = self.model.new_cache(1, len(prompt_ids) + max_new_tokens)
        for _ in range(max_new_tokens):
            new = self.source.steps[len(self.steps):]
            if not new:
                return
            for s in new:
                self.step(s.token, kv)
            yield new[-1].token

    def before_token(self) -> None:
        """The token's bookkeeping, outside its clock: every reader call all made for it, prepared."""
        sets = self.source.steps[len(self.steps)].predicted_sets
        self.prepared = [self._prepare(layer, ids) for layer, ids in enumerate(sets)]

    def _prepare(self, layer: int, ids: np.ndarray) -> list[PreparedCall]:
        st, window, placed = self.store, self.windows[layer], self.placed[layer]
        calls = []
        for plan, loaded in reader_calls(window, ids, self.cap, placed):
            file_rows, rows = st.file_rows(layer, loaded), self.buffer[:loaded.size]
            iocbs, iov, lengths = self.reader.prepare(layer, file_rows, rows) if loaded.size else (
                np.zeros(0, aio.IOCB), None, np.zeros(0, np.int64))
            stats = ReadStats(layer, loaded.size, loaded.size, lengths.size, 0, loaded.size * st.neuron_bytes,
                              int(lengths.sum()), 0.0, self.ctx.depth, True, "scatter", self.reader.gap_bytes,
                              lengths, "aio")
            calls.append(PreparedCall(plan, torch.from_numpy(plan.cached), loaded, file_rows, rows,
                                      iocbs, iov, lengths, stats))
        return calls

    def start(self, call: PreparedCall) -> PreparedCall:
        """Submit a prepared call's requests (the kernel's part of all's submit)."""
        if call.iocbs.size:
            call.batch = self.ctx.start(call.iocbs)
        return call

    def finish(self, call: PreparedCall) -> None:
        """Wait for a call's requests and check its rows, as all's wait does."""
        if call.batch is None:
            return
        done, call.batch = call.batch.wait(), None
        if not np.array_equal(done, call.lengths):
            raise FlashnbError(f"the bare engine's reads of {self.store.ffn_path} came back short or failed; check "
                               "the disk (dmesg) and the store (`flashnb verify`)")
        call.stats.verify_seconds = self.reader.check(call.stats.layer, call.file_rows, call.rows)

    def abandon(self) -> None:
        """A token stopped half way: land the reads still in flight (their buffers must outlive them)."""
        for call in (c for calls in self.prepared for c in calls if c.batch is not None):
            call.batch, batch = None, call.batch
            batch.wait()

    def close(self) -> None:
        if self.ctx is not None:
            aio.release(self.ctx)
            self.ctx = None
        self.reader.close()
