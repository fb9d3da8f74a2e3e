"""Where each neuron lies on flash: co-activation placement (beyond the paper; after Ripple, 2024).

The paper stores neuron i at row i and reads each needed bundle with its own request; its attempt to
pair a neuron with its "closest friend" failed (Appendix D: the friend is mostly one of a few very
active neurons). Placement orders ALL of a layer's neurons instead, so that neurons that fire together
lie next to each other: a token's neurons then form runs of adjacent rows, and the reader merges a run
into one request (fewer, longer reads; the bytes needed are the same).

`coactivation_order(mask)` is a greedy chain over the co-activation graph learned from recorded neuron
sets (mask [tokens, ffn_dim]): start at the most used neuron; repeatedly append the unplaced neuron most
co-active with the last placed one (Jaccard: tokens both fire / tokens either fires); when none is, the
most used unplaced neuron. A `Placement` keeps every layer's order and the model's fingerprint, saved as
`placement.safetensors` in the model's predictors folder; `flashnb convert --placement FOLDER` writes a
store in that order (flashnb.core.store maps neuron ids to file rows; the engine's results are unchanged).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from flashnb.errors import FlashnbError
from flashnb.paths import publish, read_flashnb_file

FORMAT = "flashnb-placement/1"
FILE = "placement.safetensors"


def coactivation_order(mask: np.ndarray) -> np.ndarray:
    """A greedy co-activation chain over the columns (neurons) of `mask` [tokens, ffn_dim] (bool): file row
    r holds neuron order[r] (int64 [ffn_dim], a permutation)."""
    x = np.asarray(mask, dtype=np.float32)
    f = x.sum(0)
    both = x.T @ x
    affinity = both / np.maximum(f[:, None] + f[None, :] - both, 1.0)
    np.fill_diagonal(affinity, -1.0)
    n = x.shape[1]
    placed = np.zeros(n, bool)
    order = np.empty(n, np.int64)
    cur = int(np.argmax(f))
    for r in range(n):
        order[r] = cur
        placed[cur] = True
        affinity[:, cur] = -1.0  # never chosen again
        if r + 1 == n:
            break
        nxt = int(np.argmax(affinity[cur]))
        if affinity[cur, nxt] <= 0.0:  # nothing co-active left: the most used unplaced neuron
            nxt = int(np.argmax(np.where(placed, -1.0, f)))
        cur = nxt
    return order


def positions(order: np.ndarray) -> np.ndarray:
    """The file row of every neuron, position[..., i], from order[..., r] (the neuron at row r): its inverse."""
    pos = np.empty_like(order)
    np.put_along_axis(pos, order, np.broadcast_to(np.arange(order.shape[-1]), order.shape), -1)
    return pos


def is_permutation(order: np.ndarray, n: int) -> bool:
    return order.shape == (n,) and bool(np.array_equal(np.sort(order), np.arange(n)))


@dataclass(frozen=True)
class Placement:
    """Every layer's neuron order on flash: order[layer][r] is the neuron at file row r."""

    order: np.ndarray   # int64 [layers, ffn_dim]
    fingerprint: str | None  # the model's (flashnb.models.fingerprint); None only for the random weights of
                             # flashnb.bench.scale, which no model's placement can belong to
    tokens: int         # tokens whose neuron sets it was learned from
    source: str         # which sets: e.g. "predicted sets of 65536 training-split tokens"

    def __post_init__(self):
        o = np.asarray(self.order)
        if o.ndim != 2 or not all(is_permutation(row, o.shape[1]) for row in o):
            raise FlashnbError("a placement must give every layer a permutation of its neurons")

    @classmethod
    def learn(cls, masks: list[np.ndarray], fingerprint: str, source: str) -> "Placement":
        """The co-activation order of each layer from its mask [tokens, ffn_dim]."""
        return cls(np.stack([coactivation_order(m) for m in masks]), fingerprint, int(masks[0].shape[0]), source)

    @property
    def position(self) -> np.ndarray:
        """The file row of every neuron: position[layer][i] (the inverse of `order`)."""
        return positions(self.order)

    def save(self, folder: str | Path) -> Path:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        header = {"format": FORMAT, "fingerprint": self.fingerprint, "tokens": self.tokens, "source": self.source}
        tmp = out / (FILE + ".tmp")
        save_file({"order": self.order.astype(np.int32)}, str(tmp), metadata={"flashnb": json.dumps(header)})
        publish(tmp, out / FILE)
        return out / FILE


def load_placement(path: str | Path) -> Placement:
    """The placement in `path` (a predictors folder holding placement.safetensors, or the file)."""
    p = Path(path)
    f = p / FILE if p.is_dir() else p
    if not f.is_file():
        raise FlashnbError(f"{f} is missing; learn a placement with `flashnb train-predictors --placement-only "
                           "--model MODEL` (it writes MODEL-predictors/placement.safetensors)")
    header, tensors = read_flashnb_file(f, "numpy", "placement file", "learn the placement again")
    order = tensors.get("order")
    if not isinstance(header, dict) or header.get("format") != FORMAT or order is None \
            or not isinstance(header.get("fingerprint"), str):
        raise FlashnbError(f"{f}: not a flashnb placement ({FORMAT}) or damaged; learn the placement again")
    try:
        return Placement(order.astype(np.int64), header["fingerprint"], int(header.get("tokens", 0)),
                         str(header.get("source", "")))
    except FlashnbError as e:
        raise FlashnbError(f"{f}: {e}; the file is damaged: learn the placement again") from None


def count_runs(sets: list[list[np.ndarray]], position: np.ndarray | None = None) -> int:
    """Runs of adjacent file rows over every token and layer of `sets[token][layer]` (neuron ids), with
    neuron i at row position[layer][i] (None: at row i): the requests a bundled store needs for them when
    the reader merges only touching rows (gap 0)."""
    runs = 0
    for token in sets:
        for layer, ids in enumerate(token):
            if len(ids):
                rows = np.sort(ids if position is None else position[layer][ids])
                runs += 1 + int(np.count_nonzero(np.diff(rows) > 1))
    return runs
