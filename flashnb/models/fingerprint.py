"""A short fingerprint of a model: which model a trace or a predictor set belongs to.

The fingerprint is the SHA-256 (first 16 hex digits) of the model's config (as the Hugging Face
config dict, minus its dtype) and of a sample of its weights rounded to float16: the first and last
rows of the token embedding and of every layer's FFN weights. Rounding to float16 makes the
fingerprint of a model loaded in float32 from an fp16 file equal to that of the same file loaded in
float16, while a differently trained model (or another checkpoint of the same run) differs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable

import torch

from flashnb.errors import FlashnbError


def fingerprint(config, tensor: Callable[[str], torch.Tensor]) -> str:
    """16 hex digits that identify the model of `config` whose weight named `name` (flashnb's
    parameter name) is `tensor(name)`."""
    cfg = config.to_hf()
    cfg.pop("torch_dtype", None)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    names = ["embed_tokens.weight"] + [f"layers.{i}.ffn.{part}.weight" for i in range(config.num_hidden_layers)
                                       for part, _ in config.ffn_parts]
    with torch.no_grad():
        for name in names:
            w = tensor(name)
            rows = torch.cat([w[:2], w[-2:]]).detach().to("cpu", torch.float16).contiguous()
            h.update(rows.numpy().tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> str:
    """16 hex digits that identify `model` (config + a float16 sample of its weights)."""
    return fingerprint(model.config, model.get_parameter)


def check_fingerprint(found: str, expected: str, what: str, fix: str) -> None:
    """Raise FlashnbError if `found` (stored in `what`) differs from the model's `expected` one."""
    if found != expected:
        raise FlashnbError(f"{what} belongs to another model (fingerprint {found}, this model is "
                           f"{expected}); {fix}")
