"""Helpers for the store / reader / profile / cost-model tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flashnb.core.manifest import DTYPES
from flashnb.models.checkpoint import TensorIndex, ffn_param, read_config


def reference_rows(src: Path, layer: int, dtype: str) -> np.ndarray:
    """The store rows [ffn, P * d] of `layer` built straight from the checkpoint, in the store dtype:
    [up[i, :], down[:, i]] (OPT) or [gate[i, :], up[i, :], down[:, i]] (Llama)."""
    cfg = read_config(src)
    index = TensorIndex(src)
    mats = []
    for part, orient in cfg.ffn_parts:
        w = index.get(cfg.hf_key(ffn_param(layer, part)))
        mats.append(w if orient == "row" else w.t())
    return torch.cat(mats, dim=1).to(DTYPES[dtype][0]).contiguous().numpy()


def synthetic_profile(latency_s: float = 1e-4, bandwidth: float = 1e9,
                      chunks=(4096, 16384, 65536, 262144, 1 << 20, 4 << 20), in_flight=(1, 2, 4, 8)) -> dict:
    """Profile JSON for an ideal device: with T reads in flight a request of s bytes costs
    latency_s / T + s / bandwidth seconds (not a measurement: kind = 'synthetic')."""
    rows = []
    for t in in_flight:
        for s in chunks:
            sec = latency_s / t + s / bandwidth
            rows.append({"chunk_bytes": s, "in_flight": t, "reads": 100, "bytes": 100 * s, "seconds": 100 * sec,
                         "throughput_bytes_per_s": s / sec, "latency_p50_s": sec, "latency_p99_s": sec})
    return {"flashnb_profile_version": 2, "kind": "synthetic", "date": "2024-01-01T00:00:00+00:00",
            "machine": {"disk": {"device": "synthetic"}}, "direct": True, "random": rows,
            "sequential": [{"chunk_bytes": 4 << 20, "in_flight": 1,
                            "throughput_bytes_per_s": bandwidth}],
            "memory": {"memcpy_bytes_per_s": 5e9, "matvec_fp32_bytes_per_s": 1e10}}
