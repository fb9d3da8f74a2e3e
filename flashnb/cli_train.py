"""The `flashnb train` and `flashnb train-predictors` commands (flashnb.cli holds the others): they
build what flashnb ships, the models and their predictors (or a SwiGLU model's thresholds)."""

from __future__ import annotations

import sys

from flashnb.cli_args import real, whole
from flashnb.errors import FlashnbError


THREADS_HELP = ("torch threads (default: FLASHNB_TORCH_THREADS if set, else the cores idle at start, which a "
                "machine busy with other work has fewer of)")


def _threads(args) -> int:
    """--threads, else FLASHNB_TORCH_THREADS, else the idle cores (flashnb.core.generate.torch_threads)."""
    from flashnb.core.generate import torch_threads

    return args.threads if args.threads is not None else torch_threads()


def cmd_train(args) -> None:
    from flashnb.training.train import check_out, command_config, train

    cfg = command_config(args.arch, args.out, args.sparsity_target, tokens=args.tokens, seed=args.seed,
                         threads=_threads(args), checkpoint_seconds=args.checkpoint_minutes * 60)
    check_out(cfg, args.resume)
    card = train(cfg)
    if card is None:
        raise KeyboardInterrupt
    h = card["heldout"]
    print(f"wrote {cfg.out}: held-out perplexity {h['perplexity']:.1f}, "
          f"FFN sparsity {h['sparsity_mean']:.1%} (training_card.json has the rest)")


def job_files(args) -> list[str]:
    """What a `train-predictors` job writes into its --out folder (the files --force lets it replace)."""
    from flashnb.core.pinning import HOT_FILE
    from flashnb.core.placement import FILE as PLACEMENT
    from flashnb.core.predictor import CARD, WEIGHTS
    from flashnb.core.thresholds import FILE as THRESHOLDS, TWO_STAGE
    from flashnb.training.build_predictors import HELDOUT, LOOKAHEAD, THRESHOLD_CARD

    if args.two_stage_only:
        return [TWO_STAGE]
    if args.sparsity is not None:
        return [THRESHOLDS, THRESHOLD_CARD, WEIGHTS, CARD, HELDOUT, HOT_FILE]
    if args.hot_neurons_only:
        return [HOT_FILE]
    if args.placement_only:
        return [PLACEMENT]
    if args.lookahead:
        return [f"{LOOKAHEAD}/{WEIGHTS}", f"{LOOKAHEAD}/{CARD}"]
    return [WEIGHTS, CARD, HELDOUT, HOT_FILE]


