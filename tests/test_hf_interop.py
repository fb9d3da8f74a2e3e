"""Hugging Face interop: transformers' AutoTokenizer encodes every folder flashnb ships or writes exactly as
flashnb does, and its pipeline and batched generate give flashnb's tokens."""

from __future__ import annotations

import pytest
import torch

from flashnb.cli import main
from flashnb.core.generate import generate
from flashnb.models.checkpoint import load_model
from flashnb.models.tokenizer import Tokenizer
from flashnb.paths import shipped_model_dir

from conftest import make_tiny_llama, make_tiny_opt

TEXTS = ["Return a new list containing", "def f(x):\n    return x", "  spaces, naïve café — ∑ 🙂", "a"]


def same_encoding(folder) -> None:
    from transformers import AutoTokenizer

    ours, hf = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    assert ours.bos_id is not None and hf.bos_token_id == ours.bos_id
    assert hf.pad_token_id is not None and hf.pad_token_id < ours.vocab_size
    assert hf.eos_token_id is not None and hf.eos_token_id < ours.vocab_size
    for text in TEXTS:
        assert hf(text).input_ids == ours.encode(text), text
        assert hf.decode(hf(text).input_ids, skip_special_tokens=True) == text


def test_shipped_tokenizers_load_in_autotokenizer_with_flashnb_ids():
    from flashnb.paths import SWIGLU_MODEL, data_dir

    same_encoding(shipped_model_dir())
    same_encoding(data_dir() / SWIGLU_MODEL)


@pytest.mark.parametrize("make", [make_tiny_opt, make_tiny_llama], ids=["opt", "llama"])
def test_tiny_checkpoints_tokenize_the_same_in_transformers(tmp_path, make):
    same_encoding(make(tmp_path))


def test_pipeline_continues_as_flashnb_generate_does(capsys):
    from transformers import pipeline

    folder = shipped_model_dir()
    prompt = "Return a new list containing"
    main(["generate", "--model", str(folder), "--prompt", prompt, "-n", "24"])
    ours = capsys.readouterr().out.rstrip("\n")
    pipe = pipeline("text-generation", model=str(folder), dtype=torch.float32)
    theirs = pipe(prompt, max_new_tokens=24, do_sample=False)[0]["generated_text"]
    assert theirs == ours


@pytest.mark.parametrize("pad_with_eos", [False, True], ids=["pad", "pad=eos"])
def test_batched_generate_with_padding_equals_one_by_one(pad_with_eos):
    from transformers import AutoTokenizer, OPTForCausalLM

    folder = shipped_model_dir()
    hf_tok = AutoTokenizer.from_pretrained(folder)
    if pad_with_eos:  # the common recipe; it crashed on a tokenizer whose EOS lay outside the vocabulary
        hf_tok.pad_token = hf_tok.eos_token
    model = OPTForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = ["Return a new list containing", "Open the file"]
    batch = hf_tok(prompts, padding=True, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=hf_tok.pad_token_id)
    ours, dense = Tokenizer.from_folder(folder), load_model(folder)
    for row, prompt in zip(out, prompts):
        new = row[batch.input_ids.shape[1]:].tolist()
        assert new == list(generate(dense, ours.encode(prompt), 12)), prompt
