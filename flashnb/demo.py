"""`flashnb demo`: the shipped model generating from flash at half its memory, token by token."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from flashnb.core.convert import ConvertConfig, convert
from flashnb.core.engine import FlashEngine, Policy
from flashnb.core.pinning import HotNeurons
from flashnb.core.predictor import load_predictors
from flashnb.core.simulate import choose_pinned
from flashnb.core.store import FlashStore
from flashnb.device.costmodel import steps_io_ms
from flashnb.device.profile import coalescing_gap, load_default_profile
from flashnb.lab.stats import TokenStats
from flashnb.models.tokenizer import Tokenizer
from flashnb.paths import temporary_folder


def per_token_table(steps, tok, out_ids) -> str:
    """One line per generated token: neurons predicted / already cached / read, bytes and times."""
    lines = [f"{'token':<14} {'predicted':>9} {'cached':>7} {'read':>6} {'KB read':>8} {'I/O ms':>7} "
             f"{'mem ms':>7} {'compute ms':>10}"]
    for s, tid in zip(steps, out_ids):
        text = repr(tok.decode([tid]))[:14]
        lines.append(f"{text:<14} {s.predicted:>9} {s.cached:>7} {s.loaded:>6} {s.bytes_read / 1e3:>8.1f} "
                     f"{s.io_seconds * 1e3:>7.2f} {s.mm_seconds * 1e3:>7.2f} {s.compute_seconds * 1e3:>10.2f}")
    return "\n".join(lines)


def generate_from_flash(folder: Path, prompt: str, n: int, memory: float | int, window: int, in_flight: int,
                        table: bool = True, predictors_dir: Path | None = None, pinned: int | str = 0) -> None:
    """Convert `folder` to a temporary bundled store and generate with the flash engine, printing the
    text on stdout and what each token read and cost on stderr. `pinned`: hot-neuron rows per layer,
    or "auto" (`flashnb.core.simulate.choose_pinned` with the cost model on the saved device profile)."""
    folder = Path(folder)
    tok = Tokenizer.from_folder(folder)
    pred_dir = Path(predictors_dir or folder.parent / f"{folder.name}-predictors")
    predictors = load_predictors(pred_dir)
    profile = load_default_profile()
    policy = Policy(window, memory, in_flight, coalescing_gap(profile, in_flight))
    hot = HotNeurons.load(pred_dir) if pinned else None
    with temporary_folder("flashnb-demo-") as work:
        store = FlashStore.open(convert(folder, work / "store", ConvertConfig(layout="bundled", progress=False)))
        if pinned == "auto":
            pinned = choose_pinned(hot, store, policy, predictors.memory_bytes(store.np_dtype.itemsize),
                                   io_ms=lambda steps: steps_io_ms(profile, steps, in_flight)).chosen
        with FlashEngine(store, predictors, replace(policy, pinned=pinned), hot=hot) as eng:
            mem = eng.memory
            print(f"flashnb: {folder.name} from flash: FFN on disk ({eng.reader.io_mode}), "
                  f"{mem.used_bytes / 2**20:.1f} MiB of weights in DRAM = {mem.used_bytes / mem.model_bytes:.0%} of "
                  f"{mem.model_bytes / 2**20:.1f} MiB (budget {memory:g}); low-rank predictors, window {window} "
                  f"({mem.capacity_rows} rows per layer), {mem.pinned_rows} hot neurons pinned per layer, "
                  "row-column bundles\n", file=sys.stderr)
            ids = tok.encode(prompt)
            out = list(eng.generate(ids, n, eos_id=eng.model.config.eos_token_id))
            print(prompt + tok.decode(out))
            steps = eng.steps[len(ids):]
            if table:
                print(per_token_table(steps, tok, out), file=sys.stderr)
            if steps:
                s = TokenStats.of(steps, eng.store.num_layers * eng.store.ffn_dim)
                print(f"\nper generated token (mean of {s.tokens}, measured): {s.bytes_read / 1e6:.3f} MB read in "
                      f"{s.requests:.0f} requests, I/O {s.io_ms:.2f} ms, memory management {s.mm_ms:.2f} ms, "
                      f"compute {s.compute_ms:.2f} ms, total {s.total_ms:.2f} ms (median {s.median_ms:.2f}); the whole "
                      f"FFN would be {mem.model_bytes / 1e6 - mem.resident_bytes / 1e6:.2f} MB", file=sys.stderr)
