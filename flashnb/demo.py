"""`flashnb demo` and `flashnb generate`: the flash engine generating, token by token, with what each token
read and where its time went (and the dense model, the reference)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from flashnb.core.convert import ConvertConfig, convert
from flashnb.core.engine import FlashEngine, Policy
from flashnb.core.generate import SamplingConfig, check_context, generate
from flashnb.core.manifest import check_runs_from_flash
from flashnb.core.pinning import HotNeurons
from flashnb.core.defaults import IN_FLIGHT, MEMORY_BUDGET, WINDOW
from flashnb.core.predictor import AllNeurons, OraclePredictor, load_predictors
from flashnb.core.simulate import choose_pinned
from flashnb.core.store import FlashStore
from flashnb.core.thresholds import (FILE as THRESHOLDS_FILE, GateThresholds, Thresholds, apply_thresholds,
                                     thresholds_in, two_stage_in)
from flashnb.device.costmodel import steps_io_ms
from flashnb.device.profile import coalescing_gap, load_default_profile
from flashnb.errors import FlashnbError
from flashnb.lab.stats import TokenStats, window_advice
from flashnb.models.checkpoint import TensorIndex, load_model, read_config
from flashnb.models.tokenizer import Tokenizer
from flashnb.paths import SWIGLU_MODEL, data_dir, predictors_beside, shipped_predictors_dir, temporary_folder
from flashnb.text import MB, wrap


def budget_words(budget: float | int) -> str:
    """A --memory value as given: a fraction (0.5) or bytes, in MB (text.MB)."""
    return f"{budget:g}" if isinstance(budget, float) else f"{budget / MB:.1f} MB"


def per_token_table(steps, tok, out_ids) -> str:
    """One line per step after the prompt, named by the generated token it ran on: neurons predicted / in the
    pinned rows (when any are) / already cached / loaded from flash, bytes, requests and times."""
    pins = any(s.pinned for s in steps)
    lines = [f"{'token in':<14} {'predicted':>9}" + (f" {'pinned':>7}" if pins else "") + f" {'cached':>7} "
             f"{'loaded':>6} {'KB read':>8} {'requests':>8} {'I/O ms':>7} {'mem ms':>7} {'compute ms':>10}"]
    for s, tid in zip(steps, out_ids):
        text = repr(tok.decode([tid]))[:14]
        lines.append(f"{text:<14} {s.predicted:>9}" + (f" {s.pinned:>7}" if pins else "")
                     + f" {s.cached:>7} {s.loaded:>6} {s.bytes_read / 1e3:>8.1f} "
                     f"{s.requests:>8} {s.io_seconds * 1e3:>7.2f} {s.mm_seconds * 1e3:>7.2f} "
                     f"{s.compute_seconds * 1e3:>10.2f}")
    return "\n".join(lines)


def show_text(prompt: str, continuation: str, stream=None) -> str:
    """The prompt and what the model added, marked off: the continuation in bold on a terminal (unless
    NO_COLOR is set), else after the prompt as it is (so the text pipes unchanged)."""
    stream = stream or sys.stdout
    if stream.isatty() and not os.environ.get("NO_COLOR"):
        return f"{prompt}\x1b[1m{continuation}\x1b[0m"
    return prompt + continuation


def token_records(steps, tok, out_ids) -> list[dict]:
    """The per-token table as JSON records (counts are neurons summed over layers; times in ms): record k
    is the step that fed generated token k in (`token_in`, `text_in`) and chose token k + 1."""
    return [{"token_in": tid, "text_in": tok.decode([tid]), "predicted": s.predicted, "pinned": s.pinned,
             "cached": s.cached, "loaded": s.loaded, "evicted": s.evicted, "bytes_read": s.bytes_read,
             "requests": s.requests, "io_ms": s.io_seconds * 1e3, "mm_ms": s.mm_seconds * 1e3,
             "compute_ms": s.compute_seconds * 1e3, "total_ms": s.wall_seconds * 1e3}
            for s, tid in zip(steps, out_ids)]


def generate_on_store(store: FlashStore, predictor, policy: Policy, prompt: str, n: int, *,
                      hot: HotNeurons | None = None, sampling: SamplingConfig | None = None,
                      stats: str = "table", name: str | None = None, tok: Tokenizer | None = None,
                      thresholds: Thresholds | None = None) -> None:
    """Generate from `store` with the flash engine: the text on stdout, and on stderr the engine's setting,
    per token what was read and where the time went (`stats`: "table"), or only the means ("summary");
    `stats="json"` prints one JSON object on stdout instead (text, per-token records, means). `tok`: the
    model's tokenizer when the caller has it (default: the store's copy). `thresholds`: a SwiGLU model's."""
    tok = tok or Tokenizer.from_folder(store.path, bos_id=store.config.bos_token_id)
    with FlashEngine(store, predictor, policy, hot=hot, thresholds=thresholds) as eng:
        mem = eng.memory
        kept = ("" if thresholds is None or thresholds is getattr(predictor, "thresholds", None) else
                f", kept by {thresholds.criterion} thresholds ({thresholds.sparsity:.0%} sparsity)")
        rows = f"{mem.capacity_rows} rows {'per layer' if policy.window else 'shared by every layer'}"
        print(wrap(f"flashnb: {name or store.path} from flash: FFN on disk ({eng.reader.io_mode}), "
                   f"{mem.used_bytes / MB:.1f} MB in DRAM for weights, predictors and maps = "
                   f"{mem.used_bytes / mem.model_bytes:.0%} of the model's {mem.model_bytes / MB:.1f} MB (budget "
                   f"{budget_words(policy.memory_budget)}); {predictor.name}"
                   f"{kept}, window {policy.window} ({rows}), {mem.pinned_rows} hot neurons pinned per layer, "
                   f"{store.layout} store"
                   + (" in the co-activation order" if store.placement_path is not None else "")) + "\n",
              file=sys.stderr)
        ids = tok.encode(prompt)
        out = list(eng.generate(ids, n, sampling, eos_id=eng.model.config.eos_token_id))
        steps = eng.steps[len(ids):]
    mean = TokenStats.of(steps, store.num_layers * store.ffn_dim) if steps else None
    stopped = "end-of-text" if len(out) < n else "length"
    if stats == "json":
        s = sampling or SamplingConfig()
        print(json.dumps({"prompt": prompt, "text": tok.decode(out), "store": str(store.path),
                          "predictor": predictor.name, "window": policy.window, "pinned_rows": mem.pinned_rows,
                          "memory_budget": policy.memory_budget, "dram_bytes": mem.used_bytes,
                          "model_bytes": mem.model_bytes, "io_mode": eng.reader.io_mode, "n": n,
                          "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed,
                          "generated": len(out), "stopped": stopped,
                          "tokens": token_records(steps, tok, out),
                          "per_token": mean.to_json() if mean else None}))
        if mean:   # the notes a person reading stderr gets, beside the JSON on stdout
            print(window_advice(mean, mem, store.num_layers), end="", file=sys.stderr)
        return
    print(show_text(prompt, tok.decode(out)))
    if stopped == "end-of-text":
        print(f"(stopped after {len(out)} of {n} tokens: the model wrote its end-of-text token)", file=sys.stderr)
    if not steps:
        print(wrap("(one new token: it comes from the prompt's last step, so no step after the prompt was "
                   "measured; ask for -n 2 or more)"), file=sys.stderr)
    elif stats == "table":
        print(per_token_table(steps, tok, out), file=sys.stderr)
    if mean:
        print("\n" + wrap(f"per generated token (mean of {mean.tokens}, measured): {mean.bytes_read / MB:.3f} MB "
                          f"read in {mean.requests:.0f} requests, I/O {mean.io_ms:.2f} ms, memory management "
                          f"{mean.mm_ms:.2f} ms, compute {mean.compute_ms:.2f} ms, total {mean.total_ms:.2f} ms "
                          f"(median {mean.median_ms:.2f}); the FFN on flash is "
                          f"{(mem.model_bytes - mem.resident_bytes) / MB:.2f} MB"
                          + (" (the gate matrices stay in DRAM)" if store.gate_in_dram else "")), file=sys.stderr)
        print(window_advice(mean, mem, store.num_layers), end="", file=sys.stderr)


