"""Hugging Face checkpoint folders: config.json + *.safetensors (sharded too) + tokenizer.json.

`load_model` builds flashnb's plain-PyTorch model from such a folder and checks every tensor's name
and shape on the way; `save_model` writes a folder that transformers loads unchanged. Only
safetensors is read or written, never pickle.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flashnb.errors import FlashnbError
from flashnb.models import llama, opt
from flashnb.paths import publish

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


def regular_file(f: Path, what: str = "file") -> Path:
    """`f` if it is a regular file (not a FIFO, socket or device, which could block a read forever);
    one clear error otherwise."""
    try:
        mode = f.stat().st_mode
    except FileNotFoundError:
        raise FlashnbError(f"{f} is missing") from None
    except OSError as e:
        raise FlashnbError(f"cannot read {f} ({e.strerror}); check its permissions") from None
    if not stat.S_ISREG(mode):
        raise FlashnbError(f"{f} is not a regular file (a pipe, socket or device?); replace it with the "
                           f"checkpoint's {what}")
    return f


def read_config(path: str | Path):
    """The architecture's config dataclass read from `path`/config.json."""
    f = _folder(path) / "config.json"
    if not f.exists() and (f.parent / "manifest.json").is_file():
        raise FlashnbError(f"{f.parent} is a flashnb store, not a Hugging Face model folder: give the model folder "
                           "it was converted from, or run the store itself (`flashnb generate --store "
                           f"{f.parent}`)")
    if not f.exists():
        raise FlashnbError(f"{f} is missing: a model folder needs a Hugging Face config.json")
    try:
        cfg = json.loads(regular_file(f, "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlashnbError(f"{f} is not valid JSON ({e}); restore the file from its source") from None
    except OSError as e:
        raise FlashnbError(f"cannot read {f} ({e.strerror}); check its permissions") from None
    if not isinstance(cfg, dict):
        raise FlashnbError(f"{f} must hold a JSON object, got {type(cfg).__name__}; restore the file from its source")
    kind = cfg.get("model_type")
    if not isinstance(kind, str) or kind not in CONFIGS:
        archs = cfg.get("architectures")
        raise FlashnbError(f"{f}: unknown architecture model_type={kind!r} (architectures={archs}); "
                           f"flashnb runs {sorted(CONFIGS)} (OPT, and Llama-style gated FFNs)")
    return CONFIGS[kind].from_hf(cfg, str(f))


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_WEIGHT = 1e4  # |weight| beyond this is no trained model's: the file is damaged


class TensorIndex:
    """Where each tensor of a checkpoint lives, read lazily one tensor at a time.

    Accepts `model.safetensors`, a sharded set with `model.safetensors.index.json` (then exactly the
    files it lists: any other *.safetensors is refused as a stale shard), or any set of `*.safetensors`
    files without duplicate tensors. Keys are looked up with and without a leading "model." prefix,
    since some OPT checkpoints were saved from the bare decoder. Every tensor read is checked: a
    floating-point dtype, the shape the config implies, finite values of plausible size.
    """

    def __init__(self, path: str | Path):
        folder = _folder(path)
        self.files = files = self._files(folder)
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            try:
                with safe_open(regular_file(f, "weights"), framework="pt") as h:
                    for k in h.keys():
                        if k in self.where:
                            raise FlashnbError(f"tensor {k!r} is in both {self.where[k].name} and {f.name} in "
                                               f"{folder}: one of them is a stale copy; remove it")
                        self.where[k] = f
                        self.shapes[k] = tuple(h.get_slice(k).get_shape())
            except (SafetensorError, OSError, ValueError) as e:
                raise FlashnbError(f"{f} is not a readable safetensors file ({e}); re-download or "
                                   "re-save it") from None

    @staticmethod
    def _files(folder: Path) -> list[Path]:
        files = sorted(folder.glob("*.safetensors"))
        index = folder / "model.safetensors.index.json"
        if index.exists():
            try:
                listed = set(json.loads(regular_file(index).read_text())["weight_map"].values())
            except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
                raise FlashnbError(f"{index} is not a valid shard index ({e!r}); restore it from the "
                                   "checkpoint's source") from None
            stale = sorted(f.name for f in files if f.name not in listed)
            if stale:
                raise FlashnbError(f"{folder} holds {stale}, which {index.name} does not list: stale shards? move "
                                   "them out of the folder")
            missing = sorted(n for n in listed if not (folder / str(n)).exists())
            if missing:
                raise FlashnbError(f"{index} lists {missing[:3]}, missing from {folder}; the download is incomplete")
        if not files:
            bins = sorted(p.name for p in folder.glob("*.bin"))
            hint = (f" (found {bins}: flashnb never unpickles; re-save the model with "
                    "save_pretrained(..., safe_serialization=True))") if bins else ""
            raise FlashnbError(f"no *.safetensors file in {folder}{hint}")
        return files

    def resolve(self, key: str) -> str | None:
        """The key as stored in the files, trying with and without a leading 'model.'."""
        for k in (key, key.removeprefix("model."), "model." + key):
            if k in self.where:
                return k
        return None

    def get(self, key: str, expected_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Tensor `key`; a clear error if it is missing, has another shape than expected, is not
        floating point, or holds values no trained model has (inf, nan, |x| > MAX_WEIGHT)."""
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
                t = h.get_tensor(k)
        except (SafetensorError, OSError, ValueError) as e:
            raise FlashnbError(f"{self.where[k]}: tensor {k!r} cannot be read ({e}); the file is "
                               "damaged, re-download or re-save it") from None
        if t.dtype not in FLOAT_DTYPES:
            raise FlashnbError(f"{self.where[k]}: tensor {k!r} is {t.dtype}, not a floating-point weight; the file "
                               "is damaged or holds a quantized model flashnb does not read")
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise FlashnbError(f"{self.where[k]}: tensor {k!r} holds inf or nan values; the checkpoint is damaged")
        if t.numel() and float(t.abs().max()) > MAX_WEIGHT:
            raise FlashnbError(f"{self.where[k]}: tensor {k!r} holds values up to {float(t.abs().max()):.3g}, far "
                               f"beyond a trained model's weights (< {MAX_WEIGHT:g}); the checkpoint is damaged")
        return t


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
    publish(tmp, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
