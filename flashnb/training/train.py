"""`flashnb train`: train the shipped OPT-style ReLU model (or a Llama-style SwiGLU one) from the offline corpus.

Recipe: byte-level BPE (tokenizers) on the training split; a decoder trained with AdamW, warmup + cosine
learning rate, on random 256-token windows. The OPT model (`arch="opt"`, ReLU) gets an L1 penalty on the
FFN activations (ProSparse-style) whose weight `lam` is steered each step towards a target sparsity:
    lam <- max(0, lam + l1_rate * clip(target - batch_sparsity, -0.02, +0.02)).
The Llama model (`arch="llama"`: RMSNorm, rotary positions, grouped-query attention, a SiLU-gated FFN as
Llama, Qwen and Mistral have) trains without it: its sparsity comes later, from thresholds.
It writes a Hugging Face folder (config.json, model.safetensors in fp16, tokenizer.json) and a
training card with the corpus hash, tokens seen, wall time, held-out perplexity and sparsity per layer,
both measured on the fp16 weights it ships. Checkpoints (safetensors + JSON, no pickle) let a run resume:
one every `checkpoint_every` steps and every `checkpoint_seconds`, and one when Ctrl-C (SIGINT) or SIGTERM
asks the run to stop (at the end of the step under way; a second Ctrl-C stops at once, without one).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from flashnb.models.checkpoint import build_model, load_model, save_model
from flashnb.paths import file_in_the_way
from flashnb.text import show_progress
from flashnb.training.corpus import Corpus, collect
from flashnb.errors import FlashnbError
from flashnb.models.llama import LlamaConfig
from flashnb.models.opt import OPTConfig
from flashnb.models.tokenizer import Tokenizer, train_bpe


ARCHS = ("opt", "llama")


@dataclass
class TrainConfig:
    out: str = "data/flashnb-opt-23m"
    arch: str = "opt"             # "opt": ReLU FFN with the L1 penalty; "llama": SwiGLU FFN, no penalty
    vocab_size: int = 4096
    d_model: int = 512
    ffn_dim: int = 2048
    layers: int = 6
    heads: int = 8
    context: int = 256
    batch: int = 8
    tokens: int = 3_000_000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    sparsity_target: float | None = 0.94   # None: no L1 penalty (the Llama model)
    kv_heads: int | None = None   # grouped-query attention (llama): key/value heads; None = heads
    l1_rate: float = 0.05
    seed: int = 0
    threads: int = 2
    checkpoint_every: int = 100
    checkpoint_seconds: float = 180.0
    eval_tokens: int = 65_536

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch * self.context))


# `flashnb train --arch llama`: a SwiGLU model of at most 25 MB in fp16 (11.0 M parameters: d_model 384, six
# heads of 64 sharing two key/value heads, FFN 1024, 6 layers, the embeddings tied to the LM head).
LLAMA_SHAPE = dict(arch="llama", d_model=384, ffn_dim=1024, layers=6, heads=6, kv_heads=2, sparsity_target=None)

DEFAULT_OUT = {"opt": "flashnb-opt-21m", "llama": "flashnb-llama-11m"}


def command_config(arch: str, out: str | None, sparsity_target: float | None, **settings) -> TrainConfig:
    """`flashnb train`'s settings: the shipped ReLU model (L1 steered to `sparsity_target`, 0.94 by default)
    or, for `arch` "llama", the SwiGLU one (no penalty); into `out` or the architecture's default folder."""
    if arch == "llama" and sparsity_target is not None:
        raise FlashnbError("--sparsity-target steers the L1 penalty of the ReLU model; the SwiGLU model (--arch "
                           "llama) trains without it: drop --sparsity-target")
    shape = LLAMA_SHAPE if arch == "llama" else dict(sparsity_target=0.94 if sparsity_target is None
                                                     else sparsity_target)
    return TrainConfig(out=out or DEFAULT_OUT[arch], **settings, **shape)


# Settings that may change between a run and its resumption: they do not change what is trained.
RESUMABLE = ("out", "threads", "checkpoint_every", "checkpoint_seconds")


@dataclass
class TrainState:
    step: int = 0
    lam: float = 0.0
    seconds: float = 0.0
    log: list = field(default_factory=list)