def _beside_source(store: FlashStore) -> Path | None:
    """SOURCE-predictors beside the model folder the store was converted from, when it holds predictors for
    this very model."""
    src = store.manifest.get("source", {}).get("folder")
    folder = predictors_beside(src) if src else None
    if folder is None or not (folder / "predictors.safetensors").is_file():
        return None
    return folder if load_predictors(folder).fingerprint == store.fingerprint else None


def generate_from_flash(folder: Path, prompt: str, n: int, memory: float | int, window: int, in_flight: int,
                        table: bool = True, predictors_dir: Path | None = None, pinned: int | str = 0,
                        gate_in_dram: bool = False, two_stage: bool = False) -> None:
    """Convert `folder` to a temporary store and generate with the flash engine (`generate_on_store`): a
    bundled store and the low-rank predictors of `predictors_dir` (default: FOLDER-predictors beside it);
    with `gate_in_dram` (a SwiGLU model whose predictors folder holds gate thresholds,
    flashnb.core.thresholds), a gate-apart store whose gate decides from DRAM; with `two_stage`, the gate picks
    candidates and the product keeps (the folder's two-stage/, `two_stage_in`). `pinned`: hot-neuron rows per
    layer, or "auto" (`flashnb.core.simulate.choose_pinned` with the cost model on the saved device profile)."""
    folder = Path(folder)
    config = read_config(folder)   # first: a folder that is not a model says so, before its tokenizer is missed,
    check_runs_from_flash(config)  # ... a model the engine cannot run, and weights flashnb cannot read (.bin),
    TensorIndex(folder)            # before its predictors are looked for
    tok = Tokenizer.from_folder(folder)
    check_early(tok.encode(prompt), n, config, pinned)
    pred_dir = Path(predictors_dir or predictors_beside(folder))
    pair = two_stage_rule(pred_dir, config, folder.name) if two_stage else None
    if gate_in_dram and not config.needs_thresholds:
        raise FlashnbError(f"--gate-in-dram is for SwiGLU models (a SiLU gate, no exact zeros); {folder.name} is "
                           f"sparse by itself ({config.ffn_activation}): drop --gate-in-dram, or run a SwiGLU model "
                           f"such as --model {SWIGLU_MODEL}")
    thresholds = pair[1] if pair else folder_thresholds(pred_dir, config) if gate_in_dram else None
    if gate_in_dram and thresholds is None:
        raise FlashnbError(f"--gate-in-dram runs a SwiGLU model with the gate thresholds in its predictors folder; "
                           f"{pred_dir} has no {THRESHOLDS_FILE}: calibrate them with `flashnb train-predictors "
                           "--model FOLDER --sparsity 0.5`")
    gate_decides = thresholds is not None
    if gate_decides and pinned:
        raise FlashnbError("--pinned keeps the hot neurons that low-rank predictors select; with --gate-in-dram or "
                           "--two-stage the gate thresholds decide, which have none: drop --pinned")
    predictors = None if gate_decides else load_predictors(pred_dir)
    with temporary_folder("flashnb-demo-") as work:
        layout = "gate-apart" if gate_decides else "bundled"
        store = FlashStore.open(convert(folder, work / "store", ConvertConfig(layout=layout, progress=False)))
        predictors = predictors or GateThresholds(store, pair[0] if pair else thresholds)
        policy, hot = pinned_policy(store, predictors, pred_dir, memory, window, in_flight, pinned)
        generate_on_store(store, predictors, policy, prompt, n, hot=hot, stats="table" if table else "summary",
                          name=folder.name, tok=tok, thresholds=thresholds)


