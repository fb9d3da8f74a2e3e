"""Shared fixtures: tiny random Hugging Face checkpoints built and saved by transformers itself.

The suite runs torch with one thread: on a 2-core machine with other work running, two threads of
tiny kernels contend and a call can take 100x longer. (The package's own decode default is set by
flashnb.core.generate.set_decode_threads, from measurement.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from flashnb.models import tiny
from flashnb.models.tiny import TEXTS, save_tiny_tokenizer  # noqa: F401  (tests import them from here)

torch.set_num_threads(1)
# ... and so do the commands the tests run in this process: set_decode_threads would otherwise sample
# the cores for 0.1 s on every call and raise torch to two threads for the rest of the run.
os.environ.setdefault("FLASHNB_TORCH_THREADS", "1")


def make_tiny_opt(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random OPTForCausalLM (vocab 300, d 32, ffn 64, 2 layers) saved by transformers in `folder`."""
    return tiny.make_tiny_opt(folder, seed, backend="transformers", **overrides)


def make_tiny_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random LlamaForCausalLM(hidden_act="relu") with grouped-query attention saved by transformers."""
    return tiny.make_tiny_llama(folder, seed, backend="transformers", **overrides)


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory) -> Path:
    return make_tiny_opt(tmp_path_factory.mktemp("tiny_opt"))


def cli_refuses(capsys, argv: list[str], *words: str) -> str:
    """`flashnb ARGV` ends with exit status 2 and one line `flashnb: error: ...` holding every one of
    `words`, no traceback; returns the line."""
    from flashnb.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flashnb: error: ") and "\n" not in err and "Traceback" not in err, err
    assert all(w in err for w in words), err
    return err
