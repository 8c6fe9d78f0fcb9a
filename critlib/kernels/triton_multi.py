"""The multi-tensor Triton kernels of `critlib.kernels.multi`: one grid over every block of every tensor.

A launch is given a table per tensor: element offsets of its weight and gradient from two base tensors
(same dtype each), its size, the index of its first block (`start`, T+1 entries) and its histogram slot.
Program `pid` finds its tensor by a binary search of `start` (LOG steps), so one launch covers any number
of tensors of any sizes, as optimizers' `_foreach` kernels do.

- `_pass1`: per block of BLOCK scores: count, float64 sum and Σ(x − block mean)², min, max, the maximum of
  each sub-block of SUB scores (the top-K candidates are found from these), a sort key of the block maximum,
  and the top-16-bit histogram. HIST=2 pre-aggregates the histogram in the program: the block's bin numbers
  are sorted, a segmented scan gives each run of equal bins its length, and one atomic add per distinct bin
  goes to memory (scores crowd into a few hundred bins, so per-element atomics on the same addresses
  serialise); HIST=1 is one atomic per score, HIST=0 none (to time the rest).
- `_gather`: the scores of chosen sub-blocks as sort keys (value descending, then flat index ascending).
- `_segreduce`: Chan's merge of consecutive rows of [count, sum, M2, min, max] (segments of ≤ TILE rows);
  a fixed order, so the statistics are deterministic (float atomics would not be).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

CODES = {"grad_x_weight": 0, "grad_squared": 1, "magnitude": 2, "score": 3}
BIG = tl.constexpr(0x7FFFFFFF)  # sorts after every bin number


@triton.jit
def _find(start_ptr, pid, T, LOG: tl.constexpr):
    """The tensor that block `pid` belongs to: the largest t < T with start[t] <= pid."""
    lo = pid * 0
    hi = lo + T
    for _ in tl.static_range(LOG):
        mid = (lo + hi) // 2
        go = tl.load(start_ptr + mid) <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


@triton.jit
def _scores(w_base, g_base, w_off, g_off, idx, mask, ALIGN: tl.constexpr, METRIC: tl.constexpr):
    w_off = tl.multiple_of(w_off, ALIGN)
    g_off = tl.multiple_of(g_off, ALIGN)
    w = tl.load(w_base + w_off + idx, mask=mask, other=0.0).to(tl.float32)
    if METRIC == 0:
        g = tl.load(g_base + g_off + idx, mask=mask, other=0.0).to(tl.float32)
        s = tl.abs(g * w)
    elif METRIC == 1:
        g = tl.load(g_base + g_off + idx, mask=mask, other=0.0).to(tl.float32)
        s = g * g
    elif METRIC == 2:
        s = tl.abs(w)
    else:
        s = w
    return s


@triton.jit
def _desc(x):
    """int32, decreasing in the float32 value x (−0.0 and +0.0 equal): sorting it ascending sorts x descending."""
    bits = tl.where(x == 0.0, 0, x.to(tl.int32, bitcast=True))
    return ~(bits ^ ((bits >> 31) & 0x7FFFFFFF))


@triton.jit
def _runs(af, al, ac, bf, bl, bc):
    """Segmented count over sorted keys: (first key, last key, length of the last run)."""
    whole = (al == bf) & (bf == bl)  # b is one run continuing a's last run
    return af, bl, tl.where(whole, ac + bc, bc)


@triton.jit
def _pass1(w_base, g_base, w_off_ptr, g_off_ptr, n_ptr, start_ptr, slot_ptr,
           count_ptr, sum_ptr, m2_ptr, min_ptr, max_ptr, key_ptr, sub_ptr, hist_ptr, T,
           LOG: tl.constexpr, ALIGN: tl.constexpr, METRIC: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr,
           NBINS: tl.constexpr, HIST: tl.constexpr):
    pid = tl.program_id(0)
    t = _find(start_ptr, pid, T, LOG)
    n = tl.load(n_ptr + t)
    b = (pid - tl.load(start_ptr + t)).to(tl.int64)
    NS: tl.constexpr = BLOCK // SUB
    idx = b * BLOCK + tl.arange(0, NS)[:, None] * SUB + tl.arange(0, SUB)[None, :]  # [NS, SUB]
    mask = idx < n
    s = _scores(w_base, g_base, tl.load(w_off_ptr + t), tl.load(g_off_ptr + t), idx, mask, ALIGN, METRIC)
    c = tl.sum(tl.sum(mask.to(tl.int32), axis=1), axis=0)
    s64 = tl.where(mask, s.to(tl.float64), 0.0)
    total = tl.sum(tl.sum(s64, axis=1), axis=0)
    d = tl.where(mask, s64 - total / c, 0.0)
    sub_max = tl.max(tl.where(mask, s, -float("inf")), axis=1)  # [NS]
    hi = tl.max(sub_max, axis=0)
    tl.store(count_ptr + pid, c.to(tl.int64))
    tl.store(sum_ptr + pid, total)
    tl.store(m2_ptr + pid, tl.sum(tl.sum(d * d, axis=1), axis=0))
    tl.store(min_ptr + pid, tl.min(tl.min(tl.where(mask, s, float("inf")), axis=1), axis=0))
    tl.store(max_ptr + pid, hi)
    tl.store(sub_ptr + pid.to(tl.int64) * NS + tl.arange(0, NS), sub_max)
    # (tensor, block maximum descending): a stable sort of these keys lists each tensor's blocks best first
    tl.store(key_ptr + pid, t.to(tl.int64) * 4294967296 + (_desc(hi).to(tl.int64) + 2147483648))
    if HIST != 0:
        bins = s.to(tl.int32, bitcast=True) >> 16
        ok = mask & (bins >= 0) & (bins < NBINS)  # critlib's scores are ≥ 0; a negative one is not counted
        base = hist_ptr + tl.load(slot_ptr + t).to(tl.int64) * NBINS
        if HIST == 1:
            tl.atomic_add(base + bins, tl.full([NS, SUB], 1, tl.int64), mask=ok)
        else:
            keys = tl.sort(tl.reshape(tl.where(ok, bins, BIG), (BLOCK,)), 0)
            one = tl.full([BLOCK], 1, tl.int32)
            _, _, ahead = tl.associative_scan((keys, keys, one), 0, _runs)  # position in its run, from 1
            _, _, left = tl.associative_scan((keys, keys, one), 0, _runs, reverse=True)  # to the run's end
            first = (ahead == 1) & (keys != BIG)
            tl.atomic_add(base + tl.where(first, keys, 0), left.to(tl.int64), mask=first)


@triton.jit
def _gather(w_base, g_base, w_off_ptr, g_off_ptr, n_ptr, start_ptr, sub_ids_ptr, key_ptr, KS,
            ALIGN: tl.constexpr, METRIC: tl.constexpr, SUB: tl.constexpr, NS: tl.constexpr, ROWS: tl.constexpr):
    """Program (t, j): sub-blocks j·ROWS … of tensor t's chosen list (global sub-block ids, −1: none)."""
    t = tl.program_id(0)
    j = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    sub = tl.load(sub_ids_ptr + t * KS + j, mask=j < KS, other=-1)  # [ROWS]
    first = tl.load(start_ptr + t) * NS  # the tensor's first sub-block
    idx = (sub - first)[:, None] * SUB + tl.arange(0, SUB)[None, :]  # flat indices in the tensor, [ROWS, SUB]
    mask = (sub >= 0)[:, None] & (idx < tl.load(n_ptr + t))
    s = _scores(w_base, g_base, tl.load(w_off_ptr + t), tl.load(g_off_ptr + t), idx, mask, ALIGN, METRIC)
    key = (_desc(s).to(tl.int64) << 32) | idx
    out = key_ptr + t.to(tl.int64) * KS * SUB + j[:, None] * SUB + tl.arange(0, SUB)[None, :]
    tl.store(out, tl.where(mask, key, 9223372036854775807), mask=(j < KS)[:, None])


