import subprocess
import sys

import pytest

from flashnb.cli import build_parser, main


def test_demo_prints_text(capsys):
    assert main(["demo", "-n", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Return a new list containing") and len(out) > len("Return a new list containing")


def test_generate_on_a_folder(tiny_opt_dir, capsys):
    assert main(["generate", "--model", str(tiny_opt_dir), "--prompt", "Open the", "-n", "5"]) == 0
    assert capsys.readouterr().out.startswith("Open the")


@pytest.mark.parametrize("command", sorted(build_parser()._subparsers._group_actions[0].choices))
def test_every_command_has_help(command):
    r = subprocess.run([sys.executable, "-m", "flashnb.cli", command, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage: flashnb " + command in r.stdout


def test_bad_sampling_option(tiny_opt_dir, capsys):
    assert main(["generate", "--model", str(tiny_opt_dir), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_decode_threads_default_and_override(monkeypatch):
    import os

    import torch

    from flashnb.generate import DECODE_THREADS, set_decode_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("FLASHNB_TORCH_THREADS", raising=False)
        assert set_decode_threads() == min(DECODE_THREADS, os.cpu_count() or 1) == torch.get_num_threads()
        monkeypatch.setenv("FLASHNB_TORCH_THREADS", "1")
        assert set_decode_threads() == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_bad_thread_variable_is_one_clear_error(tiny_opt_dir, monkeypatch, capsys):
    monkeypatch.setenv("FLASHNB_TORCH_THREADS", "many")
    assert main(["generate", "--model", str(tiny_opt_dir), "--prompt", "x", "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert "FLASHNB_TORCH_THREADS must be a whole number >= 1, got 'many'" in err and "Traceback" not in err
