"""Exact top-K: per tensor (in chunks, so any size works) and global (a merge of per-tensor candidates).

Order is by score descending, ties broken by (parameter order, flat index) ascending, so every ranking is
deterministic and equals a full stable sort of all scores.
"""

from __future__ import annotations

import math

import torch

from .bins import step_for


def _prefilter(x: torch.Tensor, k: int) -> torch.Tensor | None:
    """Indices of a small superset of the top-k of float32 `x`: every element whose order-preserving bit
    key falls in the bins (top 16 bits) that hold the k largest. None when it would not help."""
    bits = x.view(torch.int32)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # monotone in the float value, negatives included
    hi = (key >> 16) + 32768
    counts = torch.bincount(hi, minlength=65536)
    from_top = torch.cumsum(counts.flip(0), 0)
    b = 65535 - int(torch.searchsorted(from_top, torch.tensor([k], device=x.device)))
    if b == 32768 or int(from_top[65535 - b]) > x.numel() // 4:  # -0.0 (bin 32767) would tie +0.0; or no gain
        return None
    return (hi >= b).nonzero().flatten()


def topk_exact(x: torch.Tensor, k: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of a 1-D tensor as (values desc, indices + offset); among equal values the lowest index wins."""
    k = min(k, x.numel())
    if k == 0:
        return x.new_empty(0), torch.empty(0, dtype=torch.long, device=x.device)
    big = x.numel() >= max(1 << 16, 64 * k)
    if big and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous():
        sub = _prefilter(x, k)
        if sub is not None:  # every element outside `sub` is strictly smaller than all of the k-th bin
            v, i = topk_exact(x[sub], k)
            return v, sub[i] + offset
    vals, idx = torch.topk(x, k, sorted=False)
    kth = vals.min()
    n_all, n_kept = torch.stack([(x == kth).sum(), (vals == kth).sum()]).tolist()
    if n_all == n_kept:  # no tie left out: topk's set is the answer
        return sort_candidates(vals, idx + offset)
    above = (x > kth).nonzero().flatten()
    ties = (x == kth).nonzero().flatten()[: k - above.numel()]
    idx = torch.cat([above, ties])
    return sort_candidates(x[idx], idx + offset)


def sort_candidates(values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort by value descending, then index ascending."""
    order = torch.argsort(index)
    values, index = values[order], index[order]
    order = torch.sort(values, descending=True, stable=True).indices
    return values[order], index[order]


BLOCK = 32


def _candidates(flat: torch.Tensor, k: int, step: int, trim: bool | None = None,
                maxima: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Ascending indices of a small superset of the top-k of `flat`: the elements ≥ τ, the k-th largest
    maximum of the blocks of BLOCK consecutive elements (k blocks reach τ, so the k-th largest value is ≥ τ),
    looked for only in the blocks that reach τ. One read of `flat` for the block maxima (none where `maxima`
    are given), in steps of `step` elements (a multiple of BLOCK). Returns (indices, their values), or None when ties make nearly every block a candidate.
    `trim` (default: on a CPU) keeps only values ≥ τ; otherwise whole blocks come back (lanes past the end
    valued -inf) rather than wait on a GPU for their count. `maxima`: the block maxima, where they were made
    on the way already (`critlib.stats.summarize_steps`)."""
    bm = _block_maxima(flat, step) if maxima is None else maxima
    blocks, tau = _top_blocks(bm, k)
    if blocks.numel() > bm.numel() // 4:
        return None
    idx = (blocks[:, None] * BLOCK + torch.arange(BLOCK, device=flat.device)).reshape(-1)
    if not (flat.device.type == "cpu" if trim is None else trim):
        return idx, torch.where(idx < flat.numel(), flat[idx.clamp_max(flat.numel() - 1)], -math.inf)
    short = -flat.numel() % BLOCK  # lanes past the end, in the last block
    if short and int(blocks[-1]) == bm.numel() - 1:
        idx = idx[:-short]
    idx = idx[flat[idx] >= tau]
    return idx, flat[idx]


def _top_blocks(bm: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ascending indices of the blocks whose maximum is ≥ τ, τ): τ is the k-th largest of the block maxima
    `bm`. Where there are many, it is looked for only in the groups of BLOCK blocks whose largest maximum is
    ≥ τ₁, the k-th largest group maximum: k groups reach τ₁, each with a block, so τ ≥ τ₁ and every block that
    reaches τ lies in those groups (torch.topk over all maxima took 0.30 s of a 1B-shape analyze's 1.10 s of
    ranking and statistics on an Intel Xeon)."""
    full = bm.numel() // BLOCK * BLOCK
    if full // BLOCK < 4 * k:
        tau = torch.topk(bm, k, sorted=False).values.min()
        return (bm >= tau).nonzero().flatten(), tau
    groups = bm[:full].view(-1, BLOCK).amax(1)
    tau1 = torch.topk(groups, k, sorted=False).values.min()
    first = (groups >= tau1).nonzero() * BLOCK
    idx = torch.cat([(first + torch.arange(BLOCK, device=bm.device)).reshape(-1),
                     torch.arange(full, bm.numel(), device=bm.device)])  # the last, partial group: always
    sub = bm[idx]
    tau = torch.topk(sub, k, sorted=False).values.min()
    return idx[sub >= tau], tau


def _block_maxima(flat: torch.Tensor, step: int) -> torch.Tensor:
    """The maximum of every BLOCK consecutive elements (the last block may be short), in steps of `step`."""
    maxima = []
    for start in range(0, flat.numel(), step):
        c = flat[start:start + step]
        full = c.numel() // BLOCK * BLOCK
        maxima.append(c[:full].view(-1, BLOCK).amax(1))
        if full < c.numel():
            maxima.append(c[full:].amax().reshape(1))
    return torch.cat(maxima)


def topk_chunked(x: torch.Tensor, k: int, chunk_size: int = 1 << 30,
                 maxima: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of a flattened tensor of any size, read in steps of at most `chunk_size` elements (see
    `critlib.bins.step_for`): block maxima pick the few blocks that can hold a top-k value, and only those
    are ranked. Where ties defeat that, the top-k of each step are merged. `maxima`: the maxima of `x`'s
    blocks of BLOCK elements, where the statistics made them already."""
    flat = x.reshape(-1)
    n = flat.numel()
    step = step_for(flat.device, chunk_size)
    if 0 < k and -(-n // BLOCK) >= 4 * k:
        found = _candidates(flat, k, max(BLOCK, step // BLOCK * BLOCK), maxima=maxima)
        if found is not None:  # ascending indices: topk_exact's lowest-position tie-break is the lowest index
            v, i = topk_exact(found[1], k)
            return v, found[0][i]
    if n <= step:
        return topk_exact(flat, k)
    vals, idxs = [], []
    for start in range(0, n, step):
        v, i = topk_exact(flat[start:start + step], k, offset=start)
        vals.append(v)
        idxs.append(i)
    return merge(torch.cat(vals), torch.cat(idxs), k)


def merge(values: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, index = sort_candidates(values, index)
    return values[:k], index[:k]


class TopK:
    """Keeps the exact top-k candidates of each tensor it sees; merges them into a global top-k."""

    def __init__(self, k: int, chunk_size: int = 1 << 30):
        self.k = k
        self.chunk_size = chunk_size
        self.candidates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, name: str, scores: torch.Tensor, maxima: torch.Tensor | None = None) -> None:
        v, i = topk_chunked(scores.detach(), self.k, self.chunk_size, maxima)
        self.candidates[name] = (v.float().cpu(), i.cpu())

    def add_candidates(self, name: str, values: torch.Tensor, index: torch.Tensor) -> None:
        """Keep a tensor's exact top-k found elsewhere (values descending, ties by lowest flat index)."""
        self.candidates[name] = (values[: self.k].float().cpu(), index[: self.k].cpu())

    def per_tensor(self, name: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        v, i = self.candidates[name]
        return v[:k], i[:k]

    def global_topk(self, k: int, order: list[str]) -> list[tuple[str, int, float]]:
        """The k highest (param, flat index, score) over all tensors, `order` giving the tie-break by param."""
        names = [n for n in order if n in self.candidates]
        vals = torch.cat([self.candidates[n][0] for n in names])
        pos = torch.cat([torch.full_like(self.candidates[n][1], j) for j, n in enumerate(names)])
        flat = torch.cat([self.candidates[n][1] for n in names])
        # one sortable key for (param position, flat index): positions are < 2**20, flat indices < 2**43
        key = pos * (1 << 43) + flat
        v, key = merge(vals, key, k)
        return [(names[int(kk >> 43)], int(kk & ((1 << 43) - 1)), float(s)) for s, kk in zip(v, key)]
