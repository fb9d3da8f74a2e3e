"""Tiny random models for the trace and predictor tests (built in memory, no files)."""

import torch

from flashnb.models.checkpoint import build_model
from flashnb.models.llama import LlamaConfig
from flashnb.models.opt import OPTConfig


def tiny(seed: int = 0, ffn: int = 64, d: int = 32, layers: int = 2) -> torch.nn.Module:
    """A random OPT: vocab 50, d_model `d`, `ffn` neurons, `layers` layers, context 32."""
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=50, hidden_size=d, ffn_dim=ffn, num_hidden_layers=layers,
                    num_attention_heads=4, max_position_embeddings=32)
    return build_model(cfg).eval()


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A random Llama-style model with a gated ReLU FFN: vocab 50, d_model 32, 64 neurons, 2 layers."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32)
    return build_model(cfg).eval()
