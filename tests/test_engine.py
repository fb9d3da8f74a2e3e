"""The flash engine against the dense model: exact with the oracle, budgets, baselines, simulate."""

from __future__ import annotations

import pytest
import torch

from flashnb import FlashnbError
from flashnb.bench.baselines import AccelerateOffload, HybridEngine, MmapEngine
from flashnb.core.convert import ConvertConfig, convert
from flashnb.core.engine import FlashEngine, Policy
from flashnb.core.generate import generate
from flashnb.core.memory import ROW_BOOKKEEPING
from flashnb.core.predictor import AllNeurons, LowRankPredictor, LowRankPredictors, OraclePredictor
from flashnb.core.simulate import sets_from_trace, simulate
from flashnb.core.store import FlashStore
from flashnb.models.checkpoint import load_model
from flashnb.models.fingerprint import model_fingerprint
from flashnb.training.quality import restricted_ffns
from flashnb.training.traces import record

from conftest import make_tiny_llama, make_tiny_opt

PROMPT = [2, 17, 42, 99, 7]


@pytest.fixture(scope="module", params=["opt", "llama"])
def tiny(request, tmp_path_factory):
    """(HF folder, {layout: fp32 store}) for a tiny random model of each architecture."""
    root = tmp_path_factory.mktemp(request.param)
    folder = (make_tiny_opt if request.param == "opt" else make_tiny_llama)(root / "hf", max_position_embeddings=80)
    stores = {layout: FlashStore.open(convert(folder, root / layout, ConvertConfig(layout, "fp32", progress=False)))
              for layout in ("bundled", "unbundled")}
    return folder, stores


def oracle(store):
    return OraclePredictor(store.load_model())


