"""`flashnb train` on a tiny corpus: the folder it writes loads in transformers; resuming is exact."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from flashnb.training.corpus import Corpus
from flashnb.training.train import TrainConfig, train

from conftest import TEXTS

CORPUS = Corpus(train=[t + f" {i}" for i, t in enumerate(TEXTS * 4)], heldout=TEXTS[:4], sources={"what": "test"})


def tiny(out) -> TrainConfig:
    return TrainConfig(out=str(out), vocab_size=300, d_model=32, ffn_dim=64, layers=2, heads=4, context=16,
                       batch=4, tokens=4 * 16 * 6, warmup_steps=2, checkpoint_every=100, eval_tokens=64,
                       threads=1)


def test_train_writes_a_folder_transformers_loads(tmp_path):
    from transformers import OPTForCausalLM

    card = train(tiny(tmp_path / "m"), corpus=CORPUS, progress=False)
    folder = tmp_path / "m"
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_card.json"} <= {p.name for p in folder.iterdir()}
    hf = OPTForCausalLM.from_pretrained(folder)
    assert hf.config.ffn_dim == 64 and hf.config.num_hidden_layers == 2
    assert card["tokens_seen"] == 6 * 4 * 16 and card["steps"] == 6
    h = card["heldout"]
    assert len(h["sparsity_per_layer"]) == 2 and all(0 <= s <= 1 for s in h["sparsity_per_layer"])
    assert h["perplexity"] > 1 and json.loads((folder / "training_card.json").read_text())["corpus"]["sha256"] == CORPUS.sha256


def test_resume_is_exact(tmp_path):
    straight = tiny(tmp_path / "a")
    train(straight, corpus=CORPUS, progress=False)
    resumed = tiny(tmp_path / "b")
    assert train(resumed, corpus=CORPUS, progress=False, stop_at_step=3) is None
    train(resumed, corpus=CORPUS, progress=False)
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
