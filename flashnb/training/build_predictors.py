"""`flashnb train-predictors`: trace, train, evaluate and write a predictor set with its card.

Steps, all deterministic for a given model, corpus and seed:
  1. training trace: `train_tokens` tokens from the corpus training split, as random windows of
     `context` tokens (seeded), recorded with FFN inputs;
  2. a predictor per layer trained on it (flashnb.predictor_train);
  3. held-out evaluation on the first `eval_tokens` (+1 target) tokens of the held-out split:
     recall, precision, false negatives and over-selection per layer, perplexity dense vs
     predicted-only and top-1 agreement (flashnb.predicted_ffn), sparsity and temporal reuse
     (flashnb.tracestats), and the closest-friend bundling experiment (friends counted on the
     training trace, at most FRIEND_TOKENS evenly spaced tokens; bytes measured on the held-out one);
  4. the folder: predictors.safetensors, metrics.json (the card), heldout_slice.safetensors
     (the held-out token ids the card was measured on, so tests and notebooks reuse them without
     rebuilding the corpus) and hot_neurons.safetensors (how often the predictors select each neuron
     on the training trace, and their selections on the first CALIBRATION_TOKENS held-out tokens:
     what pinning hot neurons ranks and calibrates on, flashnb.core.pinning).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from flashnb.core.pinning import HotNeurons
from flashnb.core.predictor import CARD as CARD_NAME, LowRankPredictors, load_predictors
from flashnb.errors import FlashnbError
from flashnb.models.checkpoint import load_model, read_config
from flashnb.models.tokenizer import Tokenizer
from flashnb.paths import data_dir, publish
from flashnb.training import tracestats
from flashnb.training.corpus import collect
from flashnb.training.predictors import PredictorTrainConfig, train_lookahead, train_predictors
from flashnb.training.quality import Selection, mean_selection, quality, selection_metrics
from flashnb.training.traces import record
from flashnb.training.train import encode_split

HELDOUT = "heldout_slice.safetensors"
CALIBRATION_TOKENS = 256  # held-out tokens whose predicted sets choose the pinned/window split
THRESHOLD_TOKENS = 16_384  # training tokens that calibrate a SwiGLU model's thresholds (at most)
FRIEND_TOKENS = 16_384  # at most this many (evenly spaced) training-trace tokens count friends
TARGETS = {"recall_min": 0.95, "over_selection_max": 3.0, "perplexity_increase_max": 0.03,
           "top1_agreement_min": 0.95}
PAPER = {"source": "Alizadeh et al., LLM in a flash (ACL 2024), OPT 6.7B",
         "ffn_sparsity": 0.97, "false_negative_rate": 0.05, "false_positive_rate": 0.07,
         "over_selection": 3.0, "predictor_ranks": "128-1024 (larger in the last layers)"}


@dataclass
class BuildConfig:
    """model: HF model folder; out: output folder; train_tokens / eval_tokens: tokens traced for
    training / held-out evaluation; context: window length (tokens); threads: torch threads."""

    model: str
    out: str
    train_tokens: int = 65_536
    eval_tokens: int = 16_384
    context: int = 256
    threads: int = 2
    train: PredictorTrainConfig = field(default_factory=PredictorTrainConfig)


def train_windows(stream: np.ndarray, tokens: int, context: int, seed: int) -> np.ndarray:
    """`tokens // context` random windows of `context` tokens from `stream`, concatenated (int64)."""
    n = max(1, tokens // context)
    if len(stream) < context + 1:
        raise FlashnbError(f"the training split has only {len(stream)} tokens, fewer than one window "
                           f"of {context}")
    starts = np.sort(np.random.default_rng(seed).integers(0, len(stream) - context, n))
    return np.concatenate([stream[s:s + context] for s in starts]).astype(np.int64)


def save_heldout(folder: str | Path, ids: np.ndarray, corpus_sha256: str) -> None:
    """Write the held-out token ids (int32) the card was measured on."""
    p = Path(folder) / HELDOUT
    tmp = p.with_name(p.name + ".tmp")
    save_file({"ids": ids.astype(np.int32)}, str(tmp), metadata={"corpus_sha256": corpus_sha256})
    publish(tmp, p)


def load_heldout(folder: str | Path, tokens: int | None = None) -> np.ndarray:
    """The first `tokens` (default all) held-out token ids (int64) shipped with a predictor set."""
    p = Path(folder) / HELDOUT
    if not p.is_file():
        raise FlashnbError(f"{p} is missing; rebuild the predictor set with `flashnb train-predictors`")
    try:
        with safe_open(str(p), framework="numpy") as h:
            ids = h.get_tensor("ids")
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise FlashnbError(f"{p} is not a readable held-out slice ({e}); rebuild the predictor set "
                           "with `flashnb train-predictors`") from None
    return ids[:tokens].astype(np.int64)


def evaluate(model, predictors, heldout_trace, heldout_ids: np.ndarray, context: int) -> dict:
    """The card's held-out section: selection per layer and mean, quality, targets met."""
    per_layer = selection_metrics(predictors, heldout_trace)
    mean = mean_selection(per_layer)
    q = quality(model, predictors, heldout_ids, context)
    met = {"recall": mean.recall >= TARGETS["recall_min"],
           "over_selection": mean.over_selection <= TARGETS["over_selection_max"],
           "perplexity": q.perplexity_increase <= TARGETS["perplexity_increase_max"],
           "top1_agreement": q.top1_agreement >= TARGETS["top1_agreement_min"]}
    return {"per_layer": [s.to_dict() for s in per_layer], "mean": mean.to_dict(), "quality": q.to_dict(),
            "targets": TARGETS, "targets_met": met}


