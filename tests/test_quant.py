"""Quantized stores (int8, q4): the bytes of llama.cpp's Q8_0 and Q4_0 blocks, values within half a step,
the engine exact against the dense model holding the same dequantized weights, exact byte counts, the
checksums and verify covering codes and scales, clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from flashnb import FlashnbError
from flashnb.bench.baselines import HybridEngine, MmapEngine
from flashnb.cli import main
from flashnb.core.convert import ConvertConfig, convert
from flashnb.core.engine import FlashEngine, Policy
from flashnb.core.generate import generate, greedy_with_logits
from flashnb.core.predictor import AllNeurons, OraclePredictor
from flashnb.core.quant import RowFormat
from flashnb.core.reader import NeuronReader, ReaderConfig
from flashnb.core.simulate import sets_from_trace, simulate
from flashnb.core.store import FlashStore
from flashnb.core.thresholds import GateThresholds, apply_thresholds, calibrate
from flashnb.core.verify import verify
from flashnb.models.checkpoint import load_model
from flashnb.training.traces import record

from conftest import make_tiny_llama, make_tiny_opt
from test_engine import PROMPT

D = 32  # the tiny models' d_model: one group of 32 values per slice


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """{(arch, dtype, layout): store} of the tiny models, FFN quantized, DRAM tensors fp32 (so the
    engine can be held to 1e-4), and the HF folders."""
    root = tmp_path_factory.mktemp("quant")
    folders = {"opt": make_tiny_opt(root / "opt", max_position_embeddings=80),
               "llama": make_tiny_llama(root / "llama", max_position_embeddings=80)}
    stores = {(arch, dt, lay): FlashStore.open(convert(folders[arch], root / f"{arch}-{dt}-{lay}",
                                                       ConvertConfig(lay, dt, progress=False, dram="fp32")))
              for arch in folders for dt in ("int8", "q4") for lay in ("bundled", "unbundled")}
    return folders, stores


def test_a_group_is_a_q8_0_or_q4_0_block_and_values_stay_within_half_a_step():
    torch.manual_seed(0)
    m = torch.randn(6, 128) * 0.05
    m[2] = 0.0                            # an all-zero row decodes to zeros
    m[3, :32] = torch.linspace(-1, 1, 32)  # one group with a wide range
    for name, block, top in (("int8", 34, 127), ("q4", 18, 7)):  # llama.cpp: sizeof(block_q8_0), sizeof(block_q4_0)
        f = RowFormat(name, 128)
        stored = f.encode(m)
        assert stored.dtype == np.uint8 and stored.shape == (6, 4 * block)
        back = f.part(torch.from_numpy(np.concatenate([stored, stored], axis=1)), 1)
        amax = m.reshape(6, 4, 32).abs().amax(-1, keepdim=True)
        step = (amax / top).half().float()   # the stored scale
        err = (back - m).reshape(6, 4, 32).abs()
        assert bool((err <= step / 2 + 1e-7).all())
        assert bool((back[2] == 0).all())
        picked = f.part(torch.from_numpy(stored), 0, torch.tensor([4, 1]))
        assert torch.equal(picked, back[[4, 1]])


@pytest.mark.parametrize("arch", ["opt", "llama"])
@pytest.mark.parametrize("dtype", ["int8", "q4"])
@pytest.mark.parametrize("layout", ["bundled", "unbundled"])
def test_oracle_engine_equals_the_dense_model_with_the_same_dequantized_weights(quantized, arch, dtype, layout):
    folders, stores = quantized
    st = stores[(arch, dtype, layout)]
    reference = st.load_model()   # the checkpoint's weights as the store holds them, dequantized
    expected = list(generate(reference, PROMPT, 48))
    with FlashEngine(st, OraclePredictor(reference), Policy(3, 1.0, in_flight=2)) as eng:
        got, logits = greedy_with_logits(eng, PROMPT, 48)
    assert got == expected
    with torch.no_grad():
        ref = reference(torch.tensor([PROMPT + got[:-1]]))[0]
        assert (logits - ref).abs().max().item() <= 1e-4
        # and the quantized model is near the original, not equal to it
        original = load_model(folders[arch])(torch.tensor([PROMPT + got[:-1]]))[0]
    gap = (original - ref).abs().max().item()
    assert 0 < gap < (0.05 if dtype == "int8" else 0.5)
    for runner in (HybridEngine(st, memory_budget=1.0, in_flight=2), MmapEngine(st)):
        kv = runner.model.new_cache(1, len(PROMPT))
        out = torch.stack([runner.step(t, kv) for t in PROMPT])
        runner.close()
        assert (out - ref[:len(PROMPT)]).abs().max().item() <= 1e-4


def test_bundles_are_the_quantized_bytes_and_naive_reads_exactly_them(quantized):
    _, stores = quantized
    expected = {"int8": 2 * 34, "q4": 2 * 18}  # OPT: up row + down column, one block each at d 32
    for dtype, nbytes in expected.items():
        st = stores[("opt", dtype, "bundled")]
        assert st.neuron_bytes == nbytes and st.row_dtype == np.uint8
        assert st.manifest["ffn_dtype"] == dtype and st.manifest["dtype"] == "fp32"
        with FlashEngine(st, AllNeurons(st.ffn_dim), Policy(0, 1.0, in_flight=2)) as eng:
            list(eng.generate(PROMPT, 2))
            assert all(s.bytes_needed == st.num_layers * st.ffn_dim * nbytes for s in eng.steps)
    # the whole FFN file shrinks by the same ratio (regions 4 KiB-aligned)
    fp = stores[("opt", "q4", "unbundled")]
    assert fp.regions(0)[1].row_bytes == 18


@pytest.mark.parametrize("dtype", ["int8", "q4"])
def test_simulate_counts_what_the_engine_reads_from_a_quantized_store(quantized, dtype):
    folders, stores = quantized
    st = stores[("opt", dtype, "bundled")]
    reference = st.load_model()
    seq = PROMPT + list(generate(reference, PROMPT, 12))
    sets = sets_from_trace(record(reference, seq))
    pol = Policy(2, 1.0, in_flight=2, gap_bytes=4096)
    with FlashEngine(st, OraclePredictor(reference), pol) as eng:
        kv = eng.model.new_cache(1, len(seq))
        for t in seq:
            eng.step(t, kv)
        measured = [(s.bytes_read, s.bytes_needed, s.requests, s.loaded) for s in eng.steps]
    assert [(s.bytes_read, s.bytes_needed, s.requests, s.loaded) for s in simulate(sets, st, pol)] == measured


def test_gate_apart_thresholds_on_quantized_up_down_equal_the_thresholded_reference(tmp_path):
    folder = make_tiny_llama(tmp_path / "hf", hidden_act="silu", max_position_embeddings=80)
    st = FlashStore.open(convert(folder, tmp_path / "q4", ConvertConfig("gate-apart", "q4", progress=False,
                                                                         dram="fp32")))
    assert st.neuron_bytes == 2 * 18  # up | down; the gate stays in DRAM at fp32
    t = calibrate(load_model(folder), torch.randint(3, 300, (300,), generator=torch.Generator().manual_seed(1)), 0.5,
                  "scaled-gate")  # on the checkpoint, as `flashnb train-predictors` does; used on its q4 store
    ref_model = apply_thresholds(st.load_model(), t)
    expected = list(generate(ref_model, PROMPT, 32))
    with FlashEngine(st, GateThresholds(st, t), Policy(2, 1.0, in_flight=2)) as eng:
        got, logits = greedy_with_logits(eng, PROMPT, 32)
    with torch.no_grad():
        ref = ref_model(torch.tensor([PROMPT + got[:-1]]))[0]
    assert got == expected and (logits - ref).abs().max().item() <= 1e-4


def test_a_flipped_bit_in_a_scale_is_caught_by_the_reader_and_by_verify(quantized, tmp_path):
    _, stores = quantized
    src = stores[("opt", "q4", "bundled")]
    p = tmp_path / "copy"
    shutil.copytree(src.path, p)
    st = FlashStore.open(p)
    assert verify(p).bytes_hashed >= st.manifest["ffn_file"]["bytes"]  # intact: every byte hashed, no error
    reg = st.regions(1)[0]
    with open(st.ffn_path, "r+b") as f:  # neuron 7's first scale: right after its 16 bytes of up codes
        f.seek(reg.offset + 7 * reg.row_bytes + 16)
        b = f.read(1)
        f.seek(reg.offset + 7 * reg.row_bytes + 16)
        f.write(bytes([b[0] ^ 0x10]))
    st = FlashStore.open(p)
    with NeuronReader(st, ReaderConfig(in_flight=2)) as r:
        r.read(1, [6, 8])
        with pytest.raises(FlashnbError, match="layer 1 neuron 7 .* does not match its checksum"):
            r.read(1, [7])
    with pytest.raises(FlashnbError, match="layer 1 region 'bundles'"):
        verify(p)


def test_quantized_store_errors_name_the_fix(quantized, tmp_path):
    folders, stores = quantized
    wide = make_tiny_opt(tmp_path / "d48", hidden_size=48, num_attention_heads=4)
    with pytest.raises(FlashnbError, match="d_model 48 is not a multiple of 32: convert it with --dtype fp16"):
        convert(wide, tmp_path / "never", ConvertConfig(dtype="q4", progress=False))
    assert not (tmp_path / "never").exists()
    with pytest.raises(FlashnbError, match="unknown store dtype 'q3'"):
        convert(folders["opt"], tmp_path / "never", ConvertConfig(dtype="q3", progress=False))
    p = tmp_path / "copy"
    shutil.copytree(stores[("opt", "int8", "bundled")].path, p)
    m = json.loads((p / "manifest.json").read_text())
    for field, value, message in (("ffn_dtype", "q2", "unknown ffn_dtype 'q2'"),
                                  ("group", 64, "int8 rows need group 32")):
        (p / "manifest.json").write_text(json.dumps({**m, field: value}))
        with pytest.raises(FlashnbError, match=message):
            FlashStore.open(p)


def test_cli_converts_q4_and_says_the_bytes(quantized, tmp_path, capsys):
    folders, _ = quantized
    assert main(["convert", str(folders["llama"]), str(tmp_path / "s"), "--dtype", "q4"]) == 0
    out = capsys.readouterr().out
    assert "bundled q4" in out and "54 bytes/neuron" in out  # gate | up | down: three blocks of 18 bytes
    st = FlashStore.open(tmp_path / "s")
    assert st.manifest["dtype"] == "fp16" and st.manifest["ffn_dtype"] == "q4"


def test_a_placement_of_another_shape_is_one_clear_error_before_writing(quantized, tmp_path):
    from flashnb.core.placement import Placement

    folders, _ = quantized
    other = Placement(np.stack([np.arange(128)] * 2), "0" * 16, 10, "another model's")
    with pytest.raises(FlashnbError, match=r"orders 2 layers x 128 neurons, this model has 2 x 64: it belongs to "
                                           "another model"):
        convert(folders["opt"], tmp_path / "never", ConvertConfig(dtype="q4", progress=False, placement=other))
    assert not (tmp_path / "never").exists()