@triton.jit
def _segreduce(count_ptr, sum_ptr, m2_ptr, min_ptr, max_ptr, seg_ptr,
               count_out, sum_out, m2_out, min_out, max_out, TILE: tl.constexpr):
    s = tl.program_id(0)
    lo = tl.load(seg_ptr + s)
    r = lo + tl.arange(0, TILE)
    mask = r < tl.load(seg_ptr + s + 1)
    c = tl.load(count_ptr + r, mask=mask, other=0)
    tot = tl.load(sum_ptr + r, mask=mask, other=0.0)
    n = tl.sum(c, axis=0)
    total = tl.sum(tot, axis=0)
    cf = c.to(tl.float64)
    dev = tl.where(c > 0, tot / tl.where(c > 0, cf, 1.0) - total / n.to(tl.float64), 0.0)
    m2 = tl.sum(tl.load(m2_ptr + r, mask=mask, other=0.0), axis=0) + tl.sum(cf * dev * dev, axis=0)
    tl.store(count_out + s, n)
    tl.store(sum_out + s, total)
    tl.store(m2_out + s, m2)
    tl.store(min_out + s, tl.min(tl.load(min_ptr + r, mask=mask, other=float("inf")), axis=0))
    tl.store(max_out + s, tl.max(tl.load(max_ptr + r, mask=mask, other=-float("inf")), axis=0))


# 2: pre-aggregated in each program (sorted runs); 1: one atomic per score; 0: none (timing only). The same
# histogram either way; the CPU interpreter runs tl.sort in Python (≈ 0.1 s a program), so it counts per score
HIST = 1 if os.environ.get("TRITON_INTERPRET") == "1" else 2
ROWS = 32  # sub-blocks per program of `_gather`
TILE = 1024  # rows per program of `_segreduce`
