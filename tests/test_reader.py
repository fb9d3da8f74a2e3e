"""The neuron reader: exact rows for any id set, both I/O paths, coalescing, statistics, failures."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import make_tiny_llama, make_tiny_opt
from flash_helpers import reference_rows
from flashnb.core import aio
from flashnb.core import io as io_mod
from flashnb.core import reader as reader_mod
from flashnb.core.convert import ConvertConfig, convert
from flashnb.core.defaults import MAX_PROFILE_GAP
from flashnb.core.io import AlignedBuffer, aligned_empty, preadv_full
from flashnb.core.reader import NeuronReader, ReaderConfig
from flashnb.core.store import FlashStore
from flashnb.errors import FlashnbError

# d 32 (rows of 64..128 B: the staging path) and d 128 (bundles of 512 B+: the zero-copy scatter path)
SOURCES = {"opt": dict(), "opt128": dict(hidden_size=128, ffn_dim=256, word_embed_proj_dim=128),
           "llama": dict()}
COMBOS = [(m, lay, dt) for m in SOURCES for lay in ("bundled", "unbundled") for dt in ("fp16", "fp32")]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("reader")
    out = {}
    for m, kw in SOURCES.items():
        src = (make_tiny_llama if m == "llama" else make_tiny_opt)(base / m, **kw)
        for lay in ("bundled", "unbundled"):
            for dt in ("fp16", "fp32"):
                s = FlashStore.open(convert(src, base / f"{m}-{lay}-{dt}", ConvertConfig(lay, dt, progress=False)))
                out[(m, lay, dt)] = (s, [reference_rows(src, i, dt) for i in range(s.num_layers)])
    return out


def _id_sets(n: int, rng) -> list[np.ndarray]:
    return [np.array([], np.int64), np.array([n - 1]), np.arange(n),          # empty, one, all
            rng.permutation(n)[: n // 3],                                      # unsorted
            rng.integers(0, n, n // 2),                                        # duplicates
            np.array([3, 3, 3, 0, n - 1, 0]),                                  # duplicates, edges
            np.sort(rng.choice(n, n // 5, replace=False))]                     # sorted, unique (engine)


@pytest.mark.parametrize("model,layout,dtype", COMBOS)
def test_rows_equal_checkpoint_exactly(stores, model, layout, dtype):
    s, ref = stores[(model, layout, dtype)]
    rng = np.random.default_rng(hash((model, layout, dtype)) % 2**32)
    paths = set()
    backends = set()
    for cfg in (ReaderConfig(in_flight=3, gap_bytes=0),
                ReaderConfig(in_flight=3, gap_bytes=0, backend="threads"),
                ReaderConfig(in_flight=2, gap_bytes=1 << 20, max_request_bytes=4096),
                ReaderConfig(in_flight=2, gap_bytes=4096, max_request_bytes=8192, backend="threads"),
                ReaderConfig(in_flight=4, direct=False, gap_bytes=1024)):
        with NeuronReader(s, cfg) as r:
            for layer in (cfg.in_flight % s.num_layers,):   # the configurations alternate between the layers
                for ids in _id_sets(s.ffn_dim, rng):
                    for out in (None, aligned_empty((ids.size, s.row_values), s.np_dtype),
                                np.empty((ids.size, s.row_values), s.np_dtype)):
                        res = r.read(layer, ids, out)
                        assert res.rows.shape == (ids.size, s.row_values) and res.rows.dtype == s.np_dtype
                        assert np.array_equal(res.rows.view(np.uint8), ref[layer][ids].view(np.uint8)), \
                            (cfg, layer, ids[:8])
                        if out is not None:
                            assert res.rows is out
                        st = res.stats
                        assert st.neurons_requested == ids.size and st.neurons_unique == np.unique(ids).size
                        assert st.bytes_needed == np.unique(ids).size * s.neuron_bytes
                        assert st.bytes_read >= st.bytes_needed and st.requests == st.chunk_sizes.size
                        assert int(st.chunk_sizes.sum()) == st.bytes_read
                        assert st.direct == (cfg.direct and r.direct)
                        paths.add(st.path)
                        backends.add(st.backend)
            split = s.split_rows(r.read(0, [4, 1]).rows)
            assert list(split) == list(s.parts) and all(v.shape == (2, s.d_model) for v in split.values())
    assert backends == ({"aio", "threads"} if aio.available() else {"threads"})
    if model == "opt128" and layout == "bundled":
        assert "scatter" in paths   # 512 B+ bundles into an aligned buffer: no staging copy
    if model == "opt":
        assert "staging" in paths   # 64 B rows: aligned staging buffer + gather


def test_coalescing_counts(stores):
    s, ref = stores[("opt128", "bundled", "fp32")]          # bundles of 1 KiB
    ids = np.array([0, 1, 2, 10, 11, 40, 200])
    with NeuronReader(s, ReaderConfig(in_flight=2, gap_bytes=0)) as r:
        st = r.read(0, ids).stats
        assert st.path == "scatter" and st.requests == 4 and st.bytes_read == st.bytes_needed == 7 * 1024
        assert st.chunk_sizes.tolist() == [3 * 1024, 2 * 1024, 1024, 1024]   # rows 0-2, 10-11, 40, 200
    with NeuronReader(s, ReaderConfig(in_flight=2, gap_bytes=7 * 1024)) as r:   # 0-2 and 10-11 merge (7 between)
        st = r.read(0, ids).stats
        assert st.requests == 3 and st.bytes_read == 12 * 1024 + 2 * 1024
    with NeuronReader(s, ReaderConfig(in_flight=2, gap_bytes=1 << 30)) as r:   # everything in one request
        res = r.read(0, ids)
        assert res.stats.requests == 1 and res.stats.bytes_read == 201 * 1024
        assert np.array_equal(res.rows, ref[0][ids])
    with NeuronReader(s, ReaderConfig(in_flight=4, gap_bytes=0, max_request_bytes=16 * 1024)) as r:
        st = r.read(1, np.arange(s.ffn_dim)).stats                  # 256 KiB split for the threads
        assert st.requests == 16 and set(st.chunk_sizes.tolist()) == {16 * 1024}


def test_the_engines_in_order_plan_equals_the_general_plan():
    """Rows landing in order (first=None, the engine's reads) take a shorter path to the same requests, runs
    and destinations as the general plan, long runs and coalescing gaps included."""
    from types import SimpleNamespace

    from flashnb.core.requests import plan_scatter

    rng = np.random.default_rng(0)
    region = SimpleNamespace(offset=8192, row_bytes=1024)
    for _ in range(50):
        ids = np.sort(rng.choice(512, int(rng.integers(1, 512)), replace=False))
        for gap, most in ((0, 1 << 20), (0, 4096), (2048, 1 << 20), (0, 512)):
            fast = plan_scatter([region], ids, None, 1024, [0], gap, most)
            general = plan_scatter([region], ids, np.arange(ids.size), 1024, [0], gap, most)
            assert all(np.array_equal(getattr(fast, k), getattr(general, k)) for k in
                       ("req_off", "req_len", "run_start", "run_dst", "run_len", "run_gap")), (gap, most, ids[:8])


def test_gap_from_profile():
    from flash_helpers import synthetic_profile
    from flashnb.device.profile import Profile, coalescing_gap

    prof = Profile(synthetic_profile(latency_s=1e-4, bandwidth=1e9))
    assert coalescing_gap(prof, 4) == min(prof.coalesce_gap(4), MAX_PROFILE_GAP) > 0
    assert coalescing_gap(None, 4) == 0


def test_out_of_range_and_bad_arguments(stores):
    s, _ = stores[("llama", "bundled", "fp16")]
    with NeuronReader(s, ReaderConfig(in_flight=2)) as r:
        for bad in ([0, s.ffn_dim], [-1], [5, s.ffn_dim + 10, 7]):
            with pytest.raises(FlashnbError, match=r"out of range for layer 1 .* \(valid ids: 0\.\.63\)"):
                r.read(1, bad)
        with pytest.raises(FlashnbError, match="layer 2 is out of range"):
            r.read(2, [0])
        with pytest.raises(FlashnbError, match="out must be"):
            r.read(0, [1, 2], np.empty((3, s.row_values), s.np_dtype))
    with pytest.raises(FlashnbError, match="closed"):
        r.read(0, [1])
    with pytest.raises(FlashnbError, match="reads in flight must be a whole number >= 1"):
        NeuronReader(s, ReaderConfig(in_flight=0))
    with pytest.raises(FlashnbError, match="neuron ids must be integers"):
        with NeuronReader(s, ReaderConfig(in_flight=2)) as r:
            r.read(0, [1.5, 2.0])


def test_short_reads_and_eintr_are_retried(stores, monkeypatch):
    s, ref = stores[("opt128", "bundled", "fp16")]
    real = os.preadv
    calls = {"n": 0}

    def flaky(fd, iov, off):
        calls["n"] += 1
        if calls["n"] % 3 == 1:
            raise InterruptedError(errno.EINTR, "interrupted")
        if calls["n"] % 3 == 2 and sum(v.nbytes for v in iov) > 512:   # a short read of 512 bytes
            return real(fd, [iov[0][:512]] if iov[0].nbytes >= 512 else iov[:1], off)
        return real(fd, iov, off)

    monkeypatch.setattr(io_mod.os, "preadv", flaky)
    ids = np.array([9, 3, 100, 101, 102, 250, 3])
    for direct in (True, False):
        with NeuronReader(s, ReaderConfig(in_flight=1, gap_bytes=4096, direct=direct, backend="threads")) as r:
            res = r.read(0, ids)
            assert np.array_equal(res.rows, ref[0][ids]) and res.stats.retries > 0


@pytest.mark.skipif(not aio.available(), reason="native AIO (io_setup) is not available on this kernel")
def test_aio_short_or_failed_requests_are_reread(stores, monkeypatch):
    s, ref = stores[("opt128", "bundled", "fp16")]
    real = aio.AioBatch.wait

    def flaky(self):  # the kernel reports the first request short and the second failed
        res = real(self).copy()
        res[:1] //= 2
        res[1:2] = -errno.EIO
        return res

    monkeypatch.setattr(aio.AioBatch, "wait", flaky)
    ids = np.array([9, 3, 100, 101, 102, 250, 3])
    for out in (None, np.empty((ids.size, s.row_values), s.np_dtype)):  # scatter and staging paths
        with NeuronReader(s, ReaderConfig(in_flight=4, gap_bytes=0, backend="aio")) as r:
            res = r.read(0, ids, out)
            assert np.array_equal(res.rows, ref[0][ids]) and res.stats.retries == 2 and res.stats.backend == "aio", res.stats


def test_unknown_backend_is_an_error(stores):
    s, _ = stores[("opt128", "bundled", "fp16")]
    with pytest.raises(FlashnbError, match="backend must be one of auto, aio, threads"):
        NeuronReader(s, ReaderConfig(backend="uring"))


def test_end_of_file_is_an_error(tmp_path):
    f = tmp_path / "short.bin"
    f.write_bytes(b"x" * 1000)
    fd = os.open(f, os.O_RDONLY)
    try:
        buf = AlignedBuffer(4096)
        with pytest.raises(FlashnbError, match="truncated"):
            preadv_full(fd, [buf.view[:2048]], 0)
    finally:
        os.close(fd)


def test_fallback_when_o_direct_is_refused(stores, monkeypatch):
    s, ref = stores[("opt", "unbundled", "fp32")]
    real_open = os.open
    evicted = []

    def no_direct(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(io_mod.os, "open", no_direct)
    monkeypatch.setattr(reader_mod, "evict", lambda fd, off=0, ln=0: evicted.append((off, ln)))
    with NeuronReader(s, ReaderConfig(in_flight=2)) as r:
        assert r.direct is False and r.io_mode.startswith("buffered (the file system refuses direct I/O")
        res = r.read(1, [7, 2, 7])
        assert res.stats.direct is False and np.array_equal(res.rows, ref[1][[7, 2, 7]])
        regs = s.regions(1)
        assert evicted == [(regs[0].offset, regs[-1].offset + regs[-1].size - regs[0].offset)]


def test_aligned_memory():
    a = aligned_empty((3, 1000), np.float16)
    assert a.ctypes.data % 4096 == 0 and a.shape == (3, 1000)
    b = AlignedBuffer(10)
    assert b.nbytes == 4096 and b.u8.ctypes.data % 4096 == 0
    with pytest.raises(FlashnbError, match="too small"):
        b.array((4097,), np.uint8)


def test_reader_accepts_a_path_and_torch_ids(stores):
    import torch

    s, ref = stores[("llama", "unbundled", "fp16")]
    with NeuronReader(Path(s.path), ReaderConfig(in_flight=2)) as r:
        res = r.read(0, torch.tensor([5, 1]))
        assert np.array_equal(res.rows, ref[0][[5, 1]])
        assert res.stats.neurons_unique == 2


@pytest.mark.parametrize("backend", ["aio", "threads"])
def test_submit_then_wait_equals_read_and_holds_the_reader(stores, backend):
    import threading

    if backend == "aio" and not aio.available():
        pytest.skip("native AIO (io_setup) is not available on this kernel")
    s, ref = stores[("opt128", "bundled", "fp16")]
    ids = np.array([3, 9, 100, 101, 250])
    with NeuronReader(s, ReaderConfig(in_flight=4, backend=backend)) as r:
        pending = r.submit(0, ids, out=aligned_empty((ids.size, s.row_values), s.np_dtype))
        other = {}
        t = threading.Thread(target=lambda: other.setdefault("rows", r.read(1, ids).rows))
        t.start()
        t.join(0.2)
        assert t.is_alive() and "rows" not in other  # the reader takes no other call before wait()
        res = pending.wait()
        assert pending.wait() is res and np.array_equal(res.rows, ref[0][ids]) and res.stats.backend == backend
        t.join(10)
        assert np.array_equal(other["rows"], ref[1][ids])
        with pytest.raises(FlashnbError, match="out of range"):  # a refused call leaves the reader usable
            r.submit(0, [s.ffn_dim])
        assert np.array_equal(r.read(0, ids).rows, ref[0][ids])


def test_a_second_submit_before_wait_is_a_clear_error_and_a_dropped_read_is_reclaimed(stores):
    import gc

    s, ref = stores[("opt128", "bundled", "fp16")]
    ids = np.array([3, 9, 100])
    with NeuronReader(s, ReaderConfig(in_flight=4)) as r:
        pending = r.submit(0, ids)
        with pytest.raises(FlashnbError, match="already has a read pending"):
            r.submit(1, ids)
        assert np.array_equal(pending.wait().rows, ref[0][ids])
        r.submit(0, ids)      # dropped without wait(): completed when collected
        gc.collect()
        assert np.array_equal(r.read(1, ids).rows, ref[1][ids])


@pytest.mark.skipif(not aio.available(), reason="native AIO (io_setup) is not available on this kernel")
def test_a_wait_stopped_by_ctrl_c_leaves_the_reader_usable(stores):
    """Ctrl-C while the reads fly: the AIO context they used is closed (the kernel finishes them first),
    and the reader's next call reads through a fresh one, instead of blaming the disk."""
    s, ref = stores[("opt128", "bundled", "fp16")]
    ids = np.array([9, 3, 100, 101, 102, 250])
    with NeuronReader(s, ReaderConfig(in_flight=4, backend="aio")) as r:
        lib = r._aio._lib

        class Interrupted:  # the first io_getevents is interrupted
            def __getattr__(self, name):
                return getattr(lib, name)

            def syscall(self, nr, *args):
                if nr.value == r._aio._getevents:
                    raise KeyboardInterrupt
                return lib.syscall(nr, *args)

        r._aio._lib = Interrupted()
        with pytest.raises(KeyboardInterrupt):
            r.read(0, ids)
        assert r._aio.closed
        assert np.array_equal(r.read(0, ids).rows, ref[0][ids]) and not r._aio.closed


@pytest.mark.skipif(not aio.available(), reason="native AIO (io_setup) is not available on this kernel")
def test_aio_submit_interrupted_or_busy_is_retried_and_eio_is_one_line(stores, monkeypatch):
    import ctypes

    s, ref = stores[("opt128", "bundled", "fp16")]
    ids = np.array([9, 3, 100, 101, 102, 250])
    with NeuronReader(s, ReaderConfig(in_flight=4, gap_bytes=0, backend="aio")) as r:
        lib = r._aio._lib
        real, calls = lib.syscall, {"n": 0}

        class Flaky:  # io_submit fails with EINTR, then EAGAIN, then works
            def __getattr__(self, name):
                return getattr(lib, name)

            def syscall(self, nr, *args):
                if nr.value == r._aio._submit and calls["n"] < 2:
                    calls["n"] += 1
                    ctypes.set_errno(errno.EINTR if calls["n"] == 1 else errno.EAGAIN)
                    return -1
                return real(nr, *args)

        r._aio._lib = Flaky()
        assert np.array_equal(r.read(0, ids).rows, ref[0][ids]) and calls["n"] == 2
        r._aio._lib = lib

    def eio(fd, iov, off):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(aio.AioBatch, "wait", lambda self: np.full(self.n, -errno.EIO))
    monkeypatch.setattr(io_mod.os, "preadv", eio)         # the synchronous re-read fails too
    with NeuronReader(s, ReaderConfig(in_flight=4, gap_bytes=0, backend="aio")) as r:
        with pytest.raises(FlashnbError, match=r"reading .*ffn.bin failed \(Input/output error\).*flashnb verify"):
            r.read(0, ids)