def _shown(path: str) -> str:
    """`path` relative to the repository (data/...) when it lies inside it, else as given."""
    try:
        return str(Path(path).resolve().relative_to(data_dir().resolve().parent))
    except (ValueError, FlashnbError):
        return str(path)


def build(cfg: BuildConfig, progress: bool = True, log=print) -> dict:
    """Run steps 1-4 of the module docstring; returns the card written to cfg.out/metrics.json."""
    t0 = time.perf_counter()
    check_zeros(cfg.model, read_config(cfg.model), thresholds=False)
    model, corpus, train_ids, held, train_trace, held_trace = _traces(cfg, progress, log)
    predictors = train_predictors(model, train_trace, cfg.train, progress=progress)
    log("evaluating on the held-out split ...")
    heldout = evaluate(model, predictors, held_trace, held, cfg.context)
    summary = tracestats.summarize(held_trace, k_max=16)
    neuron_bytes = 2 * model.config.hidden_size * 2  # fp16 up column + down row
    friends = tracestats.friends_per_layer(train_trace, max_tokens=FRIEND_TOKENS)
    bundling = tracestats.friend_experiment(held_trace, neuron_bytes, friends)
    c = model.config
    card = {
        "what": f"low-rank FFN activation predictors for {Path(cfg.model).name}",
        "command": (f"flashnb train-predictors --model {_shown(cfg.model)} --out {_shown(cfg.out)} --train-tokens "
                    f"{cfg.train_tokens} --eval-tokens {cfg.eval_tokens} --rank {cfg.train.rank}"
                    + (f" --ranks {','.join(map(str, cfg.train.ranks))}" if cfg.train.ranks else "")
                    + f" --threshold {cfg.train.threshold} --epochs {cfg.train.epochs} --init {cfg.train.init}"
                    f" --pos-weight {cfg.train.pos_weight} --lr {cfg.train.lr} --seed {cfg.train.seed}"),
        "model": {"folder": Path(cfg.model).name, "d_model": c.hidden_size, "ffn_dim": c.ffn_dim,
                  "layers": c.num_hidden_layers},
        "build": {k: v for k, v in asdict(cfg).items() if k != "train"} | {"model": _shown(cfg.model),
                                                                          "out": _shown(cfg.out)},
        "train": asdict(cfg.train),
        "corpus": {"sha256": corpus.sha256, "train_trace_tokens": int(len(train_ids)),
                   "heldout_tokens": int(len(held) - 1), "heldout_slice": HELDOUT},
        "heldout": heldout,
        "trace_stats_heldout": {"sparsity_per_layer": summary.sparsity.tolist(),
                                "reuse_k1_to_16_mean_over_layers": summary.reuse.mean(0).tolist(),
                                "s_agg_k1_to_16_mean_over_layers": summary.s_agg.mean(0).tolist()},
        "closest_friend_bundling": {"neuron_bytes": neuron_bytes,
                                    "friends_from": f"training trace, at most {FRIEND_TOKENS} evenly spaced tokens",
                                    "measured_on": "held-out trace",
                                    "per_layer": [b.to_dict() for b in bundling]},
        "paper": PAPER,
        "measured": {"machine": platform.machine(), "threads": cfg.threads, "torch": torch.__version__,
                     "wall_seconds": None},
        "weights_dtype": "float16",
    }
    predictors.save(cfg.out, card)
    save_heldout(cfg.out, held, corpus.sha256)
    measure_hot(predictors, train_trace, held_trace).save(cfg.out)
    card["measured"]["wall_seconds"] = round(time.perf_counter() - t0, 1)
    predictors.save(cfg.out, card)
    return predictors.card


