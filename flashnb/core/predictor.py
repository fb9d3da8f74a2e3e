"""Which FFN neurons will a token use? (paper §3.1) Three predictors with one interface.

Every predictor answers `select(layer, x)`: the ids (sorted int64 numpy array) of the neurons layer
`layer` loads for one token whose FFN input is `x` (float tensor [d_model]: the normalized hidden
state after attention, exactly what `block.ffn` receives). `memory_bytes(itemsize)` is the DRAM its
weights take at the store's precision, which the memory budget counts.

- `LowRankPredictors` (Deja Vu style, the paper's): per layer Linear(d_model, r, no bias) ->
  Linear(r, ffn_dim) -> sigmoid; a neuron is selected when its probability exceeds the layer's
  threshold. Saved as a folder with `predictors.safetensors` (float16 weights) and `metrics.json`
  (the card: model fingerprint, shapes, thresholds, training settings, measured metrics). Loading
  checks shapes and, given the model, its fingerprint.
- `OraclePredictor`: the exact active set, from the dense FFN's first projection (for a thresholded
  SwiGLU model, flashnb.core.thresholds, the neurons above threshold); with it the engine must
  reproduce the dense model exactly (a reference: it needs the whole FFN).
- `AllNeurons`: every neuron, every token (naive loading).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

from flashnb.errors import FlashnbError
from flashnb.models.fingerprint import check_fingerprint, model_fingerprint
from flashnb.paths import publish, read_flashnb_file

FORMAT = "flashnb-predictors/1"
WEIGHTS = "predictors.safetensors"
CARD = "metrics.json"


class Predictor:
    """The interface: `select(layer, x)` -> sorted int64 neuron ids; `memory_bytes(itemsize)` of DRAM."""

    name: str = "predictor"

    def select(self, layer: int, x: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def memory_bytes(self, itemsize: int) -> int:
        """Bytes of DRAM the predictor's weights take at `itemsize` bytes per value (0: none counted; the
        oracle is a reference, not a saving)."""
        return 0


class AllNeurons(Predictor):
    """Every neuron of every layer, every token: what naive loading reads."""

    name = "every neuron"

    def __init__(self, ffn_dim: int):
        self.ffn_dim = ffn_dim
        self._all = np.arange(ffn_dim, dtype=np.int64)

    def select(self, layer: int, x: torch.Tensor) -> np.ndarray:
        return self._all


def first_projection(ffn: nn.Module, config) -> tuple[nn.Linear, object]:
    """The FFN's input projection whose activation decides whether a neuron is used, and that
    activation: fc1 and ReLU for OPT, gate_proj and act for a gated (Llama-style) FFN."""
    return getattr(ffn, config.ffn_parts[0][0]), ffn.act


class OraclePredictor(Predictor):
    """The exact active set of the dense FFN: neuron i is selected iff act(first_proj(x))_i != 0
    (for ReLU: > 0). Needs the model's FFN weights, so it is a reference, not a saving."""

    name = "oracle"

    def __init__(self, model: nn.Module):
        self.model = model
        self.n_layers = model.config.num_hidden_layers
        self.ffn_dim = model.config.ffn_dim

    @torch.no_grad()
    def predict(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        ffn = self.model.layers[layer].ffn
        proj, act = first_projection(ffn, self.model.config)
        a = act(proj(x.to(proj.weight.dtype)))
        keep = getattr(ffn, "keep", None)  # a thresholded SwiGLU FFN's rule
        return a != 0 if keep is None else keep.fires(a, ffn.up_proj(x.to(proj.weight.dtype)))

    def select(self, layer: int, x: torch.Tensor) -> np.ndarray:
        return np.flatnonzero(self.predict(layer, x).reshape(-1).numpy())


class LowRankPredictor(nn.Module):
    """One layer's predictor: logits = up(down(x)), down: d_model -> rank, up: rank -> ffn_dim."""

    def __init__(self, d_model: int, ffn_dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(d_model, rank, bias=False)
        self.up = nn.Linear(rank, ffn_dim)

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def logit(p: float) -> float:
    """The logit log(p / (1 - p)) of a probability threshold p in (0, 1)."""
    if not 0.0 < p < 1.0:
        raise FlashnbError(f"a predictor threshold must lie strictly between 0 and 1, got {p}")
    return math.log(p / (1.0 - p))


class LowRankPredictors(Predictor):
    """A low-rank predictor for every layer, thresholds (probabilities) per layer, and the
    fingerprint of the model it was trained for."""

    name = "low-rank predictors"

    def __init__(self, layers: list[LowRankPredictor], thresholds: list[float], fingerprint: str,
                 card: dict | None = None, lookahead: bool = False):
        if len(thresholds) != len(layers):
            raise FlashnbError(f"{len(thresholds)} thresholds for {len(layers)} predictor layers; "
                               "give one threshold per layer")
        self.layers = layers
        self.thresholds = [float(t) for t in thresholds]
        for t in self.thresholds:
            logit(t)
        self.fingerprint = fingerprint
        self.card = card or {}
        self.lookahead = lookahead  # layer i's predictor guesses layer i + 1's neurons from layer i's FFN input
        self.n_layers = len(layers)
        self.d_model = layers[0].down.in_features
        self.ffn_dim = layers[0].up.out_features

    @property
    def ranks(self) -> list[int]:
        return [p.rank for p in self.layers]

    def with_thresholds(self, thresholds: float | list[float]) -> "LowRankPredictors":
        """The same predictors (weights shared) with other thresholds (one, or one per layer)."""
        t = [thresholds] * self.n_layers if isinstance(thresholds, (int, float)) else list(thresholds)
        return LowRankPredictors(self.layers, t, self.fingerprint, self.card, self.lookahead)

    @torch.no_grad()
    def logits(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """float32 [..., ffn_dim] logits of layer `layer` for FFN inputs x [..., d_model]."""
        p = self.layers[layer]
        return p(x.to(p.down.weight.dtype)).float()

    def predict(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """bool [..., ffn_dim]: probability > the layer's threshold."""
        return self.logits(layer, x) > logit(self.thresholds[layer])

    def select(self, layer: int, x: torch.Tensor) -> np.ndarray:
        """int64 ids of the neurons selected for one token x [d_model], ascending."""
        return np.flatnonzero(self.predict(layer, x).reshape(-1).numpy())

    def memory_bytes(self, itemsize: int) -> int:
        """Bytes of DRAM the weights take at `itemsize` bytes per value (the engine holds them at the
        store's precision, see `hold_as`)."""
        return itemsize * sum(p.numel() for layer in self.layers for p in layer.parameters())

    def hold_as(self, dtype: torch.dtype) -> "LowRankPredictors":
        """Keep the weights in `dtype` (the engine holds them at the store's precision); returns self."""
        for p in self.layers:
            p.to(dtype)
        return self

    def save(self, folder: str | Path, card: dict | None = None) -> None:
        """Write predictors.safetensors (float16) and metrics.json into `folder`, atomically each."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, p in enumerate(self.layers):
            tensors[f"layers.{i}.down.weight"] = p.down.weight.detach().to(torch.float16).contiguous()
            tensors[f"layers.{i}.up.weight"] = p.up.weight.detach().to(torch.float16).contiguous()
            tensors[f"layers.{i}.up.bias"] = p.up.bias.detach().to(torch.float16).contiguous()
        header = self._header()
        tmp = out / (WEIGHTS + ".tmp")
        save_file(tensors, str(tmp), metadata={"flashnb": json.dumps(header)})
        publish(tmp, out / WEIGHTS)
        self.card = dict(card if card is not None else self.card) | header
        tmp = out / (CARD + ".tmp")
        tmp.write_text(json.dumps(self.card, indent=2) + "\n")
        tmp.replace(out / CARD)

    def _header(self) -> dict:
        return {"format": FORMAT, "fingerprint": self.fingerprint, "lookahead": self.lookahead, "n_layers": self.n_layers,
                "d_model": self.d_model, "ffn_dim": self.ffn_dim, "ranks": self.ranks,
                "thresholds": self.thresholds}


def _read_card(path: Path) -> dict:
    """The predictors' card (metrics.json), {} without one."""
    if not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise FlashnbError(f"{path} is not valid JSON ({e}); train the predictors again, or delete it (the "
                           "weights do not need it)") from None
    if not isinstance(card, dict):
        raise FlashnbError(f"{path} must hold a JSON object; train the predictors again")
    return card


def load_predictors(folder: str | Path, model: nn.Module | None = None) -> LowRankPredictors:
    """The predictor set saved in `folder` (float32 weights); with `model`, check it belongs to it."""
    d = Path(folder)
    f = d / WEIGHTS
    if not f.is_file():
        model = d.with_name(d.name.removesuffix("-predictors")) if d.name.endswith("-predictors") else None
        how = (f"`flashnb train-predictors --model {model}` (it writes them there)"
               if model is not None and (model / "config.json").is_file() else
               "`flashnb train-predictors --model MODEL --out FOLDER`")
        raise FlashnbError(f"{f} is missing; train predictors with {how}, or pass the folder that holds "
                           "predictors.safetensors and metrics.json")
    header, tensors = read_flashnb_file(f, "pt", "safetensors file", "train the predictors again")
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise FlashnbError(f"{f} is not a flashnb predictor file (format "
                           f"{header.get('format') if isinstance(header, dict) else header!r}, expected {FORMAT!r}); "
                           "train the predictors again")
    L, dm, F, ranks = (header.get(k) for k in ("n_layers", "d_model", "ffn_dim", "ranks"))
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 24  # noqa: E731
    thresholds = header.get("thresholds")
    if not (all(map(whole, (L, dm, F))) and isinstance(ranks, list) and len(ranks) == L and all(map(whole, ranks))
            and isinstance(thresholds, list) and len(thresholds) == L and isinstance(header.get("fingerprint"), str)
            and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in thresholds)):
        raise FlashnbError(f"{f}: the predictor header (n_layers, d_model, ffn_dim, ranks, thresholds, fingerprint) "
                           "is damaged; train the predictors again")
    card = _read_card(d / CARD)
    if model is not None:
        c = model.config
        if (L + bool(header.get("lookahead")), dm, F) != (c.num_hidden_layers, c.hidden_size, c.ffn_dim):
            raise FlashnbError(f"{f} holds predictors for {L} layers, d_model {dm}, ffn_dim {F}, but the "
                               f"model has {c.num_hidden_layers} layers, d_model {c.hidden_size}, ffn_dim "
                               f"{c.ffn_dim}; they belong to another model: train predictors for this one "
                               "with `flashnb train-predictors`")
    layers = []
    for i, r in enumerate(ranks):
        p = LowRankPredictor(dm, F, r)
        want = {"down.weight": (r, dm), "up.weight": (F, r), "up.bias": (F,)}
        for name, shape in want.items():
            t = tensors.get(f"layers.{i}.{name}")
            if t is None or tuple(t.shape) != shape:
                got = "missing" if t is None else f"shape {list(t.shape)}"
                raise FlashnbError(f"{f}: tensor layers.{i}.{name} is {got}, expected {list(shape)} "
                                   f"(rank {r}, d_model {dm}, ffn_dim {F}); the file is damaged or was "
                                   "edited, train the predictors again")
            if not bool(torch.isfinite(t).all()):
                raise FlashnbError(f"{f}: tensor layers.{i}.{name} holds inf or nan; train the predictors again")
            p.get_parameter(name).data = t.float()
        layers.append(p.eval())
    preds = LowRankPredictors(layers, thresholds, header["fingerprint"], card, bool(header.get("lookahead", False)))
    if model is not None:
        check_fingerprint(preds.fingerprint, model_fingerprint(model), str(f),
                          "train predictors for this model with `flashnb train-predictors`")
    return preds
