"""`flashnb train` on a tiny corpus: the folder it writes loads in transformers; resuming is exact."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from flashnb.models.tokenizer import Tokenizer
from flashnb.training.corpus import Corpus
from flashnb.training.train import TrainConfig, train

from conftest import TEXTS

CORPUS = Corpus(train=[t + f" {i}" for i, t in enumerate(TEXTS * 4)], heldout=TEXTS[:4], sources={"what": "test"})


def tiny(out) -> TrainConfig:
    return TrainConfig(out=str(out), vocab_size=300, d_model=32, ffn_dim=64, layers=2, heads=4, context=16,
                       batch=4, tokens=4 * 16 * 6, warmup_steps=2, checkpoint_every=100, eval_tokens=64,
                       threads=1)


def test_train_writes_a_folder_transformers_loads(tmp_path):
    from transformers import AutoTokenizer, OPTForCausalLM

    card = train(tiny(tmp_path / "m"), corpus=CORPUS, progress=False)
    folder = tmp_path / "m"
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_card.json"} <= {p.name for p in folder.iterdir()}
    hf = OPTForCausalLM.from_pretrained(folder)
    hf_tok, ours = AutoTokenizer.from_pretrained(folder), Tokenizer.from_folder(folder)
    assert hf_tok(TEXTS[0]).input_ids == ours.encode(TEXTS[0]) and ours.encode(TEXTS[0])[0] == hf.config.bos_token_id
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


def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes_exactly(tmp_path, monkeypatch, capsys):
    import signal

    from flashnb.training import train as train_module

    train(tiny(tmp_path / "a"), corpus=CORPUS, progress=False)
    lr_at, pressed = train_module.lr_at, []
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a shell's background job

    def lr_then_ctrl_c(step, cfg):
        if step == 2 and not pressed:
            pressed.append(step)
            signal.raise_signal(signal.SIGINT)   # as if the user pressed Ctrl-C once during the third step
        return lr_at(step, cfg)

    monkeypatch.setattr(train_module, "lr_at", lr_then_ctrl_c)
    assert train(tiny(tmp_path / "b"), corpus=CORPUS, progress=True) is None
    err = capsys.readouterr().err
    assert err.startswith("flashnb train: fitting the tokenizer") and "stopped at step 3 of 6" in err
    assert train_module.checkpointed_step(tmp_path / "b" / "checkpoint") == 3
    assert signal.getsignal(signal.SIGINT) is before   # the handler is given back
    monkeypatch.setattr(train_module, "lr_at", lr_at)
    train(tiny(tmp_path / "b"), corpus=CORPUS, progress=False)
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_also_come_by_the_clock(tmp_path, monkeypatch):
    from dataclasses import replace

    from flashnb.training import train as train_module

    saved = []
    save = train_module._save_checkpoint
    monkeypatch.setattr(train_module, "_save_checkpoint", lambda ckpt, m, o, state, rng: (saved.append(state.step),
                                                                                         save(ckpt, m, o, state, rng)))
    train(replace(tiny(tmp_path / "a"), checkpoint_seconds=1e9), corpus=CORPUS, progress=False)
    assert saved == [6]                       # only the last step: 100 steps or 1e9 s never came
    saved.clear()
    train(replace(tiny(tmp_path / "b"), checkpoint_seconds=1e-9), corpus=CORPUS, progress=False)
    assert saved == [1, 2, 3, 4, 5, 6]


def test_the_command_resumes_only_when_asked(tmp_path, capsys):
    from flashnb.cli import main

    out = tmp_path / "m"
    assert train(tiny(out), corpus=CORPUS, progress=False, stop_at_step=2) is None

    def error(argv):
        assert main(["train", "--out", str(out), *argv]) == 2
        return capsys.readouterr().err

    assert "checkpointed at step 2" in error([]) and "add --resume" in error([])
    assert "holds no checkpoint to resume" in error(["--resume", "--out", str(tmp_path / "new")])
    train(tiny(out), corpus=CORPUS, progress=False)
    assert not (out / "checkpoint").exists()       # a finished run keeps no optimizer state
    assert "already holds a model" in error([])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert "holds files of its own" in error(["--out", str(tmp_path / "mine")])
    assert oct((out / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_train_arch_llama_writes_a_swiglu_model_transformers_runs_as_flashnb_does(tmp_path):
    """`flashnb train --arch llama`: a SiLU-gated Llama with grouped-query attention and tied embeddings,
    trained without the L1 penalty; transformers' LlamaForCausalLM loads the folder and computes flashnb's
    logits."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from flashnb.models.checkpoint import load_model

    cfg = tiny(tmp_path / "m")
    cfg.arch, cfg.heads, cfg.kv_heads, cfg.sparsity_target = "llama", 4, 2, None
    card = train(cfg, corpus=CORPUS, progress=False)
    folder = tmp_path / "m"
    hf = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    assert (hf.config.hidden_act, hf.config.num_key_value_heads, hf.config.tie_word_embeddings) == ("silu", 2, True)
    assert card["final_l1_weight"] == 0.0 and card["model"].startswith("Llama architecture")
    assert all(s == 0.0 for s in card["heldout"]["sparsity_per_layer"])   # SiLU: no exact zeros
    ids = Tokenizer.from_folder(folder).encode(TEXTS[1])
    assert AutoTokenizer.from_pretrained(folder)(TEXTS[1]).input_ids == ids
    with torch.no_grad():
        ours = load_model(folder, dtype=torch.float32)(torch.tensor([ids]))
        theirs = hf(torch.tensor([ids])).logits
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_the_command_refuses_a_sparsity_target_for_the_swiglu_model(tmp_path, capsys):
    from flashnb.cli import main

    assert main(["train", "--arch", "llama", "--sparsity-target", "0.9", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "--sparsity-target" in err and "drop" in err and not (tmp_path / "m").exists()
