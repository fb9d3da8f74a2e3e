"""Pieces both architectures share: the KV cache, causal attention, activations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flashnb.errors import FlashnbError

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


# Sizes beyond these are not a model this machine could hold: a config that claims them is damaged.
LIMITS = {"vocab_size": 1 << 24, "hidden_size": 1 << 17, "ffn_dim": 1 << 20, "intermediate_size": 1 << 20,
          "num_hidden_layers": 1 << 10, "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12,
          "max_position_embeddings": 1 << 22, "head_dim": 1 << 12, "word_embed_proj_dim": 1 << 17}


def check_config(cfg: dict, source: str, required: list[str], optional_ints=(), flags=(), ids=()) -> None:
    """One clear error for a config.json field of the wrong type or an absurd value: `required` and
    `optional_ints` (when present) are whole numbers from 1 to LIMITS, `flags` booleans, `ids` token
    ids (whole numbers >= 0, or null)."""
    if not isinstance(cfg, dict):
        raise FlashnbError(f"{source}: a model config must be a JSON object, got {type(cfg).__name__}")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise FlashnbError(f"{source}: the config lacks {missing}; is this a checkpoint of this architecture?")
    for k in [*required, *(k for k in optional_ints if cfg.get(k) is not None)]:
        v = cfg[k]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= LIMITS.get(k, 1 << 30):
            raise FlashnbError(f"{source}: {k} must be a whole number from 1 to {LIMITS.get(k, 1 << 30)}, got {v!r}; "
                               "the config is damaged: restore it from the checkpoint's source")
    for k in flags:
        if cfg.get(k) is not None and not isinstance(cfg[k], bool):
            raise FlashnbError(f"{source}: {k} must be true or false, got {cfg[k]!r}")
    def token_id(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    for k in ids:
        v = cfg.get(k)
        if v is not None and not (token_id(v) or (isinstance(v, list) and all(map(token_id, v)))):
            raise FlashnbError(f"{source}: {k} must be a token id (a whole number >= 0), a list of them, or null, "
                               f"got {v!r}")


def activation(name: str, source: str):
    """The activation function called `name` in a Hugging Face config (`source` names that file)."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise FlashnbError(
            f"{source}: activation {name!r} is not supported; flashnb knows {sorted(ACTIVATIONS)}"
        ) from None


class KVCache:
    """Preallocated keys and values for every layer: [batch, kv_heads, max_len, head_dim] each.

    `length` is the number of positions already filled; a forward pass over T new tokens writes
    positions length..length+T-1 and then advances `length` (done by the model, once per pass).
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v ([B, kv_heads, T, hd]) after the filled part; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise FlashnbError(
                f"KV cache is full: {end} positions needed, {self.max_len} allocated; "
                "create the cache with a larger max_len (prompt + new tokens)"
            )
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled dot-product attention of q [B,H,T,hd] over k, v [B,H_kv,S,hd], S >= T.

    The T queries are the last T positions of the S keys; each attends to itself and what precedes.
    Grouped-query attention: H_kv divides H and each key/value head serves H // H_kv query heads.
    """
    t, s = q.shape[2], k.shape[2]
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if t == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
