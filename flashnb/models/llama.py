"""Llama-style decoders in plain PyTorch: RMSNorm, rotary positions, grouped-query attention, and a
gated FFN down(act(gate(x)) * up(x)) whose activation comes from the config's `hidden_act`.

With `hidden_act = "relu"` (ReluLLaMA, ProSparse Llama 2) the FFN is sparse: neuron i fires when
relu(gate_i · x) > 0, and only then are gate row i, up row i and down column i needed.
Parameter names follow Hugging Face's `LlamaForCausalLM` (see `hf_key`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from flashnb.errors import FlashnbError
from flashnb.models.common import KVCache, activation, causal_attention, check_config, default_scale


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048
    hidden_act: str = "relu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    head_dim: int = 0
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    torch_dtype: str = "float16"

    model_type = "llama"
    # The FFN's weight matrices in bundle order (see OPTConfig.ffn_parts).
    ffn_parts = (("gate_proj", "row"), ("up_proj", "row"), ("down_proj", "col"))
    gated = True  # down(act(gate x) * up x): act(gate x) decides which neurons fire

    @property
    def ffn_activation(self) -> str:
        """The name of the FFN activation (the Hugging Face config's hidden_act)."""
        return self.hidden_act

    @property
    def needs_thresholds(self) -> bool:
        """SwiGLU (a SiLU gate): no neuron is exactly zero, so thresholds (flashnb.core.thresholds) make the FFN
        sparse; a ReLU gate (ReluLLaMA, ProSparse) is sparse by itself."""
        return self.ffn_activation != "relu"

    @staticmethod
    def hf_key(name: str) -> str:
        """flashnb's parameter name -> the name in a Hugging Face LlamaForCausalLM checkpoint."""
        if name.startswith("lm_head."):
            return name
        return "model." + re.sub(r"^layers\.(\d+)\.ffn\.", r"layers.\1.mlp.", name)

    @property
    def ffn_dim(self) -> int:
        return self.intermediate_size

    @property
    def num_kv_heads(self) -> int:
        return self.num_key_value_heads

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "LlamaConfig":
        """Read the fields flashnb needs from a Hugging Face Llama config dict."""
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"]
        check_config(cfg, source, required, optional_ints=("num_key_value_heads", "max_position_embeddings",
                                                           "head_dim"),
                     flags=("attention_bias", "mlp_bias", "tie_word_embeddings"), ids=("bos_token_id", "eos_token_id"))
        for k in ("rms_norm_eps", "rope_theta"):
            v = cfg.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e12):
                raise FlashnbError(f"{source}: {k} must be a positive number, got {v!r}")
        out = cls(**{k: cfg[k] for k in required},
                  num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
        for f in ("max_position_embeddings", "hidden_act", "rms_norm_eps", "rope_theta",
                  "attention_bias", "mlp_bias", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                  "torch_dtype"):
            if cfg.get(f) is not None:
                setattr(out, f, cfg[f])
        out.head_dim = cfg.get("head_dim") or out.hidden_size // out.num_attention_heads
        # transformers < 5 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise FlashnbError(f"{source}: rope_parameters / rope_scaling must be an object, got {rope!r}")
        if rope.get("rope_theta") is not None:
            out.rope_theta = rope["rope_theta"]
        if rope.get("rope_type", rope.get("type")) not in (None, "default"):
            raise FlashnbError(f"{source}: rotary scaling {rope} is not supported; flashnb implements "
                               "plain rotary positions (rope_type 'default')")
        if out.num_attention_heads % out.num_key_value_heads:
            raise FlashnbError(f"{source}: num_attention_heads {out.num_attention_heads} is not a "
                               f"multiple of num_key_value_heads {out.num_key_value_heads}")
        activation(out.hidden_act, source)
        return out

    def to_hf(self) -> dict:
        d = asdict(self)
        d.update(model_type="llama", architectures=["LlamaForCausalLM"], rope_scaling=None,
                 attention_dropout=0.0, use_cache=True)
        return d


def rope_inv_freq(c: LlamaConfig) -> torch.Tensor:
    """The rotary frequencies 1 / theta^(2i / head_dim), float32 [head_dim / 2]."""
    return 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        d, hd, b = c.hidden_size, c.head_dim, c.attention_bias
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=b)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=b)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=b)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=b)

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q = (q * cos + rotate_half(q) * sin).to(v.dtype)
        k = (k * cos + rotate_half(k) * sin).to(v.dtype)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = causal_attention(q, k, v, default_scale(self.head_dim))
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LlamaFFN(nn.Module):
    """down(act(gate(x)) * up(x)). Neuron i = row i of gate and up, column i of down.

    `last_activation` (with `record = True`) is act(gate(x)): where it is zero, neuron i is unused.
    `keep` (a `Keep`, set by `flashnb.core.thresholds.apply_thresholds`) makes the FFN thresholded: a
    neuron that does not fire counts as zero. None: the dense FFN.
    """

    def __init__(self, c: LlamaConfig):
        super().__init__()
        d, f, b = c.hidden_size, c.intermediate_size, c.mlp_bias
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=b), nn.Linear(d, f, bias=b)
        self.down_proj = nn.Linear(f, d, bias=b)
        self.act = activation(c.hidden_act, "config.json")
        self.record = False
        self.last_activation: torch.Tensor | None = None
        self.keep: Keep | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, u = self.act(self.gate_proj(x)), self.up_proj(x)
        if self.keep is not None:
            a = torch.where(self.keep.fires(a, u), a, torch.zeros((), dtype=a.dtype))
        if self.record:
            self.last_activation = a
        return self.down_proj(a * u)


@dataclass(frozen=True)
class Keep:
    """One layer's rule in a thresholded SwiGLU FFN (flashnb.core.thresholds): neuron i fires when
    score_i * scale_i > threshold, where score = |act(gate x)| (CATS; `on_product` False) or
    |act(gate x) * up x| (`on_product` True: it needs the up rows too)."""

    threshold: float
    scale: torch.Tensor  # [ffn_dim]
    on_product: bool = False

    def fires(self, a: torch.Tensor, u: torch.Tensor | None = None, ids: torch.Tensor | None = None) -> torch.Tensor:
        """bool, like `a`: which neurons fire given their gate activations `a` and up projections `u` (needed
        only `on_product`), for neurons `ids` of the layer when given, else all."""
        s = self.scale if ids is None else self.scale.index_select(0, ids)
        return (a * u if self.on_product else a).abs() * s.to(a.dtype) > self.threshold


class LlamaBlock(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = LlamaAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.ffn = LlamaFFN(c)

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, cache)
        return x + self.ffn(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The whole decoder and its LM head. forward(ids [B,T]) -> logits [B,T,vocab] (fp32)."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(c), persistent=False)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c, p = self.config, next(self.parameters())
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim, p.dtype, p.device)

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        start = cache.length if cache is not None else 0
        T = ids.shape[1]
        pos = torch.arange(start, start + T, device=ids.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        x = self.embed_tokens(ids)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, i, cache)
        if cache is not None:
            cache.length += T
        x = self.norm(x)
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, w).float()
