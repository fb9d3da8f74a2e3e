import argparse
import io
import os
import subprocess
import sys

import pytest

from flashnb.cli import build_parser, main

from conftest import cli_refuses as _one_line_error


def test_demo_prints_text(capsys):
    assert main(["demo", "-n", "8"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Return a new list containing") and len(out) > len("Return a new list containing")
    # one table row per step after the prompt, its requests adding up to the summary's mean
    lines = err.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("token in"))
    rows = [ln for ln in lines[head + 1:] if ln.strip() and not ln.startswith("per generated token")][:7]
    assert lines[head][14:].split()[:6] == ["predicted", "cached", "loaded", "KB", "read", "requests"]
    requests = [int(r[14:].split()[4]) for r in rows]   # (the token takes the first 14 characters)
    summary = " ".join(err[err.index("per generated token"):].split())   # (a wrapped paragraph)
    assert f"in {sum(requests) / len(requests):.0f} requests" in summary
    assert all(len(ln) <= 100 for ln in lines if not ln.startswith(("token in", "'")))   # prose lines wrapped


def test_demo_pins_hot_neurons_when_asked(capsys):
    assert main(["demo", "-n", "4", "--memory", "0.8", "--pinned", "auto", "--no-table"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    pinned = int(err.split(" hot neurons pinned per layer")[0].rsplit(" ", 1)[1])
    assert pinned > 0   # at 80% of the model the simulated split pins hundreds of hot neurons per layer
    assert main(["demo", "-n", "3", "--pinned", "16"]) == 0
    err = capsys.readouterr().err
    assert "16 hot neurons pinned per layer" in " ".join(err.split())
    head, row = [line.split() for line in err.split("token in", 1)[1].splitlines()[:2]]
    assert head[:4] == ["predicted", "pinned", "cached", "loaded"]     # the table's counts add up: pinned shown
    predicted, pinned, cached, read = map(int, row[-9:-5])
    assert pinned > 0 and predicted == pinned + cached + read


def test_generate_on_a_folder(tiny_opt_dir, capsys):
    assert main(["generate", "--model", str(tiny_opt_dir), "--prompt", "Open the", "-n", "5"]) == 0
    assert capsys.readouterr().out.startswith("Open the")


@pytest.fixture(scope="module")
def shipped_store(tmp_path_factory):
    from flashnb.core.convert import ConvertConfig, convert
    from flashnb.paths import shipped_model_dir

    return convert(shipped_model_dir(), tmp_path_factory.mktemp("s") / "store", ConvertConfig(progress=False))


def test_generate_from_a_store_equals_dense_with_the_oracle(shipped_store, capsys):
    from flashnb.paths import shipped_model_dir

    prompt = ["--prompt", "Open the file", "-n", "12"]
    assert main(["generate", "--model", str(shipped_model_dir()), *prompt]) == 0
    dense = capsys.readouterr().out
    assert main(["generate", "--store", str(shipped_store), "--policy", "oracle", "--memory", "0.6", *prompt]) == 0
    out, err = capsys.readouterr()
    err = " ".join(err.split())
    assert out == dense and "oracle, window 4" in err and "I/O ms" in err and "per generated token" in err


def test_generate_from_a_store_prints_json_records(shipped_store, capsys):
    import json

    argv = ["generate", "--store", str(shipped_store), "--prompt", "Return a new list", "-n", "6"]
    assert main(argv + ["--stats", "summary"]) == 0   # the shipped predictors, found by the store's fingerprint
    text = capsys.readouterr().out.rstrip("\n")
    assert main(argv + ["--stats", "json", "--window", "2"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["prompt"] + got["text"] == text and got["predictor"] == "low-rank predictors" and got["window"] == 2
    assert len(got["tokens"]) == 5 and got["per_token"]["tokens"] == 5   # the first new token comes with the prompt
    assert "".join(r["text_in"] for r in got["tokens"]) in got["text"]   # each record: the token fed in
    for r in got["tokens"]:
        assert r["predicted"] == r["cached"] + r["loaded"] + r["pinned"] and r["bytes_read"] >= r["loaded"] * 2048
    assert got["per_token"]["bytes_read"] == pytest.approx(sum(r["bytes_read"] for r in got["tokens"]) / 5)


def test_a_budget_that_leaves_fewer_rows_than_a_token_needs_is_said(shipped_store, capsys):
    import re

    argv = ["generate", "--store", str(shipped_store), "--prompt", "Return a new list", "-n", "6", "--stats", "summary"]
    assert main(argv + ["--memory", "0.46"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    m = re.search(r"a token needed (\d+) neurons per layer on average \(measured\), more than the (\d+) rows", err)
    assert m and int(m.group(1)) > int(m.group(2))
    assert main(argv + ["--memory", "0.9"]) == 0      # room for every token's neurons: nothing to say
    assert "note: a token needed" not in capsys.readouterr().err


def test_generate_from_a_store_of_another_model_needs_predictors(tmp_path, tiny_opt_dir, capsys):
    from flashnb.core.convert import ConvertConfig, convert

    store = convert(tiny_opt_dir, tmp_path / "store", ConvertConfig(progress=False))
    _one_line_error(capsys, ["generate", "--store", str(store), "--prompt", "Open"], "pass --predictors FOLDER")
    assert main(["generate", "--store", str(store), "--prompt", "Open", "-n", "3", "--policy", "every",
                 "--memory", "0.9"]) == 0
    capsys.readouterr()
    _one_line_error(capsys, ["generate", "--model", str(tiny_opt_dir), "--prompt", "x", "--window", "2"],
                    "--window: only for the flash engine")


def test_what_depends_on_the_model_is_checked_before_any_work(shipped_store, tiny_opt_dir, tmp_path, capsys):
    import time

    from flashnb.core.convert import ConvertConfig, convert
    from flashnb.paths import shipped_model_dir

    t0 = time.perf_counter()
    _one_line_error(capsys, ["demo", "-n", "300"], "exceeds the model's context of 256")
    _one_line_error(capsys, ["demo", "--pinned", "99999"], "--pinned 99999 is out of range: give a whole number "
                                                             "from 0 to 2047")
    _one_line_error(capsys, ["demo", "--pinned", "2048", "--memory", "100MB"],   # every neuron: no window row
                    "the window needs a row", "run the dense model")
    store = ["generate", "--store", str(shipped_store), "--prompt", "Open"]
    _one_line_error(capsys, store + ["-n", "300"], "exceeds the model's context")
    _one_line_error(capsys, store + ["--policy", "oracle", "--predictors", "x"], "--predictors is for --policy "
                                                                                  "predictors")
    _one_line_error(capsys, ["generate", "--model", str(shipped_store), "--prompt", "Open"],
                    f"{shipped_store} is a flashnb store, not a Hugging Face model folder: give the model folder it "
                    f"was converted from, or run the store itself (`flashnb generate --store {shipped_store}`)")
    _one_line_error(capsys, ["generate", "--model", str(shipped_model_dir()), "--prompt", "x", "-n", "300"],
                    "exceeds the model's context")
    assert time.perf_counter() - t0 < 20   # refused before converting or loading anything (each well under 1 s)
    other = convert(tiny_opt_dir, tmp_path / "store", ConvertConfig(progress=False))
    _one_line_error(capsys, ["generate", "--store", str(other), "--prompt", "Open", "--policy", "every",
                             "--pinned", "8"],
                    "--pinned holds the hot neurons")


def test_the_continuation_is_bold_on_a_terminal_only(monkeypatch):
    from flashnb.demo import show_text

    class Tty:
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert show_text("Open", " it", Tty()) == "Open\x1b[1m it\x1b[0m"
    monkeypatch.setenv("NO_COLOR", "1")
    assert show_text("Open", " it", Tty()) == "Open it"


@pytest.mark.parametrize("command", sorted(build_parser()._subparsers._group_actions[0].choices))
def test_every_command_has_help(command):
    r = subprocess.run([sys.executable, "-m", "flashnb.cli", command, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage: flashnb " + command in r.stdout


def test_progress_bars_stay_out_of_logs(tiny_opt_dir, tmp_path):
    """A command whose stderr goes to a file or a pipe writes no progress bar (a carriage return per
    update); on a terminal it draws one."""
    from flashnb.text import show_progress

    r = subprocess.run([sys.executable, "-m", "flashnb", "convert", str(tiny_opt_dir), str(tmp_path / "store")],
                       capture_output=True, text=True, env={**os.environ, "FLASHNB_TORCH_THREADS": "1"})
    assert r.returncode == 0 and "\r" not in r.stderr and "convert" not in r.stderr

    class Tty(io.StringIO):
        def isatty(self):
            return True

    real = sys.stderr
    try:
        sys.stderr = Tty()
        assert show_progress(True) and not show_progress(False)
    finally:
        sys.stderr = real


@pytest.mark.parametrize("argv,words", [
    (["--top-p", "0"], "argument --top-p: 0 is out of range: give a probability mass in (0, 1]"),
    (["--temperature", "nan"], "argument --temperature: nan is out of range"),
    (["--seed", str(2**70)], "argument --seed"),
    (["-n", "-5"], "argument -n: -5 is out of range: give a whole number from 1"),
    (["-n", "many"], "argument -n: 'many' is not a whole number"),
])
def test_bad_numbers_are_one_line_before_any_work(tiny_opt_dir, capsys, argv, words):
    _one_line_error(capsys, ["generate", "--model", str(tiny_opt_dir), "--prompt", "x", *argv], words)


@pytest.mark.parametrize("value,words", [("1.5", "neither a fraction of the model in (0, 1]"),
                                         ("0", "neither a fraction"), ("inf", "neither a fraction"),
                                         ("-3MB", "neither a fraction"), ("2", "'2' is ambiguous")])
def test_memory_is_a_fraction_or_bytes(capsys, value, words):
    _one_line_error(capsys, ["demo", f"--memory={value}"], words)


def test_memory_parses_fractions_and_bytes():
    from flashnb.cli_args import memory_budget

    assert memory_budget("0.5") == 0.5 and memory_budget("1.0") == 1.0
    assert memory_budget("20000000") == 20_000_000 and memory_budget("20MB") == 20_000_000
    assert memory_budget("19MiB") == 19 * 2**20 and memory_budget("2KiB") == 2048   # a unit says bytes
    assert memory_budget("0.5MiB") == 2**19 and memory_budget("700000B") == 700_000  # small models' budgets
    for ambiguous in ("1", "2", "1048575"):   # a bare number under 1 MiB: a fraction meant without its point?
        with pytest.raises(argparse.ArgumentTypeError, match="is ambiguous") as e:
            memory_budget(ambiguous)
        unit = "byte" if ambiguous == "1" else "bytes"
        assert f"{ambiguous}B for {ambiguous} {unit}" in str(e.value)   # the bytes spelled out, not a GiB guess


def test_a_prompt_that_is_not_utf8_is_one_line(tiny_opt_dir, capsys):
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of a Latin-1 command line
    _one_line_error(capsys, ["generate", "--model", str(tiny_opt_dir), "--prompt", bad], "not valid UTF-8")


def test_help_does_not_import_torch():
    code = ("import sys; from flashnb.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.split() == ["False", "False"]


def test_python_dash_m_flashnb_is_the_flashnb_command():
    r = subprocess.run([sys.executable, "-m", "flashnb", "generate", "--policy", "all"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("flashnb: error: generate: ") and "is now 'every'" in r.stderr


def test_decode_threads_default_and_override(monkeypatch):
    import os

    import torch

    from flashnb.core import generate as G

    before = torch.get_num_threads()
    cores = os.cpu_count() or 1
    assert 0 <= G.idle_cores(0.05) <= cores + 1e-9
    try:
        monkeypatch.delenv("FLASHNB_TORCH_THREADS", raising=False)
        monkeypatch.setattr(G, "idle_cores", lambda: float(cores))     # an idle machine: up to DECODE_THREADS
        assert G.set_decode_threads() == min(G.DECODE_THREADS, cores) == torch.get_num_threads()
        monkeypatch.setattr(G, "idle_cores", lambda: 0.4)              # other work on the cores: one thread
        assert G.set_decode_threads() == 1 == torch.get_num_threads()
        monkeypatch.setenv("FLASHNB_TORCH_THREADS", "1")
        assert G.set_decode_threads() == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_bad_thread_variable_is_one_clear_error(tiny_opt_dir, monkeypatch, capsys):
    monkeypatch.setenv("FLASHNB_TORCH_THREADS", "many")
    assert main(["generate", "--model", str(tiny_opt_dir), "--prompt", "x", "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert "FLASHNB_TORCH_THREADS must be a whole number from 1 to" in err and "got 'many'" in err
    assert "Traceback" not in err
    monkeypatch.setenv("FLASHNB_TORCH_THREADS", "100000")      # more threads than cores: refused, not a segfault
    assert main(["generate", "--model", str(tiny_opt_dir), "--prompt", "x", "-n", "2"]) == 2
    assert "got '100000'" in capsys.readouterr().err


def test_in_flight_is_range_checked(capsys):
    _one_line_error(capsys, ["demo", "--in-flight", "100000"], "argument --in-flight: 100000 is out of range")
    _one_line_error(capsys, ["demo", "--memory", "nan"], "neither a fraction")
    _one_line_error(capsys, ["demo", "--pinned", "many"],
                    "argument --pinned: 'many' is neither 'auto' nor a whole number of rows >= 0")
    _one_line_error(capsys, ["demo", "--pinned", "-1"], "'-1' is neither 'auto' nor a whole number")
    _one_line_error(capsys, ["bench", "--bogus"], "unrecognized arguments: --bogus")


def test_sigterm_during_demo_removes_its_temporary_store(tmp_path):
    import os
    import signal
    import time

    env = dict(os.environ, TMPDIR=str(tmp_path), FLASHNB_TORCH_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "flashnb.cli", "demo", "-n", "240"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list(tmp_path.glob("flashnb-demo-*/store/ffn.bin")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob("flashnb-demo-*")), "the demo never wrote its store"
    p.send_signal(signal.SIGTERM)
    rc = p.wait(60)
    err = p.stderr.read().decode(errors="replace")[-2000:]
    assert rc == 128 + signal.SIGTERM, (rc, err)
    assert not list(tmp_path.glob("flashnb-demo-*")), err


def test_demo_runs_the_shipped_swiglu_model_both_ways(capsys):
    from flashnb.paths import SWIGLU_MODEL, data_dir

    swiglu = str(data_dir() / SWIGLU_MODEL)
    assert main(["demo", "--model", swiglu, "-n", "4", "--no-table"]) == 0
    out, err = capsys.readouterr()
    err = " ".join(err.split())   # (wrapped lines)
    assert out.startswith("Return a new list containing")
    assert "50% of" in err and "low-rank predictors" in err and "bundled store" in err
    assert main(["demo", "--model", SWIGLU_MODEL, "--gate-in-dram", "--memory", "0.65", "-n", "4", "--no-table"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "scaled-gate thresholds on the gate in DRAM (50% sparsity), window" in err and "gate-apart store" in err
    assert "the gate matrices stay in DRAM" in err
    assert main(["demo", "--model", SWIGLU_MODEL, "--two-stage", "--memory", "0.65", "-n", "4", "--no-table"]) == 0
    err = " ".join(capsys.readouterr().err.split())   # the shipped two-stage rule: gate candidates, product keeps
    assert ("scaled-gate thresholds on the gate in DRAM (30% sparsity), kept by product thresholds (50% sparsity)"
            in err and "gate-apart store" in err)


def test_train_predictors_two_stage_only_writes_what_demo_two_stage_runs(tmp_path, monkeypatch, capsys):
    import json

    from flashnb.core.thresholds import two_stage_in
    from flashnb.models.tiny import TEXTS
    from flashnb.training import corpus

    from conftest import make_tiny_llama

    tiny = corpus.Corpus(train=[t + f" {i}" for i, t in enumerate(TEXTS * 40)], heldout=TEXTS[:3], sources={})
    monkeypatch.setattr(corpus, "collect", lambda: tiny)   # the real corpus takes half a minute to collect
    model = make_tiny_llama(tmp_path / "sw", hidden_act="silu")
    argv = ["train-predictors", "--model", str(model), "--two-stage-only", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "two stages: candidates above scaled-gate thresholds for 30% sparsity" in out
    pick, keep = two_stage_in(tmp_path / "sw-predictors")   # written beside the model
    assert (pick.criterion, pick.sparsity, keep.criterion, keep.sparsity) == ("scaled-gate", 0.3, "product", 0.5)
    card = json.loads((tmp_path / "sw-predictors" / "two-stage" / "card.json").read_text())
    assert 0 < card["heldout"]["kept_share"] < 0.7 and card["heldout"]["tokens"] > 0
    assert main(argv) == 2 and "already holds two-stage, which this job would replace; pass --force" in \
        capsys.readouterr().err
    assert main(["demo", "--model", str(model), "--two-stage", "--memory", "1.0", "-n", "3", "--no-table"]) == 0
    demo = capsys.readouterr()
    assert "kept by product thresholds (50% sparsity)" in " ".join(demo.err.split())
    # the same rule from a gate-apart store with `generate --store`: the same text as the demo
    assert main(["convert", str(model), str(tmp_path / "ga"), "--layout", "gate-apart"]) == 0
    store = ["generate", "--store", str(tmp_path / "ga"), "--prompt", "Return a new list containing", "-n", "3",
             "--memory", "1.0", "--predictors", str(tmp_path / "sw-predictors")]
    capsys.readouterr()
    assert main(store + ["--two-stage", "--stats", "json"]) == 0
    got = capsys.readouterr()
    text = json.loads(got.out)["text"]
    assert text.strip() and text in demo.out
    assert "kept by product thresholds (50% sparsity)" in " ".join(got.err.split())
    assert main(store + ["--two-stage", "--policy", "oracle"]) == 2
    assert "drop --policy oracle or --two-stage" in capsys.readouterr().err
    assert main(store[:-2] + ["--predictors", str(tmp_path), "--two-stage"]) == 2
    assert "has no two-stage/" in capsys.readouterr().err


@pytest.mark.parametrize("argv,words", [
    (["demo", "--model", "SWIGLU", "--gate-in-dram", "-n", "2"], "at least 0.579 of the model"),
    (["demo", "--gate-in-dram", "-n", "2"], "flashnb-opt-21m is sparse by itself (relu): drop --gate-in-dram, or run a "
                                            "SwiGLU model such as --model flashnb-llama-11m"),
    (["demo", "--model", "no-such-model", "-n", "2"], "no such folder, nor the name of a model"),
    (["convert", "RELU", "STORE", "--layout", "gate-apart"], "this opt model's FFN has no gate"),
    (["train-predictors", "--model", "RELU", "--sparsity", "0.5", "--out", "OUT"],
     "thresholds are for SwiGLU models"),
    (["train-predictors", "--sparsity", "0.5", "--lookahead"], "different jobs"),
    (["train-predictors", "--model", "SWIGLU", "--out", "OUT"],
     "is a SwiGLU model (silu gate): none of its neurons is exactly zero, so predictors of its nonzero neurons would "
     "select at random; pass --sparsity"),
    (["train-predictors", "--model", "SWIGLU", "--lookahead", "--out", "OUT"], "pass --sparsity"),
    (["demo", "--two-stage", "-n", "2"], "flashnb-opt-21m is sparse by itself (relu): drop --two-stage"),
    (["train-predictors", "--model", "RELU", "--two-stage-only", "--out", "OUT"], "a two-stage rule is for SwiGLU"),
    (["train-predictors", "--candidates", "0.3", "--out", "OUT"], "--candidates goes with --two-stage-only"),
    (["train-predictors", "--model", "SWIGLU", "--two-stage-only", "--candidates", "0.6", "--out", "OUT"],
     "--candidates 0.6 must be below --sparsity 0.5"),
])
def test_swiglu_options_fail_in_one_line(tmp_path, capsys, argv, words):
    from flashnb.paths import SHIPPED_MODEL, SWIGLU_MODEL, data_dir

    names = {"STORE": tmp_path / "STORE", "OUT": tmp_path / "OUT", "SWIGLU": data_dir() / SWIGLU_MODEL,
             "RELU": data_dir() / SHIPPED_MODEL}
    argv = [str(names[a]) if a in names else a for a in argv]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not (tmp_path / "STORE").exists() and not (tmp_path / "OUT").exists()
