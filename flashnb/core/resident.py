"""The DRAM-resident part of a model, built from a flash store.

Everything but the FFN weight matrices (embeddings, attention, norms, FFN biases) is loaded from the
store's dram.safetensors; each block's FFN becomes a module the caller provides (the flash FFN of
the engine, or a baseline's), so no FFN matrix is ever allocated here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from flashnb.models.checkpoint import materialize, meta_model
from flashnb.errors import FlashnbError


def ffn_biases(dram: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """The FFN bias vectors of `layer` by part name ({"fc1": [ffn], "fc2": [d]} for OPT; {} if none)."""
    prefix = f"layers.{layer}.ffn."
    return {k[len(prefix):-len(".bias")]: v for k, v in dram.items()
            if k.startswith(prefix) and k.endswith(".bias")}


def resident_model(store, make_ffn: Callable[[int, dict[str, torch.Tensor]], nn.Module],
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    """The store's model with DRAM tensors in `dtype` and block i's FFN = make_ffn(i, biases_i)."""
    model = meta_model(store.config)
    for block in model.layers:
        block.ffn = nn.Identity()  # placeholder: no FFN matrices are allocated
    materialize(model, dtype)
    dram = store.dram_tensors()
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(dram))
    if missing:
        raise FlashnbError(f"{store.dram_path} lacks {missing[:4]}; re-create the store with `flashnb convert`")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(p.shape) != tuple(dram[name].shape):
                raise FlashnbError(f"{store.dram_path}: tensor {name!r} has shape {list(dram[name].shape)}, "
                                   f"the model expects {list(p.shape)}; re-create the store")
            p.copy_(dram[name].to(dtype))
    for i, block in enumerate(model.layers):
        block.ffn = make_ffn(i, {k: v.to(dtype) for k, v in ffn_biases(dram, i).items()})
    return model.eval()
