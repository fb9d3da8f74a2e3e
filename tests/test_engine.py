"""The flash engine against the dense model: exact with the oracle, budgets, baselines, simulate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashnb import FlashnbError
from flashnb.bench.baselines import AccelerateOffload, HybridEngine, MmapEngine
from flashnb.core.convert import ConvertConfig, convert
from flashnb.core.engine import FlashEngine, Policy
from flashnb.core.generate import generate, greedy_with_logits
from flashnb.core.memory import ROW_BOOKKEEPING, bookkeeping_bytes
from flashnb.core.pinning import HotNeurons
from flashnb.core.predictor import AllNeurons, LowRankPredictor, LowRankPredictors, OraclePredictor
from flashnb.core.simulate import choose_pinned, sets_from_trace, simulate
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


@pytest.mark.parametrize("window", [0, 4])
def test_a_token_stopped_half_way_leaves_the_engine_exact(tiny, window):
    """Ctrl-C in a notebook (or any error) in the middle of a layer, after its evicted rows were deleted:
    the engine's next tokens still equal the dense model's."""
    folder, stores = tiny
    st = stores["bundled"]
    with FlashEngine(st, oracle(st), Policy(window, 1.0, in_flight=2)) as eng:
        list(eng.generate(PROMPT, 6))                    # a full window
        ffn, held = eng.ffns[1], eng.ffns[1].compute_held

        def stop(*args):
            raise KeyboardInterrupt

        ffn.compute_held = stop                          # the reads are in flight, the rows already moved
        with pytest.raises(KeyboardInterrupt):
            list(eng.generate([5, 6, 7], 4))
        ffn.compute_held = held
        got, logits = greedy_with_logits(eng, PROMPT, 16)
    dense = load_model(folder)
    assert got == list(generate(dense, PROMPT, 16))
    with torch.no_grad():
        assert (logits - dense(torch.tensor([PROMPT + got[:-1]]))[0]).abs().max().item() <= 1e-4


def test_overlap_is_counted_only_while_reads_fly(tiny, monkeypatch):
    """FFN math done between submit and wait overlaps the reads only where they are still in flight
    (native AIO); reader threads finish the reads inside submit, so nothing overlaps."""
    from flashnb.core import reader as reader_mod

    _, stores = tiny
    st = stores["bundled"]
    overlap = {}
    for backend in ("aio", "threads"):
        if backend == "aio" and not reader_mod.aio.available():
            continue
        if backend == "threads":
            monkeypatch.setattr(reader_mod.aio, "acquire", lambda depth: (_ for _ in ()).throw(OSError(38, "no AIO")))
        with FlashEngine(st, oracle(st), Policy(4, 1.0, in_flight=2)) as eng:
            assert eng.reader.backend == backend
            list(eng.generate(PROMPT, 8))
            overlap[backend] = sum(layer.overlap_s for s in eng.steps for layer in s.layers)
    assert overlap["threads"] == 0.0 and overlap.get("aio", 1.0) > 0


def test_budget_too_small_is_one_clear_error_before_any_work(tiny):
    _, stores = tiny
    st = stores["bundled"]
    with pytest.raises(FlashnbError, match=r"memory budget .* is too small.*raise the budget .*to at least"):
        FlashEngine(st, AllNeurons(st.ffn_dim), Policy(0, 0.05))
    with pytest.raises(FlashnbError, match="predictor must be a flashnb predictor"):
        FlashEngine(st, "learned", Policy(2))


def test_bad_policy_values():
    with pytest.raises(FlashnbError, match="window must be a whole number of tokens >= 0"):
        Policy(-1)
    with pytest.raises(FlashnbError, match=r"fraction of the model's bytes in \(0, 1\]") as e:
        Policy(4, 1.5)   # a float is a fraction, however large: bytes are an int
    assert "e.g. 0" not in str(e.value)   # no example that is itself refused (Policy knows no model)
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


def test_the_hybrid_baselines_modeled_calls_are_the_calls_it_makes(tiny):
    """What notebook 06's budget sweep prices for hybrid without running it (hybrid_calls) is, call for call,
    what the hybrid baseline reads: pinned rows skipped, the rest in pieces of its buffer's rows."""
    from flashnb.bench.baselines import hybrid_calls
    from flashnb.core.reader import NeuronReader, ReaderConfig

    _, stores = tiny
    st = stores["bundled"]
    seen = set()
    for budget in (0.8, 0.95):   # (the tiny models: a buffer of 34-47 rows of 64; rows pinned)
        with HybridEngine(st, memory_budget=budget, in_flight=2, gap_bytes=4096) as hyb, \
                NeuronReader(st, ReaderConfig(in_flight=2, gap_bytes=4096)) as reader:
            kv = hyb.model.new_cache(1, 2)
            hyb.step(PROMPT[0], kv)
            made = [(layer.requests, layer.bytes_read) for layer in hyb.steps[0].layers]
            assert made == hybrid_calls(st, budget, reader)
            seen.add((len(made) > st.num_layers, hyb.memory.pinned_rows > 0))
    assert (True, False) in seen and (False, True) in seen   # a layer read in pieces; rows pinned


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
    budget = (st.resident_bytes + bookkeeping_bytes(st.memory_shape(), 2)
              + st.num_layers * 10 * (st.neuron_bytes + ROW_BOOKKEEPING))
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