def folder_thresholds(folder: Path | None, config) -> Thresholds | None:
    """The thresholds in a predictors folder, for a gated model (None without them)."""
    return thresholds_in(folder) if folder is not None and config.gated else None


def pinned_policy(store: FlashStore, predictors, pred_dir: Path | None, memory: float | int, window: int,
                  in_flight: int, pinned: int | str) -> tuple[Policy, HotNeurons | None]:
    """The engine's policy with `pinned` hot-neuron rows per layer ("auto": the split that simulates fastest
    on the saved device profile), and the hot neurons from `pred_dir` (None when nothing is pinned)."""
    profile = load_default_profile()
    policy = Policy(window, memory, in_flight, coalescing_gap(profile, in_flight))
    if not pinned:
        return policy, None
    if pred_dir is None:
        raise FlashnbError("--pinned needs the hot neurons that `flashnb train-predictors` writes beside the "
                           "predictors: pass --predictors FOLDER")
    hot = HotNeurons.load(pred_dir)
    if pinned == "auto":
        pinned = choose_pinned(hot, store, policy, predictors.memory_bytes(store.np_dtype.itemsize),
                               io_ms=lambda steps: steps_io_ms(profile, steps, in_flight)).chosen
    return replace(policy, pinned=pinned), hot


def generate_from_store(store_dir: str | Path, prompt: str, n: int, *, policy: str = "predictors",
                        predictors: str | Path | None = None, window: int = WINDOW,
                        memory: float | int = MEMORY_BUDGET, in_flight: int = IN_FLIGHT, pinned: int | str = 0,
                        stats: str = "table", sampling: SamplingConfig | None = None, two_stage: bool = False) -> None:
    """`flashnb generate --store`: the flash engine on a store written by `flashnb convert`. `policy`:
    "predictors" (from `predictors`, default the shipped ones when the store holds a shipped model; on a
    gate-apart store, the folder's gate thresholds, or with `two_stage` its two-stage rule), "oracle" (the
    exact active set; of the thresholded model on a gate-apart store) or "every" (every neuron: naive)."""
    store = FlashStore.open(store_dir)
    tok = Tokenizer.from_folder(store.path, bos_id=store.config.bos_token_id)
    check_early(tok.encode(prompt), n, store.config, pinned)
    if predictors is not None and policy != "predictors" and not pinned and not store.gate_in_dram:
        raise FlashnbError(f"--predictors is for --policy predictors (or --pinned): --policy {policy} does not use "
                           "them; drop one of the two")
    shipped_swiglu = predictors_beside(data_dir() / SWIGLU_MODEL)
    found = folder_thresholds(shipped_swiglu, store.config) if predictors is None else None
    if found is not None and found.fingerprint == store.fingerprint:
        predictors = shipped_swiglu  # the shipped SwiGLU model: its thresholds, whatever the policy
    if predictors is None and (policy == "predictors" or pinned):
        predictors = _beside_source(store)   # where `flashnb train-predictors --model SOURCE` wrote them
    if predictors is None and (policy == "predictors" or pinned):   # else the shipped model's, if it is that one
        if load_predictors(shipped_predictors_dir()).fingerprint != store.fingerprint:
            if policy != "predictors":
                raise FlashnbError("--pinned holds the hot neurons that `flashnb train-predictors` writes beside the "
                                   f"predictors, and {store.path} holds a model other than the shipped one: pass "
                                   "--predictors FOLDER, or drop --pinned")
            raise FlashnbError(f"{store.path} holds a model other than the shipped one, and no predictors of it lie "
                               "beside the folder it was converted from: pass --predictors FOLDER "
                               "(`flashnb train-predictors --model SOURCE` writes them), or --policy oracle (exact; "
                               "holds the whole FFN in DRAM to predict) or --policy every (naive: every neuron read)")
        predictors = shipped_predictors_dir()
    pair = _two_stage_rule(store, policy, predictors) if two_stage else None
    thresholds = pair[1] if pair else folder_thresholds(predictors, store.config) if store.gate_in_dram else None
    if store.gate_in_dram and thresholds is None:
        raise FlashnbError(f"{store.path} keeps the gate in DRAM (layout gate-apart) for gate thresholds: pass "
                           "--predictors FOLDER holding thresholds.safetensors (`flashnb train-predictors --sparsity` "
                           "writes it), or convert the model with --layout bundled")
    if policy == "predictors" and thresholds is not None:
        predictor = GateThresholds(store, pair[0] if pair else thresholds)
    elif policy == "predictors":
        predictor = load_predictors(predictors)
    elif policy == "oracle":
        predictor = OraclePredictor(apply_thresholds(store.load_model(), thresholds))
    else:
        predictor = AllNeurons(store.ffn_dim)
    pol, hot = pinned_policy(store, predictor, Path(predictors) if predictors else None, memory, window,
                             in_flight, pinned)
    generate_on_store(store, predictor, pol, prompt, n, hot=hot, stats=stats, sampling=sampling, tok=tok,
                      thresholds=thresholds)