LOOKAHEAD = "lookahead"  # the subfolder of a predictor folder that holds its lookahead set


def build_lookahead(cfg: BuildConfig, progress: bool = True, log=print) -> dict:
    """Lookahead predictors for cfg.model (flashnb.training.predictors.train_lookahead), trained on the
    same corpus windows as `build`, written to cfg.out/lookahead; their held-out selection is reported
    beside the same-layer set's in cfg.out (when there is one) for the same layers."""
    t0 = time.perf_counter()
    check_zeros(cfg.model, read_config(cfg.model), thresholds=False)
    model, corpus, train_ids, held, train_trace, held_trace = _traces(cfg, progress, log)
    ahead = train_lookahead(model, train_trace, cfg.train, progress=progress)
    L = held_trace.n_layers
    per_layer = [Selection.of(ahead.predict(i, torch.from_numpy(held_trace.inputs[i])).numpy(), held_trace.mask(i + 1))
                 for i in range(L - 1)]
    card = {"what": f"lookahead predictors for {Path(cfg.model).name}: predictor i guesses layer i + 1's neurons "
                    "from layer i's FFN input",
            "command": f"flashnb train-predictors --lookahead --model {_shown(cfg.model)} --out {_shown(cfg.out)}",
            "train": asdict(cfg.train), "train_trace_tokens": int(len(train_ids)), "heldout_tokens": int(len(held) - 1),
            "heldout": {"per_layer": [s.to_dict() for s in per_layer], "mean": mean_selection(per_layer).to_dict()}}
    if (Path(cfg.out) / "predictors.safetensors").is_file():
        same = selection_metrics(load_predictors(cfg.out, model), held_trace)[1:]
        card["same_layer_heldout"] = {"layers": list(range(1, L)), "per_layer": [s.to_dict() for s in same],
                                      "mean": mean_selection(same).to_dict()}
    card["measured"] = {"threads": cfg.threads, "torch": torch.__version__,
                        "wall_seconds": round(time.perf_counter() - t0, 1)}
    ahead.save(Path(cfg.out) / LOOKAHEAD, card)
    return ahead.card


def check_zeros(model: str | Path, config, thresholds: bool) -> None:
    """One clear error when a job does not fit how the model's FFN gets its zeros: predictors of a SwiGLU
    model's nonzero neurons would select at random (it needs thresholds first: `thresholds`), and thresholds
    are for SwiGLU models only (a ReLU FFN's zeros are exact)."""
    if config.needs_thresholds and not thresholds:
        raise FlashnbError(f"{model} is a SwiGLU model ({config.ffn_activation} gate): none of its neurons is exactly "
                           "zero, so predictors of its nonzero neurons would select at random; pass --sparsity "
                           "(e.g. 0.5) to set thresholds that make it sparse, and predictors of what they keep")
    if thresholds and not config.needs_thresholds:
        raise FlashnbError(f"{model}: thresholds are for SwiGLU models (a gated FFN with SiLU); this model's FFN is "
                           f"{config.ffn_activation}{' gated' if config.gated else ''}, whose zeros the low-rank "
                           "predictors learn: drop --sparsity")


