"""Pass 1 of many tensors in a few launches, with no wait on the device until one copy at the end.

`pass1(ws, gs, metric, k)` scores T tensors (weights and their gradients, any sizes, fp32/bf16/fp16) and
returns, on their device, what `block_partials` + `reduce` + `block_topk` give for each tensor one at a time:
the [count, sum, M2, min, max] row of its scores, its top-16-bit histogram (summed into a slot per tensor)
and its exact top-k (values descending, ties to the lowest flat index), kept as int64 sort keys so that
every tensor's top-k comes to the host in ONE copy (`to_host`). With Triton, per dtype group:

1. `_pass1`: one grid over all blocks of all tensors (a table of offsets, sizes and first blocks) writes
   per-block statistics, sub-block maxima and the histogram (pre-aggregated in each program).
2. Each tensor's candidate blocks, found on the device: one stable sort of (tensor, block maximum
   descending) keys lists every tensor's blocks best first, and the first k of each are kept. They hold the
   exact top-k: a block outside them has k blocks before it, each with a maximum ≥ its maximum (and, when
   equal, at lower indices), so k scores beat each of its scores. The same argument picks the k best
   sub-blocks of SUB scores within those blocks (one batched top-k of their maxima).
3. `_gather` scores those sub-blocks (≤ k·SUB scores per tensor) as keys; a batched top-k of the keys is
   each tensor's exact top-k.
4. `_segreduce` merges the block statistics into one row per tensor (Chan's merge, in a fixed order).

Every size is known on the host from the tensors' shapes, so nothing waits on the device: tables go to
the device in one non-blocking copy, and the only copy back is the caller's `to_host`. The TORCH backend
loops over the tensors with the per-tensor reference (`block_partials`, `reduce`, `block_topk`): the CPU
path and the oracle of the tests.

`Pass1` batches the tensors that `critlib.sensitivity.analyze` hands in one gradient hook at a time.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from .. import CritlibError
from ..bins import N_BINS
from . import BLOCK, METRICS, Backend, block_partials, block_topk, reduce, resolve_backend

SUB = 32  # scores per sub-block: the top-k is ranked among ≤ k·SUB scores of each tensor
MAX_NUMEL = 1 << 32  # flat indices share an int64 key with a 32-bit value
KEY_PAD = torch.iinfo(torch.int64).max  # a key after every real one
STAGE = 1 << 25  # candidate keys (int64) per batched top-k: tensors are taken this many at a time
# elements `Pass1` lets wait (holding their gradients) before a pass with Triton: 1 GiB of bf16 gradients, ≈ 15
# passes over the Llama-3.1-8B shape; more waiting memory, fewer passes (bench/bench_phase1.py's digest times them)
BUDGET = 1 << 29
COUNTS: Counter = Counter()  # Triton launches and copies to the host, for the tests and benchmarks


def _launch(kernel, grid, *args, **meta) -> None:
    COUNTS["launches"] += 1
    kernel[grid](*args, **meta)


def to_host(x: torch.Tensor) -> torch.Tensor:
    """The one point where the results come to the host (a wait on the device)."""
    COUNTS["to_host"] += 1
    return x.cpu()


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host table to the device without waiting for it (a pageable copy is staged at once)."""
    return torch.from_numpy(a).to(device, non_blocking=True)


def _desc(x: torch.Tensor) -> torch.Tensor:
    """int32 decreasing in float32 x (−0.0 and +0.0 equal), as `triton_multi._desc`."""
    bits = torch.where(x == 0, 0, x.view(torch.int32))
    return ~(bits ^ ((bits >> 31) & 0x7FFFFFFF))


