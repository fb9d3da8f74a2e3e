"""Lesson 07, bring your own model: convert a Hugging Face folder, run it dense and from flash, and
check that the engine computes the same function (the oracle) and what learned predictors cost.

Everything is *measured* on this machine; a folder that is not given is the shipped model (with its
shipped predictors), or a tiny random OPT where the repository's data/ folder is missing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from flashnb.bench.baselines import DenseInDram
from flashnb.core.engine import FlashEngine, Policy, TokenLoop
from flashnb.core.predictor import LowRankPredictors, Predictor, load_predictors
from flashnb.device.costmodel import ModelShape
from flashnb.errors import FlashnbError
from flashnb.lab.stats import TokenStats
from flashnb.models.checkpoint import load_model, read_config
from flashnb.models.tiny import has_transformers, make_tiny_opt
from flashnb.models.tokenizer import Tokenizer
from flashnb.paths import data_dir, predictors_beside, shipped_model_dir
from flashnb.text import MB, wrap
from flashnb.training.build_predictors import load_heldout
from flashnb.training.predictors import PredictorTrainConfig, train_predictors
from flashnb.training.quality import Selection, mean_selection, selection_metrics
from flashnb.training.traces import record

ENV_BYO_MODEL = "FLASHNB_BYO_MODEL"
TINY_BYO = dict(hidden_size=256, ffn_dim=1024, num_hidden_layers=4, num_attention_heads=4, word_embed_proj_dim=256,
                max_position_embeddings=128)


def _params(config) -> int:
    s = ModelShape.from_config(config)
    return s.ffn_params + s.other_params


def byo_model(path: str | None, workdir: str | Path) -> tuple[Path, bool, str]:
    """(model folder, is_user_model, what it is). `path` empty: the `FLASHNB_BYO_MODEL` variable; both
    empty: a tiny random OPT (TINY_BYO) is built in `workdir`."""
    path = (path or os.environ.get(ENV_BYO_MODEL, "")).strip()
    if path:
        folder = Path(path).expanduser()
        config = read_config(folder)  # a clear error if this is not a model folder flashnb runs
        swiglu = ("; a gated FFN with SiLU (SwiGLU): hardly any neuron is exactly zero, so the oracle reads about "
                  "the whole FFN and predictors of zeros have little to skip. Notebook 08 runs such a model with "
                  "thresholds (CATS) that make it sparse") if config.needs_thresholds else ""
        return folder, True, wrap(f"your model: {folder} ({config.model_type}, "
                                  f"{_params(config) / 1e6:.3g} M parameters){swiglu}")
    try:
        folder = shipped_model_dir()
    except FlashnbError:   # installed without the repository's data/: the steps on a tiny random model
        return _tiny_random(workdir)
    config = read_config(folder)
    return folder, False, wrap(f"no model folder given (text box empty, {ENV_BYO_MODEL} unset): the shipped "
                               f"model {folder.name} ({_params(config) / 1e6:.1f} M parameters, a ReLU OPT trained "
                               "by `flashnb train`) with its shipped predictors. Put your own folder in the box and "
                               "re-run the cells below to run yours.")


def _tiny_random(workdir: str | Path) -> tuple[Path, bool, str]:
    folder = make_tiny_opt(Path(workdir) / "tiny-random-opt", backend="flashnb", **TINY_BYO)
    config = read_config(folder)
    return folder, False, wrap(f"no model folder given and no shipped model (data/ is missing): built a tiny "
                               f"RANDOM OPT ({_params(config) / 1e6:.1f} M parameters: d_model {config.hidden_size}, "
                               f"ffn {config.ffn_dim}, {config.num_hidden_layers} layers) in a temporary folder. Its "
                               "text is gibberish and about half of its FFN neurons fire per token (a trained OPT: a "
                               "few percent); it shows the steps, not the savings.")


def load_tokenizer(folder: str | Path, config) -> Tokenizer:
    """flashnb's Tokenizer from tokenizer.json; without one (facebook/opt-* ship vocab.json and merges.txt)
    transformers' fast tokenizer for the folder, converted in memory (the folder is not modified)."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_folder(folder, bos_id=config.bos_token_id)
    if not has_transformers():
        raise FlashnbError(f"{folder / 'tokenizer.json'} is missing and transformers is not installed to read "
                           "vocab.json/merges.txt: pip install transformers, or save tokenizer.json with "
                           "AutoTokenizer.from_pretrained(folder).save_pretrained(folder)")
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    return Tokenizer(fast.backend_tokenizer, config.bos_token_id)


