"""What does the model lose when every FFN uses only the neurons a predictor selects?

`restricted_ffns(model, predictor)` makes each `block.ffn` zero the activations of the neurons the
predictor did not select (for the FFN input it actually receives, so errors of earlier layers
propagate). This is a quality check that computes the whole FFN and masks it; the engine computes
only the selected neurons. With the oracle predictor the output equals the dense model's.

`quality` measures held-out perplexity dense vs restricted and top-1 next-token agreement.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from flashnb.errors import FlashnbError


def _restricted_forward(ffn, predictor, layer: int):
    gated = not hasattr(ffn, "fc1")

    def forward(x: torch.Tensor) -> torch.Tensor:
        keep = predictor.predict(layer, x).to(x.dtype)
        if gated:
            a = ffn.act(ffn.gate_proj(x)) * keep
            out = ffn.down_proj(a * ffn.up_proj(x))
        else:
            a = ffn.act(ffn.fc1(x)) * keep
            out = ffn.fc2(a)
        if ffn.record:
            ffn.last_activation = a
        return out

    return forward


@contextmanager
def restricted_ffns(model: torch.nn.Module, predictor):
    """Within the block, each FFN of `model` uses only the neurons `predictor` selects."""
    if predictor.n_layers != len(model.layers) or predictor.ffn_dim != model.config.ffn_dim:
        raise FlashnbError(f"the predictor covers {predictor.n_layers} layers x {predictor.ffn_dim} neurons, "
                           f"the model has {len(model.layers)} x {model.config.ffn_dim}; use predictors "
                           "trained for this model")
    for i, block in enumerate(model.layers):
        block.ffn.forward = _restricted_forward(block.ffn, predictor, i)
    try:
        yield model
    finally:
        for block in model.layers:
            del block.ffn.forward  # back to the class's forward


def windows(ids: np.ndarray, context: int) -> list[tuple[int, int]]:
    """Non-overlapping (start, end) windows of at most `context` inputs that each have a target."""
    n = len(ids) - 1
    if n < 1:
        raise FlashnbError("need at least 2 token ids to measure next-token prediction")
    return [(s, min(n, s + context)) for s in range(0, n, context)]


@torch.no_grad()
def quality(model: torch.nn.Module, predictor, ids, context: int | None = None,
            dense_logits: list[torch.Tensor] | None = None) -> dict:
    """Next-token quality of the restricted model against the dense one on token stream `ids`.

    Each window of `context` tokens runs from an empty context. Returns tokens (targets scored),
    dense_loss / predicted_loss (nats/token), dense_perplexity, predicted_perplexity,
    perplexity_increase (relative, predicted / dense - 1) and top1_agreement (share of positions
    where both pick the same argmax token). `dense_logits` (from `dense_window_logits`) skips the
    dense passes when the same stream is scored repeatedly (e.g. a threshold slider).
    """
    ids = np.asarray(ids, dtype=np.int64)
    context = context or model.config.max_position_embeddings
    spans = windows(ids, context)
    dense_logits = dense_logits if dense_logits is not None else dense_window_logits(model, ids, context)
    nll_d = nll_p = 0.0
    agree = count = 0
    model.eval()
    with restricted_ffns(model, predictor):
        for (s, e), ld in zip(spans, dense_logits):
            x = torch.from_numpy(ids[s:e])[None]
            y = torch.from_numpy(ids[s + 1:e + 1])
            lp = model(x)[0]
            nll_d += F.cross_entropy(ld, y, reduction="sum").item()
            nll_p += F.cross_entropy(lp, y, reduction="sum").item()
            agree += int((ld.argmax(-1) == lp.argmax(-1)).sum())
            count += e - s
    dl, pl = nll_d / count, nll_p / count
    return {"tokens": count, "dense_loss": dl, "predicted_loss": pl, "dense_perplexity": math.exp(dl),
            "predicted_perplexity": math.exp(pl), "perplexity_increase": math.exp(pl - dl) - 1.0,
            "top1_agreement": agree / count}


@torch.no_grad()
def dense_window_logits(model: torch.nn.Module, ids, context: int | None = None) -> list[torch.Tensor]:
    """The dense model's float32 logits [window_len, vocab] for every window of `windows(ids, context)`."""
    ids = np.asarray(ids, dtype=np.int64)
    context = context or model.config.max_position_embeddings
    model.eval()
    return [model(torch.from_numpy(ids[s:e])[None])[0] for s, e in windows(ids, context)]
