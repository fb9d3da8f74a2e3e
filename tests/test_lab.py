"""flashnb.lab (the lessons' measurements) and flashnb.models.tiny (tiny random checkpoints)."""

from __future__ import annotations

import pytest
import torch

from flashnb import FlashnbError
from flashnb.core.convert import ConvertConfig, convert
from flashnb.core.engine import FlashEngine, Policy
from flashnb.core.generate import generate
from flashnb.core.predictor import OraclePredictor, load_predictors
from flashnb.core.store import FlashStore
from flashnb.lab import byo, end_to_end, quickstart
from flashnb.lab.stats import TokenStats
from flashnb.models.checkpoint import load_model, read_config
from flashnb.models.tiny import make_tiny_llama, make_tiny_opt
from flashnb.paths import data_dir, shipped_model_dir


@pytest.mark.parametrize("make", [make_tiny_opt, make_tiny_llama])
def test_tiny_backends_write_the_same_checkpoint_shape(tmp_path, make):
    a = make(tmp_path / "tf", backend="transformers")
    b = make(tmp_path / "fn", backend="flashnb")
    ma, mb = load_model(a), load_model(b)
    shapes = {n: tuple(p.shape) for n, p in ma.named_parameters()}
    assert shapes == {n: tuple(p.shape) for n, p in mb.named_parameters()}
    assert (b / "tokenizer.json").is_file() and read_config(b).model_type == read_config(a).model_type
    # the same initialisation scheme: weights ~ N(0, 0.02), biases zero
    name = "layers.0.ffn.fc1.weight" if make is make_tiny_opt else "layers.0.ffn.up_proj.weight"
    w = dict(mb.named_parameters())[name]
    assert 0.01 < w.std().item() < 0.03
    with pytest.raises(FlashnbError, match="backend must be one of"):
        make(tmp_path / "x", backend="jax")