DESCRIPTIONS = {"opt": "OPT architecture, ReLU FFN, tied LM head",
                "llama": "Llama architecture (RMSNorm, rotary positions, grouped-query attention), SwiGLU FFN "
                         "(SiLU gate), tied LM head"}


def model_config(cfg: TrainConfig):
    """The architecture `cfg` trains; both use the tokenizer's </s> (id 2) to start and end a document."""
    if cfg.arch == "opt":
        return OPTConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, ffn_dim=cfg.ffn_dim,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         max_position_embeddings=cfg.context)
    if cfg.arch == "llama":
        return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
                           num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                           num_key_value_heads=cfg.kv_heads or cfg.heads, max_position_embeddings=cfg.context,
                           hidden_act="silu", head_dim=cfg.d_model // cfg.heads, tie_word_embeddings=True,
                           bos_token_id=2, eos_token_id=2)
    raise FlashnbError(f"unknown architecture {cfg.arch!r}: flashnb trains {' or '.join(ARCHS)}")


def encode_split(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    """All documents as one uint16 stream, each starting with OPT's BOS/EOS token </s>."""
    ids: list[int] = []
    for d in docs:
        ids.extend(tok.encode(d, bos=True))
    return np.asarray(ids, dtype=np.uint16)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def set_recording(model, on: bool) -> None:
    for block in model.layers:
        block.ffn.record = on
        block.ffn.last_activation = None


@torch.no_grad()
def evaluate(model, stream: np.ndarray, context: int, max_tokens: int) -> dict:
    """Held-out loss (nats/token), perplexity and FFN sparsity per layer (share of exact zeros after
    ReLU), over non-overlapping windows of `context` tokens covering up to `max_tokens` targets."""
    model.eval()
    set_recording(model, True)
    n_layers = len(model.layers)
    zeros, total = torch.zeros(n_layers, dtype=torch.float64), 0
    nll, count = 0.0, 0
    n = min(len(stream) - 1, max_tokens)
    for start in range(0, n - context + 1, context):
        x = torch.from_numpy(stream[start:start + context].astype(np.int64))[None]
        y = torch.from_numpy(stream[start + 1:start + context + 1].astype(np.int64))[None]
        logits = model(x)
        nll += F.cross_entropy(logits[0], y[0], reduction="sum").item()
        count += context
        for i, block in enumerate(model.layers):
            zeros[i] += (block.ffn.last_activation == 0).sum().item()
        total += context * model.config.ffn_dim
    set_recording(model, False)
    sparsity = (zeros / total).tolist()
    loss = nll / count
    return {"tokens": count, "loss": loss, "perplexity": math.exp(loss),
            "sparsity_per_layer": sparsity, "sparsity_mean": sum(sparsity) / n_layers}


def _save_checkpoint(ckpt: Path, model, opt, state: TrainState, rng: np.random.Generator) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        s = opt.state.get(p)
        if s:
            tensors[f"opt.{i}.exp_avg"] = s["exp_avg"]
            tensors[f"opt.{i}.exp_avg_sq"] = s["exp_avg_sq"]
            tensors[f"opt.{i}.step"] = s["step"].reshape(1).float()
    save_file(tensors, str(ckpt / "state.safetensors.tmp"))
    (ckpt / "state.safetensors.tmp").replace(ckpt / "state.safetensors")
    meta = {"state": asdict(state), "rng": rng.bit_generator.state}
    (ckpt / "state.json.tmp").write_text(json.dumps(meta))
    (ckpt / "state.json.tmp").replace(ckpt / "state.json")


def _load_checkpoint(ckpt: Path, model, opt, rng: np.random.Generator) -> TrainState:
    tensors = load_file(str(ckpt / "state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(model.parameters()):
        if f"opt.{i}.exp_avg" in tensors:
            opt.state[p] = {"exp_avg": tensors[f"opt.{i}.exp_avg"], "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"],
                            "step": tensors[f"opt.{i}.step"][0].clone()}
    meta = json.loads((ckpt / "state.json").read_text())
    rng.bit_generator.state = meta["rng"]
    return TrainState(**meta["state"])


class StopRequest:
    """While entered (in the main thread), SIGINT and SIGTERM set `signal` instead of ending the process, so
    that training stops at the end of the step under way with a checkpoint; a second SIGINT interrupts."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    def _ask(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._ask) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def checkpointed_step(ckpt: Path) -> int | None:
    """The step of the checkpoint in `ckpt`, or None if there is none."""
    try:
        return int(json.loads((ckpt / "state.json").read_text())["state"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_out(cfg: TrainConfig, resume: bool) -> None:
    """The command line's guard: a checkpoint in OUT is continued only with `resume`, a finished model in OUT
    is never trained over, and `resume` needs a checkpoint."""
    out = Path(cfg.out)
    blocked = file_in_the_way(out)  # where mkdir would fail (a missing folder is created)
    if blocked is not None:
        raise FlashnbError(f"--out {out}: {blocked} is a file, not a folder; `flashnb train` writes a new model "
                           "folder: give a new or empty folder's path")
    step = checkpointed_step(out / "checkpoint")
    if step is not None and not resume:
        raise FlashnbError(f"{out} holds a run checkpointed at step {step} of {cfg.steps}: add --resume to "
                           "continue it, or choose another --out")
    if step is None and (out / "model.safetensors").exists():
        raise FlashnbError(f"{out} already holds a model: choose another --out")
    if step is None and out.is_dir() and any(out.iterdir()):
        raise FlashnbError(f"{out} exists and holds files of its own: `flashnb train` writes a new model folder; "
                           "choose a new or empty --out")
    if step is None and resume:
        raise FlashnbError(f"{out / 'checkpoint'} holds no checkpoint to resume: drop --resume to start a run")


def _check_same_settings(ckpt: Path, cfg: TrainConfig) -> None:
    """A checkpoint is resumed only with the settings that wrote it (those in RESUMABLE may change)."""
    if not (ckpt / "state.json").exists():
        return
    try:
        saved = json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError):
        raise FlashnbError(f"{ckpt / 'config.json'} is missing or unreadable: the checkpoint cannot be resumed; "
                           "choose another --out to start afresh") from None
    differ = sorted(k for k in set(saved) | set(asdict(cfg)) if k not in RESUMABLE and saved.get(k) != asdict(cfg).get(k))
    if differ:
        raise FlashnbError(f"{ckpt} was written with other settings ({', '.join(f'{k}={saved.get(k)}' for k in differ)}); "
                           "pass the same options to resume, or another --out to start afresh")


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"flashnb train: {message}", file=sys.stderr, flush=True)


def _steps(cfg: TrainConfig, model, opt, rng: np.random.Generator, state: TrainState, train_ids: np.ndarray,
           ckpt: Path, stop: StopRequest, progress: bool, stop_at_step: int | None) -> bool:
    """Train from `state.step` to the end, checkpointing as `cfg` says; True if stopped early (with a checkpoint)."""
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not show_progress(progress), unit="step")
    t0 = time.perf_counter() - state.seconds
    saved_at = time.perf_counter()
    try:
        while state.step < cfg.steps:
            starts = rng.integers(0, len(train_ids) - cfg.context - 1, cfg.batch)
            window = np.stack([train_ids[s:s + cfg.context + 1] for s in starts]).astype(np.int64)
            x, y = torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])
            for g in opt.param_groups:
                g["lr"] = lr_at(state.step, cfg)
            logits = model(x)
            ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
            acts = [b.ffn.last_activation for b in model.layers]
            l1 = torch.stack([a.abs().mean() for a in acts]).mean()
            loss = ce + state.lam * l1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                sparsity = torch.stack([(a == 0).float().mean() for a in acts]).mean().item()
            if cfg.sparsity_target is not None:
                err = max(-0.02, min(0.02, cfg.sparsity_target - sparsity))
                state.lam = max(0.0, state.lam + cfg.l1_rate * err)
            state.step += 1
            bar.update(1)
            bar.set_postfix(ce=f"{ce.item():.3f}", sparsity=f"{sparsity:.3f}", lam=f"{state.lam:.3f}")
            if state.step % 20 == 0:
                state.log.append({"step": state.step, "ce": round(ce.item(), 4), "sparsity": round(sparsity, 4),
                                  "lam": round(state.lam, 4)})
            early = stop.signal is not None or state.step == stop_at_step
            if (early or state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps
                    or time.perf_counter() - saved_at >= cfg.checkpoint_seconds):
                state.seconds = time.perf_counter() - t0
                _save_checkpoint(ckpt, model, opt, state, rng)
                saved_at = time.perf_counter()
            if early:
                return True
        return False
    finally:
        bar.close()


def train(cfg: TrainConfig, corpus: Corpus | None = None, progress: bool = True,
          stop_at_step: int | None = None) -> dict | None:
    """Train (or resume) the model described by `cfg`; returns the training card it writes.

    `stop_at_step` ends the run early after checkpointing that step (returns None), as an
    interruption would; calling `train` again with the same `cfg` resumes exactly there. Ctrl-C or
    SIGTERM end it the same way at the end of the step under way (returns None).
    """
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    ckpt = out / "checkpoint"
    _check_same_settings(ckpt, cfg)
    out.mkdir(parents=True, exist_ok=True)
    if corpus is None:
        _say(progress, "collecting the corpus (docstrings of the standard library and torch, pydoc topics; "
                       "about a minute)")
        corpus = collect()
    tok_path = ckpt / "tokenizer.json"
    if tok_path.exists():
        tok = Tokenizer.from_folder(ckpt, bos_id=2)
    else:
        _say(progress, f"fitting the tokenizer (byte-level BPE, {cfg.vocab_size} entries) on "
                       f"{len(corpus.train)} documents")
        tok = train_bpe(corpus.train, cfg.vocab_size)
        ckpt.mkdir(parents=True, exist_ok=True)
        tok.save(ckpt)
    _say(progress, "encoding the corpus")
    train_ids, held_ids = encode_split(tok, corpus.train), encode_split(tok, corpus.heldout)

    mcfg = model_config(cfg)
    model = build_model(mcfg)
    for name, p in model.named_parameters():  # N(0, 0.02) weights, zero biases, unit norms (OPT's and Llama's)
        if name.endswith("bias"):
            torch.nn.init.zeros_(p)
        elif "norm" in name:
            torch.nn.init.ones_(p)
        else:
            torch.nn.init.normal_(p, std=0.02)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(cfg.seed)
    state = TrainState()
    if (ckpt / "state.json").exists():
        state = _load_checkpoint(ckpt, model, opt, rng)
        _say(progress, f"resuming from {ckpt} at step {state.step} of {cfg.steps}")
    (ckpt / "config.json").write_text(json.dumps(asdict(cfg), indent=2))

    model.train()
    set_recording(model, True)
    todo = f"steps {state.step + 1}..{cfg.steps}" if state.step else f"{cfg.steps} steps"
    _say(progress, f"training {todo} of {cfg.batch} x {cfg.context} tokens on {cfg.threads} thread(s); "
                   f"a checkpoint every {cfg.checkpoint_every} steps and every {cfg.checkpoint_seconds:g} s, and on "
                   "Ctrl-C")
    with StopRequest() as stop:
        stopped = _steps(cfg, model, opt, rng, state, train_ids, ckpt, stop, progress, stop_at_step)
    if stopped or stop.signal is not None:   # (a signal during the last step's checkpoint: stop there too)
        _say(progress, f"stopped at step {state.step} of {cfg.steps}; checkpoint saved in {ckpt}: the same command "
                       "with --resume continues from there")
        return None
    set_recording(model, False)
    _say(progress, "saving the model and measuring it on the held-out split")

    save_model(model, out, dtype=torch.float16)
    tok.save(out)
    shipped = load_model(out, dtype=torch.float32)  # measure what ships: the fp16 weights
    metrics = evaluate(shipped, held_ids, cfg.context, cfg.eval_tokens)
    card = {
        "model": DESCRIPTIONS[cfg.arch], "config": mcfg.to_hf(),
        "train_config": asdict(cfg),
        "corpus": {"sha256": corpus.sha256, "chars": corpus.chars(), "train_docs": len(corpus.train),
                   "heldout_docs": len(corpus.heldout), "train_tokens": int(len(train_ids)),
                   "heldout_tokens": int(len(held_ids)), **corpus.sources},
        "tokens_seen": state.step * cfg.batch * cfg.context, "steps": state.step,
        "wall_seconds": round(state.seconds, 1), "threads": cfg.threads, "torch": torch.__version__,
        "final_l1_weight": state.lam,
        "heldout": metrics, "weights_dtype": "float16",
        "log": state.log,
    }
    (out / "training_card.json").write_text(json.dumps(card, indent=2) + "\n")
    shutil.rmtree(ckpt, ignore_errors=True)   # the run is finished: its optimizer state (6x the model) goes
    _say(progress, f"wrote {out}: model.safetensors, config.json, the tokenizer files and training_card.json")
    return card
