"""Which FFN neurons will a token use? Low-rank predictors (Deja Vu style) and the oracle.

Every predictor answers, for layer `layer` and FFN input `x` (float tensor [..., d_model], the
normalized hidden state after attention, i.e. exactly what `block.ffn` receives):
    predict(layer, x)     -> bool tensor [..., ffn_dim], True = load/use this neuron
    predict_ids(layer, x) -> int64 tensor of neuron ids, for a single token x [d_model]

`LowRankPredictors`: per layer Linear(d_model, r, no bias) -> Linear(r, ffn_dim) -> sigmoid, and a
neuron is selected when its probability exceeds the layer's threshold. Saved as a folder with
`predictors.safetensors` (float16 weights) and `metrics.json` (the card: model fingerprint, shapes,
thresholds, training settings, measured metrics). Loading checks shapes and the fingerprint.

`OraclePredictor`: the exact active set, computed from the dense FFN's first projection; with it a
sparse engine must reproduce the dense model exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flashnb.errors import FlashnbError
from flashnb.fingerprint import check_fingerprint, model_fingerprint

FORMAT = "flashnb-predictors/1"
WEIGHTS = "predictors.safetensors"
CARD = "metrics.json"


class Predictor(Protocol):
    """What the engine calls: a neuron selection per layer from the FFN input."""

    n_layers: int
    ffn_dim: int

    def predict(self, layer: int, x: torch.Tensor) -> torch.Tensor: ...

    def predict_ids(self, layer: int, x: torch.Tensor) -> torch.Tensor: ...


def first_projection(ffn: nn.Module) -> tuple[nn.Linear, object]:
    """The FFN's input projection whose activation decides whether a neuron is used, and that
    activation: fc1 and ReLU for OPT, gate_proj and act for a gated (Llama-style) FFN."""
    return (ffn.fc1 if hasattr(ffn, "fc1") else ffn.gate_proj), ffn.act


class OraclePredictor:
    """The exact active set of the dense FFN: neuron i is selected iff act(first_proj(x))_i != 0
    (for ReLU: > 0). Needs the model's FFN weights, so it is a reference, not a saving."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.n_layers = model.config.num_hidden_layers
        self.ffn_dim = model.config.ffn_dim

    @torch.no_grad()
    def predict(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        proj, act = first_projection(self.model.layers[layer].ffn)
        return act(proj(x.to(proj.weight.dtype))) != 0

    def predict_ids(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(self.predict(layer, x).reshape(-1)).reshape(-1)


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


class LowRankPredictors:
    """A low-rank predictor for every layer, thresholds (probabilities) per layer, and the
    fingerprint of the model it was trained for."""

    def __init__(self, layers: list[LowRankPredictor], thresholds: list[float], fingerprint: str,
                 card: dict | None = None):
        if len(thresholds) != len(layers):
            raise FlashnbError(f"{len(thresholds)} thresholds for {len(layers)} predictor layers; "
                               "give one threshold per layer")
        self.layers = layers
        self.thresholds = [float(t) for t in thresholds]
        for t in self.thresholds:
            logit(t)
        self.fingerprint = fingerprint
        self.card = card or {}
        self.n_layers = len(layers)
        self.d_model = layers[0].down.in_features
        self.ffn_dim = layers[0].up.out_features

    @property
    def ranks(self) -> list[int]:
        return [p.rank for p in self.layers]

    def with_thresholds(self, thresholds: float | list[float]) -> "LowRankPredictors":
        """The same predictors (weights shared) with other thresholds (one, or one per layer)."""
        t = [thresholds] * self.n_layers if isinstance(thresholds, (int, float)) else list(thresholds)
        return LowRankPredictors(self.layers, t, self.fingerprint, self.card)

    @torch.no_grad()
    def logits(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """float32 [..., ffn_dim] logits of layer `layer` for FFN inputs x [..., d_model]."""
        p = self.layers[layer]
        return p(x.to(p.down.weight.dtype)).float()

    def probabilities(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """float32 [..., ffn_dim]: sigmoid of the logits, each neuron's predicted chance to fire."""
        return torch.sigmoid(self.logits(layer, x))

    def predict(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """bool [..., ffn_dim]: probability > the layer's threshold."""
        return self.logits(layer, x) > logit(self.thresholds[layer])

    def predict_ids(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """int64 ids of the neurons selected for one token x [d_model], ascending."""
        return torch.nonzero(self.predict(layer, x).reshape(-1)).reshape(-1)

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
        tmp.replace(out / WEIGHTS)
        self.card = dict(card if card is not None else self.card) | header
        tmp = out / (CARD + ".tmp")
        tmp.write_text(json.dumps(self.card, indent=2) + "\n")
        tmp.replace(out / CARD)

    def _header(self) -> dict:
        return {"format": FORMAT, "fingerprint": self.fingerprint, "n_layers": self.n_layers,
                "d_model": self.d_model, "ffn_dim": self.ffn_dim, "ranks": self.ranks,
                "thresholds": self.thresholds}


def load_predictors(folder: str | Path, model: nn.Module | None = None) -> LowRankPredictors:
    """The predictor set saved in `folder` (float32 weights); with `model`, check it belongs to it."""
    d = Path(folder)
    f = d / WEIGHTS
    if not f.is_file():
        raise FlashnbError(f"{f} is missing; train predictors with `flashnb train-predictors` "
                           "or pass the folder that holds predictors.safetensors and metrics.json")
    try:
        with safe_open(str(f), framework="pt") as h:
            header = json.loads((h.metadata() or {}).get("flashnb", "{}"))
            tensors = {k: h.get_tensor(k) for k in h.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise FlashnbError(f"{f} is not a readable safetensors file ({e}); train the predictors again") from None
    if header.get("format") != FORMAT:
        raise FlashnbError(f"{f} is not a flashnb predictor file (format {header.get('format')!r}, "
                           f"expected {FORMAT!r}); train the predictors again")
    card = json.loads((d / CARD).read_text()) if (d / CARD).is_file() else {}
    L, dm, F = header["n_layers"], header["d_model"], header["ffn_dim"]
    if model is not None:
        c = model.config
        if (L, dm, F) != (c.num_hidden_layers, c.hidden_size, c.ffn_dim):
            raise FlashnbError(f"{f} holds predictors for {L} layers, d_model {dm}, ffn_dim {F}, but the "
                               f"model has {c.num_hidden_layers} layers, d_model {c.hidden_size}, ffn_dim "
                               f"{c.ffn_dim}; they belong to another model: train predictors for this one "
                               "with `flashnb train-predictors`")
    layers = []
    for i, r in enumerate(header["ranks"]):
        p = LowRankPredictor(dm, F, r)
        want = {"down.weight": (r, dm), "up.weight": (F, r), "up.bias": (F,)}
        for name, shape in want.items():
            t = tensors.get(f"layers.{i}.{name}")
            if t is None or tuple(t.shape) != shape:
                got = "missing" if t is None else f"shape {list(t.shape)}"
                raise FlashnbError(f"{f}: tensor layers.{i}.{name} is {got}, expected {list(shape)} "
                                   f"(rank {r}, d_model {dm}, ffn_dim {F}); the file is damaged or was "
                                   "edited, train the predictors again")
            p.get_parameter(name).data = t.float()
        layers.append(p.eval())
    preds = LowRankPredictors(layers, header["thresholds"], header["fingerprint"], card)
    if model is not None:
        check_fingerprint(preds.fingerprint, model_fingerprint(model), str(f),
                          "train predictors for this model with `flashnb train-predictors`")
    return preds


# ----------------------------------------------------------------------------- selection metrics

@dataclass
class Selection:
    """How well a selection matches the truly active neurons of one layer, pooled over tokens.

    recall = TP / active, precision = TP / selected, false_negative_rate = 1 - recall,
    false_positive_rate = FP / inactive (the paper's "false positives"), over_selection =
    selected / active, active_share and selected_share = mean share of the FFN per token ([0, 1]).
    """

    recall: float
    precision: float
    false_negative_rate: float
    false_positive_rate: float
    over_selection: float
    active_share: float
    selected_share: float

    @classmethod
    def of(cls, selected: np.ndarray, active: np.ndarray) -> "Selection":
        """From bool arrays [tokens, ffn_dim] of selected and truly active neurons."""
        tp, n_act, n_sel = int((selected & active).sum()), int(active.sum()), int(selected.sum())
        n_inact = active.size - n_act
        recall = tp / n_act if n_act else 1.0
        return cls(recall, tp / n_sel if n_sel else 1.0, 1.0 - recall,
                   (n_sel - tp) / n_inact if n_inact else 0.0, n_sel / n_act if n_act else float("inf"),
                   n_act / active.size, n_sel / active.size)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def trace_logits(predictor: LowRankPredictors, trace, layer: int, chunk: int = 4096) -> np.ndarray:
    """float16 [tokens, ffn_dim]: the predictor's logits for layer `layer` on the trace's inputs."""
    if trace.inputs is None:
        raise FlashnbError("this trace has no FFN inputs; record it with inputs=True to evaluate predictors")
    x = trace.inputs[layer]
    out = np.empty((x.shape[0], predictor.ffn_dim), dtype=np.float16)
    for s in range(0, x.shape[0], chunk):
        out[s:s + chunk] = predictor.logits(layer, torch.from_numpy(x[s:s + chunk])).clamp(-60000, 60000).half().numpy()
    return out


def selection_metrics(predictor, trace) -> list[Selection]:
    """Per layer: the predictor's selection on `trace` (its recorded FFN inputs) against the trace's
    truly active sets."""
    out = []
    for i in range(trace.n_layers):
        sel = predictor.predict(i, torch.from_numpy(trace.inputs[i])).numpy()
        out.append(Selection.of(sel, trace.mask(i)))
    return out


def mean_selection(per_layer: list[Selection]) -> Selection:
    """The unweighted mean over layers of every field (what the targets are stated on)."""
    keys = Selection.__dataclass_fields__
    return Selection(**{k: float(np.mean([getattr(s, k) for s in per_layer])) for k in keys})
