"""The `flashnb` command line: one sub-command per job; `flashnb COMMAND --help` for each.

Bad input ends with one line `flashnb: error: ...` (exit status 2), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time

from flashnb.errors import FlashnbError

DEMO_PROMPT = "Return a new list containing"


def _load(folder: str):
    from flashnb.checkpoint import load_model, read_config
    from flashnb.tokenizer import Tokenizer

    model = load_model(folder)
    tok = Tokenizer.from_folder(folder, bos_id=read_config(folder).bos_token_id)
    return model, tok


def _generate_dense(folder: str, prompt: str, n: int, temperature: float, top_p: float, seed: int) -> None:
    from flashnb.generate import SamplingConfig, generate

    model, tok = _load(folder)
    ids = tok.encode(prompt)
    t0 = time.perf_counter()
    out = list(generate(model, ids, n, SamplingConfig(temperature, top_p, seed), eos_id=model.config.eos_token_id))
    dt = time.perf_counter() - t0
    print(prompt + tok.decode(out))
    print(f"\n[{len(out)} tokens in {dt:.2f} s, dense in DRAM, {len(out) / max(dt, 1e-9):.1f} tokens/s]",
          file=sys.stderr)


def _decode_threads() -> None:
    """Torch threads for token-at-a-time decoding (flashnb.generate.set_decode_threads)."""
    from flashnb.generate import set_decode_threads

    set_decode_threads()


def cmd_generate(args) -> None:
    _decode_threads()
    _generate_dense(args.model, args.prompt, args.n, args.temperature, args.top_p, args.seed)


def cmd_demo(args) -> None:
    from flashnb.paths import shipped_model_dir

    folder = shipped_model_dir()
    _decode_threads()
    if args.dense:
        print(f"flashnb demo: the shipped model {folder.name}, dense in DRAM\n", file=sys.stderr)
        _generate_dense(str(folder), args.prompt, args.n, 0.0, 1.0, 0)
        return
    _generate_flash(folder, None, args.prompt, args.n, args.memory, args.window, args.threads, args.table)


def _generate_flash(folder, predictors_dir, prompt: str, n: int, memory: float, window: int, threads: int,
                    table: bool) -> None:
    """Convert `folder` to a temporary bundled store and generate with the flash engine."""
    import tempfile
    from pathlib import Path

    from flashnb.engine import FlashEngine, Policy
    from flashnb.predictor import load_predictors
    from flashnb.profile import load_default_profile
    from flashnb.store import ConvertConfig, convert
    from flashnb.tokenizer import Tokenizer
    from flashnb.checkpoint import read_config

    folder = Path(folder)
    pred_dir = Path(predictors_dir) if predictors_dir else folder.parent / f"{folder.name}-predictors"
    config = read_config(folder)
    tok = Tokenizer.from_folder(folder, bos_id=config.bos_token_id)
    predictors = load_predictors(pred_dir)
    with tempfile.TemporaryDirectory(prefix="flashnb-demo-") as work:
        store = convert(folder, Path(work) / "store", ConvertConfig(layout="bundled", progress=False))
        policy = Policy("learned", window, memory, threads)
        with FlashEngine(store, policy, predictors=predictors, profile=load_default_profile()) as eng:
            mem = eng.memory
            print(f"flashnb: {folder.name} from flash: FFN on disk (direct I/O), {mem.used_bytes / 2**20:.1f} MiB "
                  f"of weights in DRAM = {mem.used_bytes / mem.model_bytes:.0%} of {mem.model_bytes / 2**20:.1f} MiB "
                  f"(budget {memory:g}); low-rank predictors, window {window}, row-column bundles\n",
                  file=sys.stderr)
            ids = tok.encode(prompt)
            out = list(eng.generate(ids, n, eos_id=config.eos_token_id))
            print(prompt + tok.decode(out))
            steps = eng.steps[len(ids):]
            if table:
                print(per_token_table(steps, tok, out), file=sys.stderr)
            if steps:
                tot = [s.totals() for s in steps]
                mean = lambda k: sum(t[k] for t in tot) / len(tot)  # noqa: E731
                print(f"\nper generated token (mean of {len(steps)}, measured): "
                      f"{mean('bytes_read') / 1e6:.3f} MB read in {mean('requests'):.0f} requests, "
                      f"I/O {mean('io_seconds') * 1e3:.2f} ms, memory management {mean('mm_seconds') * 1e3:.2f} ms, "
                      f"compute {mean('compute_seconds') * 1e3:.2f} ms, total {mean('wall_seconds') * 1e3:.2f} ms; "
                      f"the whole FFN would be {st_ffn_mb(eng):.2f} MB", file=sys.stderr)


def st_ffn_mb(eng) -> float:
    st = eng.store
    return st.num_layers * st.ffn_dim * st.neuron_bytes / 1e6


def per_token_table(steps, tok, out_ids) -> str:
    """One line per generated token: neurons predicted / already cached / read, bytes and times."""
    lines = [f"{'token':<14} {'predicted':>9} {'cached':>7} {'read':>6} {'KB read':>8} {'I/O ms':>7} "
             f"{'mem ms':>7} {'compute ms':>10}"]
    for s, tid in zip(steps, out_ids):
        t = s.totals()
        text = repr(tok.decode([tid]))[:14]
        lines.append(f"{text:<14} {t['predicted']:>9} {t['cached']:>7} {t['read']:>6} {t['bytes_read'] / 1e3:>8.1f} "
                     f"{t['io_seconds'] * 1e3:>7.2f} {t['mm_seconds'] * 1e3:>7.2f} {t['compute_seconds'] * 1e3:>10.2f}")
    return "\n".join(lines)


def cmd_bench(args) -> None:
    import json
    from pathlib import Path

    from flashnb.bench import BenchConfig, format_table, run_bench

    _decode_threads()
    cfg = BenchConfig(model=args.model, predictors=args.predictors, prompt=args.prompt, tokens=args.tokens,
                      window=args.window, memory=args.memory, threads=args.threads, dir=args.dir,
                      configs=tuple(args.configs.split(",")) if args.configs else BenchConfig.configs,
                      profile=args.profile, replay=args.replay, keep_replay=args.keep_replay)
    result = run_bench(cfg)
    print(format_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)


def cmd_train(args) -> None:
    from flashnb.train import TrainConfig, train

    cfg = TrainConfig(out=args.out, tokens=args.tokens, seed=args.seed, threads=args.threads,
                      sparsity_target=args.sparsity_target)
    card = train(cfg)
    h = card["heldout"]
    print(f"wrote {args.out}: held-out perplexity {h['perplexity']:.1f}, "
          f"FFN sparsity {h['sparsity_mean']:.1%} (training_card.json has the rest)")


def cmd_train_predictors(args) -> None:
    from flashnb.predictor_build import BuildConfig, build, card_summary
    from flashnb.predictor_train import PredictorTrainConfig

    ranks = None
    if args.ranks:
        try:
            ranks = [int(r) for r in args.ranks.split(",")]
        except ValueError:
            raise FlashnbError(f"--ranks {args.ranks!r} must be comma-separated integers, one per layer") from None
    tcfg = PredictorTrainConfig(rank=args.rank, ranks=ranks, threshold=args.threshold, epochs=args.epochs,
                                lr=args.lr, pos_weight=args.pos_weight, init=args.init, seed=args.seed)
    from flashnb.paths import SHIPPED_MODEL, data_dir, shipped_model_dir

    model = args.model or str(shipped_model_dir())
    out = args.out or str(data_dir() / f"{SHIPPED_MODEL}-predictors")
    cfg = BuildConfig(model=model, out=out, train_tokens=args.train_tokens,
                      eval_tokens=args.eval_tokens, threads=args.threads, train=tcfg)
    card = build(cfg, log=lambda m: print(m, file=sys.stderr))
    print(card_summary(card))
    print(f"wrote {out} (predictors.safetensors, metrics.json, heldout_slice.safetensors)")


def cmd_convert(args) -> None:
    from flashnb.store import ConvertConfig, convert, open_store

    dst = convert(args.hf_folder, args.store, ConvertConfig(layout=args.layout, dtype=args.dtype,
                                                           overwrite=args.force))
    s = open_store(dst)
    print(f"wrote {dst}: {s.layout} {s.dtype_name}, {s.num_layers} layers x {s.ffn_dim} neurons x "
          f"{s.neuron_bytes} bytes/neuron, ffn.bin {s.manifest['ffn_file']['bytes'] / 1e6:.1f} MB, "
          f"dram.safetensors {s.manifest['dram_file']['bytes'] / 1e6:.1f} MB")


def cmd_verify(args) -> None:
    from flashnb.store import verify

    r = verify(args.store)
    print(f"{r.store}: OK, {r.regions} checksums over {r.bytes_hashed / 1e6:.1f} MB in {r.seconds:.2f} s")


def cmd_profile(args) -> None:
    import json

    from flashnb.profile import Profile, ProfileConfig, default_profile_path, reader_efficiency, run_profile

    if args.use:
        prof = Profile.load(args.use)
    else:
        kw = {"dir": args.dir} if args.dir else {}
        if args.size:
            kw["size"] = args.size
        cfg = ProfileConfig.quick(**kw) if args.quick else ProfileConfig(**kw)
        prof = run_profile(cfg)
        out = prof.save(args.out or default_profile_path())
        print(f"wrote {out} ({prof.data['seconds_total']:.0f} s, "
              f"{'direct I/O' if prof.direct else 'buffered + fadvise fallback: O_DIRECT refused'})",
              file=sys.stderr)
    print(json.dumps(prof.summary(), indent=1))
    if args.reader_check:
        r = reader_efficiency(args.reader_check, prof, threads=args.threads, fraction=args.fraction)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, indent=1))


def _add_flash_commands(sub) -> None:
    """The store, reader and profile commands (issue 3)."""
    c = sub.add_parser("convert", help="convert a Hugging Face folder into a flash store",
                       description="Write a flash store: manifest.json, dram.safetensors (everything but the "
                                   "FFN matrices), ffn.bin (the FFN, 4 KiB-aligned regions per layer) and "
                                   "tokenizer.json. The source folder is only read.")
    c.add_argument("hf_folder", metavar="HF_FOLDER", help="folder with config.json and *.safetensors")
    c.add_argument("store", metavar="STORE", help="store folder to create")
    c.add_argument("--layout", choices=["bundled", "unbundled"], default="bundled",
                   help="bundled: each neuron's up row + down column contiguous; unbundled: one region "
                        "per matrix (default: %(default)s)")
    c.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16", help="store dtype (default: %(default)s)")
    c.add_argument("--force", action="store_true",
                   help="replace STORE if it is a flashnb store holding nothing but its own files (never "
                        "any other folder, and never the source or a folder holding it)")
    c.set_defaults(func=cmd_convert)

    v = sub.add_parser("verify", help="recompute every checksum of a flash store",
                       description="Validate STORE's manifest against its files and recompute the sha256 of "
                                   "every FFN region and of dram.safetensors.")
    v.add_argument("store", metavar="STORE", help="store folder")
    v.set_defaults(func=cmd_verify)

    pr = sub.add_parser("profile", help="measure this disk's read throughput by chunk size and queue depth",
                        description="Random direct-I/O reads of 4 KiB..4 MiB chunks with 1..64 requests in flight "
                                    "(native AIO where available, else threads) on a "
                                    "scratch file (created and removed), plus sequential reads; writes a JSON "
                                    "profile with a fitted throughput model. About 80 s; --quick about 10 s.")
    pr.add_argument("--dir", default=None, help="folder for the scratch file (default: the system temp folder)")
    pr.add_argument("--size", type=int, default=None, help="scratch file bytes (default: 1 GiB; --quick 256 MiB)")
    pr.add_argument("--quick", action="store_true", help="fewer cells, shorter: about 10 s")
    pr.add_argument("--out", default=None, help="profile JSON to write (default: ~/.cache/flashnb/profile.json)")
    pr.add_argument("--use", default=None, metavar="FILE", help="load this profile instead of measuring")
    pr.add_argument("--reader-check", default=None, metavar="STORE",
                    help="then read random neuron sets of STORE and print achieved / modeled throughput")
    _add_in_flight(pr, "for --reader-check")
    pr.add_argument("--fraction", type=float, default=0.1,
                    help="fraction of each layer's neurons per read for --reader-check (default: %(default)s)")
    pr.set_defaults(func=cmd_profile)


def _add_in_flight(parser: argparse.ArgumentParser, what: str = "") -> None:
    """--threads: reads kept in flight (flashnb.reader.IN_FLIGHT by default)."""
    from flashnb.reader import IN_FLIGHT

    parser.add_argument("--threads", type=int, default=IN_FLIGHT,
                        help=f"reads in flight{' ' + what if what else ''}: the AIO queue depth, or reader "
                             "threads where AIO is unavailable (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashnb", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="run the shipped model from flash at half memory and print the text",
                       description="Run the model flashnb ships (data/) with its FFN on disk: the flash engine "
                                   "at 50%% of the model's bytes in DRAM, low-rank predictors, a window of "
                                   "recent tokens and row-column bundles; prints the text and, per token, "
                                   "what was read and where the time went.")
    d.add_argument("--prompt", default=DEMO_PROMPT, help="prompt text (default: %(default)r)")
    d.add_argument("-n", type=int, default=32, help="new tokens (default: %(default)s)")
    d.add_argument("--memory", type=float, default=0.5,
                   help="DRAM budget for weights: fraction of the model's bytes, or bytes if > 1 (default: %(default)s)")
    d.add_argument("--window", type=int, default=4, help="window of recent tokens (default: %(default)s)")
    _add_in_flight(d)
    d.add_argument("--no-table", dest="table", action="store_false", help="do not print the per-token table")
    d.add_argument("--dense", action="store_true", help="run dense in DRAM instead (the reference)")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="every configuration side by side: naive ... all techniques, and peers",
                       description="Generate the same tokens with naive loading, hybrid, +predictor, "
                                   "+windowing, +bundling (all), mmap streaming and accelerate disk offload, in "
                                   "one process with direct I/O, the configurations taking turns one token each; "
                                   "print ms per token (I/O / memory / compute, mean and median), bytes per "
                                   "token, ratio vs naive and the cost model's prediction. Decoding uses "
                                   "FLASHNB_TORCH_THREADS torch threads (default 2).")
    b.add_argument("--model", default=None, help="HF model folder (default: the shipped model)")
    b.add_argument("--predictors", default=None, help="predictor folder (default: MODEL-predictors beside it)")
    b.add_argument("--prompt", default=DEMO_PROMPT, help="prompt text (default: %(default)r)")
    b.add_argument("--tokens", type=int, default=16, help="generated tokens per configuration (default: %(default)s)")
    b.add_argument("--window", type=int, default=4, help="window for +windowing and all (default: %(default)s)")
    b.add_argument("--memory", type=float, default=0.5, help="DRAM budget, fraction of the model (default: %(default)s)")
    _add_in_flight(b)
    b.add_argument("--configs", default=None, help="comma-separated subset of: naive,hybrid,predictor,windowing,"
                                                   "all,mmap,accelerate (default: all of them)")
    b.add_argument("--dir", default=None, help="folder for scratch stores (default: the system temp folder)")
    b.add_argument("--profile", default=None, help="device profile JSON (default: the saved one, else a quick one)")
    b.add_argument("--replay", action="store_true",
                   help="also replay the +predictor run's neuron sets on random FFN files of OPT 6.7B's shape "
                        "(two files of ~8.6 GB in --dir, created with a progress bar, removed afterwards)")
    b.add_argument("--keep-replay", action="store_true",
                   help="keep the replay files in --dir (folders replay-bundled-* and replay-unbundled-*) for the "
                        "next run; delete those folders to free the space")
    b.add_argument("--out", default=None, help="write the JSON result here")
    b.set_defaults(func=cmd_bench)

    g = sub.add_parser("generate", help="generate text from a Hugging Face model folder",
                       description="Generate text with a model folder (config.json, *.safetensors, "
                                   "tokenizer.json), dense in DRAM.")
    g.add_argument("--model", required=True, help="model folder")
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("-n", type=int, default=50, help="new tokens (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="reproduce the shipped model from the offline corpus",
                       description="Train the shipped OPT-style ReLU model on the docstring corpus "
                                   "(see flashnb.corpus); resumes from OUT/checkpoint if present.")
    t.add_argument("--out", default="flashnb-opt-21m", help="output folder (default: %(default)s)")
    t.add_argument("--tokens", type=int, default=3_200_000, help="training tokens (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    t.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    t.add_argument("--sparsity-target", type=float, default=0.94,
                   help="FFN sparsity the L1 weight is steered to (default: %(default)s)")
    t.set_defaults(func=cmd_train)

    tp = sub.add_parser("train-predictors", help="train the per-layer FFN activation predictors",
                        description="Trace the model on the corpus training split, train a low-rank "
                                    "predictor per layer (balanced BCE), evaluate on the held-out split "
                                    "(recall, over-selection, perplexity, top-1 agreement) and write "
                                    "OUT/predictors.safetensors + OUT/metrics.json. The defaults "
                                    "reproduce the shipped set.")
    tp.add_argument("--model", default=None, help="model folder (default: the shipped model, data/flashnb-opt-21m)")
    tp.add_argument("--out", default=None,
                    help="output folder (default: the shipped set, data/flashnb-opt-21m-predictors)")
    tp.add_argument("--train-tokens", type=int, default=65_536,
                    help="training-split tokens to trace (default: %(default)s)")
    tp.add_argument("--eval-tokens", type=int, default=16_384,
                    help="held-out tokens to evaluate on (default: %(default)s)")
    tp.add_argument("--rank", type=int, default=64, help="predictor rank of every layer (default: %(default)s)")
    tp.add_argument("--ranks", default=None, help="per-layer ranks, comma-separated (overrides --rank)")
    tp.add_argument("--threshold", type=float, default=0.5,
                    help="select a neuron when its probability exceeds this (default: %(default)s)")
    tp.add_argument("--epochs", type=int, default=4, help="passes over the trace (default: %(default)s)")
    tp.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)")
    tp.add_argument("--pos-weight", type=float, default=1.0,
                    help="weight of active neurons, times the negative/positive ratio (default: %(default)s)")
    tp.add_argument("--init", choices=["random", "pca"], default="random",
                    help="random, or the FFN's rank-r principal projection (default: %(default)s)")
    tp.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    tp.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    tp.set_defaults(func=cmd_train_predictors)
    _add_flash_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FlashnbError as e:
        print(f"flashnb: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flashnb: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
