"""Activation traces: which FFN neurons each token uses, and what the predictor sees.

`record` runs a model over token ids (split into independent sequences of at most `context`
tokens) and keeps, for every layer and token:
  * the active set: FFN neurons whose activation is nonzero (for a ReLU FFN: > 0; for a gated FFN,
    act(gate) != 0), bit-packed along the neuron axis with `np.packbits` (1 bit per neuron);
  * the predictor input: the FFN's input (the normalized hidden state after attention), float16,
    captured by a forward pre-hook on `block.ffn`.
A `Trace` saves to one safetensors file whose header carries JSON metadata, including the model
fingerprint (flashnb.fingerprint), so loading a trace against another model fails clearly.
Never pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from tqdm import tqdm

from flashnb.errors import FlashnbError
from flashnb.models.fingerprint import check_fingerprint, model_fingerprint
from flashnb.paths import publish, read_flashnb_file
from flashnb.text import show_progress

FORMAT = "flashnb-trace/1"


@dataclass
class Trace:
    """Per-layer, per-token FFN activity of one model over a token stream.

    active:  uint8 [layers, tokens, ceil(ffn_dim / 8)]: np.packbits of the active masks.
    inputs:  float16 [layers, tokens, d_model] FFN inputs, or None if not recorded.
    ids:     int32 [tokens] the token ids.
    segment_starts: int64 [sequences] index of the first token of each independent sequence
             (the model's context restarts there; temporal statistics never cross a start).
    ffn_dim: neurons per layer.  fingerprint: the model's fingerprint.  meta: free-form JSON.
    """

    active: np.ndarray
    inputs: np.ndarray | None
    ids: np.ndarray
    segment_starts: np.ndarray
    ffn_dim: int
    fingerprint: str
    meta: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.active.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.active.shape[1]

    def mask(self, layer: int) -> np.ndarray:
        """bool [tokens, ffn_dim]: True where neuron j fired for token t in `layer`."""
        return np.unpackbits(self.active[layer], axis=-1, count=self.ffn_dim).astype(bool)

    def active_ids(self, layer: int, token: int) -> np.ndarray:
        """int64 ids of the neurons active for `token` in `layer`, ascending."""
        bits = np.unpackbits(self.active[layer, token], count=self.ffn_dim)
        return np.flatnonzero(bits)

    def positions(self) -> np.ndarray:
        """int64 [tokens]: each token's position within its sequence (0 at every segment start)."""
        starts = np.zeros(self.n_tokens, dtype=np.int64)
        starts[self.segment_starts] = self.segment_starts
        return np.arange(self.n_tokens) - np.maximum.accumulate(starts)

    def save(self, path: str | Path) -> None:
        """Write the trace to `path` (one .safetensors file), atomically."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"active": np.ascontiguousarray(self.active), "ids": self.ids.astype(np.int32),
                   "segment_starts": self.segment_starts.astype(np.int64)}
        if self.inputs is not None:
            tensors["inputs"] = np.ascontiguousarray(self.inputs, dtype=np.float16)
        header = {"format": FORMAT, "ffn_dim": self.ffn_dim, "fingerprint": self.fingerprint,
                  "meta": self.meta}
        tmp = p.with_name(p.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"flashnb": json.dumps(header)})
        publish(tmp, p)


def load_trace(path: str | Path, model: torch.nn.Module | None = None) -> Trace:
    """The trace saved at `path`; with `model`, also check that the trace was recorded from it."""
    p = Path(path)
    if not p.is_file():
        raise FlashnbError(f"trace file {p} does not exist; record one with flashnb.traces.record(...)"
                           ".save(path)")
    header, tensors = read_flashnb_file(p, "numpy", "trace file", "record the trace again")
    if header.get("format") != FORMAT or not {"active", "ids", "segment_starts"} <= tensors.keys():
        raise FlashnbError(f"{p} is not a flashnb trace (format {header.get('format')!r}, expected "
                           f"{FORMAT!r}); record the trace again with flashnb.traces.record")
    trace = Trace(tensors["active"], tensors.get("inputs"), tensors["ids"], tensors["segment_starts"],
                  int(header["ffn_dim"]), header["fingerprint"], header.get("meta", {}))
    L, T, nbytes = trace.active.shape
    if nbytes != (trace.ffn_dim + 7) // 8 or trace.ids.shape != (T,) or (
            trace.inputs is not None and trace.inputs.shape[:2] != (L, T)):
        raise FlashnbError(f"{p}: tensor shapes disagree with each other (active {list(trace.active.shape)}, "
                           f"ids {list(trace.ids.shape)}, ffn_dim {trace.ffn_dim}); the file is damaged, "
                           "record the trace again")
    if model is not None:
        check_model(trace, model, str(p))
    return trace


def check_model(trace: Trace, model: torch.nn.Module, what: str = "the trace") -> None:
    """Raise FlashnbError unless `trace` was recorded from `model` (shapes, then fingerprint)."""
    c = model.config
    if (trace.n_layers, trace.ffn_dim) != (c.num_hidden_layers, c.ffn_dim) or (
            trace.inputs is not None and trace.inputs.shape[2] != c.hidden_size):
        d = trace.inputs.shape[2] if trace.inputs is not None else "?"
        raise FlashnbError(f"{what} has {trace.n_layers} layers x {trace.ffn_dim} neurons (d_model {d}), "
                           f"but the model has {c.num_hidden_layers} x {c.ffn_dim} (d_model {c.hidden_size}); "
                           "it was recorded from another model: record it again with this one")
    check_fingerprint(trace.fingerprint, model_fingerprint(model), what,
                      "record the trace again with this model (flashnb.traces.record)")


@torch.no_grad()
def record(model: torch.nn.Module, ids, context: int | None = None, inputs: bool = True,
           progress: bool = False, meta: dict | None = None) -> Trace:
    """Run `model` over token `ids` and record every layer's active FFN neurons (and inputs).

    ids: 1-D sequence of token ids. It is cut into consecutive, non-overlapping sequences of
    `context` tokens (default: the model's max_position_embeddings, or 256); the last may be
    shorter. Each sequence is run from an empty context, as in held-out evaluation.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise FlashnbError("record() got no token ids; pass a non-empty token sequence")
    c = model.config
    context = context or getattr(c, "max_position_embeddings", 256)
    vocab = c.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise FlashnbError(f"token ids must lie in [0, {vocab}) for this model; got {ids.min()}..{ids.max()}: the "
                           "tokenizer belongs to another model (a larger vocabulary); use the model's own "
                           "tokenizer.json")
    L, T, F = c.num_hidden_layers, ids.size, c.ffn_dim
    active = np.zeros((L, T, (F + 7) // 8), dtype=np.uint8)
    x_in = np.zeros((L, T, c.hidden_size), dtype=np.float16) if inputs else None
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for i, block in enumerate(model.layers):
        hooks.append(block.ffn.register_forward_pre_hook(
            lambda mod, args, i=i: captured.__setitem__(i, args[0].detach())))
        block.ffn.record = True
    was_training = model.training
    model.eval()
    starts = list(range(0, T, context))
    try:
        for s in tqdm(starts, disable=not show_progress(progress), unit="seq", desc="trace"):
            e = min(T, s + context)
            model(torch.from_numpy(ids[s:e])[None])
            for i, block in enumerate(model.layers):
                a = block.ffn.last_activation[0]
                active[i, s:e] = np.packbits((a != 0).numpy(), axis=-1)
                if inputs:
                    x_in[i, s:e] = captured[i][0].to(torch.float16).numpy()
    finally:
        for h in hooks:
            h.remove()
        for block in model.layers:
            block.ffn.record = False
            block.ffn.last_activation = None
        model.train(was_training)
    return Trace(active, x_in, ids.astype(np.int32), np.asarray(starts, dtype=np.int64), F,
                 model_fingerprint(model), dict(meta or {}, context=context))