def sample_text(chars: int = 4000) -> str:
    """Real text for prompts and predictor training: the shipped predictors' held-out slice (docstrings),
    decoded with the shipped tokenizer; any tokenizer can encode it."""
    folder = shipped_model_dir()
    ids = load_heldout(predictors_beside(data_dir() / folder.name), tokens=max(64, chars // 2))
    return Tokenizer.from_folder(folder).decode([int(i) for i in ids])[:chars]


@dataclass
class Run:
    """One greedy generation, token at a time. logits: float32 [new tokens, vocab], the logits each new
    token was chosen from; stats: per generated token (measured)."""

    name: str
    tokens: list[int]
    logits: torch.Tensor
    stats: TokenStats
    dram_bytes: int
    rows_per_layer: int | None = None  # flash runs: the window rows the budget leaves each layer


def greedy_run(loop: TokenLoop, prompt_ids: list[int], n: int, name: str, dram_bytes: int, ffn_neurons: int) -> Run:
    """Greedy generation on any token loop (the engine, or the dense model), keeping the logits."""
    kv = loop.model.new_cache(1, len(prompt_ids) + n)
    logits = None
    for t in prompt_ids:
        logits = loop.step(t, kv)
    out, rows = [], []
    for i in range(n):
        rows.append(logits.float())
        out.append(int(torch.argmax(logits)))
        if i + 1 < n:
            logits = loop.step(out[-1], kv)
    stats = TokenStats.of(loop.steps[len(prompt_ids):], ffn_neurons)
    return Run(name, out, torch.stack(rows), stats, dram_bytes)


def dense_run(folder: str | Path, prompt_ids: list[int], n: int, dtype: torch.dtype = torch.float16) -> Run:
    """The whole model in DRAM (flashnb's dense reference model), greedy: all of its time is compute."""
    loop = DenseInDram(load_model(folder, dtype))
    c = loop.model.config
    return greedy_run(loop, prompt_ids, n, "dense", loop.bytes, c.num_hidden_layers * c.ffn_dim)


def flash_run(store, predictor: Predictor, policy: Policy, prompt_ids: list[int], n: int, name: str = "flash") -> Run:
    """FlashEngine greedy generation under `policy`."""
    with FlashEngine(store, predictor, policy) as eng:
        st = eng.store
        run = greedy_run(eng, prompt_ids, n, name, eng.memory.used_bytes, st.num_layers * st.ffn_dim)
        return replace(run, rows_per_layer=eng.memory.capacity_rows)


@dataclass(frozen=True)
class Comparison:
    """Tokens and logits of a run against a reference run (both greedy after the same prompt)."""

    tokens: int
    first_difference: int | None     # first position whose chosen tokens differ
    max_abs_logit_diff: float        # over the positions up to and including the first difference
    max_rel_logit_diff: float        # ... relative to the largest reference logit
    margin_at_difference: float | None  # the reference's preference for its token there
    rounding_only: bool              # the runs agree up to rounding (see `compare`)

    @property
    def same_tokens(self) -> bool:
        return self.first_difference is None


def compare(ref: Run, run: Run, rounding: float = 1e-2) -> Comparison:
    """`run` against `ref`. Logits are compared up to and including the first position where the chosen
    tokens differ (after it the contexts differ). The runs agree up to rounding when the logits differ
    by at most `rounding` of the largest logit (fp16 keeps about 3 significant digits) and the tokens
    are the same or, at the first difference, the two tokens' logits in `ref` lie within twice that
    difference (a near tie that rounding flipped)."""
    n = min(len(ref.tokens), len(run.tokens))
    diverge = next((i for i in range(n) if ref.tokens[i] != run.tokens[i]), None)
    upto = n if diverge is None else diverge + 1
    worst = (ref.logits[:upto] - run.logits[:upto]).abs().max().item() if upto else 0.0
    scale = ref.logits[:upto].abs().max().item() or 1.0
    margin = None
    if diverge is not None:
        row = ref.logits[diverge]
        margin = (row[ref.tokens[diverge]] - row[run.tokens[diverge]]).item()
    return Comparison(n, diverge, worst, worst / scale, margin,
                      worst <= rounding * scale and (diverge is None or margin <= 2 * worst))


def compare_text(name: str, c: Comparison) -> str:
    if c.same_tokens:
        same = f"all {c.tokens} greedy tokens identical"
    else:
        why = (f"a near tie: the dense model's two candidates {c.margin_at_difference:.2g} apart" if c.rounding_only
               else f"the dense model preferred its token by {c.margin_at_difference:.2g}")
        same = (f"the first {c.first_difference} of {c.tokens} tokens identical, then one differs ({why})"
                if c.first_difference else f"the very first of {c.tokens} tokens differs ({why})")
    return wrap(f"{name} vs dense: {same}; largest logit difference {c.max_abs_logit_diff:.2g} "
                f"({c.max_rel_logit_diff:.1e} of the largest logit)")


@dataclass(frozen=True)
class QuickPredictors:
    """Predictors trained here, and their selection on the held-out part of the tokens (measured)."""

    predictors: LowRankPredictors
    selection: Selection
    train_tokens: int
    heldout_tokens: int
    rank: int
    epochs: int
    seconds: float


def quick_predictors(folder: str | Path, ids: list[int], rank: int = 32, epochs: int = 3, threshold: float = 0.5,
                     heldout: float = 0.25, context: int | None = None, seed: int = 0) -> QuickPredictors:
    """Low-rank predictors trained quickly on the FFN activations of `folder`'s model over the first
    1 - heldout of `ids` (flashnb.training.predictors), evaluated on the rest."""
    t0 = time.perf_counter()
    model = load_model(folder)
    ctx = min(context or 256, model.config.max_position_embeddings)
    k = int(len(ids) * (1 - heldout))
    if k < 16 or len(ids) - k < 8:
        raise FlashnbError(f"quick_predictors needs more tokens: got {len(ids)}, want at least 16 to train on "
                           "and 8 held out")
    train, held = record(model, ids[:k], context=ctx), record(model, ids[k:], context=ctx)
    cfg = PredictorTrainConfig(rank=rank, epochs=epochs, threshold=threshold, batch_size=128, seed=seed)
    preds = train_predictors(model, train, cfg, progress=False)
    sel = mean_selection(selection_metrics(preds, held))
    return QuickPredictors(preds, sel, k, len(ids) - k, rank, epochs, time.perf_counter() - t0)


def model_predictors(folder: str | Path, ids: list[int], rank: int = 64, epochs: int = 4,
                     heldout: float = 0.25) -> tuple[LowRankPredictors, str]:
    """The predictors beside `folder` (FOLDER-predictors, where `flashnb train-predictors` writes them) when
    they belong to this model, else predictors trained here in seconds (`quick_predictors`); with a line
    saying which, and their recall and over-selection on the held-out quarter of `ids` (measured)."""
    folder = Path(folder)
    beside = predictors_beside(folder)
    if (beside / "predictors.safetensors").is_file():
        model = load_model(folder)
        try:
            preds = load_predictors(beside, model)
        except FlashnbError:
            preds = None   # another model's predictors: train quick ones instead
        if preds is not None:
            k = int(len(ids) * (1 - heldout))
            held = record(model, ids[k:], context=min(256, model.config.max_position_embeddings))
            s = mean_selection(selection_metrics(preds, held))
            return preds, wrap(f"the predictors beside the model ({beside.name}, trained by `flashnb "
                               f"train-predictors`): {_selection_sentence(s, len(ids) - k)}")
    q = quick_predictors(folder, ids, rank=rank, epochs=epochs, heldout=heldout)
    return q.predictors, wrap(f"{_predictor_sentence(q)} Trained for {q.seconds:.0f} s on {q.train_tokens} tokens: "
                              f"for real use, `flashnb train-predictors --model {folder}` traces 65,536 tokens"
                              + _shipped_selection())


def _shipped_selection() -> str:
    """What the shipped predictors reach on their 16,384 held-out tokens (their metrics.json), or ''."""
    try:
        held = load_predictors(predictors_beside(shipped_model_dir())).card["heldout"]
        mean, tokens = held["mean"], held["quality"]["tokens"]
    except (FlashnbError, KeyError, TypeError):
        return "."
    return (f" (the shipped predictors, on {tokens:,} held-out tokens: recall {mean['recall']:.1%} at "
            f"{mean['over_selection']:.2f}x).")


def predictor_text(q: QuickPredictors) -> str:
    return wrap(_predictor_sentence(q))


def _predictor_sentence(q: QuickPredictors) -> str:
    return (f"learned predictors (rank {q.rank}, {q.epochs} epochs on {q.train_tokens} tokens, trained just now): "
            + _selection_sentence(q.selection, q.heldout_tokens))


def _selection_sentence(s: Selection, heldout_tokens: int) -> str:
    """Predictors' selection on held-out tokens (measured), the paper's beside it."""
    return (f"on {heldout_tokens} held-out tokens recall {s.recall:.1%}, over-selection {s.over_selection:.2f}x; "
            f"{s.active_share:.1%} of the FFN fires per token, they select {s.selected_share:.1%}. Paper (OPT 6.7B): "
            "5% false negatives, ~3x over-selection (Section 3.1).")


def format_costs(runs: list[Run]) -> str:
    """Per-token costs of several runs side by side (ms; MB = 1e6 bytes read per token and held in DRAM)."""
    head = (f"{'run':<28} {'I/O':>7} {'mem':>7} {'compute':>8} {'total':>8} {'MB/token':>9} {'DRAM MB':>8} "
            f"{'rows':>5}")
    lines = [head, "-" * len(head)]
    for r in runs:
        s = r.stats
        lines.append(f"{r.name:<28} {s.io_ms:7.2f} {s.mm_ms:7.2f} {s.compute_ms:8.2f} {s.total_ms:8.2f} "
                     f"{s.bytes_read / MB:9.3f} {r.dram_bytes / MB:8.1f} "
                     f"{'-' if r.rows_per_layer is None else r.rows_per_layer:>5}")
    lines.append(wrap("ms per generated token (mean), measured on this machine (direct I/O for the flash runs); "
                      "rows: each layer's window rows in the same budget (the oracle holds no predictor weights, so "
                      "it has more)"))
    return "\n".join(lines)
