"""Shared fixtures: tiny random Hugging Face checkpoints built and saved by transformers itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from flashnb import tiny
from flashnb.tiny import TEXTS, save_tiny_tokenizer  # noqa: F401  (tests import them from here)


def make_tiny_opt(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random OPTForCausalLM (vocab 300, d 32, ffn 64, 2 layers) saved by transformers in `folder`."""
    return tiny.make_tiny_opt(folder, seed, backend="transformers", **overrides)


def make_tiny_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random LlamaForCausalLM(hidden_act="relu") with grouped-query attention saved by transformers."""
    return tiny.make_tiny_llama(folder, seed, backend="transformers", **overrides)


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory) -> Path:
    return make_tiny_opt(tmp_path_factory.mktemp("tiny_opt"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