def encode(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 keys whose ascending order is (value descending, index ascending)."""
    return (_desc(values.float()).long() << 32) | index


def decode(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 values, int64 flat indices) of `encode`d keys."""
    d = ~(keys >> 32).int()
    return (d ^ ((d >> 31) & 0x7FFFFFFF)).view(torch.float32), keys & 0xFFFFFFFF


EMPTY_ROW = (0.0, 0.0, 0.0, math.inf, -math.inf)  # the statistics of no scores


@dataclass(frozen=True)
class Multi:
    """Pass 1 of T tensors, on their device (nothing has come to the host)."""
    rows: torch.Tensor  # float64 [T, 5]: count, sum, M2 (Σ (x − mean)²), min, max of each tensor's scores
    hist: torch.Tensor  # int64 [slots, N_BINS]: the top-16-bit counts of the tensors of each slot
    keys: torch.Tensor  # int64 [T, k]: each tensor's top-k as `encode`d keys, KEY_PAD after its size
    sizes: list[int]

    def topk(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each tensor's exact top-k (values descending, flat indices) on the host: one copy."""
        return split_topk(to_host(self.keys), self.sizes)


def split_topk(keys: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    values, index = decode(keys)
    return [(values[t, :min(n, keys.shape[1])], index[t, :min(n, keys.shape[1])]) for t, n in enumerate(sizes)]


def _check(ws, gs, metric: str, block: int, sub: int) -> list:
    if metric not in METRICS:
        raise CritlibError(f"metric {metric} has no fused kernel; choose one of {', '.join(METRICS)}")
    if block <= 0 or block & (block - 1) or sub <= 0 or sub & (sub - 1) or sub > block:
        raise CritlibError(f"block={block} and sub={sub} must be powers of two, sub ≤ block")
    need_g = metric not in ("magnitude", "score")
    gs = list(gs) if gs is not None else [None] * len(ws)
    if len(gs) != len(ws):
        raise CritlibError(f"{len(ws)} weights but {len(gs)} gradients")
    for w, g in zip(ws, gs):
        if need_g and (g is None or g.shape != w.shape):
            raise CritlibError(f"metric {metric} needs a gradient shaped like the weight {tuple(w.shape)}")
        if w.numel() > MAX_NUMEL:
            raise CritlibError(f"a tensor of {w.numel()} elements is beyond the multi-tensor pass "
                               f"(≤ 2**32); use critlib.kernels.fused")
    return [g if need_g else None for g in gs]


def pass1(ws: list[torch.Tensor], gs: list[torch.Tensor | None] | None, metric: str, k: int,
          backend: Backend | str = Backend.AUTO, slots: list[int] | None = None, n_slots: int | None = None,
          block: int = BLOCK, sub: int = SUB) -> Multi:
    """Statistics rows, histograms (tensor t counted into slot `slots[t]`, default t) and exact top-k of
    the scores of every tensor `ws[t]` (with gradient `gs[t]`), left on the device."""
    gs = _check(ws, gs, metric, block, sub)
    if not ws:
        raise CritlibError("pass1 needs at least one tensor")
    dev = ws[0].device
    backend = resolve_backend(backend, dev)
    if backend is Backend.OFF:
        raise CritlibError("pass1 needs a backend that computes: torch, triton or auto")
    T = len(ws)
    slots = list(range(T)) if slots is None else list(slots)
    n_slots = (max(slots) + 1) if n_slots is None else n_slots
    sizes = [w.numel() for w in ws]
    hist = torch.zeros((n_slots, N_BINS), dtype=torch.int64, device=dev)
    if backend is Backend.TORCH:
        return _reference(ws, gs, metric, k, slots, hist, block, sizes)
    wf = [w.detach().reshape(-1) for w in ws]
    gf = [None if g is None else g.detach().reshape(-1) for g in gs]
    groups: dict = {}
    for t, (w, g) in enumerate(zip(wf, gf)):  # one launch group per (weight dtype, gradient dtype)
        if w.numel():
            groups.setdefault((w.dtype, None if g is None else g.dtype), []).append(t)
    if len(groups) == 1 and len(next(iter(groups.values()))) == T:  # the usual case: one group of all
        rows, keys = _triton_group(wf, gf, metric, k, slots, hist, block, sub)
        return Multi(rows, hist, keys, sizes)
    rows = _empty_rows(T, dev)
    keys = torch.full((T, k), KEY_PAD, dtype=torch.int64, device=dev)
    for members in groups.values():
        r, kk = _triton_group([wf[t] for t in members], [gf[t] for t in members], metric, k,
                              [slots[t] for t in members], hist, block, sub)
        at = _to_device(np.array(members, dtype=np.int64), dev)
        rows.index_copy_(0, at, r)
        keys.index_copy_(0, at, kk)
    return Multi(rows, hist, keys, sizes)


def _empty_rows(n: int, device: torch.device) -> torch.Tensor:
    """n rows of EMPTY_ROW, made on the device (a blocking copy from the host would wait on it)."""
    return _to_device(np.array([EMPTY_ROW] * n, dtype=np.float64).reshape(n, 5), device)


def _reference(ws, gs, metric, k, slots, hist, block, sizes) -> Multi:
    """The per-tensor torch path, arranged as the Triton one."""
    rows = _empty_rows(len(ws), hist.device)
    keys = torch.full((len(ws), k), KEY_PAD, dtype=torch.int64, device=hist.device)
    for t, (w, g) in enumerate(zip(ws, gs)):
        if not w.numel():
            continue
        p = block_partials(w, g, metric, Backend.TORCH, block)
        rows[t] = reduce(p)
        hist[slots[t]] += p.hist_count
        v, i = block_topk(w, g, metric, p.max, block, k)
        keys[t, :v.numel()] = encode(v, i)
    return Multi(rows, hist, keys, sizes)


def _offsets(ts: list[torch.Tensor]) -> tuple[torch.Tensor, np.ndarray]:
    """The tensor with the lowest address and every tensor's element offset from it."""
    base = min(ts, key=lambda x: x.data_ptr())
    size = base.element_size()
    diff = np.array([x.data_ptr() - base.data_ptr() for x in ts], dtype=np.int64)
    if (diff % size).any():
        raise CritlibError("tensors of one dtype at addresses that are not a whole number of elements apart")
    return base, diff // size


def _align(offsets: np.ndarray) -> int:
    """The largest power of two ≤ 16 dividing every element offset (lets the compiler vectorise loads)."""
    a = 16
    while a > 1 and (offsets % a).any():
        a //= 2
    return a


def _segments(rows: np.ndarray, tile: int) -> list[np.ndarray]:
    """Segment tables that merge each tensor's `rows[t]` consecutive rows into one, ≤ tile rows a segment
    (one table per level, each a list of segment starts followed by the total)."""
    levels = []
    rows = rows.copy()
    while (rows > 1).any():
        n_seg = -(-rows // tile)
        first = np.concatenate([[0], np.cumsum(rows)])
        starts = np.repeat(first[:-1], n_seg) + tile * (np.arange(n_seg.sum()) - np.repeat(
            np.concatenate([[0], np.cumsum(n_seg)])[:-1], n_seg))
        levels.append(np.concatenate([starts, first[-1:]]))
        rows = n_seg
    return levels


def _triton_group(ws, gs, metric, k, slots, hist, block, sub) -> tuple[torch.Tensor, torch.Tensor]:
    from . import triton_multi as tm
    dev, T, ns = ws[0].device, len(ws), block // sub
    ws = [w.contiguous() for w in ws]
    gs = [w if g is None else g.contiguous() for w, g in zip(ws, gs)]
    n = np.array([w.numel() for w in ws], dtype=np.int64)
    nb = -(-n // block)
    start = np.concatenate([[0], np.cumsum(nb)])
    n_blocks = int(start[-1])
    w_base, w_off = _offsets(ws)
    g_base, g_off = _offsets(gs)
    kb = np.minimum(k, nb)
    levels = _segments(nb, tm.TILE)
    # every table in one copy to the device
    parts = [w_off, g_off, n, start, np.array(slots, dtype=np.int64), kb] + levels
    at = np.concatenate([[0], np.cumsum([len(p) for p in parts])])
    table = _to_device(np.concatenate(parts).astype(np.int64), dev)
    w_off_d, g_off_d, n_d, start_d, slot_d, kb_d, *levels_d = [table[a:b] for a, b in zip(at[:-1], at[1:])]

    count = torch.empty(n_blocks, dtype=torch.int64, device=dev)
    total = torch.empty(n_blocks, dtype=torch.float64, device=dev)
    m2 = torch.empty(n_blocks, dtype=torch.float64, device=dev)
    lo = torch.empty(n_blocks, dtype=torch.float32, device=dev)
    hi = torch.empty(n_blocks, dtype=torch.float32, device=dev)
    bkey = torch.empty(n_blocks, dtype=torch.int64, device=dev)
    sub_max = torch.empty(n_blocks * ns, dtype=torch.float32, device=dev)
    if n_blocks * ns >= MAX_NUMEL:
        raise CritlibError(f"{n_blocks * block} elements in one multi-tensor pass; pass fewer tensors at once")
    log = 4 * max(1, math.ceil(math.log2(T) / 4))  # binary-search steps, in fours: few compiled variants
    align = _align(np.concatenate([w_off, g_off]))
    _launch(tm._pass1, (n_blocks,), w_base, g_base, w_off_d, g_off_d, n_d, start_d, slot_d,
            count, total, m2, lo, hi, bkey, sub_max, hist, T, LOG=log, ALIGN=align,
            METRIC=tm.CODES[metric], BLOCK=block, SUB=sub, NBINS=N_BINS, HIST=tm.HIST)

    # statistics: each tensor's block rows merged into one row
    stats = (count, total, m2, lo, hi)
    for seg in levels_d:
        out = tuple(torch.empty(seg.numel() - 1, dtype=x.dtype, device=dev) for x in stats)
        _launch(tm._segreduce, (seg.numel() - 1,), *stats, seg, *out, TILE=tm.TILE)
        stats = out
    rows = torch.stack([x.double() for x in stats], 1)

    keys = torch.full((T, k), KEY_PAD, dtype=torch.int64, device=dev)
    if k == 0:
        return rows, keys
    order = torch.sort(bkey, stable=True).indices  # per tensor: blocks by maximum descending, then index
    KB = int(kb.max())
    lane = torch.arange(KB, device=dev)
    sub_lane = torch.arange(ns, device=dev)
    per = max(1, STAGE // (KB * ns))  # tensors per batched top-k, bounding its temporaries
    for t0 in range(0, T, per):
        t1 = min(T, t0 + per)
        valid = lane < kb_d[t0:t1, None]  # [t, KB]
        blocks = order[torch.where(valid, start_d[t0:t1, None] + lane, 0)]
        subs = blocks[..., None] * ns + sub_lane  # global sub-block ids, [t, KB, ns]
        skey = torch.where(valid[..., None], (_desc(sub_max[subs]).long() << 32) | subs, KEY_PAD)
        KS = min(k, KB * ns)
        best = torch.topk(skey.reshape(t1 - t0, -1), KS, dim=1, largest=False, sorted=False).values
        chosen = torch.where(best == KEY_PAD, -1, best & 0xFFFFFFFF)
        ekey = torch.empty((t1 - t0, KS * sub), dtype=torch.int64, device=dev)
        _launch(tm._gather, (t1 - t0, -(-KS // tm.ROWS)), w_base, g_base, w_off_d[t0:], g_off_d[t0:],
                n_d[t0:], start_d[t0:], chosen, ekey, KS, ALIGN=align, METRIC=tm.CODES[metric], SUB=sub, NS=ns,
                ROWS=tm.ROWS)
        kout = min(k, KS * sub)
        keys[t0:t1, :kout] = torch.topk(ekey, kout, dim=1, largest=False, sorted=True).values
    return rows, keys


class Pass1:
    """Pass 1 of `critlib.sensitivity.analyze` for the tensors the fused kernels score, batched.

    The gradient hooks hand in one tensor at a time (`add`); the tensors wait, holding their gradients,
    until `budget` elements are queued (default BUDGET with Triton; the torch path runs each at once), then
    one `pass1` runs over all of them (`flush`), leaving its results on the device. `finish` flushes, brings
    every tensor's top-k and statistics row to the host in one copy, refuses non-finite scores (a NaN or inf
    gradient), keeps the top-k in `topk` and merges the statistics into `stats` (`merge_groups`: rows on the
    host, histograms on the device, where a pass left them).

    `groups(name)` names the statistics groups of a tensor, `cell(metric, name, numel, total)` gets each
    tensor's float64 sum (a 0-d tensor on the device)."""

    def __init__(self, k: int, backend: Backend | str, stats: dict, topk: dict, groups, cell=None,
                 budget: int | None = None):
        self.k, self.backend, self.stats, self.topk = k, Backend(backend), stats, topk
        self.groups, self.cell = groups, cell
        self.budget = budget
        self.queue: dict[str, list] = {}
        self.queued = 0
        self.done: list[tuple[str, list[str], Multi]] = []

    def add(self, metric: str, name: str, w: torch.Tensor, g: torch.Tensor | None) -> None:
        if w.numel() > MAX_NUMEL:  # beyond 32-bit indices: the per-tensor path, now
            p = block_partials(w, g, metric, self.backend)
            row = reduce(p).reshape(1, 5)
            merge_groups(self.stats[metric], [self.groups(name)], row, p.hist_count.reshape(1, -1))
            if self.cell is not None:
                self.cell(metric, name, w.numel(), row[0, 1])
            self.topk[metric].add_candidates(name, *block_topk(w, g, metric, p.max, p.block, self.k))
            return
        self.queue.setdefault(metric, []).append((name, w, g))
        self.queued += w.numel()
        budget = self.budget
        if budget is None:
            budget = BUDGET if self.backend is Backend.TRITON else 0
        if self.queued >= budget:
            self.flush()

    def flush(self) -> None:
        for metric, items in self.queue.items():
            names = [n for n, _, _ in items]
            m = pass1([w for _, w, _ in items], [g for _, _, g in items], metric, self.k, self.backend)
            if self.cell is not None:
                for j, name in enumerate(names):
                    self.cell(metric, name, m.sizes[j], m.rows[j, 1])
            self.done.append((metric, names, m))
        self.queue, self.queued = {}, 0

    def finish(self) -> None:
        self.flush()
        if not self.done:
            return
        k = self.k
        # keys and statistics rows (their bits) of every pass, one copy to the host
        host = to_host(torch.cat([torch.cat([m.keys, m.rows.view(torch.int64)], 1).reshape(-1)
                                  for _, _, m in self.done]))
        at = 0
        for metric, names, m in self.done:
            block = host[at:at + len(names) * (k + 5)].view(len(names), k + 5)
            at += block.numel()
            rows = block[:, k:].view(torch.float64)
            bad = [n for n, s in zip(names, rows[:, 1].tolist()) if not math.isfinite(s)]
            if bad:
                raise CritlibError(f"the gradient of {bad[0]} has NaN or inf values (its {metric} scores are not "
                                   "finite); use dtype fp32, check the weights for NaN/inf, or try other data")
        at = 0
        for metric, names, m in self.done:
            block = host[at:at + len(names) * (k + 5)].view(len(names), k + 5)
            at += block.numel()
            merge_groups(self.stats[metric], [self.groups(n) for n in names], block[:, k:].view(torch.float64),
                         m.hist)
            for name, (v, i) in zip(names, split_topk(block[:, :k], m.sizes)):
                self.topk[metric].add_candidates(name, v, i)
        self.done = []


def merge_groups(stats, tensor_groups: list[list[str]], rows: torch.Tensor, hist: torch.Tensor) -> None:
    """`stats.merge(tensor_groups[t], rows[t], hist[t])` for every tensor t, in a few operations for all of
    them: per group, the histogram the sum of its tensors' (one float64 matmul, exact below 2**53) and the
    rows its tensors' rows (the others made empty rows, which merge as nothing). `rows` may be on the host
    and `hist` on the device."""
    names = sorted(set().union(*tensor_groups))
    member = np.zeros((len(names), len(tensor_groups)), dtype=np.float64)
    at = {g: j for j, g in enumerate(names)}
    for t, gs in enumerate(tensor_groups):
        member[[at[g] for g in gs], t] = 1.0
    dev = hist.device
    if len(tensor_groups) == 1:
        for g in names:
            _group(stats, g, dev).merge(rows.reshape(1, 5), hist.reshape(-1))
        return
    counts = (_to_device(member, dev) @ hist.double()).long()
    m = _to_device(member, rows.device)
    per_group = torch.where(m[..., None] > 0, rows, _empty_rows(1, rows.device))  # [groups, T, 5]
    for j, g in enumerate(names):
        _group(stats, g, dev).merge(per_group[j], counts[j])


def _group(stats, name: str, device: torch.device):
    """`stats`' group `name`, a new one with its histogram on `device` (else its first merge would copy it
    there from the host, and wait)."""
    if name not in stats.groups:
        from ..stats import Group
        stats.groups[name] = Group(hist_count=torch.zeros(N_BINS, dtype=torch.int64, device=device))
    return stats.groups[name]

