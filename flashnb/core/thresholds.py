"""Sparsity for SwiGLU models: thresholded gate activations (CATS, Lee et al. 2024).

A SiLU gate is almost never exactly zero, so a SwiGLU FFN has no free sparsity to predict. CATS makes
some: neuron i of layer l fires for a token only when |SiLU(gate_i . x)| exceeds the layer's
threshold t_l, chosen so that a target fraction of the neurons stays below it on calibration text;
the others count as zero. The model changes a little (the "thresholded model"); the engine then
reproduces that model exactly, reading only the neurons that fire.

Three criteria (the score compared with t_l):
  gate         |SiLU(gate_i . x)|: CATS. The gate alone decides, so the gate rows can stay in DRAM and
               decide before anything is read (store layout "gate-apart", `GateThresholds`).
  scaled-gate  |SiLU(gate_i . x)| * scale_i, scale_i the root-mean-square of neuron i's up projection on
               the calibration text: a neuron whose up projection is large needs a smaller gate to
               matter. Still decided by the gate alone (plus one number per neuron).
  product      |SiLU(gate_i . x) * (up_i . x)|: the neuron's actual activation, what its down column is
               multiplied by. It needs the up row, so it cannot decide before the read: low-rank
               predictors choose what to read (a bundled store), the engine then drops what is below.

`calibrate` sets the thresholds from a model and calibration tokens; `Thresholds.save` / `load_thresholds`
keep them as `thresholds.safetensors` in the model's predictors folder, with the model's fingerprint;
`apply_thresholds` turns a dense model into the thresholded reference the engine must equal;
`GateThresholds` is the predictor that decides the neurons from the gate rows held in DRAM (a store of
layout "gate-apart").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

from flashnb.core.predictor import Predictor
from flashnb.errors import FlashnbError
from flashnb.models.checkpoint import ffn_param
from flashnb.models.fingerprint import check_fingerprint, model_fingerprint
from flashnb.models.llama import Keep
from flashnb.paths import publish, read_flashnb_file

FORMAT = "flashnb-thresholds/1"
FILE = "thresholds.safetensors"
CRITERIA = ("gate", "scaled-gate", "product")  # CATS: |SiLU(gate)|; |SiLU(gate)| * rms(up); |SiLU(gate) * up|


@dataclass(frozen=True)
class Thresholds:
    """Per-layer thresholds (and per-neuron scales) of a thresholded SwiGLU model.

    values: t_l per layer; scales: float32 [layers, ffn_dim] (all 1 but for "scaled-gate");
    sparsity: the target fraction of neurons below threshold on the calibration text; measured: the
    fraction each layer reached there; criterion: one of CRITERIA; fingerprint: the model's.
    """

    values: tuple[float, ...]
    scales: torch.Tensor
    sparsity: float
    measured: tuple[float, ...]
    criterion: str
    fingerprint: str
    calibration_tokens: int

    @property
    def n_layers(self) -> int:
        return len(self.values)

    def keep(self, layer: int) -> Keep:
        """The rule of `layer` (flashnb.models.llama.Keep)."""
        return Keep(self.values[layer], self.scales[layer], self.criterion == "product")

    def save(self, folder: str | Path) -> Path:
        """Write `folder`/thresholds.safetensors (atomically); returns its path."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        header = {"format": FORMAT, "fingerprint": self.fingerprint, "criterion": self.criterion,
                  "sparsity": self.sparsity, "values": list(self.values), "measured": list(self.measured),
                  "calibration_tokens": self.calibration_tokens}
        tmp = out / (FILE + ".tmp")
        save_file({"scales": self.scales.float().contiguous()}, str(tmp), metadata={"flashnb": json.dumps(header)})
        publish(tmp, out / FILE)
        return out / FILE


def load_thresholds(folder: str | Path, model: nn.Module | None = None) -> Thresholds:
    """The thresholds saved in `folder`; with `model`, checked to belong to it."""
    f = Path(folder) / FILE
    if not f.is_file():
        raise FlashnbError(f"{f} is missing; calibrate thresholds with `flashnb train-predictors --model FOLDER "
                           "--sparsity 0.5` (SwiGLU models) or pass the folder that holds them")
    header, tensors = read_flashnb_file(f, "pt", "safetensors file", "calibrate the thresholds again")
    scales = tensors.get("scales")
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)  # noqa: E731
    ok = (isinstance(header, dict) and header.get("format") == FORMAT and header.get("criterion") in CRITERIA
          and isinstance(header.get("values"), list) and all(num(v) and v >= 0 for v in header["values"])
          and isinstance(header.get("fingerprint"), str) and num(header.get("sparsity"))
          and scales is not None and scales.dim() == 2 and scales.shape[0] == len(header["values"])
          and bool(torch.isfinite(scales).all()) and bool((scales >= 0).all()))
    if not ok:
        raise FlashnbError(f"{f}: not flashnb thresholds ({FORMAT}) or damaged; calibrate the thresholds again with "
                           "`flashnb train-predictors --model FOLDER --sparsity 0.5`")
    t = Thresholds(tuple(float(v) for v in header["values"]), scales.float(), float(header["sparsity"]),
                   tuple(float(v) for v in header.get("measured", [])), header["criterion"], header["fingerprint"],
                   int(header.get("calibration_tokens", 0)))
    if model is not None:
        check_thresholds(t, model.config)
        check_fingerprint(t.fingerprint, model_fingerprint(model), str(f),
                          "calibrate thresholds for this model with `flashnb train-predictors --sparsity`")
    return t


