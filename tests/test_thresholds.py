"""SwiGLU models through thresholds (CATS): the engine equals the thresholded dense model, the gate-apart
store keeps the gate in DRAM and reads only up | down, threshold 0 is the dense model, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashnb import FlashnbError
from flashnb.core.convert import ConvertConfig, convert
from flashnb.core.engine import FlashEngine, Policy
from flashnb.core.generate import generate, greedy_with_logits
from flashnb.core.predictor import AllNeurons, LowRankPredictor, LowRankPredictors, OraclePredictor
from flashnb.core.store import FlashStore
from flashnb.core.thresholds import Fires, GateThresholds, apply_thresholds, calibrate, load_thresholds
from flashnb.core.verify import verify
from flashnb.models.checkpoint import load_model
from flashnb.models.fingerprint import model_fingerprint
from flashnb.training.quality import restricted_ffns

from conftest import make_tiny_llama, make_tiny_opt
from test_engine import PROMPT

D, FFN, LAYERS = 32, 64, 2


@pytest.fixture(scope="module")
def swiglu(tmp_path_factory):
    """(HF folder, {layout: fp32 store}, calibration ids) of a tiny random SiLU-gated Llama."""
    root = tmp_path_factory.mktemp("swiglu")
    folder = make_tiny_llama(root / "hf", hidden_act="silu", max_position_embeddings=80)
    stores = {lay: FlashStore.open(convert(folder, root / lay, ConvertConfig(lay, "fp32", progress=False)))
              for lay in ("bundled", "gate-apart")}
    calib = torch.randint(3, 300, (400,), generator=torch.Generator().manual_seed(1))
    return folder, stores, calib


def thresholded_reference(folder, thresholds, tokens: list[int]):
    """Greedy tokens and every position's logits of the dense model with the same thresholds."""
    dense = apply_thresholds(load_model(folder), thresholds)
    out = list(generate(dense, PROMPT, tokens))
    with torch.no_grad():
        return out, dense(torch.tensor([PROMPT + out[:-1]]))[0]


@pytest.mark.parametrize("window", [0, 1, 4])
@pytest.mark.parametrize("criterion", ["gate", "scaled-gate"])
def test_gate_thresholds_engine_equals_the_thresholded_dense_model(swiglu, window, criterion):
    folder, stores, calib = swiglu
    t = calibrate(load_model(folder), calib, 0.5, criterion)
    expected, ref = thresholded_reference(folder, t, 64)
    st = stores["gate-apart"]
    with FlashEngine(st, GateThresholds(st, t), Policy(window, 1.0, in_flight=2)) as eng:
        got, logits = greedy_with_logits(eng, PROMPT, 64)
        steps = eng.steps
    assert got == expected
    assert (logits - ref).abs().max().item() <= 1e-4
    with torch.no_grad():  # and the thresholded model is not the dense one
        assert (load_model(folder)(torch.tensor([PROMPT + got[:-1]]))[0] - ref).abs().max().item() > 1e-2
    # it skips neurons (about half), and every neuron read costs exactly its up | down bundle
    selected = sum(s.predicted for s in steps)
    assert 0.2 * len(steps) * LAYERS * FFN < selected < 0.8 * len(steps) * LAYERS * FFN
    assert sum(s.bytes_needed for s in steps) == sum(s.loaded for s in steps) * 2 * D * 4


