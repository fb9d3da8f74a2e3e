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


def cmd_generate(args) -> None:
    _generate_dense(args.model, args.prompt, args.n, args.temperature, args.top_p, args.seed)


def cmd_demo(args) -> None:
    from flashnb.paths import shipped_model_dir

    folder = shipped_model_dir()
    print(f"flashnb demo: the shipped model {folder.name}, dense in DRAM\n", file=sys.stderr)
    _generate_dense(str(folder), args.prompt, args.n, 0.0, 1.0, 0)


def cmd_train(args) -> None:
    from flashnb.train import TrainConfig, train

    cfg = TrainConfig(out=args.out, tokens=args.tokens, seed=args.seed, threads=args.threads,
                      sparsity_target=args.sparsity_target)
    card = train(cfg)
    h = card["heldout"]
    print(f"wrote {args.out}: held-out perplexity {h['perplexity']:.1f}, "
          f"FFN sparsity {h['sparsity_mean']:.1%} (training_card.json has the rest)")


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
    c.add_argument("--force", action="store_true", help="replace STORE if it exists")
    c.set_defaults(func=cmd_convert)

    v = sub.add_parser("verify", help="recompute every checksum of a flash store",
                       description="Validate STORE's manifest against its files and recompute the sha256 of "
                                   "every FFN region and of dram.safetensors.")
    v.add_argument("store", metavar="STORE", help="store folder")
    v.set_defaults(func=cmd_verify)

    pr = sub.add_parser("profile", help="measure this disk's read throughput by chunk size and threads",
                        description="Random direct-I/O reads of 4 KiB..4 MiB chunks with 1..32 threads on a "
                                    "scratch file (created and removed), plus sequential reads; writes a JSON "
                                    "profile with a fitted throughput model. About 70 s; --quick about 10 s.")
    pr.add_argument("--dir", default=None, help="folder for the scratch file (default: the system temp folder)")
    pr.add_argument("--size", type=int, default=None, help="scratch file bytes (default: 1 GiB; --quick 256 MiB)")
    pr.add_argument("--quick", action="store_true", help="fewer cells, shorter: about 10 s")
    pr.add_argument("--out", default=None, help="profile JSON to write (default: ~/.cache/flashnb/profile.json)")
    pr.add_argument("--use", default=None, metavar="FILE", help="load this profile instead of measuring")
    pr.add_argument("--reader-check", default=None, metavar="STORE",
                    help="then read random neuron sets of STORE and print achieved / modeled throughput")
    pr.add_argument("--threads", type=int, default=8, help="reader threads for --reader-check (default: %(default)s)")
    pr.add_argument("--fraction", type=float, default=0.1,
                    help="fraction of each layer's neurons per read for --reader-check (default: %(default)s)")
    pr.set_defaults(func=cmd_profile)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashnb", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="run the shipped model and print the text",
                       description="Run the model flashnb ships (data/) on a prompt and print the text.")
    d.add_argument("--prompt", default=DEMO_PROMPT, help="prompt text (default: %(default)r)")
    d.add_argument("-n", type=int, default=40, help="new tokens (default: %(default)s)")
    d.set_defaults(func=cmd_demo)

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
