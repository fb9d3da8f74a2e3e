"""Property-based fuzzing of every boundary a user's file or call crosses: store manifests, safetensors
headers (the store's DRAM file and a checkpoint's weights), config.json, predictor files and the
reader's inputs. Whatever the input, the outcome is a result or flashnb's own one-line error
(FlashnbError), never another exception, a crash or a hang.

CI runs a few hundred cases (FLASHNB_FUZZ_EXAMPLES per test, default 50); raise it for a longer run:
`FLASHNB_FUZZ_EXAMPLES=500 python -m pytest -o addopts="" tests/test_fuzz.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashnb import FlashnbError
from flashnb.core.convert import ConvertConfig, convert
from flashnb.core.engine import FlashEngine, Policy
from flashnb.core.predictor import AllNeurons, load_predictors
from flashnb.core.reader import NeuronReader, ReaderConfig
from flashnb.core.store import FlashStore
from flashnb.models.checkpoint import read_config

EXAMPLES = int(os.environ.get("FLASHNB_FUZZ_EXAMPLES", "50"))
# CI's default run is reproducible; a longer run on demand draws fresh cases every time
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="FLASHNB_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# JSON values of every kind a damaged or hand-edited file could hold
leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**65, 2**65), st.floats(allow_nan=True),
                   st.text(max_size=12), st.sampled_from(["../x", "/etc/passwd", "", ".", "ffn.bin", "bundled",
                                                          "fp16", "opt", "llama", "relu"]))
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                         max_size=3), max_leaves=6)


def only_flashnb_errors(fn) -> None:
    """Run `fn`; a FlashnbError is an answer, any other exception a bug."""
    try:
        fn()
    except FlashnbError as e:
        assert str(e) and "\n" not in str(e).strip()


def _paths(obj, prefix=()):
    """Every (path, value) inside a JSON object, for picking what to damage."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _set(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_opt_dir):
    """A store, the model folder and a predictor set, to copy and damage."""
    from test_bench import tiny_predictors

    root = tmp_path_factory.mktemp("fuzz")
    store = convert(tiny_opt_dir, root / "store", ConvertConfig(progress=False))
    return {"store": store, "model": tiny_opt_dir, "predictors": tiny_predictors(tiny_opt_dir, root / "preds")}


def _copy(src: Path, tmp: Path, name: str) -> Path:
    dst = tmp / name
    if dst.exists():
        shutil.rmtree(dst)
    return Path(shutil.copytree(src, dst))


@FUZZ
@given(data=st.data(), value=values)
def test_damaged_manifests(pristine, tmp_path, data, value):
    p = _copy(pristine["store"], tmp_path, "s")
    m = json.loads((p / "manifest.json").read_text())
    paths = [q for q, _ in _paths(m) if q]
    where = data.draw(st.sampled_from(paths))
    _set(m, where, value)
    (p / "manifest.json").write_text(json.dumps(m))

    def use():
        s = FlashStore.open(p)
        with FlashEngine(s, AllNeurons(s.ffn_dim), Policy(0, 1.0, in_flight=2)) as eng:
            list(eng.generate([2, 5], 2))

    only_flashnb_errors(use)


def _damage_header(path: Path, data) -> None:
    """Rewrite a safetensors file's JSON header with random damage, keeping the file's size."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    where = data.draw(st.sampled_from([q for q, _ in _paths(header) if q]))
    _set(header, where, data.draw(values))
    text = json.dumps(header).encode()
    text = text[:n].ljust(n, b" ")  # the same size: the manifest's byte count still agrees
    path.write_bytes(raw[:8] + text + raw[8 + n:])


@FUZZ
@given(data=st.data())
def test_damaged_dram_file_header(pristine, tmp_path, data):
    p = _copy(pristine["store"], tmp_path, "s")
    _damage_header(p / "dram.safetensors", data)

    def use():
        s = FlashStore.open(p)
        with FlashEngine(s, AllNeurons(s.ffn_dim), Policy(0, 1.0, in_flight=2)) as eng:
            list(eng.generate([2, 5], 2))

    only_flashnb_errors(use)


@FUZZ
@given(data=st.data())
def test_damaged_checkpoint_header(pristine, tmp_path, data):
    src = _copy(pristine["model"], tmp_path, "m")
    _damage_header(src / "model.safetensors", data)
    only_flashnb_errors(lambda: convert(src, tmp_path / "out", ConvertConfig(progress=False, overwrite=True)))


@FUZZ
@given(data=st.data(), value=values)
def test_damaged_config(pristine, tmp_path, data, value):
    src = _copy(pristine["model"], tmp_path, "m")
    cfg = json.loads((src / "config.json").read_text())
    key = data.draw(st.sampled_from(sorted(cfg) + ["model_type", "num_hidden_layers", "ffn_dim", "hidden_size"]))
    cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))

    def use():
        read_config(src)
        convert(src, tmp_path / "out", ConvertConfig(progress=False, overwrite=True))

    only_flashnb_errors(use)


@FUZZ
@given(data=st.data(), value=values)
def test_damaged_predictor_files(pristine, tmp_path, data, value):
    d = _copy(pristine["predictors"], tmp_path, "p")
    if data.draw(st.booleans()):
        card = json.loads((d / "metrics.json").read_text())
        _set(card, data.draw(st.sampled_from([q for q, _ in _paths(card) if q])), value)
        (d / "metrics.json").write_text(json.dumps(card) if data.draw(st.booleans()) else "{broken")
    else:
        _damage_header(d / "predictors.safetensors", data)

    def use():
        preds = load_predictors(d)
        s = FlashStore.open(pristine["store"])
        with FlashEngine(s, preds, Policy(2, 1.0, in_flight=2)) as eng:
            list(eng.generate([2, 5], 2))

    only_flashnb_errors(use)


ids_strategy = st.one_of(
    st.lists(st.integers(-2**40, 2**40), max_size=40),
    st.lists(st.integers(0, 63), max_size=200),
    st.lists(st.floats(allow_nan=True), max_size=5),
    st.lists(st.text(max_size=3), max_size=3),
    st.builds(lambda n: np.arange(n, dtype=np.int32), st.integers(0, 64)),
    st.builds(lambda n: np.zeros((n, 2), dtype=np.int64), st.integers(0, 4)))


@FUZZ
@given(ids=ids_strategy, layer=st.integers(-3, 4), out_kind=st.sampled_from(["none", "right", "wrong", "readonly"]),
       backend=st.sampled_from(["aio", "threads"]))
def test_reader_inputs(pristine, ids, layer, out_kind, backend):
    s = FlashStore.open(pristine["store"])

    def use():
        n = np.asarray(ids).size
        out = {"none": None, "right": np.empty((n, s.row_values), s.np_dtype),
               "wrong": np.empty((n + 1, s.row_values), s.np_dtype),
               "readonly": np.empty((n, s.row_values), s.np_dtype)}[out_kind]
        if out_kind == "readonly":
            out.flags.writeable = False
        with NeuronReader(s, ReaderConfig(in_flight=3, backend=backend)) as r:
            res = r.read(layer, ids, out)
            assert res.rows.shape == (n, s.row_values)

    only_flashnb_errors(use)
