"""Hot neurons pinned in DRAM (PowerInfer's hot/cold split, beside the paper's window).

Activation sparsity follows a power law: a few neurons of each layer fire on most tokens. The
window (§3.1) keeps them only while recent tokens used them and may evict them under a tight budget;
pinning them keeps them in DRAM for the whole run, read once at start, so every token finds them
there. Pinned rows come out of the same budget as the window's rows (`flashnb.core.memory.plan_memory`
takes them first), so more pinned rows mean a shorter window: the split is a trade, and
`choose_pinned` settles it by simulating each candidate split on recorded neuron sets.

`HotNeurons` is what `flashnb train-predictors` measures and saves beside the predictors
(`hot_neurons.safetensors`): how often the predictors select each neuron of each layer over the
training trace (the ranking), and the predictors' selections on the first held-out tokens (the
calibration sets `choose_pinned` replays).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from flashnb.errors import FlashnbError
from flashnb.paths import publish

HOT_FILE = "hot_neurons.safetensors"


@dataclass
class HotNeurons:
    """frequency [layers, ffn_dim]: share of traced tokens whose selection held each neuron;
    calibration [tokens, layers, ceil(ffn_dim / 8)] uint8: selections on held-out tokens, bit-packed."""

    frequency: np.ndarray
    calibration: np.ndarray

    @property
    def num_layers(self) -> int:
        return self.frequency.shape[0]

    @property
    def ffn_dim(self) -> int:
        return self.frequency.shape[1]

    @classmethod
    def measure(cls, sets: list[list[np.ndarray]], calibration: list[list[np.ndarray]], ffn_dim: int) -> "HotNeurons":
        """From neuron sets per token per layer: `sets` rank the neurons, `calibration` (other
        tokens) are kept for `choose_pinned`."""
        if not sets or not calibration:
            raise FlashnbError("hot neurons need neuron sets of at least one token to rank and one to calibrate on")
        layers = len(sets[0])
        count = np.zeros((layers, ffn_dim), np.float64)
        for token in sets:
            for layer, ids in enumerate(token):
                count[layer, ids] += 1
        packed = np.zeros((len(calibration), layers, (ffn_dim + 7) // 8), np.uint8)
        for t, token in enumerate(calibration):
            for layer, ids in enumerate(token):
                mask = np.zeros(ffn_dim, bool)
                mask[ids] = True
                packed[t, layer] = np.packbits(mask)
        return cls((count / len(sets)).astype(np.float32), packed)

    def top(self, rows: int) -> list[np.ndarray]:
        """The `rows` most frequently selected neurons of each layer (ties: the lower id), ascending ids."""
        if not 0 <= rows <= self.ffn_dim:
            raise FlashnbError(f"pinned rows must be in 0..{self.ffn_dim} (the FFN's neurons per layer), got {rows}")
        return [np.sort(np.argsort(-f, kind="stable")[:rows]).astype(np.int64) for f in self.frequency]

    def calibration_sets(self) -> list[list[np.ndarray]]:
        """The calibration selections as neuron ids per token per layer."""
        bits = np.unpackbits(self.calibration, axis=2, count=self.ffn_dim).astype(bool)
        return [[np.flatnonzero(layer) for layer in token] for token in bits]

    def save(self, folder: str | Path) -> Path:
        p = Path(folder) / HOT_FILE
        tmp = p.with_name(p.name + ".tmp")
        save_file({"frequency": self.frequency, "calibration": self.calibration}, str(tmp),
                  metadata={"format": "flashnb-hot-neurons/1"})
        publish(tmp, p)
        return p

    @classmethod
    def load(cls, folder: str | Path) -> "HotNeurons":
        p = Path(folder) / HOT_FILE
        if not p.is_file():
            raise FlashnbError(f"{p} is missing: pinning hot neurons needs their frequencies; `flashnb "
                               f"train-predictors` writes them beside the predictors")
        try:
            with safe_open(str(p), framework="numpy") as h:
                freq, cal = h.get_tensor("frequency"), h.get_tensor("calibration")
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise FlashnbError(f"{p} is not a readable hot-neuron file ({e}); rebuild it with `flashnb "
                               f"train-predictors`") from None
        if freq.ndim != 2 or cal.ndim != 3 or cal.shape[1:] != (freq.shape[0], (freq.shape[1] + 7) // 8):
            raise FlashnbError(f"{p} holds frequency {freq.shape} and calibration {cal.shape}, which do not "
                               f"match; rebuild it with `flashnb train-predictors`")
        return cls(freq, cal)


def pinned_ids(hot: HotNeurons | None, rows: int, num_layers: int, ffn_dim: int) -> list[np.ndarray]:
    """Each layer's pinned neurons for `rows` pinned rows per layer (none for 0), checked against the model."""
    if rows == 0:
        return [np.zeros(0, np.int64) for _ in range(num_layers)]
    if hot is None:
        raise FlashnbError(f"{rows} pinned rows per layer need the hot neurons' frequencies: pass hot="
                           f"HotNeurons.load(PREDICTORS) (written by `flashnb train-predictors`), or pin 0 rows")
    if (hot.num_layers, hot.ffn_dim) != (num_layers, ffn_dim):
        raise FlashnbError(f"the hot neurons were measured on {hot.num_layers} layers of {hot.ffn_dim} neurons, the "
                           f"store's model has {num_layers} of {ffn_dim}: use the file beside this model's predictors")
    return hot.top(rows)


@dataclass
class PinningChoice:
    """Candidate splits (pinned rows per layer), what each does per token on the calibration sets
    (simulated), and the chosen one: the lowest score among the splits that make at most 1% more reader
    calls than pinning nothing (a window too small for a token serves it in parts, a reader call each,
    and each call pays costs the score does not see), ties to fewer pinned rows."""

    pinned_rows: list[int]
    window_rows: list[int]          # each layer's window rows left beside the pinned ones
    bytes_per_token: list[float]
    requests_per_token: list[float]
    reader_calls_per_token: list[float]
    score: list[float]              # what was minimised: bytes per token, or the cost model's I/O ms per token
    score_name: str
    chosen: int                     # pinned rows per layer


def candidate_splits(most: int, ffn_dim: int, steps: int = 10) -> list[int]:
    """Pinned-row counts to try: 0 up to `most` and below the FFN's neurons per layer, evenly spaced."""
    top = max(0, min(ffn_dim - 1, most))
    return sorted({int(round(top * i / steps)) for i in range(steps + 1)})
