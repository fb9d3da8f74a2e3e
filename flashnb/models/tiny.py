"""Tiny random Hugging Face checkpoints: for tests, and for notebook 07 when no model folder is given.

`make_tiny_opt(folder)` / `make_tiny_llama(folder)` write a complete model folder (config.json,
model.safetensors, tokenizer.json) of a random OPT / ReLU Llama model (grouped-query attention) that
flashnb, and transformers, load like any downloaded checkpoint. By default transformers builds and
saves the model itself (`OPTForCausalLM` / `LlamaForCausalLM`, its own initialisation: weights normal with
std 0.02, biases zero), so a test comparing flashnb with transformers compares against an independent
writer. Without transformers installed (`backend="flashnb"`), flashnb's own model classes build the
same shapes with the same initialisation and `flashnb.models.checkpoint.save_model` writes them.

The weights are random: the text they produce is gibberish, and about half of a random ReLU FFN's
neurons fire for any token (a trained OPT: 3-10%).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from flashnb.errors import FlashnbError

# The tokenizer's training texts (a byte-level BPE; tests use them as a corpus too).
TEXTS = ["Return the number of items in the container.", "Open the file and return a stream.",
         "Raise ValueError if the argument is negative.", "def f(x):\n    return x + 1\n"] * 4

OPT_DEFAULTS = dict(vocab_size=300, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32)
LLAMA_DEFAULTS = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, hidden_act="relu", max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=2, pad_token_id=1)  # the tokenizer's <s>, </s>, <pad>
BACKENDS = ("auto", "transformers", "flashnb")


def save_tiny_tokenizer(folder: str | Path, vocab_size: int = 300) -> None:
    """A byte-level BPE fitted on TEXTS, saved in `folder` for flashnb and for transformers' AutoTokenizer;
    its start token is the folder's config.json `bos_token_id` (written first), else OPT's 2."""
    from flashnb.models.tokenizer import config_bos, train_bpe

    bos = config_bos(Path(folder))
    train_bpe(TEXTS, vocab_size, bos_id=2 if bos is None else bos).save(folder)


def has_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


def _backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise FlashnbError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "transformers" if has_transformers() else "flashnb"
    if backend == "transformers" and not has_transformers():
        raise FlashnbError("backend 'transformers' needs transformers: pip install 'flashnb[bench]', "
                           "or use backend='flashnb'")
    return backend


def _save_with_flashnb(hf_config: dict, folder: Path, seed: int) -> None:
    """Build flashnb's model for `hf_config`, initialise it as transformers does, save it in fp32."""
    from flashnb.models.checkpoint import CONFIGS, build_model, save_model

    config = CONFIGS[hf_config["model_type"]].from_hf(hf_config, "tiny config")
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    save_model(model, folder, dtype=torch.float32)


def _make_tiny(folder: str | Path, model_type: str, kw: dict, seed: int, backend: str) -> Path:
    """Save a random `model_type` model of config `kw` and the tiny tokenizer in `folder`: through
    transformers' own classes, or flashnb's writer where transformers is not installed."""
    folder = Path(folder)
    if _backend(backend) == "transformers":
        import transformers

        name = {"opt": "OPT", "llama": "Llama"}[model_type]
        torch.manual_seed(seed)
        model = getattr(transformers, f"{name}ForCausalLM")(getattr(transformers, f"{name}Config")(**kw)).eval()
        model.save_pretrained(folder, safe_serialization=True)
    else:
        _save_with_flashnb(dict(kw, model_type=model_type), folder, seed)
    save_tiny_tokenizer(folder)
    return folder


def make_tiny_opt(folder: str | Path, seed: int = 0, backend: str = "auto", **overrides) -> Path:
    """A random OPT model (default: vocab 300, d 32, ffn 64, 2 layers; `overrides` change any config
    field) with its tokenizer, saved as a Hugging Face folder `folder` (created). Returns the folder."""
    return _make_tiny(folder, "opt", dict(OPT_DEFAULTS, **overrides), seed, backend)


def make_tiny_llama(folder: str | Path, seed: int = 0, backend: str = "auto", **overrides) -> Path:
    """A random Llama model with ReLU gated FFN and grouped-query attention (default: vocab 300, d 32,
    ffn 64, 2 layers, 4 heads, 2 KV heads) with its tokenizer, saved as a Hugging Face folder."""
    return _make_tiny(folder, "llama", dict(LLAMA_DEFAULTS, **overrides), seed, backend)
