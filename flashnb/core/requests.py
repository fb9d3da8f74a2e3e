"""Which read requests a set of neurons becomes: row spans, coalescing, and where each byte lands.

Each neuron is one row per store region (bundled: one row of P * d_model values; unbundled: P rows
of d_model values, one per matrix). For a sorted, duplicate-free set of neuron ids the rows become
byte spans of the FFN file; neighbouring spans merge into one request when the gap between them is
at most `gap_bytes` (reading a few unneeded bytes is cheaper than another request), and requests
longer than `max_request_bytes` are split so that reads in flight can share them.

Two plans, both vectorized with numpy (nothing loops over neurons in Python):

- scatter: rows go straight into the caller's block-aligned destination (one iovec per run of
  file-adjacent rows, the gaps into a sink buffer): no copy;
- staging: block-aligned requests land in an aligned staging buffer, from which the rows are
  gathered afterwards (any destination).

`flashnb.core.simulate` uses the same plans to count what the engine would read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flashnb.core import aio
from flashnb.core.io import IOV_MAX, preadv_full
from flashnb.errors import FlashnbError


def as_ids(ids, ffn_dim: int, where: str) -> np.ndarray:
    """`ids` as a flat int64 array of valid neuron ids; one clear error otherwise."""
    try:
        arr = np.asarray(ids)
    except (TypeError, ValueError):
        arr = np.asarray([], dtype=object)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise FlashnbError(f"neuron ids must be integers, got {arr.dtype} values for {where}")
    arr = arr.astype(np.int64, copy=False).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= ffn_dim):
        bad = arr[(arr < 0) | (arr >= ffn_dim)]
        raise FlashnbError(f"neuron ids {bad[:5].tolist()}{' ...' if bad.size > 5 else ''} are out of range "
                           f"for {where} (valid ids: 0..{ffn_dim - 1})")
    return arr


@dataclass
class RequestPlan:
    """Requests of one read call, in file order. Offsets and lengths in bytes."""

    req_off: np.ndarray       # file offset of each request
    req_len: np.ndarray       # bytes of each request
    run_start: np.ndarray     # scatter: index of the request's first run (len = requests + 1)
    run_dst: np.ndarray       # scatter: byte offset in the destination of each run of needed rows
    run_len: np.ndarray       # scatter: bytes of each run
    run_gap: np.ndarray       # scatter: unneeded bytes after the run, read into the sink
    gather: list[tuple[int, np.ndarray]]  # staging: (region index, staging byte offset per unique id)


def plan_scatter(regions, uniq: np.ndarray, first: np.ndarray | None, out_row_bytes: int, part_col: list[int],
                 gap_bytes: int, max_request_bytes: int) -> RequestPlan:
    """Rows of neurons `uniq` go straight to destination row `first[k]` (row k when `first` is None; column
    part_col[j] of region j);
    file-adjacent rows with adjacent destinations form one run (one iovec); runs closer than
    gap_bytes share a request, the gap going to a sink."""
    M = max_request_bytes
    offs, lens, starts, dsts, rlens, gaps = [], [], [], [], [], []
    nrun = 0
    adjacent = np.diff(uniq) == 1
    if first is None:  # row k lands in destination row k (the engine's usual call)
        if (plan := _runs_in_order(regions, uniq, adjacent, out_row_bytes, part_col, gap_bytes, M)) is not None:
            return plan
        first, in_order = np.arange(uniq.size), True
    else:
        in_order = first.size < 2 or bool(first[-1] - first[0] == first.size - 1 and np.all(np.diff(first) == 1))
    for j, r in enumerate(regions):
        rb = r.row_bytes
        s = r.offset + uniq * rb                          # file offset of each row
        d = first * out_row_bytes + part_col[j]           # destination offset of each row
        brk = np.ones(uniq.size, bool)
        brk[1:] = ~adjacent if (in_order and out_row_bytes == rb) else ~adjacent | (np.diff(d) != rb)
        rs = np.flatnonzero(brk)
        nrows = np.diff(np.append(rs, uniq.size))
        step = max(1, M // rb)                            # rows per piece of a long run
        if int(nrows.max()) <= step:                      # (the usual case: no run longer than a request)
            run_s, run_d, run_l = s[rs], d[rs], nrows * rb
        else:
            npc = -(-nrows // step)
            ridx = np.repeat(np.arange(rs.size), npc)
            k = np.arange(ridx.size) - np.repeat(np.cumsum(npc) - npc, npc)
            run_s = s[rs][ridx] + k * step * rb
            run_d = d[rs][ridx] + k * step * rb
            run_l = np.minimum(step, nrows[ridx] - k * step) * rb
        R = run_s.size
        gap = np.zeros(R, np.int64)
        gap[:-1] = run_s[1:] - (run_s[:-1] + run_l[:-1])
        new = np.ones(R, bool)
        new[1:] = gap[:-1] > gap_bytes
        if not new.all():                                 # some runs share a request: cap its bytes and iovecs
            grp = np.cumsum(new) - 1
            g0 = np.flatnonzero(new)
            piece = (run_s - run_s[g0][grp]) // M         # about M bytes per request
            kk = (np.arange(R) - g0[grp]) // (IOV_MAX // 2)  # at most IOV_MAX iovecs per request
            new[1:] |= (piece[1:] != piece[:-1]) | (kk[1:] != kk[:-1])
        req_first = np.flatnonzero(new)
        req_last = np.append(req_first[1:], R) - 1
        gap[req_last] = 0                                 # nothing to skip after a request's last run
        offs.append(run_s[req_first])
        lens.append(run_s[req_last] + run_l[req_last] - run_s[req_first])
        starts.append(req_first + nrun)
        dsts.append(run_d)
        rlens.append(run_l)
        gaps.append(gap)
        nrun += R
    if len(regions) == 1:
        return RequestPlan(offs[0], lens[0], np.append(starts[0], nrun), dsts[0], rlens[0], gaps[0], [])
    return RequestPlan(np.concatenate(offs), np.concatenate(lens), np.append(np.concatenate(starts), nrun),
                       np.concatenate(dsts), np.concatenate(rlens), np.concatenate(gaps), [])


def _runs_in_order(regions, uniq: np.ndarray, adjacent: np.ndarray, out_row_bytes: int, part_col: list[int],
                   gap_bytes: int, max_request_bytes: int) -> RequestPlan | None:
    """plan_scatter's plan for rows landing in order, in its commonest case and a few operations: one region,
    destination rows of the rows' size, no coalescing gap: each run of file-adjacent rows is one request of
    one iovec. None in any other case, or when a run is longer than a request may be (the general path
    splits it)."""
    r = regions[0]
    rb = r.row_bytes
    if len(regions) != 1 or gap_bytes or out_row_bytes != rb:
        return None
    rs = np.flatnonzero(np.concatenate(([True], ~adjacent)))   # each run's first row
    nrows = np.diff(np.append(rs, uniq.size))
    if int(nrows.max()) > max(1, max_request_bytes // rb):
        return None
    run_l = nrows * rb
    return RequestPlan(r.offset + uniq[rs] * rb, run_l, np.arange(rs.size + 1), rs * rb + part_col[0], run_l,
                       np.zeros(rs.size, np.int64), [])


def plan_staging(regions, uniq: np.ndarray, io_align: int, gap_bytes: int, max_request_bytes: int) -> RequestPlan:
    """Block-aligned requests into a staging buffer; rows are gathered from it afterwards."""
    A = io_align
    offs, lens, gather = [], [], []
    base = 0
    for j, r in enumerate(regions):
        s = r.offset + uniq * r.row_bytes
        a_s = s // A * A
        a_e = -(-(s + r.row_bytes) // A) * A
        new = np.ones(uniq.size, bool)
        new[1:] = (a_s[1:] - a_e[:-1]) > gap_bytes
        gi = np.flatnonzero(new)
        g_s = a_s[gi]
        g_e = np.append(a_e[gi[1:] - 1], a_e[-1])
        g_len = g_e - g_s
        g_stage = base + np.concatenate(([0], np.cumsum(g_len)[:-1]))
        grp = np.cumsum(new) - 1
        gather.append((j, g_stage[grp] + (s - g_s[grp])))
        base += int(g_len.sum())
        # split long groups into pieces of at most max_request_bytes (a multiple of A)
        step = max(A, max_request_bytes // A * A)
        npieces = -(-g_len // step)
        gidx = np.repeat(np.arange(gi.size), npieces)
        k = np.arange(gidx.size) - np.repeat(np.cumsum(npieces) - npieces, npieces)
        p_off = g_s[gidx] + k * step
        p_len = np.minimum(step, g_e[gidx] - p_off)
        offs.append(p_off)
        lens.append(p_len)
    off, ln = np.concatenate(offs), np.concatenate(lens)
    empty = np.zeros(0, np.int64)
    return RequestPlan(off, ln, empty, empty, empty, empty, gather)


def scatter_iocbs(fd: int, plan: RequestPlan, base: int, sink: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A scatter plan's requests as kernel AIO iocbs (flashnb.core.aio), reading into the destination at
    address `base`: one iovec per run of rows, then one for its gap into the sink at address `sink`;
    returns the iocbs and the iovecs they point to (both must stay alive while the requests fly). Requests of
    one run each and no gap (the engine's usual reads) read straight into their run: no iovecs (None)."""
    if plan.run_dst.size == plan.req_off.size and not plan.run_gap.any():
        return aio.pread_iocbs(fd, plan.req_off, base + plan.run_dst, plan.req_len), None
    has_gap = plan.run_gap > 0
    per_run = 1 + has_gap
    first = np.concatenate(([0], np.cumsum(per_run)[:-1]))
    iov = np.zeros(int(per_run.sum()), aio.IOVEC)
    iov["base"][first] = base + plan.run_dst
    iov["len"][first] = plan.run_len
    iov["base"][first[has_gap] + 1] = sink
    iov["len"][first[has_gap] + 1] = plan.run_gap[has_gap]
    return aio.preadv_iocbs(fd, plan.req_off, iov, np.append(first, iov.size)[plan.run_start]), iov


