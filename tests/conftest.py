"""Shared fixtures: tiny random Hugging Face checkpoints built and saved by transformers itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TEXTS = ["Return the number of items in the container.", "Open the file and return a stream.",
         "Raise ValueError if the argument is negative.", "def f(x):\n    return x + 1\n"] * 4


def save_tiny_tokenizer(folder: Path, vocab_size: int = 300) -> None:
    from flashnb.tokenizer import train_bpe

    train_bpe(TEXTS, vocab_size).save(folder)


def make_tiny_opt(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random OPTForCausalLM (vocab 300, d 32, ffn 64, 2 layers) saved as safetensors in `folder`."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=300, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, word_embed_proj_dim=32)
    kw.update(overrides)
    model = OPTForCausalLM(OPTConfig(**kw)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    save_tiny_tokenizer(folder)
    return folder


def make_tiny_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random LlamaForCausalLM(hidden_act="relu") with grouped-query attention saved in `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, hidden_act="relu", max_position_embeddings=64)
    kw.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    save_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory) -> Path:
    return make_tiny_opt(tmp_path_factory.mktemp("tiny_opt"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