def cmd_train_predictors(args) -> None:
    from pathlib import Path

    from flashnb.paths import data_dir, predictors_beside, shipped_model_dir
    from flashnb.training.build_predictors import (BuildConfig, build, build_hot, build_lookahead, build_placement,
                                                  build_thresholds, card_summary, check_zeros, hot_summary,
                                                  thresholds_summary)
    from flashnb.training.predictors import PredictorTrainConfig

    ranks = None
    if args.ranks:
        try:
            ranks = [int(r) for r in args.ranks.split(",")]
        except ValueError:
            raise FlashnbError(f"--ranks {args.ranks!r} must be comma-separated integers, one per layer") from None
    tcfg = PredictorTrainConfig(rank=args.rank, ranks=ranks, threshold=args.threshold, epochs=args.epochs,
                                lr=args.lr, pos_weight=args.pos_weight, init=args.init, seed=args.seed)
    model = args.model or str(shipped_model_dir())
    name = Path(model).resolve().name
    beside = predictors_beside(Path(model).resolve())   # where flashnb looks for a model's predictors
    shipped = Path(model).resolve().parent == data_dir().resolve()  # a model flashnb ships: its set stays as shipped
    in_place = args.hot_neurons_only or args.placement_only or args.two_stage_only  # beside what is there
    out = args.out or str(beside if in_place or not shipped else predictors_beside(Path.cwd() / name))
    if Path(out).exists() and not Path(out).is_dir():
        raise FlashnbError(f"--out {out} is a file; give a folder for the predictors (it is created if missing)")
    thresholds_job = args.sparsity is not None and not args.two_stage_only
    if sum(map(bool, (args.lookahead, args.hot_neurons_only, args.placement_only, args.two_stage_only,
                      thresholds_job))) > 1:
        raise FlashnbError("--lookahead, --hot-neurons-only, --placement-only, --two-stage-only and --sparsity are "
                           "different jobs: choose one (--two-stage-only takes --sparsity as the share it keeps)")
    if args.criterion is not None and args.sparsity is None:
        raise FlashnbError("--criterion chooses how --sparsity's thresholds compare a neuron: it goes with --sparsity")
    if args.candidates is not None and not args.two_stage_only:
        raise FlashnbError("--candidates goes with --two-stage-only (the gate's candidates of a two-stage rule)")
    from flashnb.core.manifest import check_runs_from_flash
    from flashnb.models.checkpoint import read_config

    config = read_config(model)
    check_runs_from_flash(config)   # predictors and thresholds serve the flash engine only
    if not (args.two_stage_only or args.hot_neurons_only or args.placement_only):   # before the files are checked
        check_zeros(model, config, thresholds_job)
    replaced = [f for f in job_files(args) if (Path(out) / f).exists()]
    if replaced and not args.force:
        raise FlashnbError(f"{out} already holds {', '.join(replaced)}, which this job would replace; pass --force "
                           "to replace them, or choose another --out")
    context = min(BuildConfig.context, config.max_position_embeddings)  # windows the model can take
    cfg = BuildConfig(model=model, out=out, train_tokens=args.train_tokens, eval_tokens=args.eval_tokens,
                      threads=_threads(args), train=tcfg, context=context)
    if args.two_stage_only:
        from flashnb.training.two_stage import build_two_stage, two_stage_summary

        card = build_two_stage(cfg, 0.3 if args.candidates is None else args.candidates,
                               0.5 if args.sparsity is None else args.sparsity,
                               log=lambda m: print(m, file=sys.stderr))
        print(two_stage_summary(card))
        print(f"wrote {out}/two-stage (candidates/ and keep/ thresholds, card.json; use it: flashnb demo --model MODEL "
              "--two-stage)")
        return
    if args.sparsity is not None:
        card = build_thresholds(cfg, args.sparsity, args.criterion or "scaled-gate",
                                log=lambda m: print(m, file=sys.stderr))
        print(thresholds_summary(card))
        print(f"wrote {out} (thresholds.safetensors, thresholds.json, predictors.safetensors, metrics.json, "
              "heldout_slice.safetensors, hot_neurons.safetensors)")
        return
    if args.placement_only:
        r = build_placement(cfg, log=lambda m: print(m, file=sys.stderr))
        print(f"co-activation placement learned on {r['tokens']} tokens; on {r['heldout_tokens']} held-out tokens the "
              f"predicted sets ({r['neurons'] / r['heldout_tokens']:.0f} neurons per token) lie in "
              f"{r['runs_original'] / r['heldout_tokens']:.0f} runs of adjacent rows per token in the original order, "
              f"{r['runs_placed'] / r['heldout_tokens']:.0f} placed ({r['runs_original'] / r['runs_placed']:.2f}x fewer)")
        print(f"wrote {out}/placement.safetensors (use it: flashnb convert MODEL STORE --placement {out})")
        return
    if args.hot_neurons_only:
        print(hot_summary(build_hot(cfg, log=lambda m: print(m, file=sys.stderr))))
        print(f"wrote {out}/hot_neurons.safetensors")
        return
    if args.lookahead:
        card = build_lookahead(cfg, log=lambda m: print(m, file=sys.stderr))
        m = card["heldout"]["mean"]
        print(f"lookahead predictors: held-out recall {m['recall']:.1%}, over-selection {m['over_selection']:.2f}x "
              f"(mean over layers 1..; metrics.json has each layer beside the same-layer set's)")
        print(f"wrote {out}/lookahead (predictors.safetensors, metrics.json)")
        return
    card = build(cfg, log=lambda m: print(m, file=sys.stderr))
    print(card_summary(card))
    print(f"wrote {out} (predictors.safetensors, metrics.json, heldout_slice.safetensors, hot_neurons.safetensors)")
    if Path(out).resolve() != beside:
        print(f"run them with --predictors {out} (flashnb looks beside the model, in {beside}, without it)")


