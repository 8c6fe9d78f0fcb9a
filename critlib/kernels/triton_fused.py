"""The Triton kernel: one program per block reads its weights and gradients once, scores them, reduces the
block statistics in registers and counts every score into a top-16-bit histogram with atomics.

Scores crowd into a few hundred bins, so atomics on one shared histogram serialise on those addresses:
program p counts into copy p % COPIES of the histogram, and the copies are summed at the end."""

from __future__ import annotations

import triton
import triton.language as tl

CODES = {"grad_x_weight": 0, "grad_squared": 1, "magnitude": 2, "score": 3}


@triton.jit
def _fused(w_ptr, g_ptr, n, count_ptr, sum_ptr, m2_ptr, min_ptr, max_ptr, hc_ptr,
           METRIC: tl.constexpr, BLOCK: tl.constexpr, NBINS: tl.constexpr, COPIES: tl.constexpr,
           HIST: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if METRIC == 0:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.abs(g * w)
    elif METRIC == 1:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = g * g
    elif METRIC == 2:
        s = tl.abs(w)
    else:
        s = w
    c = tl.sum(mask.to(tl.int32), axis=0)
    s64 = tl.where(mask, s.to(tl.float64), 0.0)
    total = tl.sum(s64, axis=0)
    d = tl.where(mask, s64 - total / c, 0.0)
    tl.store(count_ptr + pid, c.to(tl.int64))
    tl.store(sum_ptr + pid, total)
    tl.store(m2_ptr + pid, tl.sum(d * d, axis=0))
    tl.store(min_ptr + pid, tl.min(tl.where(mask, s, float("inf")), axis=0))
    tl.store(max_ptr + pid, tl.max(tl.where(mask, s, -float("inf")), axis=0))
    if HIST:
        bins = s.to(tl.int32, bitcast=True) >> 16
        tl.atomic_add(hc_ptr + (pid % COPIES) * NBINS + bins, 1, mask=mask)


COPIES = 256
HIST = True  # False only to time the kernel without its histogram (bench/bench_phase1.py)


def partials_chunk(w, g, metric, block, blocks, hist_count) -> None:
    """Triton version of `reference.partials_chunk` (chunks < 2**31 elements: 32-bit counts and offsets)."""
    import torch
    copies, hist = COPIES, HIST
    n = w.numel()
    count, total, m2, lo, hi = blocks
    nb = triton.cdiv(n, block)
    copies = max(1, min(copies, nb))
    hc = torch.zeros((copies, hist_count.numel()), dtype=torch.int32, device=w.device)
    w = w.contiguous()
    g = w if g is None else g.contiguous()
    _fused[(nb,)](w, g, n, count, total, m2, lo, hi, hc, METRIC=CODES[metric], BLOCK=block,
                  NBINS=hist_count.numel(), COPIES=copies, HIST=hist)
    hist_count += hc.sum(0)
