"""Bad command lines found by trying the CLI as a newcomer: each is one `flashnb: error:` line said before
the work it would have wasted or the file it would have replaced, and naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from flashnb.cli import build_parser, main

from conftest import cli_refuses as _refused


def test_an_output_file_is_checked_before_the_run(tmp_path, capsys):
    _refused(capsys, ["bench", "--out", str(tmp_path)], "is a folder; give a file name")
    _refused(capsys, ["bench", "--out", str(tmp_path / "no" / "r.json")], "no does not exist; give a path inside an")
    _refused(capsys, ["profile", "--quick", "--out", str(tmp_path)], "is a folder")
    _refused(capsys, ["profile", "--quick", "--out", str(tmp_path / "no" / "p.json")], "does not exist")
    assert not (tmp_path / "no").exists()                          # nothing created on the way
    (tmp_path / "f").write_text("mine")
    _refused(capsys, ["bench", "--tokens", "1", "--configs", "naive", "--dir", str(tmp_path / "f")],
             "is a file, not a folder")
    _refused(capsys, ["bench", "--keep-replay"], "it goes with --replay")
    assert (tmp_path / "f").read_text() == "mine"


def test_files_in_the_way_of_an_output_are_named_and_kept(tmp_path, capsys):
    """An output path under a file, a folder given as a profile, a user's file given as --out: one line each,
    naming the file, and the file left as it was; a flashnb result of an earlier run is replaced."""
    mine = tmp_path / "notes.py"
    mine.write_text("print('mine')")
    for argv in (["bench", "--out", str(mine / "r.json")], ["profile", "--quick", "--out", str(mine / "p.json")],
                 ["convert", "RELU", str(mine / "store")], ["train", "--out", str(mine / "model")],
                 ["train", "--out", str(mine)], ["profile", "--quick", "--dir", str(mine)]):
        argv = [str(Path(__file__).parents[1] / "data" / "flashnb-opt-21m") if a == "RELU" else a for a in argv]
        _refused(capsys, argv, f"{mine} is a file")
    _refused(capsys, ["bench", "--configs", "floor", "--out", str(mine)], "exists and is not a flashnb result")
    _refused(capsys, ["profile", "--quick", "--out", str(mine)], "exists and is not a flashnb result")
    for argv in (["profile", "--use", str(tmp_path)], ["bench", "--configs", "floor", "--profile", str(tmp_path)]):
        _refused(capsys, argv, f"profile {tmp_path} is a folder; give the profile's JSON file")
    assert mine.read_text() == "print('mine')"
    earlier = tmp_path / "r.json"
    earlier.write_text('{"flashnb_bench_version": 1}')
    assert main(["bench", "--configs", "floor", "--tokens", "2", "--out", str(earlier)]) == 0
    assert "results" in earlier.read_text()


def test_profile_options_that_would_do_nothing_or_the_wrong_thing(tmp_path, capsys, monkeypatch):
    import flashnb.device.measure as measure

    monkeypatch.setattr(measure, "run_profile", lambda cfg: pytest.fail("measured before checking the store"))
    _refused(capsys, ["profile", "--use", "p.json", "--out", str(tmp_path / "q.json")], "--use loads a saved profile")
    from flashnb.paths import shipped_model_dir

    model = shipped_model_dir()   # a model folder where a store belongs: said before measuring (and saving)
    _refused(capsys, ["profile", "--quick", "--reader-check", str(model)], "is a Hugging Face model folder, not a flash store")
    assert build_parser().parse_args(["profile", "--size", "1GB"]).size == 10**9
    assert build_parser().parse_args(["profile", "--size", "256MiB"]).size == 256 << 20
    _refused(capsys, ["profile", "--size", "lots"], "is not bytes")


def test_an_unknown_option_points_at_its_command(capsys):
    _refused(capsys, ["demo", "--memroy", "0.5"], "demo: unrecognized arguments: --memroy", "`flashnb demo --help`")


def test_bench_configs_that_name_nothing_or_nothing_that_runs(capsys, monkeypatch):
    _refused(capsys, ["bench", "--configs", ""], "--configs names no configuration")
    _refused(capsys, ["bench", "--configs", "lookahead", "--tokens", "1"], "none of the configurations can run here",
             "lookahead: no lookahead predictors")
    import flashnb.bench.run as run    # --replay without the run it replays: said before anything is loaded

    monkeypatch.setattr(run, "read_config", lambda *a: pytest.fail("the bench started before its checks"))
    _refused(capsys, ["bench", "--replay", "--configs", "all", "--tokens", "1"], "include 'predictor' in --configs")


def test_train_predictors_checks_its_job_before_tracing(tiny_opt_dir, tmp_path, capsys, monkeypatch):
    import flashnb.training.build_predictors as bp

    _refused(capsys, ["train-predictors", "--model", str(tiny_opt_dir), "--rank", "100000", "--out",
                      str(tmp_path / "p")], "rank 100000 exceeds the model's d_model")
    (tmp_path / "afile").write_text("x")
    _refused(capsys, ["train-predictors", "--model", str(tiny_opt_dir), "--out", str(tmp_path / "afile")],
             "is a file; give a folder")
    _refused(capsys, ["train-predictors", "--eval-tokens", "16"], "argument --eval-tokens")   # reuse needs 17
    _refused(capsys, ["train-predictors", "--threshold", "1"], "a probability in (0, 1)")     # 1 selects nothing
    monkeypatch.setattr(bp, "available_memory", lambda: 1 << 30)   # 1 GiB here
    _refused(capsys, ["train-predictors", "--model", str(tiny_opt_dir), "--train-tokens", "100000000", "--rank", "4",
                      "--out", str(tmp_path / "p")], "need about", "give at most about")
    assert not (tmp_path / "p").exists()


def test_predictors_are_written_where_the_commands_look_for_them(tmp_path, capsys, monkeypatch):
    from flashnb.models.tiny import TEXTS, make_tiny_opt
    from flashnb.training import corpus

    tiny = corpus.Corpus(train=[t + f" {i}" for i, t in enumerate(TEXTS * 40)], heldout=TEXTS[:3], sources={})
    import flashnb.training.build_predictors as bp

    monkeypatch.setattr(bp, "collect", lambda: tiny)   # the real corpus takes half a minute to collect
    tiny_opt_dir = make_tiny_opt(tmp_path / "models")  # a model of its own: predictors appear beside it
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")                            # anywhere but beside the model
    assert main(["train-predictors", "--model", str(tiny_opt_dir), "--train-tokens", "256", "--eval-tokens", "64",
                 "--epochs", "1", "--rank", "4", "--threads", "1"]) == 0
    beside = Path(f"{tiny_opt_dir}-predictors")
    assert (beside / "predictors.safetensors").is_file() and not (tmp_path / "work" / beside.name).exists()
    from flashnb.cli_train import job_files   # what --force guards is what the job wrote, file for file
    job = build_parser().parse_args(["train-predictors"])
    assert sorted(job_files(job)) == sorted(f.name for f in beside.iterdir())
    out = capsys.readouterr().out
    assert "hot_neurons.safetensors" in out and (beside / "hot_neurons.safetensors").is_file()
    assert main(["demo", "--model", str(tiny_opt_dir), "-n", "2", "--memory", "0.9", "--no-table"]) == 0
    assert "low-rank predictors" in capsys.readouterr().err   # the demo found them, beside the model
    assert main(["bench", "--model", str(tiny_opt_dir), "--configs", "all", "--tokens", "2", "--memory", "0.9",
                 "--in-flight", "2", "--dir", str(tmp_path), "--profile", str(_profile(tmp_path))]) == 0  # ... the bench too
    assert "+bundling (all)" in capsys.readouterr().out
    assert main(["convert", str(tiny_opt_dir), str(tmp_path / "store")]) == 0   # ... and generate, from a store of it
    capsys.readouterr()
    assert main(["generate", "--store", str(tmp_path / "store"), "--prompt", "Open", "-n", "2", "--memory", "0.9",
                 "--stats", "summary"]) == 0
    assert "low-rank predictors" in capsys.readouterr().err


def _profile(folder: Path) -> Path:
    import json

    from flash_helpers import synthetic_profile

    (folder / "profile.json").write_text(json.dumps(synthetic_profile()))
    return folder / "profile.json"


def test_bench_tokens_beyond_the_context_are_said_before_the_run(capsys):
    _refused(capsys, ["bench", "--tokens", "300", "--configs", "floor"], "--tokens 300", "give --tokens 249 or fewer")


def test_options_that_belong_to_another_option_say_so(capsys):
    _refused(capsys, ["bench", "--keep"], "--keep keeps the --scale stores")
    _refused(capsys, ["profile", "--fraction", "0.2"], "goes with --reader-check")
    _refused(capsys, ["train-predictors", "--criterion", "gate"], "goes with --sparsity")
    _refused(capsys, ["demo", "--dense", "--memory", "0.3", "--window", "2"], "--memory, --window: only for the flash")


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("flashnb ")


def test_sampling_options_without_a_temperature_are_refused(capsys):
    """--top-p and --seed shape sampling; at --temperature 0 (greedy) they would be silently ignored."""
    from flashnb.paths import shipped_model_dir

    _refused(capsys, ["generate", "--model", str(shipped_model_dir()), "--prompt", "def foo", "--top-p", "0.5",
                      "--seed", "7"], "--top-p, --seed: only for sampling", "--temperature above 0")


def test_a_shipped_model_is_found_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    """`--model flashnb-opt-21m` names the shipped model in every command, as in demo, not only from the repo."""
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model", "flashnb-opt-21m", "--prompt", "def foo", "-n", "2"]) == 0
    assert capsys.readouterr().out.startswith("def foo")
    _refused(capsys, ["generate", "--model", "no-such-model", "--prompt", "x"], "no-such-model")


def test_convert_says_when_the_store_gets_no_tokenizer(tiny_opt_dir, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_opt_dir.iterdir():
        if f.name != "tokenizer.json" and f.is_file():
            shutil.copy(f, bare / f.name)
    assert main(["convert", str(bare), str(tmp_path / "store")]) == 0
    err = capsys.readouterr().err
    assert "has no tokenizer.json" in err and f"copy the model's tokenizer.json into {tmp_path / 'store'}" in err
    assert main(["convert", str(tiny_opt_dir), str(tmp_path / "store2")]) == 0
    assert "tokenizer" not in capsys.readouterr().err   # a folder with one: nothing to say


def test_one_new_token_says_why_there_is_no_table(capsys):
    assert main(["demo", "-n", "1"]) == 0
    err = capsys.readouterr().err
    assert "no step after the prompt was measured" in err and "token in" not in err


def test_a_folder_that_is_not_a_model_says_so_before_its_tokenizer(tmp_path, capsys):
    (tmp_path / "tokenizer.json").write_text("{}")   # e.g. a predictors folder, or a folder of other files
    _refused(capsys, ["demo", "--model", str(tmp_path), "-n", "2"], "config.json is missing")


def test_too_many_new_tokens_name_the_most_that_fit(capsys):
    _refused(capsys, ["generate", "--model", "flashnb-opt-21m", "--prompt", "Return a list", "-n", "300"],
             "ask for 252 new tokens or fewer")   # 4 prompt tokens (with the start token) + 252 = 256


def test_shipped_names_work_for_every_folder_option_from_anywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)   # no data/ here
    assert main(["convert", "flashnb-opt-21m", "store", "--placement", "flashnb-opt-21m-predictors"]) == 0
    assert main(["generate", "--store", "store", "--predictors", "flashnb-opt-21m-predictors", "--prompt", "Return",
                 "-n", "2", "--stats", "summary"]) == 0
    assert "low-rank predictors" in capsys.readouterr().err
