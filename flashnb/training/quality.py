"""How good is a predictor? Its selections against the truly active neurons, and what the model
loses when every FFN uses only the neurons a predictor selects.

`restricted_ffns(model, predictor)` makes each `block.ffn` zero the activations of the neurons the
predictor did not select (for the FFN input it actually receives, so errors of earlier layers
propagate). This is a quality check that computes the whole FFN and masks it; the engine computes
only the selected neurons. With the oracle predictor the output equals the dense model's.

`quality` measures held-out perplexity dense vs restricted and top-1 next-token agreement.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from flashnb.errors import FlashnbError


def _restricted_forward(ffn, predictor, layer: int, gated: bool):
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


@dataclass(frozen=True)
class Quality:
    """Next-token quality of a model whose FFNs use only the predicted neurons, against the dense one."""

    tokens: int            # targets scored
    dense_loss: float      # nats per token
    predicted_loss: float
    top1_agreement: float  # share of positions where both pick the same argmax token

    @property
    def dense_perplexity(self) -> float:
        return math.exp(self.dense_loss)

    @property
    def predicted_perplexity(self) -> float:
        return math.exp(self.predicted_loss)

    @property
    def perplexity_increase(self) -> float:
        """predicted / dense perplexity - 1."""
        return math.exp(self.predicted_loss - self.dense_loss) - 1.0

    def to_dict(self) -> dict:
        """Every field and property, for JSON cards."""
        return {**asdict(self), "dense_perplexity": self.dense_perplexity,
                "predicted_perplexity": self.predicted_perplexity, "perplexity_increase": self.perplexity_increase}


@contextmanager
def restricted_ffns(model: torch.nn.Module, predictor):
    """Within the block, each FFN of `model` uses only the neurons `predictor` selects."""
    if predictor.n_layers != len(model.layers) or predictor.ffn_dim != model.config.ffn_dim:
        raise FlashnbError(f"the predictor covers {predictor.n_layers} layers x {predictor.ffn_dim} neurons, "
                           f"the model has {len(model.layers)} x {model.config.ffn_dim}; use predictors "
                           "trained for this model")
    for i, block in enumerate(model.layers):
        block.ffn.forward = _restricted_forward(block.ffn, predictor, i, model.config.gated)
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
            dense_logits: list[torch.Tensor] | None = None) -> "Quality":
    """Next-token quality of the restricted model against the dense one on token stream `ids`.

    Each window of `context` tokens runs from an empty context. `dense_logits` (from `dense_window_logits`) skips the
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
    return Quality(count, nll_d / count, nll_p / count, agree / count)


@torch.no_grad()
def dense_window_logits(model: torch.nn.Module, ids, context: int | None = None) -> list[torch.Tensor]:
    """The dense model's float32 logits [window_len, vocab] for every window of `windows(ids, context)`."""
    ids = np.asarray(ids, dtype=np.int64)
    context = context or model.config.max_position_embeddings
    model.eval()
    return [model(torch.from_numpy(ids[s:e])[None])[0] for s, e in windows(ids, context)]


# ----------------------------------------------------------------------------------------------
# Selection metrics: how well a predictor picks the active neurons

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
def trace_logits(predictor, trace, layer: int, chunk: int = 4096) -> np.ndarray:
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
