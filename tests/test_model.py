"""flashnb's plain-PyTorch models against transformers, the KV cache against recomputation."""

from __future__ import annotations

import pytest
import torch

from flashnb.models.checkpoint import load_model
from flashnb.core.generate import SamplingConfig, generate
from flashnb.paths import shipped_model_dir

from conftest import make_tiny_llama, make_tiny_opt


def hf_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits.float()


def ours_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_model(folder, dtype=torch.float32)(ids)


@pytest.mark.parametrize("variant", [
    {},                                                   # pre-LayerNorm, as OPT 1.3B and larger
    {"do_layer_norm_before": False, "word_embed_proj_dim": 16},  # opt-350m's post-LN + projections
])
def test_tiny_opt_matches_transformers(tmp_path, variant):
    folder = make_tiny_opt(tmp_path, **variant)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    assert (hf_logits(folder, ids) - ours_logits(folder, ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", [{}, {"tie_word_embeddings": True, "num_key_value_heads": 4,
                                          "rope_theta": 500000.0}])
def test_tiny_relu_llama_matches_transformers(tmp_path, variant):
    folder = make_tiny_llama(tmp_path, **variant)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    assert (hf_logits(folder, ids) - ours_logits(folder, ids)).abs().max().item() <= 1e-4


def test_shipped_model_matches_transformers():
    folder = shipped_model_dir()
    from transformers import OPTForCausalLM

    hf = OPTForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, 4096, (2, 128), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (hf(ids).logits - load_model(folder)(ids)).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_kv_cache_generation_equals_full_recomputation(tmp_path, arch):
    folder = (make_tiny_opt if arch == "opt" else make_tiny_llama)(tmp_path)
    model = load_model(folder)
    prompt = [2, 17, 42, 99, 7]
    cached = list(generate(model, prompt, 20))
    seq = list(prompt)
    with torch.no_grad():
        for expected in cached:
            logits = model(torch.tensor([seq]))[0, -1]  # no cache: the whole sequence again
            seq.append(int(logits.argmax()))
            assert seq[-1] == expected
        # and the cached logits themselves agree with recomputation at every position
        cache = model.new_cache(1, len(seq))
        step_logits = [model(torch.tensor([seq[:len(prompt)]]), cache)[0, -1]]
        for tok in seq[len(prompt):-1]:
            step_logits.append(model(torch.tensor([[tok]]), cache)[0, -1])
        full = model(torch.tensor([seq]))[0, len(prompt) - 1:-1]
    assert (torch.stack(step_logits) - full).abs().max().item() <= 1e-5


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tiny_opt_dir):
    model = load_model(tiny_opt_dir)
    prompt = [2, 5, 6]
    a = list(generate(model, prompt, 15, SamplingConfig(temperature=1.0, top_p=0.9, seed=7)))
    b = list(generate(model, prompt, 15, SamplingConfig(temperature=1.0, top_p=0.9, seed=7)))
    assert a == b
    greedy = list(generate(model, prompt, 15))
    assert list(generate(model, prompt, 15, SamplingConfig(temperature=1.0, top_p=1e-6, seed=3))) == greedy


def test_generation_beyond_context_is_refused(tiny_opt_dir):
    from flashnb import FlashnbError

    model = load_model(tiny_opt_dir)
    with pytest.raises(FlashnbError, match="context of 64 positions"):
        list(generate(model, [2] * 60, 10))


def test_shipped_swiglu_model_matches_transformers():
    from transformers import LlamaForCausalLM

    from flashnb.paths import SWIGLU_MODEL, data_dir

    folder = data_dir() / SWIGLU_MODEL
    assert (folder / "model.safetensors").stat().st_size <= 25e6
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, 4096, (2, 128), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        diff = (hf(ids).logits - load_model(folder)(ids)).abs().max().item()
    assert diff <= 1e-4
