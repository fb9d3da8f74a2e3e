"""What the flash engine is measured against, through the same per-token statistics.

* `HybridEngine`: as many FFN neurons as the memory budget allows stay pinned in DRAM; the rest of
  every layer's FFN is read from flash (direct I/O) for every token.
* `MmapEngine`: llama.cpp's regime when a model exceeds RAM: ffn.bin memory-mapped, weights paged in
  by the kernel as the dense FFN touches them; the file is evicted from the page cache before each
  token, so every token faults its FFN in again.
* `AccelerateOffload`: a real peer, the same checkpoint through transformers + accelerate's disk
  offload (every weight in an offload folder, loaded per module per forward); the folder is evicted
  before each token.

With `cold=False` mmap and accelerate keep the page cache warm: what they cost the CPU alone, which
the benchmark's cost model adds to their modeled page-in time.

The naive baseline (the whole FFN of each layer read every token in large sequential reads) is the
engine itself with `Policy(predictor="none", window=0)`.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from flashnb.engine import LayerStep, TokenLoop, TokenStep, _dram_file_bytes, sparse_ffn
from flashnb.errors import FlashnbError
from flashnb.models.common import activation
from flashnb.reader import IN_FLIGHT, NeuronReader, ReaderConfig, aligned_empty, evict
from flashnb.resident import resident_model
from flashnb.store import FlashStore


def dense_ffn(x: torch.Tensor, rows: torch.Tensor, d: int, act, gated: bool,
              biases: dict[str, torch.Tensor], b1_ids: torch.Tensor | None = None) -> torch.Tensor:
    """FFN output for x from store rows [n, P*d_model] (neuron-major: up row(s), then down row), with
    the engine's own kernel (flashnb.engine.sparse_ffn), so every baseline computes alike.

    Without biases of the down projection (callers add it once). `b1_ids`: which fc1 bias entries
    belong to the rows (None: rows are neurons 0..n-1).
    """
    ids = np.arange(rows.shape[0]) if b1_ids is None else np.asarray(b1_ids, dtype=np.int64)
    return sparse_ffn(x, rows, ids, None if gated else biases.get("fc1"), act, gated, d)


def _act(store: FlashStore):
    c = store.config
    return activation(c.activation_function if c.model_type == "opt" else c.hidden_act, "config.json")


def _down_bias(biases: dict[str, torch.Tensor]):
    return biases.get("fc2", biases.get("down_proj"))


class HybridFFN(nn.Module):
    def __init__(self, eng: "HybridEngine", layer: int, biases: dict[str, torch.Tensor]):
        super().__init__()
        self.eng, self.layer, self.biases = eng, layer, biases
        st = eng.store
        self.pinned = torch.from_numpy(eng.reader.read(layer, np.arange(eng.pinned)).rows.copy())
        self.streamed_ids = np.arange(eng.pinned, st.ffn_dim)

    def forward(self, x):
        eng, st = self.eng, self.eng.store
        y = dense_ffn(x, self.pinned, st.d_model, eng.act, eng.gated, self.biases)
        pieces = max(1, -(-self.streamed_ids.size // len(eng.scratch))) if len(eng.scratch) else 0
        for ids in np.array_split(self.streamed_ids, pieces) if pieces else []:  # the buffer may hold less than a layer
            t0 = time.perf_counter()
            got = eng.reader.read(self.layer, ids, out=eng.scratch[: ids.size])
            t1 = time.perf_counter()
            y = y + dense_ffn(x, torch.from_numpy(got.rows), st.d_model, eng.act, eng.gated, self.biases,
                              torch.from_numpy(ids))
            eng.steps[-1].layers.append(LayerStep(
                predicted=ids.size, cached=0, read=ids.size, evicted=ids.size, bytes_read=got.stats.bytes_read,
                bytes_needed=got.stats.bytes_needed, requests=got.stats.requests, io_seconds=t1 - t0, mm_seconds=0.0))
        b2 = _down_bias(self.biases)
        return y if b2 is None else y + b2


class HybridEngine(TokenLoop):
    """Pin the first neurons of every layer's FFN in DRAM (as many as the budget allows after the
    DRAM tensors and one layer's read buffer); read the others every token."""

    def __init__(self, store: FlashStore | str, memory_budget: float = 0.5, threads: int = IN_FLIGHT, profile=None):
        self.store = st = store if isinstance(store, FlashStore) else FlashStore.open(store)
        dram = _dram_file_bytes(st)
        model_bytes = dram + st.num_layers * st.ffn_dim * st.neuron_bytes
        budget = int(memory_budget * model_bytes) if memory_budget <= 1 else int(memory_budget)
        nb, L, n = st.neuron_bytes, st.num_layers, st.ffn_dim
        # pinned rows in every layer + one read buffer of the rest: L * pinned + (n - pinned) rows must fit;
        # with less room nothing is pinned and the buffer streams each layer in pieces
        free = budget - dram
        if free < nb:
            raise FlashnbError(f"memory budget {budget / 2**20:.1f} MiB leaves no room for reading FFN rows beside "
                               f"the DRAM tensors ({dram / 2**20:.1f} MiB); raise it")
        self.pinned = int(min(n, max(0, (free - n * nb) // max(1, (L - 1) * nb))))
        buffer_rows = int(min(n - self.pinned, free // nb - L * self.pinned))
        self.budget_bytes, self.model_bytes = budget, model_bytes
        self.used_bytes = dram + (L * self.pinned + buffer_rows) * nb
        self.reader = NeuronReader(st, ReaderConfig(threads=threads), profile)
        self.scratch = aligned_empty((buffer_rows, st.row_values), st.np_dtype)
        self.act, self.gated = _act(st), st.config.model_type != "opt"
        self.steps: list[TokenStep] = []
        self.model = resident_model(st, lambda i, b: HybridFFN(self, i, b), dtype=st.dtype)
        self.steps.clear()

    def close(self) -> None:
        self.reader.close()


class MmapFFN(nn.Module):
    def __init__(self, eng: "MmapEngine", layer: int, biases):
        super().__init__()
        self.eng, self.biases = eng, biases
        st = eng.store
        parts = []
        for reg in st.regions(layer):
            a = np.frombuffer(eng.map, dtype=st.np_dtype, count=reg.rows * reg.row_bytes // st.np_dtype.itemsize,
                              offset=reg.offset)
            parts.append(torch.from_numpy(a.reshape(reg.rows, -1)))
        self.parts = parts  # bundled: one [ffn, P*d] view; unbundled: P views [ffn, d]

    def forward(self, x):
        eng, st = self.eng, self.eng.store
        rows = self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts, dim=1)
        y = dense_ffn(x, rows, st.d_model, eng.act, eng.gated, self.biases)
        b2 = _down_bias(self.biases)
        return y if b2 is None else y + b2


class MmapEngine(TokenLoop):
    """The dense model with ffn.bin memory-mapped; the page cache is dropped before every token.
    I/O cannot be separated from compute here: the kernel reads pages as the matmuls touch them."""

    def __init__(self, store: FlashStore | str, cold: bool = True):
        self.store = st = store if isinstance(store, FlashStore) else FlashStore.open(store)
        self.cold = cold  # False: the page cache stays warm (the CPU's part alone, for the cost model)
        self.fd = os.open(st.ffn_path, os.O_RDONLY)
        self.map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY)  # private: writable views, file untouched
        self.act, self.gated = _act(st), st.config.model_type != "opt"
        self.steps: list[TokenStep] = []
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
        model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=dtype).eval()
        disk_offload(model, offload_dir=str(self.dir), execution_device="cpu")
        self.model = model
        self.files = sorted(self.dir.rglob("*.dat"))
        self.cold = cold  # False: the page cache stays warm (the CPU's part alone, for the cost model)
        self.offloaded_bytes = sum(f.stat().st_size for f in self.files)
        self.steps: list[TokenStep] = []
        self.past = None
        import inspect

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

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling=None, eos_id: int | None = None):
        """Yield new token ids after `prompt_ids`, one `step` per token (as TokenLoop.generate)."""
        from flashnb.generate import decode

        return decode(lambda ids: [self.step(t) for t in ids][-1], prompt_ids, max_new_tokens, sampling, eos_id)

    @torch.no_grad()
    def step(self, token: int, kv=None) -> torch.Tensor:
        from flashnb.engine import process_read_bytes

        self.steps.append(TokenStep(token))
        self.before_token()
        r0, t0 = process_read_bytes(), time.perf_counter()
        ids = torch.tensor([[token]])
        if self._cache_kw == "cache":  # transformers >= 5.x names the KV cache argument `cache`
            out = self.model(input_ids=ids, cache=self.past, use_cache=True)
            self.past = getattr(out, "cache", None) or out.past_key_values
        else:
            out = self.model(input_ids=ids, past_key_values=self.past, use_cache=True)
            self.past = out.past_key_values
        self.steps[-1].wall_seconds = time.perf_counter() - t0
        self.steps[-1].storage_read_bytes = process_read_bytes() - r0
        return out.logits[0, -1].float()

    def close(self) -> None:
        self.model = None
        if self._tmp is not None:
            self._tmp.cleanup()
