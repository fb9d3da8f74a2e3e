"""The FFN math of one token over a subset of a layer's neurons, from their bundles.

A bundle (a store row) holds one neuron's slices of every FFN matrix side by side: [up | down] for
OPT, [gate | up | down] for a gated FFN, [up | down] for a gated FFN whose gate stays in DRAM (store
layout "gate-apart"). A thresholded SwiGLU FFN (flashnb.core.thresholds) counts a neuron whose gate
activation is below its layer's threshold as zero. The FFN output of a set of neurons is the sum of their
contributions, so the engine computes the cached neurons and the freshly read ones separately and
adds them, and row order never matters.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from flashnb.core.quant import RowFormat
from flashnb.errors import FlashnbError
from flashnb.models.common import activation


DOWN_CHUNK_BYTES = 4 << 20  # float32 bytes of down rows upcast at a time (measured: a 16384 x 4096 layer's down
                            # projection took 87 ms upcast at once, 11 ms in 4 MiB pieces)


def sparse_ffn(x: torch.Tensor, rows: torch.Tensor, ids: np.ndarray, up_bias: torch.Tensor | None, act,
               gated: bool, fmt: RowFormat, gate: torch.Tensor | None = None, keep=None) -> torch.Tensor:
    """One token's FFN output (without the down bias) from the bundles `rows` of neurons `ids`.

    rows: [n, P * part_width] bundles stored in format `fmt` (flashnb.core.quant): up | down, or
    gate | up | down when `gated`; up | down again when the gate rows [ffn_dim, d] are given as `gate`,
    held in DRAM. `keep`: the layer's rule in a thresholded gated FFN (flashnb.models.llama.Keep), or
    None. The up projection runs at the rows' precision (quantized rows dequantized to x's); the down
    projection only over the neurons whose activation is not zero (a ReLU zero contributes nothing; a
    block of at most a MiB is upcast whole, as finding its zeros costs more than multiplying them),
    upcast (or dequantized) to float32 a few MiB at a time, because half-precision vector-matrix products
    of this shape are slow on CPUs without native fp16 arithmetic.
    """
    if gated:
        t = torch.from_numpy(ids)
        g, j = (F.linear(x, fmt.part(rows, 0, dtype=x.dtype)), 1) if gate is None else (F.linear(x, gate.index_select(0, t)), 0)
        a, u = act(g), F.linear(x, fmt.part(rows, j, dtype=x.dtype))
        if keep is not None:
            a = torch.where(keep.fires(a, u, t), a, torch.zeros((), dtype=a.dtype))
        h = a * u
        j += 1
    else:
        b = None if up_bias is None else up_bias.index_select(0, torch.from_numpy(ids))
        h, j = act(F.linear(x, fmt.part(rows, 0, dtype=x.dtype), b)), 1
    h = h.reshape(-1)
    step = max(1, DOWN_CHUNK_BYTES // (4 * fmt.d))  # rows upcast at a time: they stay in the CPU's caches
    if h.numel() <= step // 4:  # a few rows: upcast them all (a zero adds nothing; finding them costs more)
        return (h.float() @ fmt.part(rows, j).float()).to(x.dtype).reshape(x.shape)
    live = torch.nonzero(h).reshape(-1)
    hl = h.index_select(0, live).float()
    y = hl[:step] @ fmt.part(rows, j, live[:step]).float()
    for a in range(step, live.numel(), step):
        y += hl[a:a + step] @ fmt.part(rows, j, live[a:a + step]).float()
    return y.to(x.dtype).reshape(x.shape)


class BundleFFN:
    """One layer's FFN computed from bundles stored in format `fmt`: `partial(x, rows, ids)` for any subset
    of neurons, `finish(y)` adds the down projection's bias once. `gate`: the layer's gate rows when they stay in
    DRAM; `keep`: the layer's rule (flashnb.models.llama.Keep) when the FFN is thresholded."""

    def __init__(self, config, biases: dict[str, torch.Tensor], fmt: RowFormat, gate: torch.Tensor | None = None,
                 keep=None):
        self.act = activation(config.ffn_activation, "config.json")
        self.gated, self.fmt = config.gated, fmt
        up, down = config.ffn_parts[0][0], config.ffn_parts[-1][0]
        if self.gated and set(biases) - {down}:
            raise FlashnbError("gated FFNs with biases on the gate or up projection (mlp_bias) are not supported "
                               "by the engine")
        self.up_bias, self.down_bias = biases.get(up), biases.get(down)
        self.gate, self.keep = gate, keep

    def partial(self, x: torch.Tensor, rows: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
        """The contribution of neurons `ids` (bundles `rows` [n, P * d]) for one token x [1, 1, d]."""
        if ids.size == 0:
            return torch.zeros_like(x)
        return sparse_ffn(x, rows, ids, self.up_bias, self.act, self.gated, self.fmt, self.gate, self.keep)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.down_bias is None else y + self.down_bias


def layer_math(store, layer: int, biases: dict[str, torch.Tensor], thresholds=None) -> BundleFFN:
    """Layer `layer`'s BundleFFN for rows read from `store`: with the gate rows from DRAM when the store keeps
    them there (layout gate-apart), and the layer's rule when `thresholds` (flashnb.core.thresholds) are given."""
    from flashnb.core.resident import shared_tensors
    from flashnb.models.checkpoint import ffn_param

    gate = shared_tensors(store, store.dtype)[ffn_param(layer, store.dram_parts[0])] if store.gate_in_dram else None
    return BundleFFN(store.config, biases, store.row_format, gate,
                     thresholds.keep(layer) if thresholds is not None else None)
