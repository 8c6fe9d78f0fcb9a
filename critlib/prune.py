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


PROTECTED = 0x7F800001  # a key above +inf's: never among the lowest


def _keys(s: torch.Tensor) -> torch.Tensor:
    """The scores' fp32 bit patterns as int32 (≥ 0 scores order like their keys): a view of `s` unless a -0.0
    must become +0.0 (then a copy)."""
    s = s.detach().reshape(-1).float()
    if not bool((s >= 0).all()):  # also false for NaN
        raise CritlibError("pruning scores must be ≥ 0 and not NaN; use |score|")
    if bool(torch.signbit(s).any()):
        s = s + 0.0  # turns -0.0 into +0.0
    return s.view(torch.int32)


class Lowest:
    """Scores of several tensors prepared for choosing their n lowest again and again (pruning at several
    sparsities, per tensor or all together): the radix keys and each tensor's histogram of their top 16 bits
    are made once, so each choice costs one pass to resolve the threshold's bucket and one to mark the mask.
    Keys are views of the scores where they can be: the scores must not change while this is used."""

    def __init__(self, scores: dict[str, torch.Tensor], order: list[str] | None = None,
                 protect: dict[str, torch.Tensor] | None = None):
        self.order = list(order or scores)
        self.shapes = {name: scores[name].shape for name in self.order}
        self.keys: dict[str, torch.Tensor] = {}
        self.n_protected: dict[str, int] = {}
        self.hi: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # occupied top-16-bit bins and their counts
        for name in self.order:
            k = _keys(scores[name])
            if protect and name in protect and protect[name].numel():
                k = k.clone() if k.data_ptr() == scores[name].data_ptr() else k
                k[protect[name].to(k.device)] = PROTECTED
                self.n_protected[name] = int((k == PROTECTED).sum())
            self.keys[name] = k
            counts = torch.bincount(k >> 16, minlength=1 << 16).cpu()
            bins = counts.nonzero().flatten()
            self.hi[name] = (bins, counts[bins])

    def masks(self, n: int, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Bool masks of the n lowest scores over the tensors `names` (default: all) together, ties going to
        the earlier tensor of the order, then the lower flat index; protected weights are never chosen."""
        names = list(names or self.order)
        total = sum(self.keys[nm].numel() for nm in names)
        n_prot = sum(self.n_protected.get(nm, 0) for nm in names)
        if not 0 <= n <= total - n_prot:
            raise CritlibError(f"cannot prune {n} weights: only {total - n_prot} of {total} are prunable "
                               f"({n_prot} protected); lower the sparsity or protect fewer weights")
        if n == 0:
            return {nm: torch.zeros(self.shapes[nm], dtype=torch.bool, device=self.keys[nm].device)
                    for nm in names}
        hi = torch.zeros(1 << 16, dtype=torch.long)
        for nm in names:
            hi.index_add_(0, *self.hi[nm])
        cum = hi.cumsum(0)
        b = int(torch.searchsorted(cum, torch.tensor(n), right=False))
        below = int(cum[b - 1]) if b else 0
        lo = {}  # per tensor holding keys in bucket b: the counts of their low 16 bits
        for nm in names:
            bins, _ = self.hi[nm]
            if bool((bins == b).any()):
                k = self.keys[nm]
                lo[nm] = torch.bincount(k[(k >> 16) == b] & 0xFFFF, minlength=1 << 16).cpu()
        cum_lo = sum(lo.values()).cumsum(0)
        l_ = int(torch.searchsorted(cum_lo, torch.tensor(n - below), right=False))
        below += int(cum_lo[l_ - 1]) if l_ else 0
        threshold = (b << 16) | l_
        ties = n - below  # of the keys equal to the threshold, the first `ties` in (tensor, index) order
        out = {}
        for nm in names:
            k = self.keys[nm]
            n_eq = int(lo[nm][l_]) if nm in lo else 0
            if ties >= n_eq:
                m = k <= threshold
                ties -= n_eq
            else:
                m = k < threshold
                if ties:
                    m[(k == threshold).nonzero().flatten()[:ties]] = True
                    ties = 0
            out[nm] = m.reshape(self.shapes[nm])
        return out

    def prune_masks(self, sparsity: float, mode: str = "per_layer") -> dict[str, torch.Tensor]:
        """Masks pruning `sparsity` of the weights: round(s · numel) of each tensor (per_layer) or round(s · N)
        of all N weights together (global)."""
        _check(sparsity, mode)
        if mode == "global":
            return self.masks(int(round(sparsity * sum(k.numel() for k in self.keys.values()))))
        out = {}
        for nm in self.order:
            out.update(self.masks(int(round(sparsity * self.keys[nm].numel())), [nm]))
        return out


def _check(sparsity: float, mode: str) -> None:
    if mode not in MODES:
        raise CritlibError(f"unknown prune mode '{mode}'; choose per_layer or global")
    if not 0 <= sparsity < 1:
        raise CritlibError(f"sparsity={sparsity} must lie in [0, 1)")


def lowest(scores: dict[str, torch.Tensor], n: int, order: list[str] | None = None,
           protect: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Bool masks (shaped like each score tensor) of the n lowest scores over all tensors together, ties
    going to the earlier tensor of `order` (default: dict order), then the lower flat index; weights at
    `protect[name]` flat indices are never chosen."""
    return Lowest(scores, order, protect).masks(n)


def prune_masks(scores: dict[str, torch.Tensor], sparsity: float, mode: str = "per_layer",
                protect: dict[str, torch.Tensor] | None = None,
                order: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Masks pruning `sparsity` of the weights: round(s · numel) of each tensor (per_layer) or round(s · N)
    of all N weights together (global). To prune at several sparsities, make one `Lowest` and ask it."""
    _check(sparsity, mode)
    return Lowest(scores, order, protect).prune_masks(sparsity, mode)


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
    """Zero the masked weights for the block and put back every bit on exit. Of each tensor, what is saved
    is what takes less memory: the masked weights (their values and int64 indices) or the whole tensor (from
    a third of an fp32 tensor pruned on, a fifth of a bf16 one: at 70% of a bf16 model, 1× its size instead
    of 3.5×)."""
    params = {lw.name: lw.param for lw in weights}
    where, whole, n_masked = {}, {}, 0
    for name, p in params.items():
        if name not in masks:
            continue
        m = masks[name]
        if m.dtype != torch.bool or m.numel() != p.numel():
            raise CritlibError(f"the pruning mask for {name} is {m.dtype} {tuple(m.shape)}; give a bool mask "
                               f"shaped like the parameter {tuple(p.shape)}")
        n = int(m.sum())
        n_masked += n
        if n * (8 + p.element_size()) > p.numel() * p.element_size():
            where[name], whole[name] = None, m
        else:
            where[name] = m

    def zero(name, p, index, old):
        if index is None:
            return old.masked_fill(whole[name].to(old.device).reshape(old.shape), 0.0)
        return 0.0

    with edited(params, where, zero) as edit:
        yield Pruned(sum(p.numel() for p in params.values()), n_masked, edit.n_changed,
                     sum(int((p.detach() == 0).sum()) for p in params.values()))


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