def two_stage_rule(pred_dir: Path | None, config, name: str) -> tuple[Thresholds, Thresholds]:
    """--two-stage: (candidates, keep) from a predictors folder's two-stage/ (`two_stage_in`), or one clear
    error naming what is missing (the folder's rule, the model's gate)."""
    if not config.needs_thresholds:
        raise FlashnbError(f"--two-stage is for SwiGLU models (a SiLU gate, no exact zeros); {name} is sparse by "
                           f"itself ({config.ffn_activation}): drop --two-stage, or run a SwiGLU model such as "
                           f"--model {SWIGLU_MODEL}")
    pair = two_stage_in(pred_dir) if pred_dir is not None else None
    if pair is None:
        where = "no --predictors folder was given" if pred_dir is None else f"{pred_dir} has no two-stage/"
        raise FlashnbError(f"--two-stage runs a SwiGLU model with the two-stage thresholds of its predictors folder; "
                           f"{where}: write them with `flashnb train-predictors --model FOLDER --two-stage-only`")
    return pair


def _two_stage_rule(store: FlashStore, policy: str, predictors) -> tuple[Thresholds, Thresholds]:
    """`generate --store --two-stage`: what the store and the policy must allow, then `two_stage_rule`."""
    if policy != "predictors":
        raise FlashnbError(f"--two-stage is the rule that picks each token's neurons, as --policy predictors does: "
                           f"drop --policy {policy} or --two-stage")
    if not store.gate_in_dram:
        raise FlashnbError(f"--two-stage reads the gate from DRAM; {store.path} is a {store.layout} store"
                           + ("" if store.config.gated else " of a model without a gate")
                           + ": convert a SwiGLU model with `flashnb convert --layout gate-apart`")
    return two_stage_rule(Path(predictors) if predictors is not None else None, store.config, store.path.name)


