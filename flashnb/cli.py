"""The `flashnb` command line: one sub-command per job; `flashnb COMMAND --help` for each.

Bad input ends with one line `flashnb: error: ...` (exit status 2), never a traceback. Options are
range-checked here, before any work; the heavy modules (torch) are imported only by the commands.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from flashnb.cli_args import (Parser, add_in_flight, add_memory, byte_count, out_file, pinned_rows, policy_name, real,
                              utf8_text, whole)
from flashnb.cli_train import add_training_commands
from flashnb.core.defaults import DEMO_PROMPT, IN_FLIGHT, MEMORY_BUDGET, WINDOW
from flashnb.errors import FlashnbError


# ----------------------------------------------------------------------------------------------
# Commands


def _decode_threads() -> None:
    from flashnb.core.generate import set_decode_threads

    set_decode_threads()


def _generate_dense(folder, prompt: str, n: int, temperature: float, top_p: float, seed: int) -> None:
    from flashnb.core.generate import SamplingConfig
    from flashnb.demo import generate_dense

    generate_dense(folder, prompt, n, SamplingConfig(temperature, top_p, seed))


def _given(args, *names: str) -> list[str]:
    """The options among `names` that the command line set (None or False: not given), as --option."""
    return [f"--{o.replace('_', '-')}" for o in names if getattr(args, o) is not None and getattr(args, o) is not False]


def _engine_settings(args) -> dict:
    """--memory, --window, --in-flight and --pinned, each its default where not given."""
    return dict(memory=MEMORY_BUDGET if args.memory is None else args.memory,
                window=WINDOW if args.window is None else args.window,
                in_flight=IN_FLIGHT if args.in_flight is None else args.in_flight, pinned=args.pinned or 0)


def cmd_generate(args) -> None:
    sampling_only = _given(args, "top_p", "seed")
    if args.temperature == 0 and sampling_only:
        raise FlashnbError(f"{', '.join(sampling_only)}: only for sampling, and --temperature 0 (the default) is "
                           "greedy: give --temperature above 0 (e.g. 0.8)")
    args.top_p, args.seed = 1.0 if args.top_p is None else args.top_p, 0 if args.seed is None else args.seed
    _decode_threads()
    if args.model is not None:
        flash_only = _given(args, "predictors", "policy", "window", "memory", "in_flight", "pinned", "stats",
                            "two_stage")
        if flash_only:
            raise FlashnbError(f"{', '.join(flash_only)}: only for the flash engine, which runs a store: use "
                               "--store STORE (`flashnb convert` writes one) instead of --model")
        _generate_dense(args.model, args.prompt, args.n, args.temperature, args.top_p, args.seed)
        return
    _generate_from_store(args)


def _generate_from_store(args) -> None:
    from flashnb.core.generate import SamplingConfig
    from flashnb.demo import generate_from_store

    generate_from_store(args.store, args.prompt, args.n, policy=args.policy or "predictors",
                        predictors=args.predictors, **_engine_settings(args), stats=args.stats or "table",
                        sampling=SamplingConfig(args.temperature, args.top_p, args.seed), two_stage=bool(args.two_stage))


def cmd_demo(args) -> None:
    from pathlib import Path

    from flashnb.paths import data_dir, shipped_model_dir

    folder = Path(args.model) if args.model else shipped_model_dir()   # main() resolved a shipped model's name
    if args.model and not folder.is_dir():
        raise FlashnbError(f"--model {args.model}: no such folder, nor the name of a model in {data_dir()}; pass a "
                           "Hugging Face model folder (config.json, *.safetensors, tokenizer.json)")
    flash_only = _given(args, "memory", "window", "pinned", "in_flight", "predictors", "gate_in_dram", "two_stage")
    if args.dense and flash_only:
        raise FlashnbError(f"{', '.join(flash_only)}: only for the flash engine; --dense runs the whole model in DRAM "
                           "(drop them, or drop --dense)")
    _decode_threads()
    if args.dense:
        print(f"flashnb demo: {'the shipped model ' if not args.model else ''}{folder.name}, dense in DRAM\n",
              file=sys.stderr)
        _generate_dense(folder, args.prompt, args.n, 0.0, 1.0, 0)
        return
    from flashnb.demo import generate_from_flash

    generate_from_flash(folder, args.prompt, args.n, **_engine_settings(args), table=args.table,
                        predictors_dir=args.predictors, gate_in_dram=args.gate_in_dram, two_stage=args.two_stage)


def cmd_bench(args) -> None:
    import json
    from pathlib import Path

    from flashnb.bench.report import format_table
    from flashnb.bench.run import CONFIGS, BenchConfig, run_bench

    from flashnb.bench import scale

    _decode_threads()
    if args.keep and not args.scale:
        raise FlashnbError("--keep keeps the --scale stores: it goes with --scale (--keep-replay keeps the replay's)")
    if args.keep_replay and not args.replay:
        raise FlashnbError("--keep-replay keeps the replay's files: it goes with --replay (--keep keeps the --scale "
                           "stores)")
    if sum(map(bool, (args.scale, args.sweep_sizes, args.replay))) > 1:
        raise FlashnbError("--scale, --sweep-sizes and --replay are three different runs: choose one")
    default = scale.SCALE_CONFIGS if args.scale else CONFIGS
    configs = default if args.configs is None else tuple(c.strip() for c in args.configs.split(",") if c.strip())
    if not configs:
        raise FlashnbError("--configs names no configuration: give a comma-separated list such as all,naive,mmap "
                           "(`flashnb bench --help` lists them), or leave it out to run them all")
    cfg = BenchConfig(model=args.model, predictors=args.predictors, prompt=args.prompt, tokens=args.tokens,
                      window=args.window, memory=args.memory, in_flight=args.in_flight, dir=args.dir,
                      configs=configs, profile=args.profile, replay=args.replay, keep_replay=args.keep_replay,
                      scale=args.scale, keep=args.keep)
    if args.sweep_sizes:
        points, runs = scale.run_sweep(cfg, log=lambda m: print(m, file=sys.stderr))
        print(scale.format_sweep(points))
        print(scale.pays_text(points))
        out = {"sweep": [vars(p) for p in points], "runs": {k: r.to_json() for k, r in runs.items()}}
    else:
        result = scale.run_scale(cfg, log=lambda m: print(m, file=sys.stderr)) if args.scale else run_bench(cfg)
        print(format_table(result))
        out = result.to_json()
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)


def cmd_convert(args) -> None:
    from flashnb.core.convert import ConvertConfig, convert
    from flashnb.core.placement import load_placement
    from flashnb.core.store import open_store

    placement = load_placement(args.placement) if args.placement else None
    dst = convert(args.hf_folder, args.store, ConvertConfig(layout=args.layout, dtype=args.dtype,
                                                           overwrite=args.force, placement=placement))
    s = open_store(dst)
    print(f"wrote {dst}: {s.layout} {s.row_format.name}{', co-activation placement' if placement else ''}, "
          f"{s.num_layers} layers x {s.ffn_dim} neurons x "
          f"{s.neuron_bytes} bytes/neuron, ffn.bin {s.manifest['ffn_file']['bytes'] / 1e6:.1f} MB, "
          f"dram.safetensors {s.manifest['dram_file']['bytes'] / 1e6:.1f} MB")
    if not s.manifest.get("tokenizer"):
        print(f"note: {args.hf_folder} has no tokenizer.json, so neither has the store: `flashnb generate --store` "
              f"needs one; copy the model's tokenizer.json into {dst} (or into {args.hf_folder}, then convert "
              "again)", file=sys.stderr)


def cmd_verify(args) -> None:
    from flashnb.core.verify import verify

    r = verify(args.store)
    print(f"{r.store}: OK, {r.regions} checksums over {r.bytes_hashed / 1e6:.1f} MB in {r.seconds:.2f} s")


def cmd_profile(args) -> None:
    import json

    from flashnb.device.measure import ProfileConfig, run_profile
    from flashnb.device.profile import Profile, default_profile_path

    if args.fraction is not None and not args.reader_check:
        raise FlashnbError("--fraction sets the neurons --reader-check reads: it goes with --reader-check STORE")
    if args.use and (args.out or args.dir or args.size or args.quick):
        raise FlashnbError("--use loads a saved profile and measures nothing: --out, --dir, --size and --quick "
                           "go with a measurement (drop them, or drop --use)")
    if args.reader_check:  # a wrong store is said now, not after the measurement replaced the saved profile
        from flashnb.core.store import open_store

        open_store(args.reader_check)
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
        from flashnb.lab.flash import reader_efficiency

        r = reader_efficiency(args.reader_check, prof, in_flight=args.in_flight,
                              fraction=0.1 if args.fraction is None else args.fraction)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.to_json().items()}, indent=1))


# ----------------------------------------------------------------------------------------------
# The parser


def _add_flash_commands(sub) -> None:
    c = sub.add_parser("convert", help="convert a Hugging Face folder into a flash store",
                       description="Write a flash store: manifest.json, dram.safetensors (everything but the "
                                   "FFN matrices), ffn.bin (the FFN, 4 KiB-aligned regions per layer), ffn.sum (a "
                                   "checksum per bundle), placement.bin (with --placement) and tokenizer.json. The "
                                   "source folder is only read.")
    c.add_argument("hf_folder", metavar="HF_FOLDER", help="folder with config.json and *.safetensors")
    c.add_argument("store", metavar="STORE", help="store folder to create")
    c.add_argument("--layout", choices=["bundled", "unbundled", "gate-apart"], default="bundled",
                   help="bundled: each neuron's up row + down column contiguous; unbundled: one region "
                        "per matrix; gate-apart (SwiGLU models run with thresholds): the gate matrices in DRAM, "
                        "each neuron's up row + down column contiguous (default: %(default)s)")
    c.add_argument("--dtype", choices=["fp16", "fp32", "int8", "q4"], default="fp16",
                   help="fp16 or fp32: every tensor; int8 or q4: the FFN rows quantized in groups of 32 values with an "
                        "fp16 scale each, inside the bundle (8.5 or 4.5 bits a value, as llama.cpp's Q8_0 and Q4_0), "
                        "the DRAM tensors fp16 (default: %(default)s)")
    c.add_argument("--placement", default=None, metavar="FOLDER",
                   help="order each layer's neurons on flash by co-activation, as learned by `flashnb train-predictors "
                        "--placement-only` (FOLDER holds placement.safetensors; e.g. data/flashnb-opt-21m-predictors); "
                        "default: neuron i at row i")
    c.add_argument("--force", action="store_true",
                   help="replace STORE if it is a flashnb store holding nothing but its own files (never "
                        "any other folder, and never the source or a folder holding it)")
    c.set_defaults(func=cmd_convert)

    v = sub.add_parser("verify", help="recompute every checksum of a flash store",
                       description="Validate STORE's manifest against its files and recompute the sha256 of "
                                   "every FFN region and of dram.safetensors.")
    v.add_argument("store", metavar="STORE", help="store folder")
    v.set_defaults(func=cmd_verify)

    pr = sub.add_parser("profile", help="measure this disk's read throughput by chunk size and reads in flight",
                        description="Random direct-I/O reads of 4 KiB..4 MiB chunks with 1..64 reads in flight "
                                    "(native AIO where available, else threads) on a scratch file (created and "
                                    "removed), plus sequential reads; writes a JSON profile with a fitted "
                                    "throughput model. About 80 s; --quick about 10 s.")
    pr.add_argument("--dir", default=None, help="folder for the scratch file (default: the system temp folder)")
    pr.add_argument("--size", type=byte_count(1 << 20, 1 << 40), default=None,
                    help="scratch file size: bytes, or with a unit such as 512MiB or 2GB (default: 1 GiB; --quick "
                         "256 MiB)")
    pr.add_argument("--quick", action="store_true", help="fewer cells, shorter: about 10 s")
    pr.add_argument("--out", type=out_file, default=None,
                    help="profile JSON to write (default: ~/.cache/flashnb/profile.json)")
    pr.add_argument("--use", default=None, metavar="FILE", help="load this profile instead of measuring")
    pr.add_argument("--reader-check", default=None, metavar="STORE",
                    help="then read random neuron sets of STORE and print achieved / modeled throughput")
    add_in_flight(pr, "for --reader-check")
    pr.add_argument("--fraction", type=real(0, 1, lo_open=True, what="a fraction"), default=None,
                    help="fraction of each layer's neurons per read for --reader-check (default: 0.1)")
    pr.set_defaults(func=cmd_profile)


def _add_run_commands(sub) -> None:
    d = sub.add_parser("demo", help="run the shipped model from flash at half memory and print the text",
                       description="Run the model flashnb ships (data/) with its FFN on disk: the flash engine "
                                   "at half of the model's bytes in DRAM, low-rank predictors, a window of "
                                   "recent tokens and row-column bundles; prints the text and, per token, "
                                   "what was read and where the time went.")
    d.add_argument("--model", default=None,
                   help="a Hugging Face model folder to run instead of the shipped model, or a shipped model's name: "
                        "flashnb-llama-11m is the SwiGLU model flashnb ships (its predictors, or with --gate-in-dram "
                        "its gate thresholds)")
    d.add_argument("--predictors", default=None,
                   help="its predictors folder: low-rank predictors, or a SwiGLU model's thresholds (default: "
                        "MODEL-predictors beside it)")
    d.add_argument("--gate-in-dram", action="store_true",
                   help="a SwiGLU model: keep its gate matrices in DRAM and let them decide with the gate thresholds "
                        "of its predictors folder, instead of low-rank predictors (needs more memory: 0.6 for "
                        "data/flashnb-llama-11m)")
    d.add_argument("--two-stage", action="store_true",
                   help="a SwiGLU model, gate in DRAM: its gate picks candidates, their up | down rows are read and "
                        "|SiLU(gate) * up| keeps those above the product thresholds (the folder's two-stage/, from "
                        "`flashnb train-predictors --two-stage-only`; needs about 0.6 of the model as --gate-in-dram)")
    d.add_argument("--prompt", type=utf8_text, default=DEMO_PROMPT, help="prompt text (default: %(default)r)")
    d.add_argument("-n", type=whole(1, 4096), default=32, help="new tokens (default: %(default)s)")
    add_memory(d, unset=True)
    d.add_argument("--window", type=whole(0, 4096), default=None, help=f"window of recent tokens (default: {WINDOW})")
    d.add_argument("--pinned", type=pinned_rows, default=None,
                   help="rows per layer that keep the hot neurons in DRAM for the whole run, out of the same budget, "
                        "or 'auto': the split that simulates fastest on the predictors' calibration sets "
                        "(default: 0)")
    add_in_flight(d, unset=True)
    d.add_argument("--no-table", dest="table", action="store_false", help="do not print the per-token table")
    d.add_argument("--dense", action="store_true", help="run dense in DRAM instead (the reference)")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="every configuration side by side: naive ... all techniques, and peers",
                       description="Generate the same tokens with naive loading, hybrid, +predictor, "
                                   "+windowing, +bundling (all), all with hot neurons pinned, all with lookahead "
                                   "predictors, all's reads alone (the disk and the kernel, nothing computed), mmap "
                                   "streaming, accelerate disk offload, the dense model in DRAM and the floor (the "
                                   "FFN in DRAM, nothing read), in one process with direct I/O, "
                                   "the configurations taking turns one token each; print ms per token (I/O / "
                                   "memory / compute, mean, median and spread), bytes per token, ratio vs naive, "
                                   "the cost model's I/O for the same requests and the ratio to the floor. "
                                   "Decoding uses FLASHNB_TORCH_THREADS torch threads (default: 2 when 2 cores "
                                   "are idle, else 1).")
    b.add_argument("--model", default=None, help="HF model folder (default: the shipped model)")
    b.add_argument("--predictors", default=None, help="predictor folder (default: MODEL-predictors beside it)")
    b.add_argument("--prompt", type=utf8_text, default=DEMO_PROMPT, help="prompt text (default: %(default)r)")
    b.add_argument("--tokens", type=whole(1, 4096), default=16,
                   help="generated tokens per configuration (default: %(default)s)")
    b.add_argument("--window", type=whole(0, 4096), default=WINDOW,
                   help="window for +windowing and all (default: %(default)s)")
    add_memory(b)
    add_in_flight(b)
    b.add_argument("--configs", default=None, help="comma-separated subset of: naive,hybrid,predictor,windowing,"
                                                   "all,pinned,lookahead,reads,mmap,accelerate,dense,floor (default: all of "
                                                   "them); only when named: placed (all on a store in the co-activation "
                                                   "order of the predictors folder's placement.safetensors), int8 and "
                                                   "q4 (all on a store of quantized bundles, in the fp16 model's budget), "
                                                   "int8-placed and q4-placed (both), bare (all with its bookkeeping "
                                                   "done before each token's clock: what all would take if its "
                                                   "bookkeeping were free); with --scale: naive, naive_model "
                                                   "(the paper's naive: the whole model read per token), predictor, "
                                                   "windowing, all and mmap (default: all of them), and the same "
                                                   "opt-in ones but bare")
    b.add_argument("--dir", default=None, help="folder for scratch stores (default: the system temp folder)")
    b.add_argument("--profile", default=None, help="device profile JSON (default: the saved one, else a quick one)")
    b.add_argument("--replay", action="store_true",
                   help="also replay the +predictor run's neuron sets on random FFN files of OPT 6.7B's shape "
                        "(two files of ~8.6 GB in --dir, created with a progress bar, removed afterwards)")
    b.add_argument("--keep-replay", action="store_true",
                   help="keep the replay files in --dir (folders replay-bundled-* and replay-unbundled-*) for the "
                        "next run; delete those folders to free the space")
    b.add_argument("--scale", default=None, metavar="NAME",
                   help="run the engine at an OPT shape instead (125m, 1.3b, 2.7b, 6.7b, 13b, or d_model,ffn,layers) "
                        "on deterministic random weights, with the shipped model's neuron sets widened onto it: "
                        "writes both layouts in --dir (6.7b: about 22 GB) and deletes them afterwards unless --keep")
    b.add_argument("--sweep-sizes", action="store_true",
                   help="naive, all and mmap at the shipped model and at the 125m, 1.3b, 2.7b and 6.7b shapes, one "
                        "run each: where flash loading starts to pay on this machine")
    b.add_argument("--keep", action="store_true", help="keep the --scale stores in --dir for the next run")
    b.add_argument("--out", type=out_file, default=None, help="write the JSON result here (a file)")
    b.set_defaults(func=cmd_bench)

    g = sub.add_parser("generate", help="generate text: dense from a model folder, or from flash with a store",
                       description="Generate text. --model FOLDER (config.json, *.safetensors, tokenizer.json): "
                                   "the dense model in DRAM. --store STORE (written by `flashnb convert`): the flash "
                                   "engine, FFN on disk under a memory budget, printing per token what was read and "
                                   "where the time went, as the demo does. The continuation is printed in bold on a "
                                   "terminal (NO_COLOR turns that off).")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", default=None, help="model folder: run it dense in DRAM")
    src.add_argument("--store", default=None, help="flash store: run it with the flash engine")
    g.add_argument("--prompt", type=utf8_text, required=True, help="prompt text")
    g.add_argument("-n", type=whole(1, 1 << 20), default=50, help="new tokens (default: %(default)s)")
    g.add_argument("--temperature", type=real(0, 100, what="a temperature"), default=0.0,
                   help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=real(0, 1, lo_open=True, what="a probability mass"), default=None,
                   help="nucleus sampling mass, with --temperature above 0 (default: 1.0)")
    g.add_argument("--seed", type=whole(0, 2**63 - 1), default=None,
                   help="sampling seed, with --temperature above 0 (default: 0)")
    f = g.add_argument_group("with --store")
    f.add_argument("--policy", type=policy_name, choices=["predictors", "oracle", "every"], default=None,
                   help="which neurons each token reads: the low-rank predictors, the exact active set (oracle: a "
                        "reference that holds the whole FFN to predict) or every neuron (naive; bench's \"all\" is "
                        "every technique instead) (default: predictors)")
    f.add_argument("--predictors", default=None,
                   help="predictor folder (default: SOURCE-predictors beside the model folder STORE was converted "
                        "from, when it holds this model's predictors; else the shipped predictors, when STORE "
                        "holds the shipped model)")
    f.add_argument("--window", type=whole(0, 4096), default=None, help=f"window of recent tokens (default: {WINDOW})")
    add_memory(f, unset=True)
    add_in_flight(f, unset=True)
    f.add_argument("--pinned", type=pinned_rows, default=None,
                   help="rows per layer that keep the hot neurons in DRAM, or 'auto' (default: 0)")
    f.add_argument("--stats", choices=["table", "summary", "json"], default=None,
                   help="table: per-token records and means on stderr; summary: the means only; json: one JSON "
                        "object on stdout (text, per-token records, and per_token: the means, median and "
                        "spread) (default: table)")
    f.add_argument("--two-stage", action="store_true", default=None,
                   help="a SwiGLU model on a gate-apart store: the gate in DRAM picks candidates, whose up | down are "
                        "read, and |SiLU(gate) * up| keeps those above the product thresholds (the predictors "
                        "folder's two-stage/, from `flashnb train-predictors --two-stage-only`)")
    g.set_defaults(func=cmd_generate)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flashnb")
    except PackageNotFoundError:
        return "(not installed: run from a checkout)"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="flashnb", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"flashnb {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    _add_run_commands(sub)
    add_training_commands(sub)
    _add_flash_commands(sub)
    return p


def _terminate(signum, frame):
    """SIGTERM: remove the temporary stores and end at once (unwinding by an exception could land in a
    finalizer, which swallows it)."""
    from flashnb.paths import remove_temporary_folders

    remove_temporary_folders()
    sys.stderr.flush()
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or an option refused with one line
        return int(e.code or 0)
    from flashnb.paths import shipped_folder

    for folder in ("model", "hf_folder", "predictors", "placement"):   # a shipped model's (or its predictors')
        if getattr(args, folder, None):                                # name works in every command, from anywhere
            setattr(args, folder, str(shipped_folder(getattr(args, folder))))
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        args.func(args)
    except FlashnbError as e:
        print(f"flashnb: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flashnb: interrupted", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
