"""Lesson 01, flash characteristics: the reader measured against the device profile, and bundled
against unbundled reads of the same neurons on real stores.

Everything here is *measured* with direct I/O; predictions from a profile are *modeled*.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flashnb.core.convert import ConvertConfig, convert
from flashnb.core.defaults import IN_FLIGHT
from flashnb.core.io import aligned_empty
from flashnb.core.reader import NeuronReader, ReaderConfig
from flashnb.core.store import FlashStore
from flashnb.device.measure import measure_cell
from flashnb.device.profile import Profile, coalescing_gap
from flashnb.errors import FlashnbError
from flashnb.models.opt import OPTConfig


# ----------------------------------------------------------------------------------------------
# Reader efficiency: achieved vs modeled on a real store


@dataclass(frozen=True)
class ReaderEfficiency:
    """The reader's achieved throughput against a profile's prediction for the same requests."""

    store: str
    layout: str
    neuron_bytes: int
    fraction: float
    calls: int
    in_flight: int
    requests: int
    bytes_read: int
    bytes_needed: int
    wall_seconds: float
    predicted_seconds: float              # the same-time profile's prediction (modeled)
    predicted_seconds_saved: float | None  # the given profile's prediction
    same_time_bps: dict[int, float]       # the same-time profile: bytes/s by request size (measured)
    direct: bool
    gap_bytes: int
    path: str

    @property
    def achieved_GBps(self) -> float:
        return self.bytes_read / self.wall_seconds / 1e9

    @property
    def efficiency(self) -> float:
        """Predicted seconds / wall seconds against the same-time profile (1 = as fast as the disk allows)."""
        return self.predicted_seconds / self.wall_seconds

    @property
    def efficiency_saved(self) -> float | None:
        return None if self.predicted_seconds_saved is None else self.predicted_seconds_saved / self.wall_seconds

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["same_time_bps"] = {str(k): v for k, v in self.same_time_bps.items()}
        return {**d, "achieved_GBps": self.achieved_GBps, "efficiency": self.efficiency,
                "efficiency_saved": self.efficiency_saved}


def reader_efficiency(store_path: str | Path, profile: Profile | None = None, in_flight: int = IN_FLIGHT,
                      fraction: float = 0.1, rounds: int = 6, calls_per_round: int = 3, cell_seconds: float = 0.2,
                      seed: int = 0, gap_bytes: int | None = None) -> ReaderEfficiency:
    """The reader's achieved throughput over the throughput a profile predicts for the same requests.

    Each reader call reads a random, sorted `fraction` of one layer's neurons (what the engine sends).
    Efficiency = predicted seconds / wall seconds, summed over all calls, where predicted seconds =
    `Profile.read_seconds(the calls' request sizes, in_flight)`.

    Two predictions are reported, because a shared or virtual disk drifts by tens of percent within
    minutes: `efficiency_saved` against `profile` (if given: measured earlier, elsewhere on the disk),
    and `efficiency` against a *same-time* profile measured here: profile cells (random direct reads of
    the power-of-two sizes spanning the reader's request sizes, with `in_flight` reads in flight, on the store's own
    ffn.bin) interleaved with the reader calls, round by round, so drift hits both alike.
    """
    store = FlashStore.open(store_path)
    rng = np.random.default_rng(seed)
    k = max(1, int(round(fraction * store.ffn_dim)))
    out = aligned_empty((k, store.row_width), store.row_dtype)
    wall = pred_saved = 0.0
    nbytes = needed = reqs = 0
    sizes: list[np.ndarray] = []
    cells: list[dict] = []
    fsize = store.ffn_path.stat().st_size
    with NeuronReader(store, ReaderConfig(in_flight=in_flight, gap_bytes=gap_bytes if gap_bytes is not None else coalescing_gap(profile, in_flight))) as r:
        st = r.read(0, np.sort(rng.choice(store.ffn_dim, k, replace=False)), out).stats  # warm-up
        lo = 1 << int(np.floor(np.log2(max(4096, st.chunk_sizes.min()))))
        hi = 1 << int(np.ceil(np.log2(max(lo, st.chunk_sizes.max()))))
        grid = [lo << i for i in range(int(np.log2(hi // lo)) + 1)][:8]
        if 4 * grid[0] > fsize:
            raise FlashnbError(f"{store.ffn_path} ({fsize} bytes) is too small for a same-time profile of its "
                               f"{grid[0]}-byte reads (a cell reads a file of 4x its size): check the reader on a "
                               "larger store")
        for rnd in range(rounds):
            for c in grid:  # same-time profile cells, on the same file
                if 4 * c <= fsize:
                    cells.append(measure_cell(r.fd, r.direct, fsize, c, in_flight, cell_seconds, rng,
                                              use_aio=r.backend == "aio"))
            for j in range(calls_per_round):
                ids = np.sort(rng.choice(store.ffn_dim, k, replace=False))
                st = r.read((rnd * calls_per_round + j) % store.num_layers, ids, out).stats
                wall += st.wall_seconds
                if profile is not None:
                    pred_saved += profile.read_seconds(st.chunk_sizes, in_flight)
                sizes.append(st.chunk_sizes)
                nbytes += st.bytes_read
                needed += st.bytes_needed
                reqs += st.requests
        info = {"direct": r.direct, "gap_bytes": r.gap_bytes, "path": st.path}
    merged: dict[int, dict] = {}
    for c in cells:  # pool the rounds per chunk size: bytes and seconds add up
        m = merged.setdefault(c["chunk_bytes"], {**c, "reads": 0, "bytes": 0, "seconds": 0.0})
        m["reads"] += c["reads"]
        m["bytes"] += c["bytes"]
        m["seconds"] += c["seconds"]
    for m in merged.values():
        m["throughput_bytes_per_s"] = m["bytes"] / m["seconds"]
    same_time = Profile({"random": list(merged.values()), "sequential": []})
    pred = sum(same_time.read_seconds(s, in_flight) for s in sizes)
    return ReaderEfficiency(str(store.path), store.layout, store.neuron_bytes, fraction, rounds * calls_per_round,
                            in_flight, reqs, nbytes, needed, wall, pred, pred_saved if profile is not None else None,
                            {c: m["throughput_bytes_per_s"] for c, m in sorted(merged.items())}, **info)


# ----------------------------------------------------------------------------------------------
# Bundled vs unbundled, measured on real stores


def random_opt_checkpoint(folder: str | Path, d_model: int = 2048, ffn_dim: int = 8192, layers: int = 2,
                          vocab: int = 512, seed: int = 0) -> Path:
    """Write an OPT-shaped Hugging Face folder of random fp16 weights (for I/O experiments only:
    the values are noise, the byte layout is a real OPT's)."""
    from safetensors.numpy import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    cfg = OPTConfig(vocab_size=vocab, hidden_size=d_model, ffn_dim=ffn_dim, num_hidden_layers=layers,
                    num_attention_heads=max(1, d_model // 64), max_position_embeddings=64)
    rng = np.random.default_rng(seed)

    def rnd(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    d = d_model
    t = {"model.decoder.embed_tokens.weight": rnd(vocab, d), "model.decoder.embed_positions.weight": rnd(66, d),
         "model.decoder.final_layer_norm.weight": np.ones(d, np.float16),
         "model.decoder.final_layer_norm.bias": np.zeros(d, np.float16)}
    for i in range(layers):
        p = f"model.decoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[p + f"self_attn.{n}.weight"], t[p + f"self_attn.{n}.bias"] = rnd(d, d), rnd(d)
        for n in ("self_attn_layer_norm", "final_layer_norm"):
            t[p + n + ".weight"], t[p + n + ".bias"] = np.ones(d, np.float16), np.zeros(d, np.float16)
        t[p + "fc1.weight"], t[p + "fc1.bias"] = rnd(ffn_dim, d), rnd(ffn_dim)
        t[p + "fc2.weight"], t[p + "fc2.bias"] = rnd(d, ffn_dim), rnd(d)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = cfg.to_hf()
    hf["torch_dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return out


@dataclass(frozen=True)
class LayoutRun:
    """One layout's reads of the same random neuron sets (measured; predicted_seconds modeled)."""

    layout: str
    calls: int
    neurons_per_call: int
    in_flight: int
    neuron_bytes: int
    requests: int
    bytes_needed: int
    bytes_read: int
    predicted_seconds: float  # the profile's prediction for the same requests (0 without a profile)
    direct: bool              # O_DIRECT (False: the buffered + fadvise fallback)
    call_seconds: tuple[float, ...]  # each call's wall time

    @property
    def wall_seconds(self) -> float:
        """Every call's wall time, summed."""
        return float(sum(self.call_seconds))

    @property
    def useful_GBps(self) -> float:
        """Bytes needed per second (1e9 bytes/s)."""
        return self.bytes_needed / self.wall_seconds / 1e9

    @property
    def read_GBps(self) -> float:
        return self.bytes_read / self.wall_seconds / 1e9

    @property
    def ms_per_call(self) -> float:
        return self.wall_seconds / self.calls * 1e3

    @property
    def call_useful_GBps(self) -> list[float]:
        """Each call's useful GB/s: the spread behind `useful_GBps`."""
        per_call = self.bytes_needed / max(1, len(self.call_seconds))
        return [per_call / s / 1e9 for s in self.call_seconds]


def compare_layouts(workdir: str | Path, profile: Profile | None = None, d_model: int = 2048,
                    ffn_dim: int = 8192, layers: int = 2, fraction: float = 0.05, in_flight: int = 8,
                    calls: int = 8, seed: int = 0, gap_bytes: int | None = None) -> list[LayoutRun]:
    """Measure the same random neuron sets read from a bundled and an unbundled store.

    Builds a random OPT-shaped checkpoint in `workdir` and converts it both ways (fp16), then reads
    `fraction` of a layer's neurons `calls` times from each store, alternating stores so that drift
    of the disk hits both alike. Returns one LayoutRun per layout: requests, bytes needed and read, wall
    seconds (in all and per call), and the profile's prediction.
    """
    work = Path(workdir)
    src = work / "checkpoint"
    if not (src / "model.safetensors").is_file():
        random_opt_checkpoint(src, d_model, ffn_dim, layers, seed=seed)
    stores = {}
    for layout in ("bundled", "unbundled"):
        p = work / f"store-{layout}"
        if not (p / "manifest.json").is_file():
            convert(src, p, ConvertConfig(layout=layout, progress=False))
        stores[layout] = FlashStore.open(p)
    rng = np.random.default_rng(seed)
    k = max(1, int(round(fraction * ffn_dim)))
    gap = gap_bytes if gap_bytes is not None else coalescing_gap(profile, in_flight)
    readers = {lay: NeuronReader(st, ReaderConfig(in_flight=in_flight, gap_bytes=gap)) for lay, st in stores.items()}
    acc = {lay: [0, 0, 0, 0.0] for lay in stores}  # requests, bytes needed, bytes read, predicted seconds
    each = {lay: [] for lay in stores}                   # every call's seconds
    try:
        out = aligned_empty((k, stores["bundled"].row_width), stores["bundled"].row_dtype)
        for c in range(calls + 1):
            ids = np.sort(rng.choice(ffn_dim, k, replace=False))
            order = list(stores) if c % 2 == 0 else list(stores)[::-1]
            for lay in order:
                st = readers[lay].read(c % layers, ids, out).stats
                if c == 0:
                    continue  # warm-up call
                pred = profile.read_seconds(st.chunk_sizes, in_flight) if profile is not None else 0.0
                for i, v in enumerate((st.requests, st.bytes_needed, st.bytes_read, pred)):
                    acc[lay][i] += v
                each[lay].append(st.wall_seconds)
    finally:
        for r in readers.values():
            r.close()
    return [LayoutRun(lay, calls, k, in_flight, stores[lay].neuron_bytes, *a, readers[lay].direct, tuple(each[lay]))
            for lay, a in acc.items()]