def test_byo_model_uses_the_path_or_the_environment_or_the_shipped_model_or_builds_a_tiny_one(tmp_path, monkeypatch):
    monkeypatch.delenv(byo.ENV_BYO_MODEL, raising=False)
    mine = make_tiny_opt(tmp_path / "mine", backend="flashnb")
    folder, yours, what = byo.byo_model(str(mine), tmp_path / "w1")
    assert folder == mine and yours and what.startswith(f"your model: {mine} (opt,") and "SwiGLU" not in what
    swiglu = byo.byo_model(str(shipped_model_dir().parent / "flashnb-llama-11m"), tmp_path / "w1")[2]
    assert "(SwiGLU)" in " ".join(swiglu.split()) and "Notebook 08" in swiglu   # pointed where it runs sparse
    monkeypatch.setenv(byo.ENV_BYO_MODEL, str(mine))
    assert byo.byo_model("", tmp_path / "w2")[0] == mine
    monkeypatch.delenv(byo.ENV_BYO_MODEL)
    folder, yours, what = byo.byo_model("  ", tmp_path / "w2")
    assert not yours and folder == shipped_model_dir() and "the shipped model flashnb-opt-21m" in what
    monkeypatch.setenv("FLASHNB_DATA", str(tmp_path / "no-data"))   # installed without data/
    (tmp_path / "w3").mkdir()
    folder, yours, what = byo.byo_model("  ", tmp_path / "w3")
    assert not yours and folder.parent == tmp_path / "w3" and "tiny RANDOM OPT" in what
    assert read_config(folder).ffn_dim == byo.TINY_BYO["ffn_dim"]
    with pytest.raises(FlashnbError, match="does not exist"):
        byo.byo_model(str(tmp_path / "nowhere"), tmp_path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tour_logic")
    folder = make_tiny_opt(root / "hf", backend="flashnb", ffn_dim=256, max_position_embeddings=96)
    store = FlashStore.open(convert(folder, root / "store", ConvertConfig(dtype="fp32", progress=False)))
    return folder, store


def test_oracle_flash_run_matches_dense_and_compare_finds_differences(tiny):
    folder, store = tiny
    prompt = [2, 17, 42, 99]
    dense = byo.dense_run(folder, prompt, 12, dtype=torch.float32)
    assert dense.tokens == list(generate(load_model(folder), prompt, 12))
    oracle = byo.flash_run(store, OraclePredictor(store.load_model()), Policy(2, 1.0, in_flight=2), prompt, 12,
                           name="oracle")
    c = byo.compare(dense, oracle)
    assert c.same_tokens and c.rounding_only and c.first_difference is None and c.max_abs_logit_diff < 1e-4
    assert oracle.stats.tokens == 11 and oracle.stats.bytes_read > 0
    assert dense.dram_bytes == sum(p.numel() * 4 for p in load_model(folder).parameters())
    # a run that picks another token at position 3: compared up to and including it
    other = byo.Run("other", dense.tokens[:3] + [dense.tokens[3] + 1] + dense.tokens[4:], dense.logits.clone(),
                    dense.stats, 0)
    other.logits[3] += 1.0
    other.logits[5] += 9.0   # after the divergence: not compared
    c = byo.compare(dense, other)
    assert not c.same_tokens and c.first_difference == 3 and c.max_abs_logit_diff == pytest.approx(1.0)
    margin = (dense.logits[3, dense.tokens[3]] - dense.logits[3, dense.tokens[3] + 1]).item()
    assert c.margin_at_difference == pytest.approx(margin)
    assert not c.rounding_only                       # logits 1.0 off: far beyond fp16 rounding of these logits
    text = " ".join(byo.compare_text("other", c).split())          # wrapped for the notebook; read as one line
    assert "the first 3 of 12 tokens identical, then one differs" in text
    assert "preferred its token by" in text
    assert "all 12 greedy tokens identical" in byo.compare_text("oracle", byo.compare(dense, oracle))
    text = byo.format_costs([dense, oracle])
    assert text.splitlines()[2].startswith("dense") and "oracle" in text
    from flashnb.core.engine import FlashEngine

    with FlashEngine(store, OraclePredictor(store.load_model()), Policy(2, 1.0, in_flight=2)) as eng:
        rows = eng.memory.capacity_rows
    assert text.splitlines()[2].split()[-1] == "-" and text.splitlines()[3].split()[-1] == str(rows)
    assert oracle.rows_per_layer == rows


def test_quick_predictors_train_and_report_selection(tiny):
    folder, _ = tiny
    ids = list(range(3, 300)) * 2
    q = byo.quick_predictors(folder, ids, rank=8, epochs=1, heldout=0.25)
    assert q.predictors.n_layers == 2 and q.predictors.ranks == [8, 8]
    assert q.train_tokens == 445 and q.heldout_tokens == 149
    assert 0 <= q.selection.recall <= 1 and q.selection.selected_share > 0
    assert "rank 8, 1 epochs on 445 tokens" in byo.predictor_text(q)
    with pytest.raises(FlashnbError, match="needs more tokens"):
        byo.quick_predictors(folder, ids[:10])


def test_model_predictors_take_the_folder_beside_the_model_else_train_quick_ones(tiny):
    ids = byo.Tokenizer.from_folder(shipped_model_dir()).encode(byo.sample_text(2000))
    preds, text = byo.model_predictors(shipped_model_dir(), ids)
    assert preds.ranks == [64] * 6 and text.startswith("the predictors beside the model (flashnb-opt-21m-predictors")
    folder, _ = tiny
    preds, text = byo.model_predictors(folder, list(range(3, 300)) * 2, rank=8, epochs=1)
    assert preds.ranks == [8, 8] and "trained just now" in text and "flashnb train-predictors --model" in text
    card = load_predictors(data_dir() / "flashnb-opt-21m-predictors").card["heldout"]   # beside it: the shipped set's
    assert (f"(the shipped predictors, on {card['quality']['tokens']:,} held-out tokens: recall "
            f"{card['mean']['recall']:.1%}") in " ".join(text.split())


def test_memory_and_store_texts_are_exact_bytes(tiny):
    _, store = tiny
    with FlashEngine(store, OraclePredictor(store.load_model()), Policy(2, 0.5, in_flight=2)) as eng:
        text = " ".join(quickstart.memory_text(eng.memory, "tiny").split())   # read as one line
    m = eng.memory
    assert f"{m.model_bytes / 1e6:.1f} MB of weights" in text and f"{m.capacity_rows} rows per cache" in text
    assert f"{m.used_bytes / m.model_bytes:.0%} of the model" in text
    # the resident part is the DRAM file's tensors plus the checksums the reader checks every bundle against
    tensors = sum(t.numel() * t.element_size() for t in store.dram_tensors().values())
    assert m.resident_bytes == tensors + store.checksum_path.stat().st_size
    assert f"resident tensors with the bundles' checksums {m.resident_bytes / 1e6:.1f} MB" in text
    s = " ".join(quickstart.store_text(store).split())
    assert s.startswith("bundled fp32 store: ffn.bin") and f"{store.num_layers} layers x 256 neurons" in s
    assert quickstart.ffn_bytes(store) == 2 * 256 * 2 * 32 * 4


def test_device_profile_measures_a_short_profile_when_none_is_saved(tmp_path, monkeypatch):
    monkeypatch.setattr(end_to_end, "SHORT_PROFILE", dict(size=8 << 20, chunk_sizes=(4096, 65536), in_flight=(1, 2),
                                                          seconds_per_cell=0.02, sequential_seconds=0.02))
    prof, source, path = end_to_end.device_profile(tmp_path, use_saved=False)
    assert path == tmp_path / "profile.json" and path.is_file()
    assert "short profile measured now" in source and list(prof.in_flight_counts) == [1, 2]
    assert "GB/s" in end_to_end.disk_text(prof) and "Paper's M1 Max" in end_to_end.disk_text(prof)


def test_sample_text_is_real_text_any_tokenizer_encodes(tiny):
    folder, _ = tiny
    text = byo.sample_text(500)
    assert len(text) == 500 and text.count(" ") > 50
    tok = byo.load_tokenizer(folder, read_config(folder))
    assert len(tok.encode(text)) > 100


def test_compare_tells_a_rounding_tie_from_a_real_difference():
    stats = TokenStats.of([], 1)
    ref = byo.Run("dense", [0, 1], torch.tensor([[1.0, 0.999, 0.0], [0.0, 1.0, 0.0]]), stats, 0)
    tie = byo.Run("flash", [1, 1], torch.tensor([[0.9995, 1.0, 0.0], [0.0, 1.0, 0.0]]), stats, 0)
    c = byo.compare(ref, tie)
    assert c.first_difference == 0 and c.rounding_only
    assert c.margin_at_difference == pytest.approx(0.001, abs=1e-6)
    assert "a near tie" in byo.compare_text("flash", c)
    wrong = byo.Run("flash", [2, 1], ref.logits.clone(), stats, 0)       # same logits, another token
    c = byo.compare(ref, wrong)
    assert not c.rounding_only and c.margin_at_difference == pytest.approx(1.0)
    assert "preferred its token by 1" in byo.compare_text("flash", c)
    noisy = byo.Run("flash", [0, 1], ref.logits + 0.5, stats, 0)         # same tokens, logits far off
    c = byo.compare(ref, noisy)
    assert c.same_tokens and not c.rounding_only


def test_memory_management_timing_reports_every_run_and_what_reallocating_copies():
    import numpy as np

    from flashnb.lab.memory import MemoryTiming, rows_kept, time_memory_management

    sets = [np.array([0, 1, 2]), np.array([1, 2, 3]), np.array([2, 3, 4]), np.array([5])]
    t = time_memory_management(sets, ffn_dim=8, width=4, window=1, capacity=8, repeats=3)
    assert len(t.preallocated_runs) == len(t.naive_runs) == 3
    assert t.preallocated_s == sorted(t.preallocated_runs)[1] and t.naive_s == sorted(t.naive_runs)[1]
    # window 1 keeps the previous token's neurons while the next one runs: {0,1,2} stay for token 1, {1,2,3}
    # for token 2, {2,3,4} for token 3: three rows copied each time; without a window nothing stays
    assert rows_kept(sets, 8, window=1, capacity=8) == 3.0
    assert rows_kept(sets, 8, window=0, capacity=8) == 0.0
    assert MemoryTiming(1, 1.0, 2.0, (0.9, 1.1), (1.9, 2.1)).apart
    assert not MemoryTiming(1, 1.0, 1.2, (0.9, 1.3), (1.1, 1.4)).apart


def test_exercise_checks_say_how_far_a_guess_is():
    from flashnb.lab.exercises import Verdict, check

    assert "set your guess above" in check(None, 3.0, "ratio")
    assert "well judged" in check(3.3, 3.0, "ratio", within=0.25) and "+10%" in check(3.3, 3.0, "ratio")
    far = check(1.0, 3.0, "ratio", "x", hint="count the requests")
    assert "(-67%)" in far and far.endswith("Hint: count the requests") and "guessed 1x" in far
    assert "(in MB)" in check(None, 1.0, "bytes", "MB") and "(a ratio" in check(None, 1.0, "r", "x")
    assert Verdict(2.0, 0.0, 0.1).error == 2.0 and not Verdict(None, 1.0, 0.1).close


def test_swap_with_last_steps_are_what_neuron_rows_does():
    from flashnb.lab.memory import swap_with_last_steps

    first, deleted, appended = swap_with_last_steps((3, 12, 25, 40, 51, 64), (12, 40), (7, 99), capacity=8)
    assert first.ids == (3, 12, 25, 40, 51, 64, -1, -1)
    assert deleted.ids == (3, 51, 25, 64, -1, -1, -1, -1)           # the last rows that stay fill the two holes
    assert deleted.state[:4] == ("kept", "moved", "kept", "moved")
    assert appended.ids[:6] == (3, 51, 25, 64, 7, 99) and appended.state[4:6] == ("new", "new")
    last = swap_with_last_steps((1, 2, 3), (3,), (), capacity=4)[1]
    assert last.ids == (1, 2, -1, -1) and "moved" not in last.state   # deleting the last row moves nothing


def test_memory_share_sets_the_engines_memory_management_beside_its_io_and_the_papers(tiny):
    from flashnb.lab.memory import memory_share
    from flashnb.text import WIDTH

    folder, store = tiny
    r = memory_share(store, OraclePredictor(store.load_model()), [2, 10, 20], 6, window=2, budget=0.5, runs=2)
    assert len(r.mm_ms) == len(r.io_ms) == len(r.total_ms) == 2
    assert all(m > 0 and i > 0 and m + i < t for m, i, t in zip(r.mm_ms, r.io_ms, r.total_ms))
    assert r.paper_mm_ms == 65 and r.paper_io_ms == 125 and round(r.paper_share, 2) == 0.34   # §4.1
    text = r.text()
    assert all(len(line) <= WIDTH for line in text.splitlines())
    assert "65 ms beside 125 ms of flash reads, 34%" in " ".join(text.split())


def test_printed_sentences_wrap_between_words():
    from flashnb.text import WIDTH, wrap

    text = " ".join(f"word{i}" for i in range(60)) + "\n\n/a/path/" + "x" * 120
    out = wrap(text)
    lines = out.splitlines()
    assert all(len(line) <= WIDTH for line in lines[:-1]) and lines[-2] == ""        # paragraphs kept
    assert out.replace("\n  ", " ").split() == text.split()                          # no word cut
    assert lines[-1] == "/a/path/" + "x" * 120                                       # a path stays whole
