"""Preview a policy from recorded neuron sets: what the engine would read, without running the model.

`simulate(sets, store, policy)` replays the neuron sets each token used in each layer through the
same windows (flashnb.core.window) and the same request planning as the reader, under the same
memory split, and returns per-token records (flashnb.core.records.TokenStep, seconds zero) whose
neuron, byte and request counts equal the engine's exactly when the engine sees the same sets (the
tests check this). Notebooks use it to redraw a window-size slider instantly; one engine run then
confirms the preview.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from flashnb.core.engine import Policy
from flashnb.core.memory import bookkeeping_bytes, plan_memory, rows_in_budget
from flashnb.core.pinning import HotNeurons, PinningChoice, candidate_splits, pinned_ids
from flashnb.core.reader import NeuronReader, ReaderConfig
from flashnb.core.records import LayerStep, TokenStep, per_token_mean, window_counts
from flashnb.core.store import FlashStore
from flashnb.core.window import Window, check_lookahead_window, in_file_order, layer_windows, reader_calls


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


def simulate(sets: list[list[np.ndarray]], store: FlashStore | str, policy: Policy, predictor_bytes: int = 0,
             lookahead_sets: list[dict[int, np.ndarray]] | None = None, hot: HotNeurons | None = None) -> list[TokenStep]:
    """Replay `sets[token][layer]` (neuron ids) under `policy` on `store`'s layout and budget, as the engine
    would run them. `predictor_bytes`: every predictor the engine holds, lookahead included. With
    `lookahead_sets[token][layer]` (the ids a lookahead guessed), each layer first prefetches its guess;
    with `policy.pinned` rows, `hot`'s top neurons are pinned (read once, before the first token)."""
    st = store if isinstance(store, FlashStore) else FlashStore.open(store)
    if lookahead_sets is not None:
        check_lookahead_window(policy.window)          # as the engine refuses it
    pinned = [np.isin(np.arange(st.ffn_dim), ids) for ids in pinned_ids(hot, policy.pinned, st.num_layers, st.ffn_dim)]
    placed = [st.placed_rows(layer) for layer in range(st.num_layers)]  # when a placement moves the neurons
    cap = plan_memory(st.memory_shape(), policy.memory_budget, policy.window, predictor_bytes,
                      policy.pinned).capacity_rows
    windows = layer_windows(st.num_layers, st.ffn_dim, cap, policy.window)
    out = []
    with NeuronReader(st, ReaderConfig(in_flight=policy.in_flight, gap_bytes=policy.gap_bytes)) as reader:
        for t, token_sets in enumerate(sets):
            step = TokenStep(-1, predicted_sets=list(token_sets))
            guesses = lookahead_sets[t] if lookahead_sets is not None else {}
            for layer, ids in enumerate(token_sets):
                ids = np.asarray(ids, dtype=np.int64)
                hot_ids, rest = ids[pinned[layer][ids]], ids[~pinned[layer][ids]]
                extra = _prefetch(reader, windows[layer], layer, guesses[layer][~pinned[layer][guesses[layer]]],
                                  st.neuron_bytes, placed[layer]) if layer in guesses else (0, 0, 0, None)
                landed = extra[3]
                for plan, loaded in reader_calls(windows[layer], rest, cap, placed[layer]):  # as the engine does
                    req = reader.request_sizes(layer, loaded)
                    cached, loaded, early = window_counts(plan, landed)
                    step.layers.append(LayerStep(
                        predicted=plan.predicted.size + hot_ids.size, cached=cached, loaded=loaded,
                        evicted=plan.evicted.size, bytes_read=int(req.sum()) + extra[0],
                        requests=int(req.size) + extra[1], bytes_needed=plan.loaded.size * st.neuron_bytes + extra[2],
                        pinned=hot_ids.size, prefetched=early))
                    extra, hot_ids = (0, 0, 0, None), hot_ids[:0]
            out.append(step)
    return out


def _prefetch(reader: NeuronReader, window: Window, layer: int, guessed: np.ndarray, neuron_bytes: int,
              file_rows: np.ndarray | None):
    """A lookahead's prefetch into `window`: (bytes read, requests, bytes needed, the neurons read)."""
    pre = window.plan_prefetch(guessed)
    req = reader.request_sizes(layer, in_file_order(pre.loaded, file_rows))
    window.admit(pre)
    return int(req.sum()), int(req.size), pre.loaded.size * neuron_bytes, pre.loaded


def choose_pinned(hot: HotNeurons, store: FlashStore | str, policy: Policy, predictor_bytes: int = 0,
                  candidates: list[int] | None = None,
                  io_ms: Callable[[list[TokenStep]], float] | None = None, tokens: int = 128) -> PinningChoice:
    """Split the budget between pinned hot neurons and the window: simulate `hot`'s calibration sets
    (held-out tokens, not the ones that ranked the neurons) for each candidate count of pinned rows per
    layer under `policy` otherwise, and choose as `PinningChoice` says. The score is `io_ms(steps)`
    (e.g. the cost model's I/O per token on a device profile) or, without it, bytes read per token, over
    the first `tokens` calibration tokens.
    Default candidates: evenly spaced from 0 to the most that leaves each window the rows of 90% of
    the calibration tokens' sets."""
    st = store if isinstance(store, FlashStore) else FlashStore.open(store)
    shape = st.memory_shape()
    caches = plan_memory(shape, policy.memory_budget, policy.window, predictor_bytes).caches
    sets = hot.calibration_sets()[:tokens]
    need = int(np.percentile([ids.size for token in sets for ids in token], 90))  # window rows a token needs
    held = predictor_bytes + bookkeeping_bytes(shape, policy.window, pinned_rows=1)   # the maps, with pins
    most = (rows_in_budget(shape, policy.memory_budget, held) - caches * max(1, need)) // st.num_layers
    candidates = sorted({0, *(candidates if candidates is not None else candidate_splits(most, st.ffn_dim))})
    rows = []
    for p in candidates:
        pol = replace(policy, pinned=int(p))
        steps = simulate(sets, st, pol, predictor_bytes, hot=hot)
        cap = plan_memory(shape, pol.memory_budget, pol.window, predictor_bytes, pol.pinned).capacity_rows
        mean = lambda f: per_token_mean(steps, f)  # noqa: E731
        rows.append((int(p), cap, mean(lambda s: s.bytes_read), mean(lambda s: s.requests),
                     mean(lambda s: len(s.layers)), io_ms(steps) if io_ms else mean(lambda s: s.bytes_read)))
    fits = [r for r in rows if r[4] <= rows[0][4] * 1.01]  # hardly more reader calls than pinning nothing
    best = min(fits, key=lambda r: (r[5], r[0]))[0]
    cols = [list(c) for c in zip(*rows)]
    return PinningChoice(*cols, "modeled I/O ms per token" if io_ms else "bytes per token", best)
