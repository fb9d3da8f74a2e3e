"""Hugging Face checkpoint folders: config.json + *.safetensors (sharded too) + tokenizer.json.

`load_model` builds flashnb's plain-PyTorch model from such a folder and checks every tensor's name
and shape on the way; `save_model` writes a folder that transformers loads unchanged. Only
safetensors is read or written, never pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flashnb.errors import FlashnbError
from flashnb.models import llama, opt

# model_type -> each architecture's config (which owns its facts: FFN parts, activation, key names)
# and model class
CONFIGS = {"opt": opt.OPTConfig, "llama": llama.LlamaConfig}
MODELS = {"opt": opt.OPTModel, "llama": llama.LlamaModel}


def _folder(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FlashnbError(f"model folder {p} does not exist or is not a folder; pass the folder that "
                           "holds config.json, *.safetensors and tokenizer.json")
    return p


def read_config(path: str | Path):
    """The architecture's config dataclass read from `path`/config.json."""
    f = _folder(path) / "config.json"
    if not f.is_file():
        raise FlashnbError(f"{f} is missing: a model folder needs a Hugging Face config.json")
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlashnbError(f"{f} is not valid JSON ({e}); restore the file from its source") from None
    kind = cfg.get("model_type")
    if kind not in CONFIGS:
        archs = cfg.get("architectures")
        raise FlashnbError(f"{f}: unknown architecture model_type={kind!r} (architectures={archs}); "
                           f"flashnb runs {sorted(CONFIGS)} (OPT, and Llama-style gated FFNs)")
    return CONFIGS[kind].from_hf(cfg, str(f))


class TensorIndex:
    """Where each tensor of a checkpoint lives, read lazily one tensor at a time.

    Accepts `model.safetensors`, a sharded set with `model.safetensors.index.json`, or any set of
    `*.safetensors` files. Keys are looked up with and without a leading "model." prefix, since some
    OPT checkpoints were saved from the bare decoder.
    """

    def __init__(self, path: str | Path):
        folder = _folder(path)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in folder.glob("*.bin"))
            hint = (f" (found {bins}: flashnb never unpickles; re-save the model with "
                    "save_pretrained(..., safe_serialization=True))") if bins else ""
            raise FlashnbError(f"no *.safetensors file in {folder}{hint}")
        self.files = files
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            try:
                with safe_open(f, framework="pt") as h:
                    for k in h.keys():
                        self.where[k] = f
                        self.shapes[k] = tuple(h.get_slice(k).get_shape())
            except (SafetensorError, OSError, ValueError) as e:
                raise FlashnbError(f"{f} is not a readable safetensors file ({e}); re-download or "
                                   "re-save it") from None

    def resolve(self, key: str) -> str | None:
        """The key as stored in the files, trying with and without a leading 'model.'."""
        for k in (key, key.removeprefix("model."), "model." + key):
            if k in self.where:
                return k
        return None

    def get(self, key: str, expected_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Tensor `key`; a clear error if it is missing or has another shape than expected."""
        k = self.resolve(key)
        if k is None:
            names = ", ".join(f.name for f in self.files)
            shape = f" (expected shape {list(expected_shape)})" if expected_shape else ""
            raise FlashnbError(f"tensor {key!r}{shape} is missing from {names} in {self.files[0].parent}; "
                               "the checkpoint is incomplete or belongs to another architecture")
        if expected_shape is not None and self.shapes[k] != tuple(expected_shape):
            raise FlashnbError(f"tensor {k!r} in {self.where[k]} has shape {list(self.shapes[k])}, but "
                               f"config.json implies {list(expected_shape)}; config and weights disagree")
        try:
            with safe_open(self.where[k], framework="pt") as h:
                return h.get_tensor(k)
        except (SafetensorError, OSError, ValueError) as e:
            raise FlashnbError(f"{self.where[k]}: tensor {k!r} cannot be read ({e}); the file is "
                               "damaged, re-download or re-save it") from None


def meta_model(config) -> torch.nn.Module:
    """`config`'s model on the meta device: its parameters' names and shapes, and no memory."""
    with torch.device("meta"):
        return MODELS[config.model_type](config)


def ffn_param(layer: int, part: str) -> str:
    """flashnb's parameter name of FFN matrix `part` ("fc1", "down_proj", ...) of `layer`."""
    return f"layers.{layer}.ffn.{part}.weight"


def ffn_matrix_names(config) -> set[str]:
    """flashnb's names of every FFN weight matrix of `config`'s model (what lives on flash)."""
    return {ffn_param(i, p) for i in range(config.num_hidden_layers) for p, _ in config.ffn_parts}


def build_model(config, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.nn.Module:
    """An initialised (random) model of `config`, e.g. for training."""
    model = MODELS[config.model_type](config)
    return model.to(device=device, dtype=dtype)


def materialize(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Give a model built on the meta device real (uninitialised) CPU storage in `dtype`, and
    recompute its non-persistent buffers (Llama's rotary frequencies), which to_empty leaves empty."""
    model.to_empty(device="cpu")
    model.to(dtype)
    if hasattr(model, "inv_freq"):
        model.inv_freq = llama.rope_inv_freq(model.config)
    return model


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """flashnb's model with the weights of the Hugging Face folder `path`, in `dtype`, on the CPU."""
    config = read_config(path)
    index = TensorIndex(path)
    model = materialize(meta_model(config), dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(index.get(config.hf_key(name), tuple(p.shape)).to(dtype))
    return model.eval()


def save_model(model: torch.nn.Module, path: str | Path, dtype: torch.dtype = torch.float16) -> None:
    """Write config.json and model.safetensors for `model` into folder `path` (created if needed)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_hf()
    cfg["torch_dtype"] = {torch.float16: "float16", torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    tensors = {model.config.hf_key(n): p.detach().to(dtype).contiguous() for n, p in model.named_parameters()}
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