def check_early(prompt_ids: list[int], n: int, config, pinned: int | str = 0) -> None:
    """What depends on the model, checked as soon as its config is read, before any heavy work: the
    prompt and new tokens within its context, pinned rows within its FFN."""
    check_context(prompt_ids, n, config)
    if isinstance(pinned, int) and not 0 <= pinned < config.ffn_dim:
        raise FlashnbError(f"--pinned {pinned} is out of range: give a whole number from 0 to {config.ffn_dim - 1} "
                           f"(the FFN has {config.ffn_dim} neurons per layer, and the window needs a row) or 'auto'; "
                           "with every neuron in DRAM, run the dense model: `flashnb generate --model FOLDER`")


def generate_dense(folder: str | Path, prompt: str, n: int, sampling: SamplingConfig | None = None) -> None:
    """`flashnb generate --model`: the dense model of a Hugging Face folder in DRAM; the text on stdout."""
    config = read_config(folder)  # (a store given here is said there, with `generate --store`)
    tok = Tokenizer.from_folder(folder)
    ids = tok.encode(prompt)
    check_early(ids, n, config)
    model = load_model(folder)
    t0 = time.perf_counter()
    out = list(generate(model, ids, n, sampling, eos_id=model.config.eos_token_id))
    dt = time.perf_counter() - t0
    print(show_text(prompt, tok.decode(out)))
    print(f"\n[{len(out)} tokens in {dt:.2f} s, dense in DRAM, {len(out) / max(dt, 1e-9):.1f} tokens/s"
          + (f"; stopped at the end-of-text token, {n} asked]" if len(out) < n else "]"), file=sys.stderr)