def test_threshold_zero_is_the_dense_model(swiglu):
    folder, stores, calib = swiglu
    t = calibrate(load_model(folder), calib, 0.0)
    assert t.values == (0.0,) * LAYERS
    dense = load_model(folder)
    expected = list(generate(dense, PROMPT, 32))
    st = stores["gate-apart"]
    with FlashEngine(st, GateThresholds(st, t), Policy(2, 1.0, in_flight=2)) as eng:
        got, logits = greedy_with_logits(eng, PROMPT, 32)
    assert got == expected
    with torch.no_grad():
        ref = dense(torch.tensor([PROMPT + got[:-1]]))[0]
    assert (logits - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("layout,criterion", [("bundled", "gate"), ("bundled", "product"), ("gate-apart", "product"),
                                              ("gate-apart", "scaled-gate")])
def test_oracle_and_all_neurons_with_thresholds_equal_the_thresholded_model(swiglu, layout, criterion):
    """The gate can stay on flash (bundled, read with each neuron): any predictor then runs the
    thresholded model once the engine is given the thresholds, whatever the criterion."""
    folder, stores, calib = swiglu
    t = calibrate(load_model(folder), calib, 0.6, criterion)
    expected, ref = thresholded_reference(folder, t, 24)
    st = stores[layout]
    for predictor in (OraclePredictor(apply_thresholds(st.load_model(), t)), AllNeurons(FFN)):
        with FlashEngine(st, predictor, Policy(1, 1.0, in_flight=2), thresholds=t) as eng:
            got, logits = greedy_with_logits(eng, PROMPT, 24)
        assert got == expected
        assert (logits - ref).abs().max().item() <= 1e-4


def test_gate_candidates_read_then_kept_by_the_product_equal_the_two_rule_model(swiglu):
    """Two stages from one gate-apart store: the gate in DRAM picks candidates (scaled-gate thresholds at a lower
    sparsity), their up | down bundles are read, and the FFN keeps those whose |SiLU(gate) x up| passes the product
    thresholds: the dense model restricted to both rules, exactly; fewer neurons than the gate alone picked."""
    folder, stores, calib = swiglu
    dense = load_model(folder)
    candidates, product = calibrate(dense, calib, 0.3, "scaled-gate"), calibrate(dense, calib, 0.5, "product")
    both = Fires(dense, product, Fires(dense, candidates))
    with restricted_ffns(load_model(folder), both) as reference:
        expected = list(generate(reference, PROMPT, 64))
        with torch.no_grad():
            ref = reference(torch.tensor([PROMPT + expected[:-1]]))[0]
    st = stores["gate-apart"]
    with FlashEngine(st, GateThresholds(st, candidates), Policy(2, 1.0, in_flight=2), thresholds=product) as eng:
        got, logits = greedy_with_logits(eng, PROMPT, 64)
        steps = eng.steps
    assert got == expected and (logits - ref).abs().max().item() <= 1e-4
    with restricted_ffns(load_model(folder), Fires(dense, candidates)) as gate_only, torch.no_grad():
        assert (gate_only(torch.tensor([PROMPT + got[:-1]]))[0] - ref).abs().max().item() > 1e-3  # the product acted
    read = sum(s.predicted for s in steps) / (len(steps) * LAYERS * FFN)   # the candidates, about 70%
    assert 0.55 < read < 0.85


def test_gate_apart_store_keeps_the_gate_in_dram_and_counts_it(swiglu):
    folder, stores, _ = swiglu
    bundled, apart = stores["bundled"], stores["gate-apart"]
    assert apart.parts == ("up_proj", "down_proj") and apart.dram_parts == ("gate_proj",)
    assert apart.neuron_bytes == 2 * D * 4 and bundled.neuron_bytes == 3 * D * 4
    assert apart.resident_bytes - bundled.resident_bytes == LAYERS * FFN * D * 4
    assert apart.manifest["ffn_file"]["bytes"] < bundled.manifest["ffn_file"]["bytes"]
    dense = load_model(folder)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(apart.load_model()(ids), dense(ids))
    assert verify(apart.path, progress=False).regions == 2 + LAYERS  # dram, checksums, one region per layer
    assert apart.fingerprint == bundled.fingerprint


def test_calibration_reaches_the_target_and_survives_a_round_trip(swiglu, tmp_path):
    folder, _, calib = swiglu
    model = load_model(folder)
    t = calibrate(model, calib, 0.7)
    assert all(abs(m - 0.7) < 0.01 for m in t.measured)
    t.save(tmp_path)
    back = load_thresholds(tmp_path, model)
    assert back.values == t.values and torch.equal(back.scales, t.scales) and back.criterion == "scaled-gate"
    # on other text the thresholded model zeroes about that fraction of the gate activations
    apply_thresholds(model, back)
    for b in model.layers:
        b.ffn.record = True
    with torch.no_grad():
        model(torch.randint(3, 300, (1, 60), generator=torch.Generator().manual_seed(5)))
    zero = np.mean([float((b.ffn.last_activation == 0).float().mean()) for b in model.layers])
    assert 0.5 < zero < 0.9


def test_threshold_errors_name_the_fix(swiglu, tmp_path):
    folder, stores, calib = swiglu
    t = calibrate(load_model(folder), calib, 0.5)
    with pytest.raises(FlashnbError, match="--layout gate-apart"):
        GateThresholds(stores["bundled"], t)
    with pytest.raises(FlashnbError, match="need each neuron's up row"):
        GateThresholds(stores["gate-apart"], calibrate(load_model(folder), calib, 0.5, "product"))
    opt = make_tiny_opt(tmp_path / "opt")
    with pytest.raises(FlashnbError, match="no gate: use layout 'bundled'"):
        convert(opt, tmp_path / "opt-store", ConvertConfig("gate-apart", progress=False))
    assert not (tmp_path / "opt-store").exists()
    with pytest.raises(FlashnbError, match="gated"):
        calibrate(load_model(opt), calib, 0.5)
    with pytest.raises(FlashnbError, match="thresholds.safetensors is missing"):
        load_thresholds(tmp_path)
    other = make_tiny_llama(tmp_path / "other", seed=3, hidden_act="silu", max_position_embeddings=80)
    t.save(tmp_path / "t")
    with pytest.raises(FlashnbError, match="belongs to another model"):
        load_thresholds(tmp_path / "t", load_model(other))
    other_store = FlashStore.open(convert(other, tmp_path / "other-store", ConvertConfig("gate-apart", progress=False)))
    with pytest.raises(FlashnbError, match="another model"):
        GateThresholds(other_store, t)
    (tmp_path / "t" / "thresholds.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(FlashnbError, match="calibrate the thresholds again"):
        load_thresholds(tmp_path / "t")
    with pytest.raises(FlashnbError, match="sparsity"):
        calibrate(load_model(folder), calib, 1.0)


def test_low_rank_predictors_with_the_gate_on_flash_equal_the_thresholded_model_they_restrict(swiglu):
    """The alternative that keeps the gate on flash: low-rank predictors choose the neurons read from a
    bundled store, and the engine computes those of them that pass the threshold: exactly the thresholded
    model restricted to the predicted neurons (flashnb.training.quality measures that model)."""
    folder, stores, calib = swiglu
    dense = load_model(folder)
    t = calibrate(dense, calib, 0.5)
    c = dense.config
    torch.manual_seed(0)
    layers = [LowRankPredictor(c.hidden_size, c.ffn_dim, 4) for _ in range(c.num_hidden_layers)]
    preds = LowRankPredictors(layers, [0.5] * c.num_hidden_layers, model_fingerprint(dense))
    seq = PROMPT + list(range(20, 40))
    with restricted_ffns(dense, Fires(dense, t, preds)), torch.no_grad():
        ref = dense(torch.tensor([seq]))[0]
    with FlashEngine(stores["bundled"], preds, Policy(2, 1.0, in_flight=2), thresholds=t) as eng:
        kv = eng.model.new_cache(1, len(seq))
        logits = torch.stack([eng.step(tok, kv) for tok in seq])
        read = sum(s.loaded for s in eng.steps)
    assert (logits - ref).abs().max().item() <= 1e-4
    with torch.no_grad():  # the predictors miss neurons the thresholded model fires: a different model
        assert (apply_thresholds(load_model(folder), t)(torch.tensor([seq]))[0] - ref).abs().max().item() > 1e-3
    assert 0 < read < len(seq) * c.num_hidden_layers * c.ffn_dim


@pytest.fixture(scope="module")
def shipped_swiglu(tmp_path_factory):
    from flashnb.paths import SWIGLU_MODEL
    from flashnb.shipped_models import shipped

    m = shipped(SWIGLU_MODEL)
    root = tmp_path_factory.mktemp("shipped-swiglu")
    stores = {lay: FlashStore.open(convert(m.folder, root / lay, ConvertConfig(lay, "fp32", progress=False)))
              for lay in ("bundled", "gate-apart")}
    return m, stores


def test_shipped_swiglu_engine_equals_its_references_over_64_tokens(shipped_swiglu):
    """The shipped SwiGLU model from flash (fp32 stores): gate thresholds from DRAM equal the dense model with
    the same thresholds; its low-rank predictors equal the dense model restricted to the predicted neurons."""
    m, stores = shipped_swiglu
    prompt = m.tokenizer.encode("Return a new list containing")
    assert m.thresholds.criterion == "scaled-gate" and m.thresholds.sparsity == 0.5
    dense = apply_thresholds(load_model(m.folder), m.thresholds)
    expected = list(generate(dense, prompt, 64))
    with FlashEngine(stores["gate-apart"], GateThresholds(stores["gate-apart"], m.thresholds),
                     Policy(4, 0.7)) as eng:
        got, logits = greedy_with_logits(eng, prompt, 64)
        selected = np.mean([s.predicted for s in eng.steps]) / (6 * 1024)
    assert got == expected
    with torch.no_grad():
        assert (logits - dense(torch.tensor([prompt + got[:-1]]))[0]).abs().max().item() <= 1e-4
    assert 0.35 < selected < 0.65  # about the target sparsity on this text
    ref = load_model(m.folder)
    with restricted_ffns(ref, m.predictors):
        expected = list(generate(ref, prompt, 32))
        with FlashEngine(stores["bundled"], m.predictors, Policy(4, 0.5)) as eng:
            got, logits = greedy_with_logits(eng, prompt, 32)
        assert got == expected
        with torch.no_grad():
            assert (logits - ref(torch.tensor([prompt + got[:-1]]))[0]).abs().max().item() <= 1e-4


def test_baselines_run_a_gate_apart_store_as_the_dense_model(swiglu):
    from flashnb.bench.baselines import HybridEngine, MmapEngine

    folder, stores, _ = swiglu
    with torch.no_grad():
        ref = load_model(folder)(torch.tensor([PROMPT]))[0]
    for runner in (HybridEngine(stores["gate-apart"], memory_budget=0.95, in_flight=2), MmapEngine(stores["gate-apart"])):
        kv = runner.model.new_cache(1, len(PROMPT))
        out = torch.stack([runner.step(t, kv) for t in PROMPT])
        runner.close()
        assert (out - ref).abs().max().item() <= 1e-4
