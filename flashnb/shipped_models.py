"""The models flashnb ships, in one call: `shipped()` -> the ReLU model's folder, config, tokenizer,
predictors and hot neurons; `shipped(SWIGLU_MODEL)` -> the SwiGLU model's, with its thresholds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from flashnb.core.convert import ConvertConfig, convert
from flashnb.core.pinning import HotNeurons
from flashnb.core.placement import load_placement
from flashnb.core.predictor import LowRankPredictors, load_predictors
from flashnb.core.store import FlashStore
from flashnb.core.thresholds import Thresholds, thresholds_in
from flashnb.models.checkpoint import load_model, read_config
from flashnb.models.tokenizer import Tokenizer
from flashnb.errors import FlashnbError
from flashnb.paths import SHIPPED_MODEL, SWIGLU_MODEL, data_dir, predictors_beside, shipped_model_dir


@dataclass
class Shipped:
    """A shipped model (a Hugging Face folder in data/) and what comes with it."""

    folder: Path
    config: object                  # flashnb.models.opt.OPTConfig or flashnb.models.llama.LlamaConfig
    tokenizer: Tokenizer
    predictors: LowRankPredictors   # data/MODEL-predictors, checked against the model
    thresholds: Thresholds | None = None  # the SwiGLU model's (flashnb.core.thresholds), beside its predictors

    @property
    def predictors_folder(self) -> Path:
        return predictors_beside(self.folder)

    def hot(self) -> HotNeurons:
        """How often the predictors select each neuron, and their calibration sets (for pinning)."""
        return HotNeurons.load(self.predictors_folder)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The whole model in DRAM (flashnb's plain-PyTorch model)."""
        return load_model(self.folder, dtype)

    def store(self, folder: str | Path, layout: str = "bundled", placed: bool = False, dtype: str = "fp16") -> FlashStore:
        """The model as a flash store in `folder`/`layout` (converted on first use, reused afterwards); `placed`:
        its neurons in the co-activation order beside the predictors (flashnb.core.placement), in
        `folder`/`layout`-placed; `dtype`: its FFN rows' (flashnb.core.quant), in `folder`/`layout`-int8 or -q4."""
        path = Path(folder) / (layout + ("-placed" if placed else "") + ("" if dtype == "fp16" else f"-{dtype}"))
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (path / "manifest.json").is_file():
            placement = load_placement(self.predictors_folder) if placed else None
            convert(self.folder, path, ConvertConfig(layout=layout, dtype=dtype, progress=False, placement=placement))
        return FlashStore.open(path)


def shipped(name: str = SHIPPED_MODEL) -> Shipped:
    """A shipped model's folder, config, tokenizer (with its start token) and low-rank predictors (and the
    SwiGLU model's thresholds): `name` is SHIPPED_MODEL (flashnb-opt-21m, ReLU) or SWIGLU_MODEL
    (flashnb-llama-11m)."""
    if name not in (SHIPPED_MODEL, SWIGLU_MODEL):
        raise FlashnbError(f"flashnb ships {SHIPPED_MODEL} and {SWIGLU_MODEL}, not {name!r}")
    folder = shipped_model_dir() if name == SHIPPED_MODEL else data_dir() / name
    if not (folder / "model.safetensors").is_file():
        raise FlashnbError(f"the shipped model {folder} is missing; check out the repository's data/ folder")
    preds = predictors_beside(data_dir() / name)
    return Shipped(folder, read_config(folder), Tokenizer.from_folder(folder), load_predictors(preds),
                   thresholds_in(preds))
