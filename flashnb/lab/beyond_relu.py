"""Lesson 08, beyond ReLU: a SwiGLU model has no zeros to skip; thresholds make some, at a price.

- `activation_histogram`: how the two shipped models' FFN activations are spread: the ReLU model's
  exact zeros beside the SwiGLU model's |SiLU(gate)|, which is small but never zero.
- `SparsityExplorer`: for a criterion and a target sparsity (flashnb.core.thresholds), the thresholded
  model's held-out perplexity and top-1 agreement with the dense model, and what it reads from flash
  per token with a window (simulated on its own neuron sets: flashnb.core.simulate).
- `memory_routes`: where half of the SwiGLU model's bytes go when the gate stays in DRAM (it does not
  fit) and when low-rank predictors decide instead (it fits), beside the ReLU model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flashnb.core.defaults import WINDOW
from flashnb.core.engine import Policy
from flashnb.core.memory import MemoryPlan, min_budget, plan_memory
from flashnb.core.simulate import sets_from_trace, simulate
from flashnb.core.thresholds import Fires, activations, apply_thresholds, thresholds_for
from flashnb.errors import FlashnbError
from flashnb.lab.stats import TokenStats
from flashnb.text import fmt, wrap
from flashnb.training.quality import Quality, dense_window_logits, quality
from flashnb.training.traces import record

# What each criterion is called in the lesson's figures and sentences.
CRITERION_LABELS = {"gate": "|SiLU(gate)| (CATS)", "scaled-gate": "|SiLU(gate)| x rms(up)",
                    "product": "|SiLU(gate) x up|", "two-stage": "two stages (gate, product)"}


def whole_ffn_bytes(store, parts: int | None = None) -> int:
    """Bytes of every FFN matrix of `store`'s model at the store's precision (`parts` matrices per layer;
    default the model's own, gate included even where the store keeps it in DRAM): what read shares are of."""
    parts = parts or len(store.config.ffn_parts)
    return store.num_layers * store.ffn_dim * parts * store.row_format.part_bytes


# ----------------------------------------------------------------------------------------------
# The activations


@dataclass(frozen=True)
class ActivationHistogram:
    """Shares of the FFN activations in log10 |a| bins, pooled over layers and tokens, per model."""

    edges: np.ndarray            # log10 |activation| bin edges
    shares: dict[str, np.ndarray]  # model name -> share of its activations in each bin (zeros excluded)
    zero: dict[str, float]         # model name -> share exactly zero
    tokens: int

    def below(self, name: str, log10_value: float) -> float:
        """The share of model `name`'s activations at most 10**log10_value (zeros included)."""
        keep = self.edges[1:] <= log10_value
        return self.zero[name] + float(self.shares[name][keep].sum())


@torch.no_grad()
def activation_histogram(models: dict[str, torch.nn.Module], ids, bins: int = 60) -> ActivationHistogram:
    """The activation that decides whether a neuron counts, for each model on token ids `ids` (one window):
    act(fc1 x) for OPT, act(gate x) for a gated FFN."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]
    values = {}
    for name, model in models.items():
        for b in model.layers:
            b.ffn.record = True
        try:
            model(ids)
            values[name] = torch.cat([b.ffn.last_activation.float().abs().reshape(-1) for b in model.layers])
        finally:
            for b in model.layers:
                b.ffn.record = False
    nonzero = torch.cat([v[v > 0] for v in values.values()])
    lo, hi = float(nonzero.min().log10()), float(nonzero.max().log10())
    edges = np.linspace(np.floor(lo), np.ceil(hi), bins + 1)
    shares, zero = {}, {}
    for name, v in values.items():
        nz = v[v > 0]
        counts, _ = np.histogram(nz.log10().numpy(), bins=edges)
        shares[name], zero[name] = counts / v.numel(), float((v == 0).float().mean())
    return ActivationHistogram(edges, shares, zero, int(ids.shape[1]))


def histogram_text(h: ActivationHistogram) -> str:
    """The lesson's sentence about the histogram."""
    lines = [f"{name}: {fmt(100 * h.zero[name], '.1f')}% of its FFN activations are exactly 0; "
             f"{fmt(100 * h.below(name, -2), '.1f')}% are at most 0.01 in magnitude" for name in h.shares]
    return wrap(f"Over {h.tokens} tokens, every layer: " + "; ".join(lines) + ".")


# ----------------------------------------------------------------------------------------------
# What a target sparsity costs


@dataclass(frozen=True)
class SparsityPoint:
    """One criterion at one target sparsity, measured on held-out text.

    measured_sparsity: the share of neurons below threshold there (mean over layers); quality: the
    thresholded model against the dense one; read_share: bytes read from flash per token (window
    `window`, every layer's window kept) over the whole FFN's bytes, from the store the criterion runs
    on (gate-apart for the gate criteria: the gate is not read; bundled for "product")."""

    criterion: str
    sparsity: float
    measured_sparsity: float
    quality: Quality
    read_share: float
    window: int


class SparsityExplorer:
    """Thresholds for any target sparsity and criterion on the shipped SwiGLU model: quality and bytes read.

    `stores`: {"gate-apart": store, "bundled": store} of the same model; calibration on `calib_ids`, every
    measurement on `eval_ids` (windows of `context` tokens). One pass over the calibration text serves every
    threshold; each `measure` runs the held-out text twice (quality, then the thresholded sets)."""

    def __init__(self, model, stores: dict, calib_ids, eval_ids, window: int = WINDOW, context: int = 256):
        missing = {"gate-apart", "bundled"} - set(stores)
        if missing:
            raise FlashnbError(f"SparsityExplorer needs the model's stores of both layouts; missing {sorted(missing)}")
        self.model, self.stores, self.window, self.context = model, stores, window, context
        self.eval_ids = np.asarray(eval_ids, dtype=np.int64)
        self.acts = activations(model, calib_ids, context)
        self.dense = dense_window_logits(model, self.eval_ids, context)
        self._measured: dict[tuple[str, float], SparsityPoint] = {}

    def thresholds(self, criterion: str, sparsity: float):
        return thresholds_for(self.acts, sparsity, criterion)

    def measure(self, criterion: str, sparsity: float) -> SparsityPoint:
        key = (criterion, round(float(sparsity), 4))
        if key not in self._measured:
            t = self.thresholds(criterion, key[1])
            q = quality(self.model, Fires(self.model, t), self.eval_ids, self.context, self.dense)
            try:
                trace = record(apply_thresholds(self.model, t), self.eval_ids[:-1], self.context, inputs=False)
            finally:
                apply_thresholds(self.model, None)
            store = self.stores["bundled" if criterion == "product" else "gate-apart"]
            steps = simulate(sets_from_trace(trace), store, Policy(self.window, 1.0))
            stats = TokenStats.of(steps, store.num_layers * store.ffn_dim)
            below = 1.0 - float(np.mean([trace.mask(i).mean() for i in range(trace.n_layers)]))
            self._measured[key] = SparsityPoint(criterion, key[1], below, q, stats.bytes_read / whole_ffn_bytes(store), self.window)
        return self._measured[key]

    def curve(self, criterion: str, sparsities) -> list[SparsityPoint]:
        return [self.measure(criterion, s) for s in sparsities]

    def two_stage(self, candidates: float, sparsity: float) -> SparsityPoint:
        """Deciding in two stages: the gate in DRAM picks candidates (scaled-gate thresholds at `candidates`
        sparsity), their up | down bundles are read, and the product |SiLU(gate) x up| keeps those above its
        thresholds at `sparsity`: what FlashEngine(gate-apart store, GateThresholds(store, candidates),
        thresholds=product) runs. Reads: the candidates'; measured_sparsity: the share the two rules drop."""
        pick, keep = self.thresholds("scaled-gate", candidates), self.thresholds("product", sparsity)
        rule = Fires(self.model, keep, Fires(self.model, pick))
        q = quality(self.model, rule, self.eval_ids, self.context, self.dense)
        read = self.measure("scaled-gate", candidates).read_share
        return SparsityPoint("two-stage", round(float(sparsity), 4), 1.0 - float(np.mean(rule.kept)), q, read,
                             self.window)


def sparsity_text(points: list[SparsityPoint]) -> str:
    """The slider's sentence: each criterion at the chosen sparsity, with the share of neurons it zeroed on
    the held-out tokens (each rule's own: thresholds set on calibration text land near the target)."""
    p0 = points[0]
    lines = [wrap(f"Target sparsity {fmt(100 * p0.sparsity, '.0f')}%, measured on {p0.quality.tokens} held-out tokens; "
                  f"zero: the neurons each rule counted as zero there; top-1: agreement with the dense model; reads: "
                  f"the FFN's share a token reads, with a window of {p0.window}:")]
    w = max(len(CRITERION_LABELS[p.criterion]) for p in points)
    lines += [f"  {CRITERION_LABELS[p.criterion]:{w}s} zero {fmt(100 * p.measured_sparsity, '.1f'):>4s}%, perplexity "
              f"{fmt(100 * p.quality.perplexity_increase, '+.2f'):>6s}%, "
              f"top-1 {fmt(100 * p.quality.top1_agreement, '.1f'):>5s}%, reads {fmt(100 * p.read_share, '.1f'):>4s}%"
              for p in points]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Where half the memory goes


@dataclass(frozen=True)
class MemoryRoute:
    """How one way of running a model splits a memory budget (bytes), and the smallest budget it runs in."""

    name: str
    model_bytes: int
    budget_bytes: int
    other_bytes: int      # embeddings, attention, norms (and the row checksums)
    gate_bytes: int       # the gate matrices kept in DRAM (gate-apart)
    predictor_bytes: int  # low-rank predictors and per-neuron scales
    row_bytes: int        # what is left for the window's neuron rows (0 when it does not fit)
    rows_per_layer: int
    min_budget: float     # fraction of the model

    @property
    def fits(self) -> bool:
        return self.rows_per_layer > 0


def memory_route(name: str, store, budget: float, window: int, predictor_bytes: int = 0) -> MemoryRoute:
    """Split `budget` (a fraction of the model) for `store` at `window` with `predictor_bytes` of predictors."""
    shape = store.memory_shape()
    gate = 0
    if store.gate_in_dram:
        gate = store.num_layers * store.ffn_dim * store.d_model * store.np_dtype.itemsize
    need = min_budget(shape, window, predictor_bytes)
    try:
        plan: MemoryPlan | None = plan_memory(shape, budget, window, predictor_bytes)
    except FlashnbError:
        plan = None
    total = int(budget * shape.model_bytes)
    return MemoryRoute(name, shape.model_bytes, total, shape.resident_bytes - gate, gate, predictor_bytes,
                       plan.cache_bytes if plan else 0, plan.capacity_rows if plan else 0, need)


def memory_text(routes: list[MemoryRoute], needed_rows: dict[str, float]) -> str:
    """The lesson's sentence: which route fits the budget, and how its rows compare with one token's set."""
    parts = []
    for r in routes:
        if r.fits:
            need = needed_rows.get(r.name)
            parts.append(f"{r.name}: fits, {r.rows_per_layer} rows per layer"
                         + (f" for a token that needs {fmt(need, '.0f')} neurons per layer" if need else ""))
        else:
            parts.append(f"{r.name}: does not fit (needs at least {fmt(100 * r.min_budget, '.1f')}% of the model)")
    return wrap(f"At {fmt(100 * routes[0].budget_bytes / routes[0].model_bytes, '.0f')}% of each model in DRAM: "
                + "; ".join(parts) + ".")


@dataclass(frozen=True)
class BudgetReads:
    """Bytes read per token from flash (a share of the FFN's bytes) at each memory budget that the route
    fits in, simulated on recorded neuron sets."""

    name: str
    window: int
    budgets: list[float]
    read_share: list[float]


def reads_by_budget(name: str, sets: list[list[np.ndarray]], store, window: int, budgets,
                    predictor_bytes: int = 0, ffn_parts: int | None = None) -> BudgetReads:
    """Simulate `sets[token][layer]` on `store` at each budget (those it does not fit in are left out; at the
    smallest one it fits in, one row per layer, every token would be served neuron by neuron).
    The share is of the whole FFN (`ffn_parts` matrices of d_model x ffn_dim per layer; default the
    model's own: 3 for a gated FFN, 2 for OPT), so a gate kept in DRAM counts as never read."""
    ffn_bytes = whole_ffn_bytes(store, ffn_parts)
    shape, kept, shares = store.memory_shape(), [], []
    least = min_budget(shape, window, predictor_bytes)
    for b in sorted({float(b) for b in budgets if b >= least}):
        steps = simulate(sets, store, Policy(window, float(b)), predictor_bytes)
        kept.append(float(b))
        shares.append(TokenStats.of(steps, store.num_layers * store.ffn_dim).bytes_read / ffn_bytes)
    return BudgetReads(name, window, kept, shares)


def route_sets(model, ids, predictors=None, thresholds=None, context: int = 256) -> list[list[np.ndarray]]:
    """Neuron ids per token per layer on token ids `ids`: those `predictors` select on the dense model's FFN
    inputs, or those the model thresholded with `thresholds` fires (what each route reads)."""
    try:
        trace = record(apply_thresholds(model, thresholds) if thresholds is not None else model,
                       np.asarray(ids, dtype=np.int64), context, inputs=predictors is not None)
    finally:
        if thresholds is not None:
            apply_thresholds(model, None)
    return sets_from_trace(trace, predictors)


def needed_rows(predictors) -> float:
    """Neurons per layer a token's predicted set holds, on the predictors' held-out card (mean of layers)."""
    return float(predictors.card["heldout"]["mean"]["selected_share"]) * predictors.ffn_dim


@dataclass(frozen=True)
class EngineCheck:
    """The flash engine against its reference on the same tokens: greedy tokens equal, the largest logit
    difference, and what it held and read."""

    name: str
    tokens: list[int]
    same_tokens: bool
    max_logit_diff: float
    max_logit: float      # the reference's largest |logit|, the scale of the difference
    dram_bytes: int
    model_bytes: int
    read_share: float  # bytes read per generated token / the whole FFN's bytes

    @property
    def rounding_only(self) -> bool:
        """The same tokens, and logits that differ by at most 1% of the largest (a store in fp16 keeps about
        three significant digits; flashnb.lab.byo.compare uses the same rule)."""
        return self.same_tokens and self.max_logit_diff <= 1e-2 * self.max_logit


@torch.no_grad()
def engine_check(name: str, store, predictor, policy: Policy, prompt: list[int], n: int, reference,
                 thresholds=None) -> EngineCheck:
    """Generate `n` greedy tokens from `prompt` with the flash engine and compare every position's logits
    with `reference` (a model computing the same function densely) on the engine's own tokens."""
    from flashnb.core.engine import FlashEngine
    from flashnb.core.generate import generate, greedy_with_logits

    with FlashEngine(store, predictor, policy, thresholds=thresholds) as eng:
        out, logits = greedy_with_logits(eng, prompt, n)
        steps, mem = eng.steps[len(prompt):], eng.memory
    ref = reference(torch.tensor([prompt + out[:-1]]))[0].float()
    expected = list(generate(reference, prompt, n))
    read = TokenStats.of(steps, store.num_layers * store.ffn_dim).bytes_read
    return EngineCheck(name, out, out == expected, float((logits - ref).abs().max()),
                       float(ref.abs().max()), mem.used_bytes, mem.model_bytes, read / whole_ffn_bytes(store))


def check_text(checks: list[EngineCheck]) -> str:
    """One line per engine run: equal to its reference, the DRAM it held and what it read."""
    return "\n".join(wrap(f"{c.name}: {len(c.tokens)} tokens, same as its reference: {c.same_tokens}, largest logit "
                          f"difference {c.max_logit_diff:.2g} ({c.max_logit_diff / c.max_logit:.1e} of the largest); {fmt(100 * c.dram_bytes / c.model_bytes, '.0f')}% of the "
                          f"model in DRAM, {fmt(100 * c.read_share, '.1f')}% of the FFN read per token") for c in checks)


def card_text(thresholds_card: dict, sparsity: float) -> str:
    """The SwiGLU model's card (thresholds.json) at `sparsity`: each criterion's held-out quality, and the
    predictors'."""
    rows = [r for r in thresholds_card["sweep"] if abs(r["sparsity"] - sparsity) < 1e-9]
    if not rows:
        raise FlashnbError(f"the card measured {sorted({r['sparsity'] for r in thresholds_card['sweep']})}, "
                           f"not {sparsity}")
    tokens = thresholds_card["heldout"]["tokens"]
    lines = [f"thresholds.json, {tokens} held-out tokens, {fmt(100 * sparsity, '.0f')}% target sparsity:",
             f"  {'criterion':28s} {'perplexity':>10s} {'top-1 agreement':>16s}"]
    for r in rows:
        lines.append(f"  {CRITERION_LABELS[r['criterion']]:28s} {fmt(100 * r['perplexity_increase'], '+.2f'):>9s}% "
                     f"{fmt(100 * r['top1_agreement'], '.1f'):>15s}%")
    p = thresholds_card["predictors"]
    lines.append(f"  {'low-rank predictors':28s} {fmt(100 * p['quality']['perplexity_increase'], '+.2f'):>9s}% "
                 f"{fmt(100 * p['quality']['top1_agreement'], '.1f'):>15s}%")
    lines.append(f"  (the predictors recall {fmt(100 * p['heldout_recall'], '.1f')}% of the |SiLU(gate) x up| sets, "
                 f"over-selection {fmt(p['heldout_over_selection'], '.2f')}x)")
    return "\n".join(lines)


def related_text(related: dict, ours: str) -> str:
    """CATS and TEAL as their papers report them (data/related_work.json), and ours."""
    c, t = related["cats"], related["teal"]
    return "\n".join([
        wrap(f"CATS (theirs): {c['models']}; {c['criterion']}; at {fmt(100 * c['ffn_sparsity'], '.0f')}% FFN "
             f"sparsity: {c['quality']}; {c['speedup']}."),
        wrap(f"TEAL (theirs): {t['models']}; {t['criterion']}; {t['quality']}; {t['speedup']}."),
        wrap(f"flashnb (ours, measured here): {ours}")])