def random_lookahead(model, seed: int = 0, threshold: float = 0.4) -> LowRankPredictors:
    """Untrained lookahead predictors (layer i guesses layer i + 1): guesses that miss and over-read."""
    c = model.config
    torch.manual_seed(seed)
    layers = [LowRankPredictor(c.hidden_size, c.ffn_dim, 4) for _ in range(c.num_hidden_layers - 1)]
    return LowRankPredictors(layers, [threshold] * (c.num_hidden_layers - 1), model_fingerprint(model), lookahead=True)


@pytest.mark.parametrize("layout", ["bundled", "unbundled"])
@pytest.mark.parametrize("budget", [1.0, 0.8])
def test_lookahead_keeps_the_oracle_exact_and_simulate_counts_its_reads(tiny, layout, budget):
    """Guesses made one layer early (here random ones, which miss and over-read) change what is read
    and when, never the result: the same tokens and logits as the dense model, and simulate, fed the
    same guesses, counts the engine's bytes and requests exactly."""
    folder, stores = tiny
    dense = load_model(folder)
    st = stores[layout]
    ahead, hot = random_lookahead(dense), oracle_hot(dense)
    pol = Policy(2, budget, in_flight=2, pinned=4)   # with hot neurons pinned too: guesses skip them
    with FlashEngine(st, oracle(st), pol, lookahead=ahead, hot=hot) as eng:
        got, logits = greedy_with_logits(eng, PROMPT, 24)
        steps = eng.steps
    assert got == list(generate(dense, PROMPT, 24))
    with torch.no_grad():
        ref = dense(torch.tensor([PROMPT + got[:-1]]))[0]
    assert (logits - ref).abs().max().item() <= 1e-4
    assert all(set(s.lookahead_sets) == set(range(1, st.num_layers)) for s in steps)   # every layer but the first
    sim = simulate([s.predicted_sets for s in steps], st, pol, ahead.memory_bytes(st.np_dtype.itemsize),
                   lookahead_sets=[s.lookahead_sets for s in steps], hot=hot)
    counts = lambda s: (s.bytes_read, s.requests, s.cached, s.loaded, s.evicted, s.prefetched)  # noqa: E731
    assert [counts(s) for s in sim] == [counts(s) for s in steps]


def test_neurons_a_lookahead_read_count_as_read_not_as_window_hits(tiny):
    """With perfect guesses every neuron a token reads in layers 1.. arrives one layer early: the same
    neurons are read and hit as without lookahead, and all of those read are prefetched."""
    folder, stores = tiny
    st = stores["bundled"]
    dense = load_model(folder)
    ids = torch.randint(0, dense.config.vocab_size, (24,), generator=torch.Generator().manual_seed(3))
    sets = sets_from_trace(record(dense, ids, context=48, inputs=False))
    pol = Policy(2, 1.0, in_flight=2)
    plain = simulate(sets, st, pol)
    ahead = simulate(sets, st, pol, lookahead_sets=[{i: t[i] for i in range(1, len(t))} for t in sets])
    assert [(s.cached, s.loaded) for s in ahead] == [(s.cached, s.loaded) for s in plain]
    later = [layer for s in ahead for layer in s.layers[1:]]
    assert sum(x.loaded for x in later) > 0 and all(x.prefetched == x.loaded for x in later)


def test_lookahead_needs_per_layer_rows_and_lookahead_predictors(tiny):
    folder, stores = tiny
    dense = load_model(folder)
    st = stores["bundled"]
    with pytest.raises(FlashnbError, match="window of at least 1"):
        FlashEngine(st, oracle(st), Policy(0, 1.0), lookahead=random_lookahead(dense))
    with pytest.raises(FlashnbError, match="window of at least 1"):   # simulate refuses what the engine refuses
        simulate([[np.arange(3)] * st.num_layers], st, Policy(0, 1.0), lookahead_sets=[{1: np.arange(3)}])
    with pytest.raises(FlashnbError, match="pass them as lookahead="):
        FlashEngine(st, random_lookahead(dense), Policy(2, 1.0))


def oracle_hot(dense, tokens: int = 96) -> HotNeurons:
    """Hot neurons ranked on the dense model's active sets over random tokens, calibrated on others."""
    ids = torch.randint(0, dense.config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(1))
    sets = sets_from_trace(record(dense, ids, context=48, inputs=False))
    return HotNeurons.measure(sets[:64], sets[64:], dense.config.ffn_dim)


