"""`flashnb train-predictors --two-stage-only`: a SwiGLU model's two-stage rule (flashnb.core.thresholds).

The gate in DRAM picks candidates (scaled-gate thresholds at the `candidates` sparsity), their up | down bundles
are read, and the FFN keeps those whose |SiLU(gate) x up| passes the product thresholds at `sparsity`:
`FlashEngine(gate_apart_store, GateThresholds(store, candidates), policy, thresholds=keep)`, which
`flashnb demo --two-stage` runs. Both sets of thresholds are calibrated on the same training-split text as
`--sparsity`'s, and the rule is measured on the held-out split (perplexity, top-1 agreement, the share kept).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from flashnb.errors import FlashnbError


def build_two_stage(cfg, candidates: float, sparsity: float, calibration_tokens: int | None = None,
                    log=print) -> dict:
    """Calibrate, measure and write cfg.out/two-stage/{candidates,keep}/thresholds.safetensors and
    two-stage/card.json; returns the card. `cfg`: a flashnb.training.build_predictors.BuildConfig."""
    from flashnb.core.thresholds import TWO_STAGE, Fires, activations, thresholds_for
    from flashnb.models.checkpoint import load_model, read_config
    from flashnb.models.tokenizer import Tokenizer
    from flashnb.training.build_predictors import THRESHOLD_TOKENS, _shown, train_windows
    from flashnb.training.corpus import collect
    from flashnb.training.quality import quality
    from flashnb.training.train import encode_split

    if not candidates < sparsity:
        raise FlashnbError(f"--candidates {candidates} must be below --sparsity {sparsity}: the gate's candidates "
                           "are a wider set than the neurons the product keeps")
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    model = load_model(cfg.model)
    if not model.config.needs_thresholds:
        raise FlashnbError(f"{cfg.model}: a two-stage rule is for SwiGLU models (a gated FFN with SiLU); this "
                           f"model's FFN is {model.config.ffn_activation}: its predictors decide")
    tok = Tokenizer.from_folder(cfg.model, bos_id=read_config(cfg.model).bos_token_id)
    log("collecting the corpus (docstrings of the stdlib and torch) ...")
    corpus = collect()
    n_calib = min(calibration_tokens or THRESHOLD_TOKENS, cfg.train_tokens)
    calib = train_windows(encode_split(tok, corpus.train), n_calib, cfg.context, cfg.train.seed + 1)
    held = encode_split(tok, corpus.heldout)[:cfg.eval_tokens + 1].astype(np.int64)
    log(f"calibrating on {len(calib)} training tokens, measuring on {len(held) - 1} held-out tokens ...")
    acts = activations(model, calib, cfg.context)
    pick, keep = thresholds_for(acts, candidates, "scaled-gate"), thresholds_for(acts, sparsity, "product")
    rule = Fires(model, keep, Fires(model, pick))
    q = quality(model, rule, held, cfg.context)
    out = Path(cfg.out) / TWO_STAGE
    pick.save(out / "candidates")
    keep.save(out / "keep")
    card = {"what": f"a two-stage rule for {Path(cfg.model).name}: the gate in DRAM picks the neurons above the "
                    f"scaled-gate thresholds for {candidates:.0%} sparsity, whose up | down bundles are read; the FFN "
                    f"keeps those above the product thresholds for {sparsity:.0%}",
            "command": f"flashnb train-predictors --model {_shown(cfg.model)} --out {_shown(cfg.out)} --two-stage-only "
                       f"--candidates {candidates} --sparsity {sparsity}",
            "candidates": {"criterion": "scaled-gate", "sparsity": candidates, "thresholds": list(pick.values)},
            "keep": {"criterion": "product", "sparsity": sparsity, "thresholds": list(keep.values)},
            "calibration": {"tokens": pick.calibration_tokens, "split": "training", "context": cfg.context},
            "heldout": {"tokens": q.tokens, "kept_share": float(np.mean(rule.kept)), **q.to_dict()},
            "targets": {"perplexity_increase_max": 0.03, "top1_agreement_min": 0.95},
            "measured": {"threads": cfg.threads, "torch": torch.__version__,
                         "wall_seconds": round(time.perf_counter() - t0, 1)}}
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def two_stage_summary(card: dict) -> str:
    h = card["heldout"]
    return (f"two stages: candidates above scaled-gate thresholds for {card['candidates']['sparsity']:.0%} sparsity, "
            f"kept above product thresholds for {card['keep']['sparsity']:.0%}: {h['kept_share']:.1%} of the neurons "
            f"kept on {h['tokens']} held-out tokens, perplexity {h['perplexity_increase']:+.2%}, top-1 agreement "
            f"{h['top1_agreement']:.1%} (against the dense model)")
