"""This machine's compute and memory-management constants, measured for the cost model.

The cost model (flashnb.costmodel) needs, besides the disk's profile, what a token's arithmetic and
the neuron cache's bookkeeping cost on this CPU. Both are measured here on the model being
benchmarked, never on the configurations the model is then compared with:

- compute: a token costs `compute_fixed_s + weight bytes multiplied / compute_bps`. Two points fix
  the line: the dense model decoding in DRAM (every weight), and the same model with every FFN
  replaced by zeros (no FFN bytes). `compute_fixed_s` is what does not scale with bytes: Python,
  operator dispatch, attention over the context, norms.
- memory management: one layer's cache step (plan, evict with swap-with-last, append) costs
  `mm_call_s + neurons x mm_neuron_s`, from a NeuronCache of the model's bundle width stepped with
  random sets of two sizes.

Everything here is *measured*; the cost model's use of it is *modeled*.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


@dataclass
class Calibration:
    """Seconds and bytes/s measured on this machine (see the module doc)."""

    compute_fixed_s: float     # per token
    compute_bps: float         # weight bytes per second through matrix-vector products
    dense_token_s: float       # the dense model in DRAM, per token (measured)
    no_ffn_token_s: float      # the same with every FFN replaced by zeros (measured)
    mm_call_s: float           # one layer's cache step, fixed part
    mm_neuron_s: float         # ... per neuron planned
    torch_threads: int

    def summary(self) -> dict:
        return asdict(self)


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


def calibrate(model_dir: str | Path, shape, window: int = 4, tokens: int = 12) -> Calibration:
    """Measure the constants for the Hugging Face folder `model_dir` of cost-model shape `shape`
    (flashnb.costmodel.ModelShape) at the store's precision (fp16)."""
    from flashnb.checkpoint import load_model
    from flashnb.costmodel import compute_bytes

    dtype = torch.float16 if shape.bytes_per_value == 2 else torch.float32
    model = load_model(model_dir, dtype=dtype).eval()
    vocab = model.config.vocab_size
    dense = _token_seconds(model, tokens, vocab)
    for block in model.layers:
        block.ffn = _ZeroFFN()
    no_ffn = _token_seconds(model, tokens, vocab)
    ffn_bytes = shape.ffn_bytes
    rate = ffn_bytes / max(dense - no_ffn, 1e-9)
    fixed = max(0.0, no_ffn - compute_bytes(shape, 0) / rate)
    width = shape.parts * shape.d_model
    small = max(1, shape.ffn_dim // 20)  # about a predicted set
    t_small = _mm_seconds(shape.ffn_dim, width, small, 2 * small, window, 40, dtype)
    t_all = _mm_seconds(shape.ffn_dim, width, shape.ffn_dim, shape.ffn_dim, 0, 12, dtype)
    per_neuron = max(0.0, (t_all - t_small) / (shape.ffn_dim - small))
    call = max(0.0, t_small - small * per_neuron)
    return Calibration(fixed, rate, dense, no_ffn, call, per_neuron, torch.get_num_threads())

