"""What the flash engine is measured against, through the same per-token statistics.

* `HybridEngine`: as many FFN neurons as the memory budget allows stay pinned in DRAM; the rest of
  every layer's FFN is read from flash (direct I/O) for every token.
* `MmapEngine`: llama.cpp's regime when a model exceeds RAM: ffn.bin memory-mapped, weights paged in
  by the kernel as the dense FFN touches them; the file is evicted from the page cache before each
  token, so every token faults its FFN in again.
* `DenseInDram`: the whole model in DRAM, nothing read per token: the reference.
* `FloorEngine`: a token's unavoidable work with a predictor (the model without FFNs, predictors,
  the sparse FFN math of the chosen neurons), the FFN in DRAM: the floor an engine approaches.
* `ReadsAlone`: the disk and the kernel alone on another engine's reads (the same requests, layer by
  layer, nothing computed): with the floor, the lower bound of that engine on this machine.
* `AccelerateOffload`: a real peer, the same checkpoint through transformers + accelerate's disk
  offload (every weight in an offload folder, loaded per module per forward); the folder is evicted
  before each token.

The naive baseline (the whole FFN of each layer read every token in large sequential reads) is the
engine itself with the `AllNeurons` predictor and window 0; `WholeModelNaive` is the paper's naive, which
reads the rest of the model every token too (`flashnb bench --scale`).
"""

from __future__ import annotations

import inspect
import mmap
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from flashnb.core import aio
from flashnb.core.defaults import IN_FLIGHT, MEMORY_BUDGET
from flashnb.core.engine import FlashEngine, Policy, TokenLoop
from flashnb.core.ffn import layer_math
from flashnb.core.generate import decode
from flashnb.core.io import AlignedBuffer, aligned_empty, evict, open_for_reading
from flashnb.core.memory import MemoryPlan, hybrid_plan
from flashnb.core.predictor import Predictor
from flashnb.core.reader import NeuronReader, PendingRead, ReaderConfig
from flashnb.core.records import LayerStep, Recorder, TokenStep
from flashnb.core.resident import resident_model
from flashnb.core.store import FlashStore
from flashnb.core.window import WindowPlan, layer_windows, reader_calls
from flashnb.errors import FlashnbError


class HybridFFN(nn.Module):
    def __init__(self, eng: "HybridEngine", layer: int, biases: dict[str, torch.Tensor]):
        super().__init__()
        self.eng, self.layer = eng, layer
        st = eng.store
        self.math = layer_math(st, layer, biases)
        self.pinned_ids = np.arange(eng.memory.pinned_rows)
        self.pinned = torch.from_numpy(eng.reader.read(layer, self.pinned_ids).rows.copy())
        self.pieces = streamed_pieces(eng.memory, st.ffn_dim)
        rec = eng.recorder
        self.submit, self.wait = rec.timed("submit", eng.reader.submit), rec.timed("wait", PendingRead.wait)

    def forward(self, x):
        eng = self.eng
        y = self.math.partial(x, self.pinned, self.pinned_ids)
        buf = eng.buffer
        for ids in self.pieces:
            got = self.wait(self.submit(self.layer, ids, out=buf[: ids.size]))
            y += self.math.partial(x, torch.from_numpy(got.rows), ids)
            eng.recorder.read(got.stats)
            eng.recorder.layer(WindowPlan(ids, ids[:0], ids, ids))
        return self.math.finish(y)