def check_job(cfg: BuildConfig, config) -> None:
    """One clear error, before any slow step, for ranks the model cannot have and for traces that do not fit
    in this machine's memory (each traced token keeps every layer's active set and FFN input)."""
    ranks = cfg.train.layer_ranks(config.num_hidden_layers)
    if max(ranks) > config.hidden_size:
        raise FlashnbError(f"rank {max(ranks)} exceeds the model's d_model of {config.hidden_size}: a low-rank "
                           f"predictor's rank is at most d_model (the shipped ones use 64 at 512); give a smaller "
                           "--rank or --ranks")
    per_token = config.num_hidden_layers * ((config.ffn_dim + 7) // 8 + 2 * config.hidden_size)
    need, have = (cfg.train_tokens + cfg.eval_tokens) * per_token, available_memory()
    if have is not None and need > have // 2:  # the traces, and room to train on them
        raise FlashnbError(f"--train-tokens {cfg.train_tokens} and --eval-tokens {cfg.eval_tokens} need about "
                           f"{need / 2**30:.1f} GiB for their traces, more than half of the {have / 2**30:.1f} GiB "
                           f"of memory available here: give at most about {have // 2 // per_token:,} tokens in all")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _traces(cfg: BuildConfig, progress: bool, log):
    """Step 1 (and the held-out trace): (model, corpus, training ids, held-out ids, traces)."""
    torch.set_num_threads(cfg.threads)
    model = load_model(cfg.model)
    tok = Tokenizer.from_folder(cfg.model, bos_id=read_config(cfg.model).bos_token_id)
    check_job(cfg, model.config)  # fail before the slow steps
    if cfg.context > model.config.max_position_embeddings:
        raise FlashnbError(f"--context {cfg.context} exceeds the model's {model.config.max_position_embeddings}")
    log("collecting the corpus (docstrings of the stdlib and torch) ...")
    corpus = collect()
    train_ids = train_windows(encode_split(tok, corpus.train), cfg.train_tokens, cfg.context, cfg.train.seed)
    held = encode_split(tok, corpus.heldout)[:cfg.eval_tokens + 1].astype(np.int64)
    log(f"tracing {len(train_ids)} training and {len(held) - 1} held-out tokens ...")
    train_trace = record(model, train_ids, cfg.context, progress=progress)
    held_trace = record(model, held[:-1], cfg.context, progress=progress)
    return model, corpus, train_ids, held, train_trace, held_trace


def measure_hot(predictors: LowRankPredictors, train_trace, held_trace,
                tokens: int = CALIBRATION_TOKENS) -> HotNeurons:
    """How often the predictors select each neuron over the training trace, and their selections on
    the first `tokens` held-out tokens (bit-packed)."""
    def selected(trace, layer: int, stop: int):
        for a in range(0, stop, 8192):
            yield predictors.predict(layer, torch.from_numpy(trace.inputs[layer][a:min(stop, a + 8192)])).numpy()

    L, T = train_trace.n_layers, train_trace.n_tokens
    freq = np.stack([sum(m.sum(0, dtype=np.float64) for m in selected(train_trace, i, T)) / T for i in range(L)])
    n = min(tokens, held_trace.n_tokens)
    cal = np.stack([np.packbits(np.concatenate(list(selected(held_trace, i, n))), axis=1) for i in range(L)], axis=1)
    return HotNeurons(freq.astype(np.float32), cal)


def build_hot(cfg: BuildConfig, progress: bool = True, log=print) -> HotNeurons:
    """Measure and write the hot neurons of the predictor set already in cfg.out (the traces of
    `build`, no training): for predictor sets made before flashnb wrote them."""
    predictors = load_predictors(cfg.out)  # one clear error when there is none
    _, _, _, _, train_trace, held_trace = _traces(cfg, progress, log)
    hot = measure_hot(predictors, train_trace, held_trace)
    hot.save(cfg.out)
    return hot


def hot_summary(hot: HotNeurons) -> str:
    """One line: how hot each layer's 1st, 16th and 64th most selected neurons are."""
    top = np.sort(hot.frequency, axis=1)[:, ::-1]
    ranks = [r for r in (1, 16, 64) if r <= hot.ffn_dim]
    return (f"share of training tokens whose predicted set holds each layer's {' / '.join(map(str, ranks))} most "
            "selected neuron: " + "; ".join(f"layer {i}: " + " / ".join(f"{row[r - 1]:.0%}" for r in ranks)
                                           for i, row in enumerate(top)))


def card_summary(card: dict) -> str:
    """A few lines for the terminal: per-layer selection, means, quality, friend bundling."""
    h = card["heldout"]
    lines = ["layer  rank  recall  precision  FP rate  over-selection  active  selected"]
    rows = [(str(i), str(card["ranks"][i]), Selection(**s)) for i, s in enumerate(h["per_layer"])]
    rows.append(("mean", "", Selection(**h["mean"])))
    for name, rank, s in rows:
        lines.append(f"{name:>5s} {rank:>5s}  {s.recall:.4f}  {s.precision:.4f}   {s.false_positive_rate:.4f}  "
                     f"{s.over_selection:10.2f}x   {s.active_share:.4f}  {s.selected_share:.4f}")
    q = h["quality"]
    lines.append(f"held-out perplexity dense {q['dense_perplexity']:.2f} -> predicted-only "
                 f"{q['predicted_perplexity']:.2f} ({q['perplexity_increase']:+.2%}), top-1 agreement "
                 f"{q['top1_agreement']:.2%} over {q['tokens']} tokens")
    b = card["closest_friend_bundling"]["per_layer"]
    lines.append("closest-friend bundles: bytes x{:.2f}, reads x{:.2f} (mean over layers)".format(
        np.mean([x["bytes_ratio"] for x in b]), np.mean([x["reads_ratio"] for x in b])))
    lines.append("targets met: " + json.dumps(h["targets_met"]))
    return "\n".join(lines)


THRESHOLD_CARD = "thresholds.json"
SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7)  # target sparsities the thresholds card measures
CATS_PAPER = {"source": "Lee et al., CATS (2024): training-free, Mistral 7B and Llama 2 7B",
              "ffn_sparsity": 0.5, "downstream_accuracy_drop": "about 1-2 points on average"}


