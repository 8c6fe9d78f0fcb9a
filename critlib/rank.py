"""Exact top-K: per tensor (in chunks, so any size works) and global (a merge of per-tensor candidates).

Order is by score descending, ties broken by (parameter order, flat index) ascending, so every ranking is
deterministic and equals a full stable sort of all scores.
"""

from __future__ import annotations

import torch


def topk_exact(x: torch.Tensor, k: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of a 1-D tensor as (values desc, indices + offset); among equal values the lowest index wins."""
    k = min(k, x.numel())
    if k == 0:
        return x.new_empty(0), torch.empty(0, dtype=torch.long, device=x.device)
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
