"""Statistics of activation traces (pure numpy): sparsity, temporal reuse, co-activation.

All functions take one layer's active mask `mask` (bool [tokens, neurons], from `Trace.mask`) and,
where time matters, `positions` (int [tokens], each token's index within its sequence, from
`Trace.positions`). Temporal statistics use only tokens with at least `k_max` predecessors in their
own sequence, so every k is measured on the same tokens and no window crosses a sequence start.

Definitions (A_t = the active set of token t, F = neurons per layer):
  sparsity            = 1 - mean_t |A_t| / F
  reuse(k)            = sum_t |A_t ∩ (A_{t-1} ∪ ... ∪ A_{t-k})| / sum_t |A_t|        k = 1..k_max
  s_agg(k)            = mean_t |A_t ∪ A_{t-1} ∪ ... ∪ A_{t-k+1}| / F                  k = 1..k_max
  increment(k)        = s_agg(k+1) - s_agg(k): the share of the FFN one more token of window adds
                        (the paper's Figure 4a)
  closest friend of i = argmax_{j != i} #tokens where i and j are both active (ties: lowest j)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from flashnb.errors import FlashnbError


def sparsity(mask: np.ndarray) -> float:
    """Share of (token, neuron) pairs that are inactive, in [0, 1]."""
    return 1.0 - float(mask.mean())


def sparsity_per_layer(trace) -> np.ndarray:
    """float64 [layers]: the sparsity of every layer of a Trace."""
    return np.array([sparsity(trace.mask(i)) for i in range(trace.n_layers)])


def eligible_tokens(positions: np.ndarray, k_max: int) -> np.ndarray:
    """Indices of tokens with at least k_max predecessors in their sequence."""
    idx = np.flatnonzero(np.asarray(positions) >= k_max)
    if idx.size == 0:
        raise FlashnbError(f"no token has {k_max} predecessors in its sequence; use a longer trace "
                         "or a smaller k_max")
    return idx


def temporal_reuse(mask: np.ndarray, positions: np.ndarray, k_max: int = 16) -> np.ndarray:
    """float64 [k_max]: reuse(k) for k = 1..k_max, the share of a token's active neurons that were
    already active in one of the previous k tokens."""
    t = eligible_tokens(positions, k_max)
    now = mask[t]
    total = now.sum()
    seen = np.zeros_like(now)
    out = np.empty(k_max)
    for k in range(1, k_max + 1):
        seen |= mask[t - k]
        out[k - 1] = (now & seen).sum() / max(total, 1)
    return out


def aggregated_usage(mask: np.ndarray, positions: np.ndarray, k_max: int = 16) -> np.ndarray:
    """float64 [k_max]: s_agg(k) for k = 1..k_max, the mean share of neurons used by the union of
    the last k tokens (the current one included)."""
    t = eligible_tokens(positions, k_max)
    union = np.zeros((t.size, mask.shape[1]), dtype=bool)
    out = np.empty(k_max)
    for k in range(1, k_max + 1):
        union |= mask[t - (k - 1)]
        out[k - 1] = union.mean()
    return out


def coactivation(mask: np.ndarray) -> np.ndarray:
    """int64 [F, F]: counts[i, j] = number of tokens where neurons i and j are both active
    (the diagonal holds each neuron's activation count)."""
    m = mask.astype(np.float32)
    return np.rint(m.T @ m).astype(np.int64)  # exact: counts < 2**24


def closest_friends(counts: np.ndarray) -> np.ndarray:
    """int64 [F]: each neuron's closest friend (most co-activated other neuron, lowest id on ties);
    -1 for neurons that never co-fire with another."""
    c = counts.astype(np.int64, copy=True)
    np.fill_diagonal(c, -1)
    friend = c.argmax(axis=1)
    friend[c.max(axis=1) <= 0] = -1
    return friend


@dataclass
class FriendBundling:
    """The closest-friend bundling experiment on one layer, over a trace.

    Plain: every active neuron is one read of `neuron_bytes`. Friend bundles: neuron i is stored
    together with its closest friend f(i), so a read of i's bundle costs 2 * neuron_bytes and brings
    f(i) along. For each token the active neurons are visited in id order; a neuron already brought
    by an earlier bundle is not read again. A friend is *useful* when it is active for the token and
    not yet loaded, *duplicate* when active but already loaded, *wasted* when inactive.
    """

    tokens: int
    reads_plain: int
    bytes_plain: int
    reads_bundled: int
    bytes_bundled: int
    friends_useful: int
    friends_duplicate: int
    friends_wasted: int
    distinct_friends: int
    hot_friend_share: float      # share of neurons whose closest friend is among the 5% most active
    median_rate: float           # median over neurons of the share of tokens a neuron is active in
    median_friend_rate: float    # the same, over each neuron's closest friend

    @property
    def bytes_ratio(self) -> float:
        """bytes read with friend bundles / bytes read without (> 1: bundling reads more)."""
        return self.bytes_bundled / max(self.bytes_plain, 1)

    @property
    def reads_ratio(self) -> float:
        """reads with friend bundles / reads without (< 1: fewer, larger reads)."""
        return self.reads_bundled / max(self.reads_plain, 1)

    def to_dict(self) -> dict:
        return asdict(self) | {"bytes_ratio": self.bytes_ratio, "reads_ratio": self.reads_ratio}


def friend_bundling(mask: np.ndarray, friends: np.ndarray, neuron_bytes: int) -> FriendBundling:
    """Bytes and reads with and without closest-friend bundles over the tokens of `mask`.

    neuron_bytes: bytes of one neuron on flash (e.g. 2 * d_model * 2 for an fp16 up column + down row).
    """
    T, F = mask.shape
    act = np.ascontiguousarray(mask.T)  # [F, T]: one neuron's activity over tokens is a row
    loaded = np.zeros_like(act)
    reads = useful = duplicate = wasted = 0
    for i in range(F):  # vectorised over tokens: visit neuron i in every token at once
        need = act[i] & ~loaded[i]
        n = int(need.sum())
        if n == 0:
            continue
        reads += n
        loaded[i, need] = True
        f = friends[i]
        if f < 0:
            wasted += n
            continue
        fa, fl = act[f, need], loaded[f, need]
        useful += int((fa & ~fl).sum())
        duplicate += int((fa & fl).sum())
        wasted += int((~fa).sum())
        loaded[f, need] = True
    plain = int(mask.sum())
    rate = mask.mean(axis=0)
    hot = np.argsort(-rate, kind="stable")[:max(1, F // 20)]
    has = friends >= 0
    fr = friends[has]
    return FriendBundling(T, plain, plain * neuron_bytes, reads, reads * 2 * neuron_bytes, useful,
                          duplicate, wasted, int(np.unique(fr).size),
                          float(np.isin(fr, hot).mean()) if fr.size else 0.0,
                          float(np.median(rate[has])) if fr.size else 0.0,
                          float(np.median(rate[fr])) if fr.size else 0.0)


@dataclass
class TraceSummary:
    """Every statistic above for every layer of a trace (arrays are [layers, ...])."""

    sparsity: np.ndarray        # [L]
    reuse: np.ndarray           # [L, k_max]  reuse(k), k = 1..k_max
    s_agg: np.ndarray           # [L, k_max]  s_agg(k), k = 1..k_max
    k_max: int

    @property
    def increments(self) -> np.ndarray:
        """[L, k_max - 1]: s_agg(k+1) - s_agg(k), k = 1..k_max-1."""
        return np.diff(self.s_agg, axis=1)


def summarize(trace, k_max: int = 16) -> TraceSummary:
    """Sparsity, temporal reuse and aggregated usage for every layer of `trace`."""
    pos = trace.positions()
    masks = [trace.mask(i) for i in range(trace.n_layers)]
    return TraceSummary(np.array([sparsity(m) for m in masks]),
                        np.stack([temporal_reuse(m, pos, k_max) for m in masks]),
                        np.stack([aggregated_usage(m, pos, k_max) for m in masks]), k_max)


def friends_per_layer(trace, max_tokens: int | None = None) -> list[np.ndarray]:
    """Every layer's closest friends, counted over `trace`: all tokens, or every s-th token with s
    chosen so at most `max_tokens` are used (the count is a [T, F] x [T, F] product: cap T to bound
    the time)."""
    stride = -(-trace.n_tokens // max_tokens) if max_tokens else 1
    return [closest_friends(coactivation(trace.mask(i)[::stride])) for i in range(trace.n_layers)]


def friend_experiment(trace, neuron_bytes: int, friends: list[np.ndarray] | None = None) -> list[FriendBundling]:
    """The closest-friend bundling experiment for every layer of `trace`.

    friends: closest friends per layer, e.g. `friends_per_layer(training_trace)` so that bundles
    are built on one trace and measured on another; default: counted on `trace` itself.
    """
    friends = friends if friends is not None else friends_per_layer(trace)
    return [friend_bundling(trace.mask(i), friends[i], neuron_bytes) for i in range(trace.n_layers)]
