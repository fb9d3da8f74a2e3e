"""The model flashnb ships, in one call: `shipped()` -> its folder, config, tokenizer, predictors and
hot neurons."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from flashnb.core.convert import ConvertConfig, convert
from flashnb.core.pinning import HotNeurons
from flashnb.core.predictor import LowRankPredictors, load_predictors
from flashnb.core.store import FlashStore
from flashnb.models.checkpoint import load_model, read_config
from flashnb.models.tokenizer import Tokenizer
from flashnb.paths import data_dir, shipped_model_dir


@dataclass
class Shipped:
    """The shipped model (data/flashnb-opt-21m, a Hugging Face OPT folder) and what comes with it."""

    folder: Path
    config: object                  # flashnb.models.opt.OPTConfig
    tokenizer: Tokenizer
    predictors: LowRankPredictors   # data/flashnb-opt-21m-predictors, checked against the model

    @property
    def predictors_folder(self) -> Path:
        return self.folder.parent / f"{self.folder.name}-predictors"

    def hot(self) -> HotNeurons:
        """How often the predictors select each neuron, and their calibration sets (for pinning)."""
        return HotNeurons.load(self.predictors_folder)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The whole model in DRAM (flashnb's plain-PyTorch model)."""
        return load_model(self.folder, dtype)

    def store(self, folder: str | Path, layout: str = "bundled") -> FlashStore:
        """The model as a flash store in `folder`/`layout` (converted on first use, reused afterwards)."""
        path = Path(folder) / layout
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (path / "manifest.json").is_file():
            convert(self.folder, path, ConvertConfig(layout=layout, progress=False))
        return FlashStore.open(path)


def shipped() -> Shipped:
    """The shipped model's folder, config, tokenizer (with its start token) and low-rank predictors."""
    folder = shipped_model_dir()
    return Shipped(folder, read_config(folder), Tokenizer.from_folder(folder),
                   load_predictors(data_dir() / f"{folder.name}-predictors"))
