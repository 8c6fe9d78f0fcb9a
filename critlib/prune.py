"""Unstructured pruning by a score: zero the lowest-scored Linear weights, per layer or model-wide.

A mask prunes exactly n weights: the n lowest scores, ties broken by (parameter order, flat index)
ascending, i.e. the first n of a full stable sort. The threshold is found without concatenating or sorting
anything: a two-level radix count over the fp32 bit patterns of the scores (scores are ≥ 0, so their bit
patterns order like their values), then the ties at the threshold taken in order.

Per-layer mode prunes round(s · numel) of each tensor; global mode prunes round(s · N) of all N weights
together. A protected set (e.g. the critical weights) is never pruned: its scores count as +inf.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import CritlibError
from .edit import edited
from .quantize import LinearWeight
from .scores import score_model

MODES = ("per_layer", "global")


def _keys(s: torch.Tensor) -> torch.Tensor:
    s = s.detach().reshape(-1).float()
    if not bool((s >= 0).all()):  # also false for NaN
        raise CritlibError("pruning scores must be ≥ 0 and not NaN; use |score|")
    return (s + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0


def _hist(keys: torch.Tensor, shift: int, sel: torch.Tensor | None = None) -> torch.Tensor:
    part = (keys >> shift) & 0xFFFF if shift == 0 else keys >> shift
    if sel is not None:
        part = part[sel]
    return torch.bincount(part.long(), minlength=1 << 16).cpu()


def lowest(scores: dict[str, torch.Tensor], n: int, order: list[str] | None = None,
           protect: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Bool masks (shaped like each score tensor) of the n lowest scores over all tensors together, ties
    going to the earlier tensor of `order` (default: dict order), then the lower flat index; weights at
    `protect[name]` flat indices are never chosen."""
    order = list(order or scores)
    keys = {}
    for name in order:
        k = _keys(scores[name])
        if protect and name in protect and protect[name].numel():
            k = k.clone()
            k[protect[name].to(k.device)] = 0x7F800001  # above +inf: never pruned
        keys[name] = k
    total = sum(k.numel() for k in keys.values())
    n_prot = sum(int((keys[nm] == 0x7F800001).sum()) for nm in protect if nm in keys) if protect else 0
    if not 0 <= n <= total - n_prot:
        raise CritlibError(f"cannot prune {n} weights: only {total - n_prot} of {total} are prunable "
                           f"({n_prot} protected); lower the sparsity or protect fewer weights")
    masks = {name: torch.zeros(scores[name].shape, dtype=torch.bool, device=keys[name].device) for name in order}
    if n == 0:
        return masks
    hi = sum(_hist(k, 16) for k in keys.values())
    cum = hi.cumsum(0)
    b = int(torch.searchsorted(cum, torch.tensor(n), right=False))
    below = int(cum[b - 1]) if b else 0
    lo = sum(_hist(k, 0, (k >> 16) == b) for k in keys.values())
    cum_lo = lo.cumsum(0)
    l_ = int(torch.searchsorted(cum_lo, torch.tensor(n - below), right=False))
    below += int(cum_lo[l_ - 1]) if l_ else 0
    threshold = (b << 16) | l_
    ties = n - below
    for name in order:
        k = keys[name]
        m = (k < threshold)
        if ties > 0:
            eq = (k == threshold).nonzero().flatten()[:ties]
            m[eq] = True
            ties -= int(eq.numel())
        masks[name] = m.reshape(scores[name].shape)
    return masks


def prune_masks(scores: dict[str, torch.Tensor], sparsity: float, mode: str = "per_layer",
                protect: dict[str, torch.Tensor] | None = None,
                order: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Masks pruning `sparsity` of the weights: round(s · numel) of each tensor (per_layer) or round(s · N)
    of all N weights together (global)."""
    if mode not in MODES:
        raise CritlibError(f"unknown prune mode '{mode}'; choose per_layer or global")
    if not 0 <= sparsity < 1:
        raise CritlibError(f"sparsity={sparsity} must lie in [0, 1)")
    order = list(order or scores)
    if mode == "global":
        n = int(round(sparsity * sum(scores[nm].numel() for nm in order)))
        return lowest(scores, n, order, protect)
    return {nm: lowest({nm: scores[nm]}, int(round(sparsity * scores[nm].numel())), [nm],
                       {nm: protect[nm]} if protect and nm in protect else None)[nm] for nm in order}


@dataclass
class Pruned:
    """What `pruned` did: weights masked, masked weights whose stored bits changed (all but those already
    +0.0), and the zeros counted in the pruned tensors afterwards (the real sparsity is n_zero / n_weights)."""
    n_weights: int = 0
    n_masked: int = 0
    n_changed: int = 0
    n_zero: int = 0

    @property
    def sparsity(self) -> float:
        return self.n_zero / self.n_weights if self.n_weights else 0.0


@contextmanager
def pruned(model: torch.nn.Module, weights: list[LinearWeight], masks: dict[str, torch.Tensor]):
    """Zero the masked weights for the block; only the masked values are saved, and restored on exit."""
    params = {lw.name: lw.param for lw in weights}
    with edited(params, {name: masks[name] for name in params if name in masks}, lambda *_: 0.0) as edit:
        info = Pruned(sum(p.numel() for p in params.values()), edit.n_selected, edit.n_changed,
                      sum(int((p.detach() == 0).sum()) for p in params.values()))
        yield info


def linear_scores(model: torch.nn.Module, windows: torch.Tensor, metric: str, weights: list[LinearWeight],
                  batch_size: int = 8, fisher_dtype: torch.dtype = torch.float32,
                  progress: bool = False) -> dict[str, torch.Tensor]:
    """One metric's fp32 scores of the given weights only (kept on the weights' device), in one scoring pass."""
    want = {lw.name for lw in weights}
    out: dict[str, torch.Tensor] = {}

    def emit(m, name, s):
        if m == metric and name in want:
            out[name] = s.detach().float()

    if metric == "magnitude":
        for lw in weights:
            out[lw.name] = lw.param.detach().float().abs()
    else:
        score_model(model, windows, [metric], emit, batch_size, fisher_dtype, progress, f"scoring {metric}")
    missing = want - set(out)
    if missing:
        raise CritlibError(f"metric {metric} gave no scores for {', '.join(sorted(missing))}")
    return {lw.name: out[lw.name] for lw in weights}


def random_scores(weights: list[LinearWeight], seed: int) -> dict[str, torch.Tensor]:
    """Uniform [0, 1) scores drawn on the CPU from `seed`: the random-choice baseline."""
    gen = torch.Generator().manual_seed(seed)
    return {lw.name: torch.rand(lw.param.shape, generator=gen) for lw in weights}