def greedy_with_logits(eng, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy generation on the engine, one step per token, keeping the logits of every position."""
    kv = eng.model.new_cache(1, len(prompt) + n)
    logits = [eng.step(t, kv) for t in prompt]
    out = []
    for _ in range(n):
        out.append(int(torch.argmax(logits[-1])))
        if len(out) < n:
            logits.append(eng.step(out[-1], kv))
    return out, torch.stack(logits)


@pytest.mark.parametrize("layout", ["bundled", "unbundled"])
@pytest.mark.parametrize("window", [0, 1, 4])
def test_oracle_engine_equals_dense_over_64_tokens(tiny, layout, window):
    folder, stores = tiny
    dense = load_model(folder)
    expected = list(generate(dense, PROMPT, 64))
    with FlashEngine(stores[layout], oracle(stores[layout]), Policy(window, 1.0, in_flight=2)) as eng:
        got, logits = greedy_with_logits(eng, PROMPT, 64)
    assert got == expected
    with torch.no_grad():
        ref = dense(torch.tensor([PROMPT + got[:-1]]))[0]   # the dense model's logits at every position
    assert (logits - ref).abs().max().item() <= 1e-4


def test_window_reduces_reads_and_keeps_the_window(tiny):
    _, stores = tiny
    reads = {}
    for window in (0, 4):
        with FlashEngine(stores["bundled"], oracle(stores["bundled"]), Policy(window, 1.0, in_flight=2)) as eng:
            list(eng.generate(PROMPT, 20))
            reads[window] = sum(s.loaded for s in eng.steps)
            t = eng.steps[-1]
            assert t.predicted == t.cached + t.loaded
            if window == 0:
                assert t.cached == 0
    assert reads[4] < reads[0]


def test_budget_too_small_is_one_clear_error_before_any_work(tiny):
    _, stores = tiny
    st = stores["bundled"]
    with pytest.raises(FlashnbError, match=r"memory budget .* is too small.*raise the budget to at least"):
        FlashEngine(st, AllNeurons(st.ffn_dim), Policy(0, 0.05))
    with pytest.raises(FlashnbError, match="predictor must be a flashnb predictor"):
        FlashEngine(st, "learned", Policy(2))


def test_bad_policy_values():
    with pytest.raises(FlashnbError, match="window must be a whole number of tokens >= 0"):
        Policy(-1)
    with pytest.raises(FlashnbError, match=r"fraction of the model's bytes in \(0, 1\]"):
        Policy(4, 1.5)   # a float is a fraction, however large: bytes are an int
    with pytest.raises(FlashnbError, match="bytes must be >= 1"):
        Policy(4, 0)
    with pytest.raises(FlashnbError, match="reads in flight"):
        Policy(4, 0.5, in_flight=0)


def test_naive_reads_every_byte_of_the_ffn(tiny):
    _, stores = tiny
    with FlashEngine(stores["bundled"], AllNeurons(stores["bundled"].ffn_dim), Policy(0, 1.0, in_flight=2)) as eng:
        kv = eng.model.new_cache(1, 8)
        for t in PROMPT:
            eng.step(t, kv)
        st = eng.store
        full = st.num_layers * st.ffn_dim * st.neuron_bytes
        assert all(s.bytes_read == full for s in eng.steps)


@pytest.mark.parametrize("layout", ["bundled", "unbundled"])
def test_baselines_equal_dense(tiny, layout):
    folder, stores = tiny
    dense = load_model(folder)
    with torch.no_grad():
        ref = dense(torch.tensor([PROMPT]))[0]
    for runner in (HybridEngine(stores[layout], memory_budget=0.95, in_flight=2), MmapEngine(stores[layout])):
        kv = runner.model.new_cache(1, len(PROMPT))
        out = torch.stack([runner.step(t, kv) for t in PROMPT])
        runner.close()
        assert (out - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("gap", [0, 8192])
def test_simulate_from_a_dense_trace_equals_engine_bytes(tiny, gap):
    """The preview computed from a trace of the dense model alone equals what the engine reads."""
    folder, stores = tiny
    dense = load_model(folder)
    seq = PROMPT + list(generate(dense, PROMPT, 16))
    trace = record(dense, seq)
    sets = sets_from_trace(trace)
    for layout in ("bundled", "unbundled"):
        for window in (0, 3):
            pol = Policy(window, 1.0, in_flight=2, gap_bytes=gap)
            with FlashEngine(stores[layout], oracle(stores[layout]), pol) as eng:
                kv = eng.model.new_cache(1, len(seq))
                for t in seq:
                    eng.step(t, kv)
                measured = [(s.bytes_read, s.requests, s.evicted, s.loaded) for s in eng.steps]
            sim = simulate(sets, stores[layout], pol)
            assert [(s.bytes_read, s.requests, s.evicted, s.loaded) for s in sim] == measured


def test_tokens_needing_more_than_the_cache_are_served_in_parts(tiny):
    """A cache of 10 rows per layer: tokens needing more neurons still give the dense model's
    logits, and simulate still counts the engine's bytes exactly."""
    folder, stores = tiny
    dense = load_model(folder)
    st = stores["bundled"]
    budget = st.resident_bytes + st.num_layers * 10 * (st.neuron_bytes + ROW_BOOKKEEPING)
    pol = Policy(2, budget, in_flight=2, gap_bytes=0)
    with FlashEngine(st, oracle(st), pol) as eng:
        assert eng.memory.capacity_rows == 10
        kv = eng.model.new_cache(1, len(PROMPT))
        out = torch.stack([eng.step(t, kv) for t in PROMPT])
        assert max(len(ids) for s in eng.steps for ids in s.predicted_sets) > 10   # some token overflowed
        sets = [s.predicted_sets for s in eng.steps]
        measured = [s.bytes_read for s in eng.steps]
    with torch.no_grad():
        ref = dense(torch.tensor([PROMPT]))[0]
    assert (out - ref).abs().max().item() <= 1e-4
    assert [s.bytes_read for s in simulate(sets, stores["bundled"], pol)] == measured


def test_accelerate_peer_equals_dense(tiny):
    folder, _ = tiny
    with torch.no_grad():
        ref = load_model(folder)(torch.tensor([PROMPT]))[0]
    peer = AccelerateOffload(folder, dtype=torch.float32)
    try:
        out = torch.stack([peer.step(t) for t in PROMPT])
    finally:
        peer.close()
    assert (out - ref).abs().max().item() <= 1e-4
    assert peer.offloaded_bytes > 0


def test_a_layer_that_selects_no_neuron_adds_only_the_ffn_bias(tiny):
    """Predictors that select nothing: the engine's logits equal the dense model whose FFN
    activations are all masked (flashnb.training.quality), with no read at all."""
    folder, stores = tiny
    dense = load_model(folder)
    c = dense.config
    torch.manual_seed(0)
    layers = [LowRankPredictor(c.hidden_size, c.ffn_dim, 4) for _ in range(c.num_hidden_layers)]
    preds = LowRankPredictors(layers, [1 - 1e-12] * c.num_hidden_layers, model_fingerprint(dense))
    seq = PROMPT + [11, 12, 13]
    with restricted_ffns(dense, preds), torch.no_grad():
        ref = dense(torch.tensor([seq]))[0]
    with FlashEngine(stores["bundled"], preds, Policy(2, 1.0, in_flight=2)) as eng:
        kv = eng.model.new_cache(1, len(seq))
        logits = torch.stack([eng.step(t, kv) for t in seq])
        assert sum(s.bytes_read for s in eng.steps) == 0
        assert all(n.size == 0 for s in eng.steps for n in s.predicted_sets)
    assert (logits - ref).abs().max().item() <= 1e-4
