"""Training low-rank predictors on activation traces.

Per layer, a `LowRankPredictor` learns from the trace's (FFN input, active set) pairs with a
balanced binary cross-entropy: positives (active neurons, a few percent) are weighted by
`pos_weight` x (negatives / positives) of that layer, so both classes count about equally.
Optimizer: AdamW with a cosine learning-rate decay over `epochs` passes of shuffled mini-batches.

Initialisation (`init`):
  "random": PyTorch's default Linear init (what the paper does: train from scratch);
  "pca":    the rank-r projection of the FFN's first projection that best reconstructs its
            pre-activations on the trace (top-r principal directions of x W^T), then trained as
            above. It needs the model's FFN weights; training fits the decision boundary from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from flashnb.errors import FlashnbError
from flashnb.core.predictor import LowRankPredictor, LowRankPredictors, first_projection
from flashnb.models.fingerprint import model_fingerprint
from flashnb.text import show_progress
from flashnb.training.traces import check_model


@dataclass
class PredictorTrainConfig:
    """rank: default rank; ranks: per-layer ranks (overrides rank); threshold: selection probability;
    epochs: passes over the trace; batch_size: tokens per step; lr: peak learning rate;
    pos_weight: multiplier on the negative/positive ratio used to weight positives."""

    rank: int = 64
    ranks: list[int] | None = None
    threshold: float = 0.5
    epochs: int = 4
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.0
    pos_weight: float = 1.0
    init: str = "random"
    seed: int = 0

    def layer_ranks(self, n_layers: int) -> list[int]:
        ranks = list(self.ranks) if self.ranks else [self.rank] * n_layers
        if len(ranks) != n_layers or min(ranks) < 1:
            raise FlashnbError(f"ranks {ranks} must be {n_layers} positive integers, one per layer")
        return ranks


def _pca_init(p: LowRankPredictor, proj: torch.nn.Linear, x: torch.Tensor) -> None:
    w = proj.weight.detach().float()                     # [F, d]
    sample = x[:: max(1, x.shape[0] // 8192)]
    z = sample @ w.T                                     # [n, F] pre-activations without bias
    _, vecs = torch.linalg.eigh(z.T @ z)                  # ascending eigenvalues
    v = vecs[:, -p.rank:]                                 # [F, r] top principal directions
    with torch.no_grad():
        p.up.weight.copy_(v)
        p.down.weight.copy_(v.T @ w)
        p.up.bias.copy_(proj.bias.detach().float() if proj.bias is not None else torch.zeros(w.shape[0]))


def train_layer(x: np.ndarray, active: np.ndarray, rank: int, cfg: PredictorTrainConfig,
                proj=None, desc: str = "", progress: bool = True) -> LowRankPredictor:
    """One layer's predictor from FFN inputs x (float16 [N, d_model]) and active masks
    (bool [N, ffn_dim]); `proj` (the layer's FFN input projection whose activation decides, see
    flashnb.core.predictor.first_projection) is needed for init="pca"."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    X = torch.from_numpy(np.ascontiguousarray(x)).float()
    Y = torch.from_numpy(np.ascontiguousarray(active))
    n, d = X.shape
    p = LowRankPredictor(d, Y.shape[1], rank)
    if cfg.init == "pca":
        if proj is None:
            raise FlashnbError("init='pca' needs the layer's FFN input projection (pass proj=first_projection(...)[0])")
        _pca_init(p, proj, X)
    elif cfg.init != "random":
        raise FlashnbError(f"unknown predictor init {cfg.init!r}; use 'random' or 'pca'")
    pos = Y.sum().item()
    ratio = (Y.numel() - pos) / max(pos, 1)
    pos_weight = torch.tensor(cfg.pos_weight * ratio)
    opt = torch.optim.AdamW(p.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    bar = tqdm(total=total, disable=not show_progress(progress), desc=desc, unit="step",
               leave=False)
    step = 0
    p.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=g)
        for s in range(0, n, cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            for group in opt.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.binary_cross_entropy_with_logits(p(X[idx]), Y[idx].float(), pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return p.eval()


def train_predictors(model, trace, cfg: PredictorTrainConfig, progress: bool = True) -> LowRankPredictors:
    """A predictor per layer of `model`, trained on `trace` (recorded from `model` with inputs)."""
    if trace.inputs is None:
        raise FlashnbError("the trace has no FFN inputs; record it with inputs=True to train predictors")
    check_model(trace, model)
    ranks = cfg.layer_ranks(trace.n_layers)
    layers = []
    for i in tqdm(range(trace.n_layers), disable=not show_progress(progress), desc="predictors", unit="layer"):
        layers.append(train_layer(trace.inputs[i], trace.mask(i), ranks[i], cfg, first_projection(model.layers[i].ffn, model.config)[0],
                                  desc=f"layer {i}", progress=progress))
    return LowRankPredictors(layers, [cfg.threshold] * trace.n_layers, model_fingerprint(model))


def train_lookahead(model, trace, cfg: PredictorTrainConfig, progress: bool = True) -> LowRankPredictors:
    """Lookahead predictors (Deja Vu's asynchronous lookahead): predictor i guesses layer i + 1's active
    neurons from layer i's FFN input, one layer early, so the engine can start layer i + 1's reads
    before its attention runs. L - 1 predictors for L layers; trained like the same-layer ones."""
    if trace.inputs is None:
        raise FlashnbError("the trace has no FFN inputs; record it with inputs=True to train predictors")
    check_model(trace, model)
    if trace.n_layers < 2:
        raise FlashnbError("lookahead predictors need a model of at least 2 layers")
    ranks = cfg.layer_ranks(trace.n_layers)
    layers = [train_layer(trace.inputs[i], trace.mask(i + 1), ranks[i + 1], cfg, None, desc=f"lookahead {i + 1}",
                          progress=progress)
              for i in tqdm(range(trace.n_layers - 1), disable=not show_progress(progress), desc="lookahead",
                            unit="layer")]
    return LowRankPredictors(layers, [cfg.threshold] * (trace.n_layers - 1), model_fingerprint(model),
                             lookahead=True)
