"""OPT (Zhang et al. 2022) in plain PyTorch: the architecture the paper's main results use.

Learned positions with OPT's offset of 2, multi-head attention with biases, a ReLU FFN fc1/fc2 with
biases, LayerNorm before (or, for opt-350m, after) each block, a final LayerNorm and an LM head tied
to the token embedding. Parameter names follow Hugging Face's `OPTForCausalLM` (see `hf_key`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from flashnb.errors import FlashnbError
from flashnb.models.common import KVCache, activation, causal_attention, check_config, default_scale

POSITION_OFFSET = 2  # OPT's learned position table starts at index 2 (fairseq legacy)


@dataclass
class OPTConfig:
    vocab_size: int = 4096
    hidden_size: int = 512
    ffn_dim: int = 2048
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    max_position_embeddings: int = 256
    activation_function: str = "relu"
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    remove_final_layer_norm: bool = False
    bos_token_id: int = 2
    eos_token_id: int = 2
    pad_token_id: int = 1
    torch_dtype: str = "float16"

    model_type = "opt"
    # The FFN's weight matrices in bundle order, each (name in the FFN module, orientation): "row" = the
    # matrix is [ffn, d] and neuron i is row i; "col" = it is [d, ffn] and neuron i is column i.
    ffn_parts = (("fc1", "row"), ("fc2", "col"))
    gated = False  # a ReLU FFN: act(fc1 x) decides which neurons fire
    needs_thresholds = False  # ReLU's exact zeros make it sparse (see LlamaConfig.needs_thresholds)

    @property
    def ffn_activation(self) -> str:
        """The name of the FFN activation (the Hugging Face config's)."""
        return self.activation_function

    @staticmethod
    def hf_key(name: str) -> str:
        """flashnb's parameter name -> the name in a Hugging Face OPTForCausalLM checkpoint."""
        return "model.decoder." + re.sub(r"^layers\.(\d+)\.ffn\.", r"layers.\1.", name)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_attention_heads

    @property
    def embed_dim(self) -> int:
        return self.word_embed_proj_dim or self.hidden_size

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "OPTConfig":
        """Read the fields flashnb needs from a Hugging Face OPT config dict."""
        required = ["vocab_size", "hidden_size", "ffn_dim", "num_hidden_layers", "num_attention_heads",
                    "max_position_embeddings"]
        check_config(cfg, source, required, optional_ints=("word_embed_proj_dim",),
                     flags=("do_layer_norm_before", "enable_bias", "layer_norm_elementwise_affine",
                            "_remove_final_layer_norm"), ids=("bos_token_id", "eos_token_id", "pad_token_id"))
        out = cls(**{k: cfg[k] for k in required})
        for f in ("activation_function", "do_layer_norm_before", "enable_bias",
                  "layer_norm_elementwise_affine", "bos_token_id", "eos_token_id", "pad_token_id",
                  "torch_dtype"):
            if cfg.get(f) is not None:
                setattr(out, f, cfg[f])
        proj = cfg.get("word_embed_proj_dim")
        out.word_embed_proj_dim = proj if proj and proj != out.hidden_size else None
        out.remove_final_layer_norm = bool(cfg.get("_remove_final_layer_norm", False))
        if out.hidden_size % out.num_attention_heads:
            raise FlashnbError(f"{source}: hidden_size {out.hidden_size} is not divisible by "
                               f"num_attention_heads {out.num_attention_heads}")
        activation(out.activation_function, source)
        return out

    def to_hf(self) -> dict:
        """A config.json dict that transformers' OPTForCausalLM loads unchanged."""
        d = asdict(self)
        d["word_embed_proj_dim"] = self.embed_dim
        d["_remove_final_layer_norm"] = d.pop("remove_final_layer_norm")
        d.update(model_type="opt", architectures=["OPTForCausalLM"], dropout=0.0,
                 attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, init_std=0.02,
                 use_cache=True, tie_word_embeddings=True)
        return d


class OPTAttention(nn.Module):
    def __init__(self, c: OPTConfig):
        super().__init__()
        d, b = c.hidden_size, c.enable_bias
        self.n_heads, self.head_dim = c.num_attention_heads, c.head_dim
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=b), nn.Linear(d, d, bias=b)
        self.v_proj, self.out_proj = nn.Linear(d, d, bias=b), nn.Linear(d, d, bias=b)

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        split = lambda t: t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = causal_attention(q, k, v, default_scale(self.head_dim))
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1))


class OPTFFN(nn.Module):
    """fc2(act(fc1(x))). Neuron i = row i of fc1 (+ bias i) and column i of fc2.

    With `record = True` the post-activation tensor of the last call is kept in `last_activation`
    (training adds an L1 penalty on it; traces read which neurons fired).
    """

    def __init__(self, c: OPTConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.ffn_dim, bias=c.enable_bias)
        self.fc2 = nn.Linear(c.ffn_dim, c.hidden_size, bias=c.enable_bias)
        self.act = activation(c.activation_function, "config.json")
        self.record = False
        self.last_activation: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.fc1(x))
        if self.record:
            self.last_activation = a
        return self.fc2(a)


class OPTBlock(nn.Module):
    def __init__(self, c: OPTConfig):
        super().__init__()
        aff = c.layer_norm_elementwise_affine
        self.pre_norm = c.do_layer_norm_before
        self.self_attn = OPTAttention(c)
        self.self_attn_layer_norm = nn.LayerNorm(c.hidden_size, elementwise_affine=aff)
        self.ffn = OPTFFN(c)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, elementwise_affine=aff)

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache | None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.self_attn(self.self_attn_layer_norm(x), layer, cache)
            return x + self.ffn(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x + self.self_attn(x, layer, cache))
        return self.final_layer_norm(x + self.ffn(x))


class OPTModel(nn.Module):
    """The whole decoder and its tied LM head. forward(ids [B,T]) -> logits [B,T,vocab] (fp32)."""

    def __init__(self, c: OPTConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.embed_dim)
        self.embed_positions = nn.Embedding(c.max_position_embeddings + POSITION_OFFSET, c.hidden_size)
        self.project_in = nn.Linear(c.embed_dim, c.hidden_size, bias=False) if c.word_embed_proj_dim else None
        self.project_out = nn.Linear(c.hidden_size, c.embed_dim, bias=False) if c.word_embed_proj_dim else None
        self.layers = nn.ModuleList(OPTBlock(c) for _ in range(c.num_hidden_layers))
        has_final = c.do_layer_norm_before and not c.remove_final_layer_norm
        self.final_layer_norm = (nn.LayerNorm(c.hidden_size, elementwise_affine=c.layer_norm_elementwise_affine)
                                 if has_final else None)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c, p = self.config, next(self.parameters())
        return KVCache(c.num_hidden_layers, batch, c.num_attention_heads, max_len, c.head_dim, p.dtype, p.device)

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        start = cache.length if cache is not None else 0
        T = ids.shape[1]
        if start + T > self.config.max_position_embeddings:
            raise FlashnbError(f"sequence of {start + T} tokens exceeds the model's "
                               f"max_position_embeddings ({self.config.max_position_embeddings})")
        x = self.embed_tokens(ids)
        if self.project_in is not None:
            x = self.project_in(x)
        pos = torch.arange(start, start + T, device=ids.device) + POSITION_OFFSET
        x = x + self.embed_positions(pos)
        for i, block in enumerate(self.layers):
            x = block(x, i, cache)
        if cache is not None:
            cache.length += T
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return F.linear(x, self.embed_tokens.weight).float()