# ----------------------------------------------------------------------------------------------
# Issuing a plan's requests one by one (the thread backend, and re-reads of short AIO requests)


def read_staging(fd: int, plan: RequestPlan, dst: memoryview, stage: np.ndarray, a: int, b: int) -> int:
    """Requests a..b-1 of a staging plan, each into the staging buffer `dst` at `stage`; the retries."""
    retries = 0
    for off, ln, so in zip(plan.req_off[a:b].tolist(), plan.req_len[a:b].tolist(), stage[a:b].tolist()):
        retries += preadv_full(fd, [dst[so:so + ln]], off)
    return retries


def read_scatter(fd: int, plan: RequestPlan, dst: memoryview, sink: memoryview, a: int, b: int) -> int:
    """Requests a..b-1 of a scatter plan, each run of rows into `dst`, the gaps into `sink`; the retries."""
    retries = 0
    rs = plan.run_start[a:b + 1].tolist()
    r0, r1 = rs[0], rs[-1]
    rd, rl, rg = plan.run_dst[r0:r1].tolist(), plan.run_len[r0:r1].tolist(), plan.run_gap[r0:r1].tolist()
    for i, off in enumerate(plan.req_off[a:b].tolist()):
        iov = []
        for k in range(rs[i] - r0, rs[i + 1] - r0):
            d = rd[k]
            iov.append(dst[d:d + rl[k]])
            if rg[k]:
                iov.append(sink[:rg[k]])
        retries += preadv_full(fd, iov, off)
    return retries