def build_thresholds(cfg: BuildConfig, sparsity: float, criterion: str = "scaled-gate",
                     calibration_tokens: int = THRESHOLD_TOKENS, progress: bool = True, log=print) -> dict:
    """A SwiGLU model's thresholds and low-rank predictors, into cfg.out:

    1. thresholds (flashnb.core.thresholds, `criterion`) for `sparsity` from `calibration_tokens`
       training-split tokens (at most cfg.train_tokens): what decides the neurons when the gate stays in
       DRAM (store layout gate-apart); the thresholded model's held-out perplexity and top-1 agreement at
       every target of SWEEP, every criterion (thresholds.json);
    2. the model thresholded on the product |SiLU(gate) * up| at the same sparsity (the neurons that
       matter most: the best labels, measured), traced on the training windows of `build`, and a
       low-rank predictor per layer trained on its sets: what decides when the gate stays on flash (a
       bundled store; the engine then computes every predicted neuron, as for a ReLU model);
    3. the predictors' held-out selection against those sets and the quality of the model that computes
       only the predicted neurons, against the dense model (metrics.json);
    4. thresholds.safetensors, predictors.safetensors, the held-out slice and the hot neurons."""
    from flashnb.core.thresholds import CRITERIA, Fires, activations, apply_thresholds, thresholds_for
    from flashnb.training.quality import dense_window_logits, quality

    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    model = load_model(cfg.model)
    check_zeros(cfg.model, model.config, thresholds=True)
    check_job(cfg, model.config)  # fail before the slow steps
    tok = Tokenizer.from_folder(cfg.model, bos_id=read_config(cfg.model).bos_token_id)
    log("collecting the corpus (docstrings of the stdlib and torch) ...")
    corpus = collect()
    train_stream = encode_split(tok, corpus.train)
    calib = train_windows(train_stream, min(calibration_tokens, cfg.train_tokens), cfg.context,
                          cfg.train.seed + 1)
    held = encode_split(tok, corpus.heldout)[:cfg.eval_tokens + 1].astype(np.int64)
    log(f"calibrating on {len(calib)} training tokens, measuring on {len(held) - 1} held-out tokens ...")
    acts = activations(model, calib, cfg.context)
    dense = dense_window_logits(model, held, cfg.context)
    sweep = []
    for crit in CRITERIA:
        for s in sorted(set(SWEEP) | {sparsity}):
            q = quality(model, Fires(model, thresholds_for(acts, s, crit)), held, cfg.context, dense)
            sweep.append({"criterion": crit, "sparsity": s, **q.to_dict()})
            log(f"  {crit:11s} {s:.0%}: perplexity {q.perplexity_increase:+.2%}, top-1 agreement {q.top1_agreement:.1%}")
    chosen = thresholds_for(acts, sparsity, criterion)
    labels = thresholds_for(acts, sparsity, "product")
    del acts
    apply_thresholds(model, labels)
    train_ids = train_windows(train_stream, cfg.train_tokens, cfg.context, cfg.train.seed)
    log(f"tracing the thresholded model on {len(train_ids)} training and {len(held) - 1} held-out tokens ...")
    train_trace = record(model, train_ids, cfg.context, progress=progress)
    held_trace = record(model, held[:-1], cfg.context, progress=progress)
    predictors = train_predictors(model, train_trace, cfg.train, progress=progress)
    apply_thresholds(model, None)
    log("evaluating on the held-out split ...")
    per_layer = selection_metrics(predictors, held_trace)
    q = quality(model, predictors, held, cfg.context, dense)
    out = Path(cfg.out)
    chosen.save(out)
    shown = (f"--sparsity {sparsity} --criterion {criterion} --rank {cfg.train.rank}"
             + (f" --ranks {','.join(map(str, cfg.train.ranks))}" if cfg.train.ranks else "")
             + f" --threshold {cfg.train.threshold} --epochs {cfg.train.epochs} --seed {cfg.train.seed}")
    card = {"what": f"per-layer activation thresholds for {Path(cfg.model).name} (a SwiGLU model): neuron i fires "
                    "when |SiLU(gate_i . x)| * scale_i exceeds its layer's threshold",
            "command": f"flashnb train-predictors --model {_shown(cfg.model)} --out {_shown(cfg.out)} {shown}",
            "criterion": criterion, "sparsity": sparsity, "thresholds": list(chosen.values),
            "calibration": {"tokens": chosen.calibration_tokens, "split": "training", "context": cfg.context,
                            "measured_sparsity": list(chosen.measured)},
            "heldout": {"tokens": int(len(held) - 1), "slice": HELDOUT, "corpus_sha256": corpus.sha256,
                        "sparsity_per_layer": [1.0 - float(held_trace.mask(i).mean()) for i in range(held_trace.n_layers)]},
            "sweep": sweep, "targets": {"perplexity_increase_max": 0.03, "top1_agreement_min": 0.95},
            "cats_paper": CATS_PAPER,
            "measured": {"threads": cfg.threads, "torch": torch.__version__}}
    mean = mean_selection(per_layer)
    pcard = {"what": f"low-rank predictors for {Path(cfg.model).name}, a SwiGLU model: trained on the neurons whose "
                     f"|SiLU(gate) * up| is above the threshold for {sparsity:.0%} sparsity (the product thresholds: "
                     "labels only; the engine computes every predicted neuron)",
             "labels": {"criterion": "product", "sparsity": sparsity, "thresholds": list(labels.values)},
             "command": card["command"], "thresholds": THRESHOLD_CARD, "train": asdict(cfg.train),
             "model": {"folder": Path(cfg.model).name, "d_model": model.config.hidden_size,
                       "ffn_dim": model.config.ffn_dim, "layers": model.config.num_hidden_layers},
             "corpus": {"sha256": corpus.sha256, "train_trace_tokens": int(len(train_ids)),
                        "heldout_tokens": int(len(held) - 1), "heldout_slice": HELDOUT},
             "heldout": {"per_layer": [s.to_dict() for s in per_layer], "mean": mean.to_dict(), "quality": q.to_dict(),
                         "targets": TARGETS},
             "weights_dtype": "float16"}
    predictors.save(out, pcard)
    save_heldout(out, held, corpus.sha256)
    measure_hot(predictors, train_trace, held_trace).save(out)
    card["predictors"] = {"card": CARD_NAME, "heldout_recall": mean.recall, "heldout_over_selection": mean.over_selection,
                          "quality": q.to_dict()}
    card["measured"]["wall_seconds"] = round(time.perf_counter() - t0, 1)
    tmp = out / (THRESHOLD_CARD + ".tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    tmp.replace(out / THRESHOLD_CARD)
    return card


def thresholds_summary(card: dict) -> str:
    """A few lines for the terminal: the thresholded model's held-out quality at each target sparsity, and
    the predictors'."""
    lines = ["thresholded model, held-out:", "criterion    sparsity  perplexity  top-1 agreement"]
    for r in card["sweep"]:
        lines.append(f"{r['criterion']:11s}  {r['sparsity']:7.0%}  {r['perplexity_increase']:+9.2%}  "
                     f"{r['top1_agreement']:14.1%}")
    p = card["predictors"]
    lines.append(f"thresholds.safetensors: {card['criterion']} at {card['sparsity']:.0%} (the gate in DRAM decides)")
    lines.append(f"low-rank predictors of the product sets at {card['sparsity']:.0%}: held-out recall "
                 f"{p['heldout_recall']:.1%}, over-selection {p['heldout_over_selection']:.2f}x, perplexity "
                 f"{p['quality']['perplexity_increase']:+.2%}, top-1 agreement {p['quality']['top1_agreement']:.1%}")
    return "\n".join(lines)


def build_placement(cfg: BuildConfig, progress: bool = True, log=print) -> dict:
    """Learn a co-activation placement (flashnb.core.placement) from the neuron sets the predictors already
    in cfg.out select on the training windows of `build` (what the engine reads), write
    cfg.out/placement.safetensors, and count what it saves on the held-out split: runs of adjacent rows
    (requests at gap 0) in the original order and in the learned one, the same neurons."""
    from flashnb.core.placement import Placement, count_runs
    from flashnb.core.simulate import sets_from_trace

    predictors = load_predictors(cfg.out)  # one clear error when there is none
    model, _, train_ids, held, train_trace, held_trace = _traces(cfg, progress, log)
    log("learning the placement (a greedy co-activation chain per layer) ...")
    masks = []
    for layer in range(train_trace.n_layers):
        x = train_trace.inputs[layer]
        masks.append(np.concatenate([predictors.predict(layer, torch.from_numpy(x[a:a + 8192])).numpy()
                                     for a in range(0, len(x), 8192)]))
    placement = Placement.learn(masks, predictors.fingerprint,
                                f"the predictors' selections on {len(train_ids)} training-split tokens")
    placement.save(cfg.out)
    sets = sets_from_trace(held_trace, predictors)
    before, after = count_runs(sets), count_runs(sets, placement.position)
    return {"tokens": placement.tokens, "heldout_tokens": len(sets), "runs_original": before, "runs_placed": after,
            "neurons": int(sum(len(ids) for token in sets for ids in token))}