@pytest.mark.parametrize("window", [0, 2])
def test_pinned_hot_neurons_keep_the_oracle_exact_and_are_read_once(tiny, window):
    """Hot neurons pinned in DRAM serve every token that needs them without a read; the result is the
    dense model's, the memory used stays within the budget, and simulate counts the engine's reads."""
    folder, stores = tiny
    dense = load_model(folder)
    st = stores["bundled"]
    hot = oracle_hot(dense)
    pol = Policy(window, 0.9, in_flight=2, pinned=8)
    with FlashEngine(st, oracle(st), pol, hot=hot) as eng:
        got, logits = greedy_with_logits(eng, PROMPT, 24)
        steps, memory = eng.steps, eng.memory
    assert got == list(generate(dense, PROMPT, 24))
    with torch.no_grad():
        ref = dense(torch.tensor([PROMPT + got[:-1]]))[0]
    assert (logits - ref).abs().max().item() <= 1e-4
    assert memory.pinned_rows == 8 and memory.used_bytes <= memory.budget_bytes
    pins = hot.top(8)
    for s in steps:
        assert s.pinned == sum(np.isin(ids, pins[i]).sum() for i, ids in enumerate(s.predicted_sets))
        assert s.predicted == s.cached + s.loaded + s.pinned
    assert sum(s.pinned for s in steps) > 0
    sim = simulate([s.predicted_sets for s in steps], st, pol, hot=hot)
    assert [(s.bytes_read, s.requests, s.loaded, s.evicted, s.pinned) for s in sim] == \
        [(s.bytes_read, s.requests, s.loaded, s.evicted, s.pinned) for s in steps]


def test_choose_pinned_pins_neurons_that_every_token_needs(tiny):
    """Without a window nothing carries over between tokens, so neurons active on every token are
    read every token unless pinned: the chosen split pins some and reads less than pinning none."""
    _, stores = tiny
    st = stores["bundled"]
    rng = np.random.default_rng(0)
    always = np.arange(6)
    sets = [[np.union1d(always, rng.choice(np.arange(6, st.ffn_dim), 5, replace=False))
             for _ in range(st.num_layers)] for _ in range(40)]
    hot = HotNeurons.measure(sets[:20], sets[20:], st.ffn_dim)
    assert [set(ids) >= set(always) for ids in hot.top(6)] == [True] * st.num_layers
    choice = choose_pinned(hot, st, Policy(0, 0.9))
    assert choice.pinned_rows[0] == 0 and choice.chosen in choice.pinned_rows
    assert choice.chosen >= 6
    assert choice.bytes_per_token[choice.pinned_rows.index(choice.chosen)] < choice.bytes_per_token[0]


def test_pinning_errors_name_the_fix(tiny, tmp_path):
    folder, stores = tiny
    st = stores["bundled"]
    with pytest.raises(FlashnbError, match="pinned rows must be a whole number"):
        Policy(2, 0.9, pinned=-1)
    with pytest.raises(FlashnbError, match="need the hot neurons' frequencies"):
        FlashEngine(st, oracle(st), Policy(2, 0.9, pinned=4))
    wrong = HotNeurons(np.zeros((st.num_layers, st.ffn_dim + 8), np.float32),
                       np.zeros((1, st.num_layers, (st.ffn_dim + 15) // 8), np.uint8))
    with pytest.raises(FlashnbError, match="measured on .* layers of .* neurons"):
        FlashEngine(st, oracle(st), Policy(2, 0.9, pinned=4), hot=wrong)
    with pytest.raises(FlashnbError, match="pinned rows"):
        FlashEngine(st, oracle(st), Policy(2, 0.9, pinned=st.ffn_dim), hot=oracle_hot(load_model(folder)))
    with pytest.raises(FlashnbError, match="hot_neurons.safetensors is missing.*train-predictors"):
        HotNeurons.load(tmp_path)
    (tmp_path / "hot_neurons.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FlashnbError, match="not a readable hot-neuron file"):
        HotNeurons.load(tmp_path)


def test_shipped_engine_writes_what_the_dense_model_writes_with_only_the_predicted_neurons(tmp_path):
    """The shipped OPT model from flash at half memory with its predictors (window, parts and all) equals the
    dense model in DRAM whose FFNs keep only the neurons the same predictors select: tokens and logits."""
    from flashnb import shipped

    m = shipped()
    prompt = m.tokenizer.encode("Return a new list containing")
    ref = load_model(m.folder, torch.float32)
    store = FlashStore.open(convert(m.folder, tmp_path / "s", ConvertConfig(dtype="fp32", progress=False)))
    with restricted_ffns(ref, m.predictors):
        expected = list(generate(ref, prompt, 16))
        with FlashEngine(store, m.predictors, Policy(4, 0.5, in_flight=8)) as eng:
            got, logits = greedy_with_logits(eng, prompt, 16)
            assert sum(s.bytes_read for s in eng.steps) > 0
        assert got == expected
        with torch.no_grad():
            assert (logits - ref(torch.tensor([prompt + got[:-1]]))[0]).abs().max().item() <= 1e-4
