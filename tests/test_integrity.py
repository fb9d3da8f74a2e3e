"""Nothing silently wrong: a damaged bundle, DRAM file or checksum table is caught when it is read; a
store whose files changed since it was opened is refused; stores never point outside themselves;
predictors of another model are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_tiny_opt
from flashnb import FlashnbError
from flashnb.core.convert import ConvertConfig, convert
from flashnb.core.engine import FlashEngine, Policy
from flashnb.core.predictor import AllNeurons, LowRankPredictor, LowRankPredictors
from flashnb.core.reader import NeuronReader, ReaderConfig
from flashnb.core.store import FlashStore
from flashnb.core.verify import verify
from flashnb.models.checkpoint import load_model
from flashnb.models.fingerprint import model_fingerprint


@pytest.fixture
def store(tmp_path, tiny_opt_dir):
    return FlashStore.open(convert(tiny_opt_dir, tmp_path / "store", ConvertConfig(progress=False)))


def _flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_one_flipped_bit_in_a_bundle_is_caught_when_it_is_read(store):
    reg = store.regions(1)[0]
    _flip(store.ffn_path, reg.offset + 5 * reg.row_bytes + 7)       # layer 1, neuron 5
    reopened = FlashStore.open(store.path)                            # open does not hash: it opens
    for backend in ("aio", "threads"):
        with NeuronReader(reopened, ReaderConfig(in_flight=2, backend=backend)) as r:
            r.read(1, [4, 6])                                         # the intact neighbours read fine
            with pytest.raises(FlashnbError, match=r"layer 1 neuron 5 .* does not match its checksum"):
                r.read(1, [3, 5, 9])
    with NeuronReader(reopened, ReaderConfig(in_flight=2, verify=False)) as r:
        r.read(1, [5])                                                # checking can be switched off


def test_the_engine_stops_instead_of_generating_from_a_damaged_ffn(store):
    reg = store.regions(0)[0]
    _flip(store.ffn_path, reg.offset + 3 * reg.row_bytes + 1)
    with FlashEngine(FlashStore.open(store.path), AllNeurons(store.ffn_dim), Policy(0, 1.0, in_flight=2)) as eng:
        with pytest.raises(FlashnbError, match="does not match its checksum"):
            list(eng.generate([2, 5, 7], 3))


def test_a_damaged_dram_file_is_caught_when_it_is_loaded(store):
    _flip(store.dram_path, store.dram_path.stat().st_size - 3)      # a weight, not the header
    with pytest.raises(FlashnbError, match="dram.safetensors: does not match its checksum"):
        FlashEngine(FlashStore.open(store.path), AllNeurons(store.ffn_dim), Policy(0, 1.0))


def test_a_store_replaced_since_it_was_opened_is_refused(store, tiny_opt_dir):
    opened = FlashStore.open(store.path)
    convert(tiny_opt_dir, store.path, ConvertConfig(dtype="fp32", overwrite=True, progress=False))
    with pytest.raises(FlashnbError, match="changed since store .* was opened.*open the store again"):
        FlashEngine(opened, AllNeurons(store.ffn_dim), Policy(0, 1.0))
    with FlashEngine(FlashStore.open(store.path), AllNeurons(store.ffn_dim), Policy(0, 1.0, in_flight=2)) as eng:
        list(eng.generate([2, 5], 2))                                 # opened again: fine


@pytest.mark.parametrize("key,value", [("ffn_file", "../other/ffn.bin"), ("ffn_file", "/etc/hostname"),
                                       ("dram_file", "../x/dram.safetensors"), ("checksums", "sub/ffn.xxh3"),
                                       ("dram_file", "..")])
def test_manifest_names_outside_the_store_are_refused(store, key, value):
    mf = store.path / "manifest.json"
    m = json.loads(mf.read_text())
    m[key]["name"] = value
    mf.write_text(json.dumps(m))
    with pytest.raises(FlashnbError, match="is not a plain file name inside the store folder"):
        FlashStore.open(store.path)
    with pytest.raises(FlashnbError, match="is not a plain file name"):
        verify(store.path, progress=False)


def test_a_damaged_checksum_table_is_named_by_verify(store):
    _flip(store.checksum_path, 10)
    with pytest.raises(FlashnbError, match="bundle checksums"):
        verify(store.path, progress=False)


def _predictors(model, fingerprint: str) -> LowRankPredictors:
    c = model.config
    torch.manual_seed(0)
    layers = [LowRankPredictor(c.hidden_size, c.ffn_dim, 4) for _ in range(c.num_hidden_layers)]
    return LowRankPredictors(layers, [0.5] * c.num_hidden_layers, fingerprint)


def test_predictors_of_another_model_are_refused(store, tmp_path, tiny_opt_dir):
    model = load_model(tiny_opt_dir)
    assert store.fingerprint == model_fingerprint(model)             # convert records the model's fingerprint
    other = load_model(make_tiny_opt(tmp_path / "other", seed=1))    # same shapes, other weights
    with pytest.raises(FlashnbError, match="predictors belong to another model"):
        FlashEngine(store, _predictors(other, model_fingerprint(other)), Policy(2, 1.0))
    with FlashEngine(store, _predictors(model, model_fingerprint(model)), Policy(2, 1.0, in_flight=2)) as eng:
        list(eng.generate([2, 5], 2))


def test_the_store_dtype_does_not_change_the_fingerprint(store, tmp_path, tiny_opt_dir):
    fp32 = FlashStore.open(convert(tiny_opt_dir, tmp_path / "fp32", ConvertConfig(dtype="fp32", progress=False)))
    assert fp32.fingerprint == store.fingerprint


def test_checksums_count_in_the_resident_bytes(store):
    table = store.checksum_path.stat().st_size
    assert table == store.num_layers * store.ffn_dim * 8
    with FlashEngine(store, AllNeurons(store.ffn_dim), Policy(0, 1.0)) as eng:
        dram = sum(t.numel() * t.element_size() for t in store.dram_tensors().values())
        assert eng.memory.resident_bytes == dram + table


def test_unsorted_and_repeated_ids_are_checked_against_their_own_rows(store):
    with NeuronReader(store, ReaderConfig(in_flight=2)) as r:
        for ids in ([0, 5, 3, 9], [7, 7, 2, 0, 2], [3, 1, 2]):   # rows land in first-occurrence order
            rows = r.read(0, ids).rows
            assert (rows == r.read(0, sorted(ids)).rows[np.searchsorted(sorted(ids), ids)]).all()


def test_a_missing_checksum_table_is_named_missing(store):
    (store.path / "ffn.sum").unlink()
    with pytest.raises(FlashnbError, match=r"ffn.sum is missing \(the per-bundle checksums\); re-create the store "
                                           r"with `flashnb convert HF_FOLDER STORE --force`"):
        FlashStore.open(store.path)
