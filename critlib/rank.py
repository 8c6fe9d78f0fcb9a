"""Exact top-K: per tensor (in chunks, so any size works) and global (a merge of per-tensor candidates).

Order is by score descending, ties broken by (parameter order, flat index) ascending, so every ranking is
deterministic and equals a full stable sort of all scores.
"""

from __future__ import annotations

import torch


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
    if x.dtype == torch.float32 and x.is_contiguous() and x.numel() >= max(1 << 16, 64 * k):
        sub = _prefilter(x, k)
        if sub is not None:  # every element outside `sub` is strictly smaller than all of the k-th bin
            v, i = topk_exact(x[sub], k)
            return v, sub[i] + offset
    vals, idx = torch.topk(x, k, sorted=False)
    kth = vals.min()
    if int((x == kth).sum()) == int((vals == kth).sum()):  # no tie left out: topk's set is the answer
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


def topk_chunked(x: torch.Tensor, k: int, chunk_size: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of a flattened tensor of any size: top-k of each chunk, then the top-k of their union."""
    flat = x.reshape(-1)
    if flat.numel() <= chunk_size:
        return topk_exact(flat, k)
    vals, idxs = [], []
    for start in range(0, flat.numel(), chunk_size):
        v, i = topk_exact(flat[start:start + chunk_size], k, offset=start)
        vals.append(v)
        idxs.append(i)
    return merge(torch.cat(vals), torch.cat(idxs), k)


def merge(values: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, index = sort_candidates(values, index)
    return values[:k], index[:k]


class TopK:
    """Keeps the exact top-k candidates of each tensor it sees; merges them into a global top-k."""

    def __init__(self, k: int, chunk_size: int = 1 << 22):
        self.k = k
        self.chunk_size = chunk_size
        self.candidates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, name: str, scores: torch.Tensor) -> None:
        v, i = topk_chunked(scores.detach(), self.k, self.chunk_size)
        self.candidates[name] = (v.float().cpu(), i.cpu())

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
