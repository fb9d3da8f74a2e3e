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
