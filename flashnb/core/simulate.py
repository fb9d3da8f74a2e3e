"""Preview a policy from recorded neuron sets: what the engine would read, without running the model.

`simulate(sets, store, policy)` replays the neuron sets each token used in each layer through the
same windows (flashnb.core.window) and the same request planning as the reader, under the same
memory split, and returns per-token records (flashnb.core.records.TokenStep, seconds zero) whose
neuron, byte and request counts equal the engine's exactly when the engine sees the same sets (the
tests check this). Notebooks use it to redraw a window-size slider instantly; one engine run then
confirms the preview.
"""

from __future__ import annotations

import numpy as np
import torch

from flashnb.core.engine import Policy
from flashnb.core.memory import plan_memory
from flashnb.core.reader import NeuronReader, ReaderConfig
from flashnb.core.records import LayerStep, TokenStep
from flashnb.core.store import FlashStore
from flashnb.core.window import Window, split_predicted


def sets_from_trace(trace, predictors=None) -> list[list[np.ndarray]]:
    """Neuron ids per token per layer: the trace's active sets (the oracle's), or the predictors'
    selections on the trace's recorded FFN inputs."""
    masks = []
    for layer in range(trace.n_layers):
        if predictors is None:
            masks.append(trace.mask(layer))
        else:
            masks.append(predictors.predict(layer, torch.from_numpy(trace.inputs[layer])).numpy())
    return [[np.flatnonzero(masks[layer][t]) for layer in range(trace.n_layers)] for t in range(trace.n_tokens)]


def simulate(sets: list[list[np.ndarray]], store: FlashStore | str, policy: Policy,
             predictor_bytes: int = 0) -> list[TokenStep]:
    """Replay `sets[token][layer]` (neuron ids) under `policy` on `store`'s layout and budget."""
    st = store if isinstance(store, FlashStore) else FlashStore.open(store)
    cap = plan_memory(st.memory_shape(), policy.memory_budget, policy.window, predictor_bytes).capacity_rows
    if policy.window == 0:
        windows = [Window(st.ffn_dim, cap, 0)] * st.num_layers  # one set of rows for every layer
    else:
        windows = [Window(st.ffn_dim, cap, policy.window) for _ in range(st.num_layers)]
    out = []
    with NeuronReader(st, ReaderConfig(in_flight=policy.in_flight, gap_bytes=policy.gap_bytes)) as reader:
        for token_sets in sets:
            step = TokenStep(-1, predicted_sets=list(token_sets))
            for layer, ids in enumerate(token_sets):
                for part in split_predicted(ids, cap):  # as the engine does
                    plan = windows[layer].plan(part)
                    req = reader.request_sizes(layer, plan.loaded)
                    windows[layer].advance(plan)
                    step.layers.append(LayerStep(
                        predicted=plan.predicted.size, cached=plan.cached.size, loaded=plan.loaded.size,
                        evicted=plan.evicted.size, bytes_read=int(req.sum()),
                        bytes_needed=plan.loaded.size * st.neuron_bytes, requests=int(req.size)))
            out.append(step)
    return out