def streamed_pieces(plan: MemoryPlan, ffn_dim: int) -> list[np.ndarray]:
    """The neurons the hybrid baseline reads per layer and token, one array per reader call: the unpinned
    ones, in pieces of at most the buffer's rows (`plan` from hybrid_plan)."""
    streamed = np.arange(plan.pinned_rows, ffn_dim)
    pieces = max(1, -(-streamed.size // plan.capacity_rows)) if plan.capacity_rows else 0
    return np.array_split(streamed, pieces) if pieces else []


def hybrid_calls(store: FlashStore, memory_budget: float | int, reader: NeuronReader) -> list[tuple[int, int]]:
    """(requests, bytes read) of every reader call the hybrid baseline makes per token at `memory_budget`,
    as `reader` plans them, nothing read (notebook 06's budget sweep prices them without running hybrid)."""
    pieces = streamed_pieces(hybrid_plan(store.memory_shape(), memory_budget), store.ffn_dim)   # alike in every layer
    calls = []
    for layer in range(store.num_layers):
        for ids in pieces:
            sizes = reader.request_sizes(layer, ids)
            calls.append((int(sizes.size), int(sizes.sum())))
    return calls


class HybridEngine(TokenLoop):
    """Pin the first neurons of every layer's FFN in DRAM (as many as the budget allows beside the DRAM
    tensors and one buffer for the rest of a layer: flashnb.core.memory.hybrid_plan); read the others
    every token."""

    def __init__(self, store: FlashStore | str, memory_budget: float | int = MEMORY_BUDGET, in_flight: int = IN_FLIGHT,
                 gap_bytes: int = 0):
        self.store = st = store if isinstance(store, FlashStore) else FlashStore.open(store)
        self.memory = hybrid_plan(st.memory_shape(), memory_budget)
        self.reader = NeuronReader(st, ReaderConfig(in_flight=in_flight, gap_bytes=gap_bytes))
        self.buffer = aligned_empty((self.memory.capacity_rows, st.row_width), st.row_dtype)
        self.recorder = Recorder()
        self.model = resident_model(st, lambda i, b: HybridFFN(self, i, b), dtype=st.dtype)

    def close(self) -> None:
        self.reader.close()


class MmapFFN(nn.Module):
    def __init__(self, eng: "MmapEngine", layer: int, biases):
        super().__init__()
        st = eng.store
        self.eng, self.math = eng, layer_math(st, layer, biases)
        self.ids = st.file_order(layer)  # the neuron of each file row (a placement moves them)
        parts = []
        for reg in st.regions(layer):
            a = np.frombuffer(eng.map, dtype=st.row_dtype, count=reg.rows * reg.row_bytes // st.row_dtype.itemsize,
                              offset=reg.offset)
            parts.append(torch.from_numpy(a.reshape(reg.rows, -1)))
        self.parts = parts  # bundled: one [ffn, row_width] view; unbundled: P views of one part each

    def forward(self, x):
        rows = self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts, dim=1)
        return self.math.finish(self.math.partial(x, rows, self.ids))


class MmapEngine(TokenLoop):
    """The dense model with ffn.bin memory-mapped; the page cache is dropped before every token.
    I/O cannot be separated from compute here: the kernel reads pages as the matmuls touch them."""

    def __init__(self, store: FlashStore | str, cold: bool = True):
        self.store = st = store if isinstance(store, FlashStore) else FlashStore.open(store)
        self.cold = cold  # False: the page cache stays warm (what the CPU alone costs)
        self.fd = os.open(st.ffn_path, os.O_RDONLY)
        self.map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY)  # private: writable views, file untouched
        self.recorder = Recorder()
        self.model = resident_model(st, lambda i, b: MmapFFN(self, i, b), dtype=st.dtype)

    def before_token(self) -> None:
        if self.cold:
            self.map.madvise(mmap.MADV_DONTNEED)  # unmap our pages, so the kernel may drop them ...
            evict(self.fd)                        # ... and drop them from the page cache

    def close(self) -> None:
        if self.fd >= 0:
            self.model = None
            try:
                self.map.close()
            except BufferError:  # views still alive somewhere: the mapping goes with them
                pass
            os.close(self.fd)
            self.fd = -1


