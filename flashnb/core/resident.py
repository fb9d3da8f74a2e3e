"""The DRAM-resident part of a model, built from a flash store.

Everything but the FFN weight matrices (embeddings, attention, norms, FFN biases) is loaded from the
store's dram.safetensors; each block's FFN becomes a module the caller provides (the flash FFN of
the engine, or a baseline's), so no FFN matrix is ever allocated here.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

import torch
import torch.nn as nn

from flashnb.core.manifest import RECREATE
from flashnb.errors import FlashnbError
from flashnb.models import llama
from flashnb.models.checkpoint import meta_model


def ffn_biases(dram: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """The FFN bias vectors of `layer` by part name ({"fc1": [ffn], "fc2": [d]} for OPT; {} if none)."""
    prefix = f"layers.{layer}.ffn."
    return {k[len(prefix):-len(".bias")]: v for k, v in dram.items()
            if k.startswith(prefix) and k.endswith(".bias")}


class _Tensors(dict):
    """Resident tensors in one dtype (a dict that weak references can point to)."""


_SHARED: "weakref.WeakValueDictionary[tuple, _Tensors]" = weakref.WeakValueDictionary()


def shared_tensors(store, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The store's DRAM tensors in `dtype`, loaded once per process and file: every model built from
    the same unchanged dram.safetensors (several engines taking turns; two stores whose DRAM files are
    hard links of one file) holds the same tensors, read-only, instead of a copy each. A file changed
    in any way (size, time, inode) is loaded and checked again."""
    store.check_unchanged()
    st = os.stat(store.dram_path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, str(dtype))
    tensors = _SHARED.get(key)
    if tensors is None:
        tensors = _Tensors((k, v.to(dtype)) for k, v in store.dram_tensors().items())
        _SHARED[key] = tensors
    return tensors


def resident_model(store, make_ffn: Callable[[int, dict[str, torch.Tensor]], nn.Module],
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    """The store's model with DRAM tensors in `dtype` (shared, see `shared_tensors`) and block i's
    FFN = make_ffn(i, biases_i)."""
    model = meta_model(store.config)
    for block in model.layers:
        block.ffn = nn.Identity()  # placeholder: no FFN matrices are allocated
    dram = shared_tensors(store, dtype)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(dram))
    if missing:
        raise FlashnbError(f"{store.dram_path} lacks {missing[:4]}; re-create the store with {RECREATE}")
    for name, p in params.items():
        if tuple(p.shape) != tuple(dram[name].shape):
            raise FlashnbError(f"{store.dram_path}: tensor {name!r} has shape {list(dram[name].shape)}, "
                               f"the model expects {list(p.shape)}; re-create the store")
    model.load_state_dict({name: dram[name] for name in params}, strict=False, assign=True)
    if hasattr(model, "inv_freq"):  # a non-persistent buffer: computed, not stored
        model.inv_freq = llama.rope_inv_freq(model.config)
    model.requires_grad_(False)
    model.resident_tensors = dram   # keeps the shared tensors alive as long as the model
    for i, block in enumerate(model.layers):
        block.ffn = make_ffn(i, {k: v for k, v in ffn_biases(dram, i).items()})
    return model.eval()