def add_training_commands(sub) -> None:
    t = sub.add_parser("train", help="reproduce the shipped model from the offline corpus",
                       description="Train the shipped OPT-style ReLU model on the docstring corpus (see flashnb."
                                   "training.corpus), or with --arch llama a Llama-style SwiGLU model (11.0 M "
                                   "parameters, 22 MB in fp16). It checkpoints into OUT/checkpoint every 100 steps, "
                                   "every --checkpoint-minutes and on Ctrl-C; --resume continues from there. The shipped "
                                   "model took 1.6 h with 2 threads on an idle 2-core machine.")
    t.add_argument("--arch", choices=("opt", "llama"), default="opt",
                   help="opt: the shipped ReLU model, with the L1 penalty; llama: SwiGLU (SiLU gate), no penalty "
                        "(default: %(default)s)")
    t.add_argument("--out", help="output folder (default: flashnb-opt-21m, or flashnb-llama-11m with --arch llama)")
    t.add_argument("--tokens", type=whole(1), default=3_200_000, help="training tokens (default: %(default)s)")
    t.add_argument("--seed", type=whole(0, 2**63 - 1), default=0, help="seed (default: %(default)s)")
    t.add_argument("--threads", type=whole(1, 1024), help=THREADS_HELP)
    t.add_argument("--sparsity-target", type=real(0, 1, what="a fraction"),
                   help="FFN sparsity the L1 weight is steered to (--arch opt only; default: 0.94)")
    t.add_argument("--checkpoint-minutes", type=real(0, 1e6, lo_open=True, what="minutes"), default=3.0,
                   help="also checkpoint after this many minutes (default: %(default)s)")
    t.add_argument("--resume", action="store_true", help="continue the run checkpointed in OUT/checkpoint")
    t.set_defaults(func=cmd_train)

    tp = sub.add_parser("train-predictors", help="train the per-layer FFN activation predictors",
                        description="Trace the model on the corpus training split, train a low-rank "
                                    "predictor per layer (balanced BCE), evaluate on the held-out split "
                                    "(recall, over-selection, perplexity, top-1 agreement) and write "
                                    "OUT/predictors.safetensors + OUT/metrics.json + OUT/hot_neurons.safetensors. "
                                    "The defaults reproduce the shipped set (in a new folder: nothing is "
                                    "replaced without --force).")
    tp.add_argument("--model", default=None, help="model folder (default: the shipped model, data/flashnb-opt-21m)")
    tp.add_argument("--out", default=None,
                    help="output folder (default: MODEL-predictors beside the model, where demo, bench and generate "
                         "look for them; for a model flashnb ships, in the current folder, so that the shipped set "
                         "stays as shipped, except with --hot-neurons-only, --placement-only and --two-stage-only, "
                         "which add to the predictors beside the model, e.g. data/flashnb-opt-21m-predictors)")
    tp.add_argument("--force", action="store_true", help="replace what OUT already holds")
    tp.add_argument("--train-tokens", type=whole(16), default=65_536,
                    help="training-split tokens to trace; with --sparsity or --two-stage-only, the thresholds are "
                         "calibrated on at most 16,384 of them (default: %(default)s)")
    tp.add_argument("--eval-tokens", type=whole(17), default=16_384,
                    help="held-out tokens to evaluate on, at least 17: reuse is measured over 16 tokens back "
                         "(default: %(default)s)")
    tp.add_argument("--rank", type=whole(1), default=64, help="predictor rank of every layer (default: %(default)s)")
    tp.add_argument("--ranks", default=None, help="per-layer ranks, comma-separated (overrides --rank)")
    tp.add_argument("--threshold", type=real(0, 1, lo_open=True, hi_open=True, what="a probability"), default=0.5,
                    help="select a neuron when its probability exceeds this (default: %(default)s)")
    tp.add_argument("--epochs", type=whole(1), default=4, help="passes over the trace (default: %(default)s)")
    tp.add_argument("--lr", type=real(0, 10, lo_open=True, what="a learning rate"), default=2e-3,
                    help="peak learning rate (default: %(default)s)")
    tp.add_argument("--pos-weight", type=real(0, 1e6, lo_open=True, what="a weight"), default=1.0,
                    help="weight of active neurons, times the negative/positive ratio (default: %(default)s)")
    tp.add_argument("--init", choices=["random", "pca"], default="random",
                    help="random, or the FFN's rank-r principal projection (default: %(default)s)")
    tp.add_argument("--seed", type=whole(0, 2**63 - 1), default=0, help="seed (default: %(default)s)")
    tp.add_argument("--threads", type=whole(1, 1024), help=THREADS_HELP)
    tp.add_argument("--lookahead", action="store_true",
                    help="train lookahead predictors instead (layer i's FFN input -> layer i+1's neurons, so the "
                         "engine reads a layer's neurons while its attention runs) into OUT/lookahead")
    tp.add_argument("--placement-only", action="store_true",
                    help="no training: learn a co-activation placement (each layer's neurons ordered so that those "
                         "the predictors in OUT select together lie side by side) and write OUT/placement.safetensors, "
                         "for `flashnb convert --placement OUT`")
    tp.add_argument("--hot-neurons-only", action="store_true",
                    help="no training: measure how often the predictors already in OUT select each neuron (the hot "
                         "neurons that --pinned keeps in DRAM) and write OUT/hot_neurons.safetensors")
    tp.add_argument("--sparsity", type=real(0, 0.99, what="a fraction"), default=None,
                    help="SwiGLU models: calibrate per-layer thresholds (--criterion; CATS thresholds the gate) so "
                         "that this fraction of the neurons stays below them, for a store that keeps the gate in DRAM; "
                         "then train low-rank predictors on the sets of the model thresholded on |SiLU(gate) * up|, "
                         "for a bundled store; measure both on the held-out split and write "
                         "OUT/thresholds.safetensors, thresholds.json, predictors.safetensors, metrics.json and "
                         "the hot neurons")
    tp.add_argument("--two-stage-only", action="store_true",
                    help="SwiGLU models, no training: calibrate a two-stage rule (the gate in DRAM picks candidates, "
                         "whose up | down are read; the product |SiLU(gate) * up| keeps those above its thresholds for "
                         "--sparsity, default 0.5), measure it on the held-out split and write OUT/two-stage, for "
                         "`flashnb demo --two-stage`")
    tp.add_argument("--candidates", type=real(0, 0.99, what="a fraction"), default=None,
                    help="with --two-stage-only: the sparsity of the gate's candidates (default 0.3: 70%% of the "
                         "neurons are read)")
    tp.add_argument("--criterion", choices=["scaled-gate", "gate", "product"], default=None,
                    help="with --sparsity: compare |SiLU(gate)| (CATS: gate), |SiLU(gate)| times the root-mean-square "
                         "of the neuron's up projection (scaled-gate) or |SiLU(gate) * up| (product: the gate cannot "
                         "decide alone, predictors must) with the threshold (default: scaled-gate)")
    tp.set_defaults(func=cmd_train_predictors)