class AccelerateOffload:
    """transformers + accelerate disk offload of a Hugging Face folder: every weight is written to an
    offload folder and loaded from it module by module on every forward pass. The folder's files are
    evicted from the page cache before each token. Needs `pip install transformers accelerate`."""

    def __init__(self, model_folder: str | Path, dtype: torch.dtype = torch.float16, offload_dir: str | None = None,
                 cold: bool = True):
        try:
            from accelerate import disk_offload
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise FlashnbError("the accelerate peer needs transformers and accelerate: "
                               "pip install transformers accelerate") from None
        self._tmp = None if offload_dir else tempfile.TemporaryDirectory(prefix="flashnb-offload-")
        self.dir = Path(offload_dir or self._tmp.name)
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()   # no "Loading weights" bar in the bench's output or a notebook's
        try:
            model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=dtype).eval()
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        disk_offload(model, offload_dir=str(self.dir), execution_device="cpu")
        self.model = model
        self.files = sorted(self.dir.rglob("*.dat"))
        self.cold = cold  # False: the page cache stays warm (what the CPU alone costs)
        self.offloaded_bytes = sum(f.stat().st_size for f in self.files)
        self.recorder = Recorder()
        self.past = None
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def before_token(self) -> None:
        if not self.cold:
            return
        for f in self.files:
            fd = os.open(f, os.O_RDONLY)
            try:
                evict(fd)
            finally:
                os.close(fd)

    @property
    def steps(self):
        return self.recorder.steps

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling=None, eos_id: int | None = None):
        """Yield new token ids after `prompt_ids`, one `step` per token (as TokenLoop.generate)."""
        return decode(lambda ids: [self.step(t) for t in ids][-1], prompt_ids, max_new_tokens, sampling, eos_id)

    @torch.no_grad()
    def step(self, token: int, kv=None) -> torch.Tensor:
        self.before_token()
        self.recorder.start_token(token)
        ids = torch.tensor([[token]])
        if self._cache_kw == "cache":  # transformers >= 5.x names the KV cache argument `cache`
            out = self.model(input_ids=ids, cache=self.past, use_cache=True)
            self.past = getattr(out, "cache", None) or out.past_key_values
        else:
            out = self.model(input_ids=ids, past_key_values=self.past, use_cache=True)
            self.past = out.past_key_values
        self.recorder.end_token()
        return out.logits[0, -1].float()

    def close(self) -> None:
        self.model = None
        if self._tmp is not None:
            self._tmp.cleanup()


class FloorFFN(nn.Module):
    def __init__(self, eng: "FloorEngine", layer: int, biases: dict[str, torch.Tensor]):
        super().__init__()
        self.layer, self.math = layer, layer_math(eng.store, layer, biases)
        self.rows = torch.from_numpy(eng.store.ffn_rows(layer))  # the layer's whole FFN, in DRAM
        rec = eng.recorder
        self.predict, self.compute = rec.timed("predict", eng.predictor.select), rec.timed("ffn", self._compute)
        self.record = rec.layer

    def forward(self, x):
        ids = self.predict(self.layer, x[0, -1])
        y = self.compute(x, ids)
        self.record(WindowPlan(ids, ids, ids[:0], ids[:0]))
        return self.math.finish(y)

    def _compute(self, x, ids: np.ndarray) -> torch.Tensor:
        return self.math.partial(x, torch.index_select(self.rows, 0, torch.from_numpy(ids)), ids)


class FloorEngine(TokenLoop):
    """The unavoidable work of a token served with `predictor`: the model without its FFNs, the
    predictor of every layer, and the sparse FFN math over the chosen neurons, with the whole FFN
    already in DRAM (no reads, no window, no memory management). What an engine approaches."""

    def __init__(self, store: FlashStore | str, predictor):
        self.store = st = store if isinstance(store, FlashStore) else FlashStore.open(store)
        self.predictor = predictor
        if hasattr(predictor, "hold_as"):
            predictor.hold_as(st.dtype)
        self.recorder = Recorder()
        self.model = resident_model(st, lambda i, b: FloorFFN(self, i, b), dtype=st.dtype)


class DenseInDram(TokenLoop):
    """The whole model in DRAM (flashnb's dense model): the reference that reads nothing per token.
    `DenseInDram(store)` rebuilds it from a store at the store's precision; `DenseInDram(model)` runs
    a model already loaded."""

    def __init__(self, source: FlashStore | str | nn.Module):
        if isinstance(source, nn.Module):
            self.model = source.eval()
        else:
            st = source if isinstance(source, FlashStore) else FlashStore.open(source)
            self.model = st.load_model()
        self.recorder = Recorder()
        self.bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())


