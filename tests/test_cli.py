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