def thresholds_in(folder: str | Path) -> Thresholds | None:
    """The thresholds saved in `folder` (a predictors folder), None when it holds none."""
    return load_thresholds(folder) if (Path(folder) / FILE).is_file() else None


TWO_STAGE = "two-stage"  # in a predictors folder: candidates/ and keep/, each a thresholds.safetensors


def two_stage_in(folder: str | Path) -> tuple[Thresholds, Thresholds] | None:
    """The two-stage rule saved in `folder`/two-stage (`flashnb train-predictors --two-stage-only`): (candidates,
    the scaled-gate thresholds whose neurons the gate in DRAM picks for reading; keep, the product thresholds the
    read neurons must pass); None when the folder holds none."""
    d = Path(folder) / TWO_STAGE
    if not (d / "candidates" / FILE).is_file():
        return None
    pick, keep = load_thresholds(d / "candidates"), load_thresholds(d / "keep")
    if pick.criterion == "product" or keep.criterion != "product" or pick.fingerprint != keep.fingerprint:
        raise FlashnbError(f"{d}: candidates must be gate thresholds and keep product thresholds of one model; "
                           "write them again with `flashnb train-predictors --two-stage-only`")
    return pick, keep


def check_thresholds(t: Thresholds, config) -> None:
    """One clear error unless `t` fits a gated model of `config`."""
    if not config.gated:
        raise FlashnbError(f"thresholds are for gated (SwiGLU) FFNs; this {config.model_type} model's FFN is "
                           f"{config.ffn_activation} without a gate: it uses predictors")
    if tuple(t.scales.shape) != (config.num_hidden_layers, config.ffn_dim):
        raise FlashnbError(f"the thresholds cover {t.scales.shape[0]} layers x {t.scales.shape[1]} neurons; the model "
                           f"has {config.num_hidden_layers} x {config.ffn_dim}: calibrate thresholds for this model")


@dataclass(frozen=True)
class Activations:
    """Every layer's dense act(gate x) and up x [tokens, ffn_dim] on calibration text, and the model's
    fingerprint: what `thresholds_for` sets thresholds from (one pass serves every target sparsity)."""

    gates: list[torch.Tensor]
    ups: list[torch.Tensor]
    fingerprint: str

    @property
    def tokens(self) -> int:
        return int(self.gates[0].shape[0])


@torch.no_grad()
def activations(model: nn.Module, ids, context: int = 256) -> Activations:
    """The gate activations and up projections of the dense `model` on token ids `ids` (1-D), run in
    windows of `context` tokens."""
    c = model.config
    if not c.gated:
        raise FlashnbError(f"thresholds are for gated (SwiGLU) FFNs; this {c.model_type} model has none")
    ids = torch.as_tensor(ids).reshape(-1)
    if ids.numel() < 2:
        raise FlashnbError("calibrating thresholds needs at least 2 tokens of text")
    gates, ups = _gate_and_up(model, ids, min(context, c.max_position_embeddings))
    return Activations(gates, ups, model_fingerprint(model))