class ReadsAlone:
    """The disk and the kernel alone, on the reads of another engine (`source`, a FlashEngine; in the bench,
    "all"): for each token the source ran, the same requests, planned from the neuron sets it recorded
    through windows of its own (as `flashnb.core.simulate`, which equals the engine's reads), issued layer
    by layer as the engine must (a layer's reads complete before the next layer's predictor can run),
    with native AIO and the source's reads in flight, into a scratch buffer. Nothing is computed or
    checked, and the requests are planned before the clock starts: a token's time is only the
    submissions and the completions, the part of the source's I/O no Python can remove.
    Each `generate` step catches up with the tokens the source has run since the last one."""

    def __init__(self, source):
        self.source, st, policy = source, source.store, source.policy
        if source.reader.backend != "aio" or not source.reader.direct:
            raise FlashnbError("measuring reads alone needs direct I/O through Linux native AIO, which this store's "
                               "file system or this machine does not offer")
        if policy.pinned or source.lookahead is not None:
            raise FlashnbError("reads alone mirror an engine's window only: run them on an engine without pinned rows "
                               "or lookahead predictors")
        self.reader = NeuronReader(st, ReaderConfig(in_flight=policy.in_flight, gap_bytes=policy.gap_bytes,
                                                    verify=False))
        try:
            self.ctx = aio.acquire(policy.in_flight)
        except BaseException:
            self.reader.close()
            raise
        self.cap = source.memory.capacity_rows
        self.windows = layer_windows(st.num_layers, st.ffn_dim, self.cap, policy.window)
        self.placed = [st.placed_rows(layer) for layer in range(st.num_layers)]
        self.buffer = aligned_empty((1 << 20,), np.uint8)
        self.recorder = Recorder()

    @property
    def steps(self):
        return self.recorder.steps

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling=None, eos_id: int | None = None):
        """Yield, once per step of the caller, the last token of the source's steps not yet replayed."""
        for _ in range(max_new_tokens):
            new = self.source.steps[len(self.steps):]
            if not new:
                return
            for step in new:
                self.steps.append(self._replay(step))
            yield new[-1].token

    def _replay(self, source_step):
        out = TokenStep(source_step.token)
        for layer, ids in enumerate(source_step.predicted_sets):
            for plan, loaded in reader_calls(self.windows[layer], ids, self.cap, self.placed[layer]):
                offsets, lengths = self.reader.requests(layer, loaded)
                if int(lengths.sum()) > self.buffer.size:
                    self.buffer = aligned_empty((int(lengths.sum()),), np.uint8)
                starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.uint64)
                cbs = aio.pread_iocbs(self.reader.fd, offsets, self.buffer.ctypes.data + starts, lengths)
                t0 = time.perf_counter()
                done = self.ctx.run(cbs) if cbs.size else lengths
                seconds = time.perf_counter() - t0
                if not np.array_equal(done, lengths):
                    raise FlashnbError(f"reading {self.reader.store.ffn_path} alone returned short or failed "
                                       "requests; check the disk (dmesg) and the store (`flashnb verify`)")
                out.layers.append(LayerStep(plan.predicted.size, plan.cached.size, plan.loaded.size,
                                            plan.evicted.size, int(lengths.sum()),
                                            plan.loaded.size * self.reader.store.neuron_bytes, int(lengths.size),
                                            wait_s=seconds))
                out.wall_seconds += seconds
        return out

    def close(self) -> None:
        if self.ctx is not None:
            aio.release(self.ctx)
            self.ctx = None
        self.reader.close()


class WholeModelNaive(FlashEngine):
    """The paper's naive: nothing stays in DRAM between tokens, so every token moves the whole model.
    The engine with every neuron (read with direct I/O, computed) plus, inside each token's time, the
    store's DRAM file read from flash with direct I/O (the weights are then used from their resident
    copy, which holds the same bytes)."""

    def __init__(self, store: FlashStore, predictor: Predictor, policy: Policy):
        super().__init__(store, predictor, policy)
        self.fd, self.direct = open_for_reading(store.dram_path)
        self.size = store.dram_path.stat().st_size
        self.buffer = AlignedBuffer(64 << 20)

    def within_token(self) -> None:
        t0 = time.perf_counter()
        done = 0
        while done < self.size:
            n = os.preadv(self.fd, [self.buffer.view], done)
            if n <= 0:
                break
            done += n
        io = time.perf_counter() - t0
        self.recorder.steps[-1].layers.append(LayerStep(0, 0, 0, 0, done, done, -(-done // self.buffer.nbytes),
                                                        wait_s=io, direct=self.direct))

    def close(self) -> None:
        super().close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
