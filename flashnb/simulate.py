"""Preview a policy from a recorded trace: what the engine would read, without running the model.

`simulate(needed, store, policy)` replays the neuron sets each token needs in each layer through the
same cache logic (`flashnb.cache.NeuronCache`, bookkeeping only) and the same request planning as
the reader, and returns per-token statistics whose byte and request counts equal the engine's
exactly when the engine sees the same sets (the tests check this). Notebooks use it to redraw a
window-size slider instantly; one engine run then confirms the preview.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flashnb.cache import NeuronCache, split_needed
from flashnb.engine import LayerStep, Policy, memory_plan
from flashnb.reader import NeuronReader, ReaderConfig
from flashnb.store import FlashStore


@dataclass
class SimStep:
    """One token's simulated layers (LayerStep with zero seconds)."""

    layers: list[LayerStep]

    @property
    def bytes_read(self) -> int:
        return sum(s.bytes_read for s in self.layers)

    def totals(self) -> dict:
        keys = ("predicted", "cached", "read", "evicted", "bytes_read", "bytes_needed", "requests")
        return {k: sum(getattr(s, k) for s in self.layers) for k in keys}


def needed_from_trace(trace, predictors=None) -> list[list[np.ndarray]]:
    """Neuron ids per token per layer: the trace's active sets (oracle), or the predictors' selections
    on the trace's recorded FFN inputs."""
    sets = []
    masks = []
    for layer in range(trace.n_layers):
        if predictors is None:
            masks.append(trace.mask(layer))
        else:
            masks.append(predictors.predict(layer, torch.from_numpy(trace.inputs[layer])).numpy())
    for t in range(trace.n_tokens):
        sets.append([np.flatnonzero(masks[layer][t]) for layer in range(trace.n_layers)])
    return sets


def simulate(needed: list[list[np.ndarray]], store: FlashStore | str, policy: Policy,
             predictor_bytes: int = 0, profile=None) -> list[SimStep]:
    """Replay `needed[token][layer]` (neuron ids) under `policy` on `store`'s layout and budget."""
    st = store if isinstance(store, FlashStore) else FlashStore.open(store)
    mem = memory_plan(st, policy, predictor_bytes)
    if policy.window == 0:
        shared = NeuronCache(st.ffn_dim, mem.capacity_rows, 0, 0)
        caches = [shared] * st.num_layers
    else:
        caches = [NeuronCache(st.ffn_dim, mem.capacity_rows, 0, policy.window) for _ in range(st.num_layers)]
    empty = torch.empty(0, 0)
    out = []
    with NeuronReader(st, ReaderConfig(threads=policy.threads, gap_bytes=policy.gap_bytes), profile) as reader:
        for token_sets in needed:
            layers = []
            for layer, ids in enumerate(token_sets):
                for part in split_needed(ids, caches[layer].capacity):  # as the engine does
                    plan = caches[layer].plan(part)
                    req = reader.request_sizes(layer, plan.load)
                    caches[layer].apply(plan, empty.new_empty(plan.load.size, 0))
                    layers.append(LayerStep(predicted=plan.needed.size, cached=plan.hits.size,
                                            read=plan.load.size, evicted=plan.evict.size, bytes_read=int(req.sum()),
                                            bytes_needed=plan.load.size * st.neuron_bytes, requests=int(req.size),
                                            io_seconds=0.0, mm_seconds=0.0))
            out.append(SimStep(layers))
    return out