def thresholds_for(acts: Activations, sparsity: float, criterion: str = "scaled-gate") -> Thresholds:
    """Thresholds for which a fraction `sparsity` of each layer's neurons stays below threshold on the
    calibration text of `acts`."""
    if criterion not in CRITERIA:
        raise FlashnbError(f"unknown threshold criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise FlashnbError(f"the target sparsity must lie in [0, 1), got {sparsity!r}")
    values, measured, scales = [], [], []
    for a, u in zip(acts.gates, acts.ups):
        scale = u.float().pow(2).mean(0).sqrt() if criterion == "scaled-gate" else torch.ones(a.shape[1])
        score = ((a.float() * u.float()) if criterion == "product" else a.float()).abs().mul_(scale).reshape(-1)
        k = int(round(sparsity * score.numel()))
        t = float(score.kthvalue(k).values) if k > 0 else 0.0
        values.append(t)
        measured.append(float((score <= t).float().mean()) if k > 0 else 0.0)
        scales.append(scale)
    return Thresholds(tuple(values), torch.stack(scales), float(sparsity), tuple(measured), criterion,
                      acts.fingerprint, acts.tokens)


def calibrate(model: nn.Module, ids, sparsity: float, criterion: str = "scaled-gate",
              context: int = 256) -> Thresholds:
    """Thresholds for which a fraction `sparsity` of each layer's neurons stays below threshold on the
    token ids `ids` (1-D), run in windows of `context` tokens through the dense `model`."""
    return thresholds_for(activations(model, ids, context), sparsity, criterion)


class Fires:
    """Which neurons a thresholded model fires (among those `predictor` selects, when given), as a
    predictor-like `predict(layer, x)` -> bool mask: what the engine computes, for measuring its quality
    (flashnb.training.quality) without changing `model`. `kept`: the share of neurons it kept at each call."""

    def __init__(self, model: nn.Module, thresholds: Thresholds, predictor=None):
        check_thresholds(thresholds, model.config)
        self.model, self.thresholds, self.predictor = model, thresholds, predictor
        self.n_layers, self.ffn_dim = thresholds.n_layers, model.config.ffn_dim
        self.kept: list[float] = []

    @torch.no_grad()
    def predict(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        ffn = self.model.layers[layer].ffn
        keep = self.thresholds.keep(layer).fires(ffn.act(ffn.gate_proj(x)), ffn.up_proj(x))
        keep = keep if self.predictor is None else keep & self.predictor.predict(layer, x)
        self.kept.append(float(keep.float().mean()))
        return keep


def _gate_and_up(model: nn.Module, ids: torch.Tensor, context: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every layer's dense act(gate x) and up x [tokens, ffn_dim] over `ids`."""
    gates: list[list[torch.Tensor]] = [[] for _ in model.layers]
    ups: list[list[torch.Tensor]] = [[] for _ in model.layers]

    def hook(i):
        def grab(ffn, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            gates[i].append(ffn.act(ffn.gate_proj(x)))
            ups[i].append(ffn.up_proj(x))
        return grab

    saved = [b.ffn.keep for b in model.layers]
    handles = [b.ffn.register_forward_pre_hook(hook(i)) for i, b in enumerate(model.layers)]
    try:
        for b in model.layers:
            b.ffn.keep = None  # calibrate on the dense model
        for s in range(0, ids.numel(), context):
            model(ids[s:s + context][None])
    finally:
        for h in handles:
            h.remove()
        for b, k in zip(model.layers, saved):
            b.ffn.keep = k
    return [torch.cat(g) for g in gates], [torch.cat(u) for u in ups]


def apply_thresholds(model: nn.Module, thresholds: Thresholds | None) -> nn.Module:
    """Make the dense `model` the thresholded model (None: dense again); returns it."""
    if thresholds is not None:
        check_thresholds(thresholds, model.config)
    for i, b in enumerate(model.layers):
        b.ffn.keep = None if thresholds is None else thresholds.keep(i)
    return model


class GateThresholds(Predictor):
    """The predictor of a thresholded SwiGLU model whose gate rows stay in DRAM (a store of layout
    "gate-apart"): neuron i of layer l is selected when |act(gate_i . x)| * scale_i > t_l, exactly the
    neurons the thresholded model fires. Its DRAM: the gate matrices (counted with the store's resident
    tensors) and the scales (counted here)."""

    def __init__(self, store, thresholds: Thresholds):
        from flashnb.core.resident import shared_tensors
        from flashnb.models.common import activation

        if not getattr(store, "gate_in_dram", False):
            raise FlashnbError(f"{store.path} keeps the gate on flash (layout {store.layout!r}); gate thresholds read "
                               "the gate from DRAM: convert the model with `flashnb convert --layout gate-apart`")
        check_thresholds(thresholds, store.config)
        if thresholds.criterion == "product":
            raise FlashnbError("thresholds on the product |SiLU(gate) * up| need each neuron's up row, which lies on "
                               "flash: run them with low-rank predictors on a bundled store, or calibrate gate "
                               "thresholds (--criterion scaled-gate or gate)")
        if store.fingerprint and thresholds.fingerprint != store.fingerprint:
            raise FlashnbError(f"the thresholds belong to another model (fingerprint {thresholds.fingerprint}; the store "
                               f"{store.path} holds {store.fingerprint}): calibrate thresholds for this model with "
                               "`flashnb train-predictors --model HF_FOLDER --sparsity 0.5`")
        self.thresholds = thresholds
        self.ffn_dim = store.ffn_dim
        gate = store.config.ffn_parts[0][0]
        tensors = shared_tensors(store, store.dtype)
        self.gates = [tensors[ffn_param(i, gate)] for i in range(store.num_layers)]
        self.act = activation(store.config.ffn_activation, "config.json")
        self.keeps = [thresholds.keep(i) for i in range(store.num_layers)]

    @property
    def name(self) -> str:
        t = self.thresholds
        return f"{t.criterion} thresholds on the gate in DRAM ({t.sparsity:.0%} sparsity)"

    def select(self, layer: int, x: torch.Tensor) -> np.ndarray:
        a = self.act(torch.mv(self.gates[layer], x.to(self.gates[layer].dtype)))
        return np.flatnonzero(self.keeps[layer].fires(a).numpy())

    def memory_bytes(self, itemsize: int) -> int:
        return itemsize * self.thresholds.scales.numel() if self.thresholds.criterion == "scaled-gate" else 0
