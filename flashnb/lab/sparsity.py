"""Lesson 02, sparsity and predictors: how good are the predictors at any threshold?

`ThresholdExplorer` computes, on one held-out trace, each layer's predictor logits, the dense model's
logits and every neuron's contribution to its FFN's output once; `measure(threshold)` then gives the
selection metrics (fast), the share of the FFN's output that the missed neurons carry, and the quality
of the model whose FFNs use only the selected neurons (a forward pass over the held-out tokens).
The statistics of the trace itself (sparsity, reuse, closest friends) are in flashnb.training.tracestats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flashnb.core.predictor import first_projection
from flashnb.text import fmt
from flashnb.training.quality import Quality, Selection, dense_window_logits, mean_selection, quality, trace_logits


@dataclass(frozen=True)
class ThresholdResult:
    """Selection metrics per layer and their mean, and the predicted-only quality, at one threshold."""

    threshold: float
    per_layer: list[Selection]
    mean: Selection
    quality: Quality
    missed_mass: float = 0.0   # share of the FFN output's magnitude carried by the neurons it missed (layer mean)


@dataclass(frozen=True)
class ThresholdCurve:
    """Mean-over-layers recall and over-selection by threshold (measured on the trace)."""

    thresholds: list[float]
    recall: list[float]
    over_selection: list[float]


class ThresholdExplorer:
    """Predictor metrics and predicted-only quality at any threshold, on one held-out trace."""

    def __init__(self, model, predictors, trace, ids: np.ndarray, context: int | None = None):
        self.model, self.predictors, self.trace = model, predictors, trace
        self.ids = np.asarray(ids, dtype=np.int64)
        self.context = context or model.config.max_position_embeddings
        self.logits = [trace_logits(predictors, trace, i) for i in range(trace.n_layers)]
        self.masks = [trace.mask(i) for i in range(trace.n_layers)]
        self.dense = dense_window_logits(model, self.ids, self.context)
        self.mass = [neuron_mass(model, i, trace.inputs[i]) for i in range(trace.n_layers)]
        self._measured: dict[float, ThresholdResult] = {}

    def missed_mass(self, threshold: float) -> list[float]:
        """Per layer: the share of the FFN's output magnitude (summed over tokens) that the neurons the
        predictors miss at `threshold` would have contributed."""
        z = _logit(threshold)
        return [float(mass[lg <= z].sum() / max(mass.sum(), 1e-30)) for lg, mass in zip(self.logits, self.mass)]

    def selection(self, threshold: float) -> list[Selection]:
        """Per-layer selection metrics at probability `threshold` (from the cached logits)."""
        z = _logit(threshold)
        return [Selection.of(lg > z, m) for lg, m in zip(self.logits, self.masks)]

    def curve(self, thresholds=np.round(np.arange(0.1, 0.91, 0.1), 2)) -> ThresholdCurve:
        means = [mean_selection(self.selection(t)) for t in thresholds]
        return ThresholdCurve(list(map(float, thresholds)), [m.recall for m in means],
                              [m.over_selection for m in means])

    def measure(self, threshold: float) -> ThresholdResult:
        """Remembered per threshold, since the model and data do not change."""
        key = round(float(threshold), 6)
        if key not in self._measured:
            per_layer = self.selection(key)
            q = quality(self.model, self.predictors.with_thresholds(key), self.ids, self.context, self.dense)
            self._measured[key] = ThresholdResult(key, per_layer, mean_selection(per_layer), q,
                                                  float(np.mean(self.missed_mass(key))))
        return self._measured[key]


def _logit(threshold: float) -> float:
    """The predictor logit above which a neuron is selected at probability `threshold`."""
    return float(np.log(threshold / (1 - threshold)))


@torch.no_grad()
def neuron_mass(model, layer: int, inputs: np.ndarray) -> np.ndarray:
    """[tokens, ffn] float32: how much each neuron adds to its layer's FFN output for each traced input,
    |act(first projection)| x the norm of its column of the down projection (0 for an inactive neuron)."""
    ffn = model.layers[layer].ffn
    proj, act = first_projection(ffn, model.config)
    x = torch.from_numpy(np.asarray(inputs)).to(proj.weight.dtype)
    down = getattr(ffn, model.config.ffn_parts[-1][0]).weight          # [d_model, ffn]
    return (act(proj(x)).abs().float() * down.float().norm(dim=0)).numpy()


def threshold_text(m: ThresholdResult) -> str:
    """One line: the mean selection metrics and the quality, the paper's beside them."""
    s, q = m.mean, m.quality
    return (f"threshold {m.threshold:g} (measured over {q.tokens} held-out tokens): recall {s.recall:.1%} "
            f"(paper 95%), precision {s.precision:.1%}, false positives {s.false_positive_rate:.1%} (paper 7%), "
            f"over-selection {s.over_selection:.2f}x (paper ~3x), loads {s.selected_share:.1%} of the FFN per "
            f"token; the missed neurons carry {m.missed_mass:.2%} of the FFN's output | perplexity dense "
            f"{q.dense_perplexity:.2f} -> predicted-only "
            f"{q.predicted_perplexity:.2f} ({fmt(q.perplexity_increase, '+.1%')}), top-1 agreement "
            f"{q.top1_agreement:.1%}")
