"""Statistics over ALL scores of a model without holding them: streaming moments plus an exact two-pass
radix selection for percentiles and top-share.

Scores are non-negative float32, so their bit patterns sort like their values. Pass 1 histograms the top
16 bits (count and float64 sum per bin); pass 2 histograms the low 16 bits inside only the bins that hold a
wanted rank, which pins the exact float32 value. Without pass 2 a value is known to within its bin: a
relative error of at most 2**-7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9, 99.99)
TOP_SHARES = (0.0001, 0.001, 0.01)  # fractions of all weights: 0.01%, 0.1%, 1%
N_BINS = 1 << 15  # the sign bit of a non-negative float is 0: 15 bits remain above the low 16
APPROX_REL_ERROR = 2.0 ** -7


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.float().contiguous().view(torch.int32)


def _value(bits: int) -> float:
    return float(np.array([bits], dtype=np.int32).view(np.float32)[0])


def summarize(x: torch.Tensor, hi: torch.Tensor) -> tuple:
    """(count, mean, M2, min, max, bin counts, bin sums) of one non-empty chunk, computed once however many
    groups it feeds."""
    x64 = x.double()
    mean_b = float(x64.mean())
    m2_b = float((x64 - mean_b).square_().sum())
    return (x.numel(), mean_b, m2_b, float(x.min()), float(x.max()),
            torch.bincount(hi, minlength=N_BINS).cpu(), torch.bincount(hi, weights=x64, minlength=N_BINS).cpu())


@dataclass
class Group:
    """Running statistics of one set of scores (the whole model, a layer or a component)."""
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    hist_count: torch.Tensor = field(default_factory=lambda: torch.zeros(N_BINS, dtype=torch.int64))
    hist_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(N_BINS, dtype=torch.float64))
    fine: dict[int, torch.Tensor] = field(default_factory=dict)  # pass 2: hi bin -> low-16-bit counts

    def add(self, x: torch.Tensor, hi: torch.Tensor) -> None:
        if x.numel():
            self.merge(*summarize(x, hi))

    def merge(self, n: int, mean_b: float, m2_b: float, lo: float, hi_v: float, hist_count: torch.Tensor,
              hist_sum: torch.Tensor) -> None:
        """Fold in the `summarize` of a non-empty chunk (Chan's parallel update of mean and M2)."""
        delta = mean_b - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += m2_b + delta * delta * self.count * n / total
        self.count = total
        self.min = min(self.min, lo)
        self.max = max(self.max, hi_v)
        self.hist_count += hist_count
        self.hist_sum += hist_sum

    def wanted_ranks(self) -> list[int]:
        n = self.count
        ranks = set()
        for p in PERCENTILES:
            pos = p / 100 * (n - 1)
            ranks.update((math.floor(pos), math.ceil(pos)))
        for q in TOP_SHARES:
            ranks.add(n - _top_count(q, n))
        return sorted(ranks)

    def _locate(self, rank: int) -> tuple[int, int]:
        cum = torch.cumsum(self.hist_count, 0)
        b = int(torch.searchsorted(cum, torch.tensor([rank]), right=True)[0])
        before = int(cum[b - 1]) if b else 0
        return b, rank - before

    def wanted_bins(self) -> set[int]:
        return {self._locate(r)[0] for r in self.wanted_ranks()} if self.count else set()

    def refine(self, lo_by_bin: dict[int, torch.Tensor]) -> None:
        for b, lo in lo_by_bin.items():
            if b not in self.fine:
                self.fine[b] = torch.zeros(1 << 16, dtype=torch.int64)
            self.fine[b] += torch.bincount(lo, minlength=1 << 16).cpu()

    def exact(self) -> bool:
        bins = self.wanted_bins()
        return bool(bins) and all(b in self.fine and int(self.fine[b].sum()) == int(self.hist_count[b])
                                  for b in bins)

    def value_at(self, rank: int, exact: bool) -> float:
        b, within = self._locate(rank)
        if not exact:
            return 0.5 * (_value(b << 16) + _value((b << 16) | 0xFFFF))
        cum = torch.cumsum(self.fine[b], 0)
        lo = int(torch.searchsorted(cum, torch.tensor([within]), right=True)[0])
        return _value((b << 16) | lo)

    def sum_from(self, rank: int, exact: bool) -> float:
        """Sum of the scores at ascending ranks ≥ rank."""
        b, within = self._locate(rank)
        above = float(self.hist_sum[b + 1:].sum())
        if not exact:  # assume the bin's values are spread evenly over its count
            c = int(self.hist_count[b])
            return above + float(self.hist_sum[b]) * (c - within) / c
        fine = self.fine[b]
        cum = torch.cumsum(fine, 0)
        lo = int(torch.searchsorted(cum, torch.tensor([within]), right=True)[0])
        vals = ((b << 16) | torch.arange(lo + 1, 1 << 16, dtype=torch.int32)).view(torch.float32).double()
        part = float((fine[lo + 1:].double() * vals).sum())
        return above + part + (int(cum[lo]) - within) * _value((b << 16) | lo)

    def summary(self) -> dict:
        n = self.count
        if n == 0:
            return {"count": 0}
        exact = self.exact()
        total = float(self.hist_sum.sum())
        pct = {}
        for p in PERCENTILES:
            pos = p / 100 * (n - 1)
            lo_v, hi_v = self.value_at(math.floor(pos), exact), self.value_at(math.ceil(pos), exact)
            pct[_fmt(p)] = lo_v + (hi_v - lo_v) * (pos - math.floor(pos))
        shares = {}
        for q in TOP_SHARES:
            r = n - _top_count(q, n)
            shares[f"{_fmt(q * 100)}%"] = self.sum_from(r, exact) / total if total > 0 else float("nan")
        out = {"count": n, "min": self.min, "max": self.max, "mean": self.mean,
               "std": math.sqrt(self.m2 / n), "sum": total,
               "max_over_mean": self.max / self.mean if self.mean > 0 else float("nan"),
               "percentiles": pct, "top_share": shares, "exact": exact}
        if not exact:
            out["percentile_relative_error_bound"] = APPROX_REL_ERROR
        return out


def _top_count(q: float, n: int) -> int:
    """How many weights make up the top fraction q of n: ceil(q·n), at least one."""
    return max(1, math.ceil(q * n - 1e-9))


def _fmt(v: float) -> str:
    return f"{v:g}"


class Stats:
    """Statistics of one metric over named groups; each score tensor is fed to all groups it belongs to."""

    def __init__(self, chunk_size: int = 1 << 22):
        self.groups: dict[str, Group] = {}
        self.chunk_size = chunk_size
        self._wanted: dict[str, set[int]] | None = None

    def add(self, groups: list[str], x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1)
        for start in range(0, flat.numel(), self.chunk_size):
            chunk = flat[start:start + self.chunk_size].float()
            bits = _bits(chunk)
            hi = (bits >> 16).long()
            if self._wanted is None:
                if chunk.numel():
                    part = summarize(chunk, hi)
                    for g in groups:
                        self.groups.setdefault(g, Group()).merge(*part)
            else:
                self._refine(groups, bits, hi)

    def start_refine(self) -> None:
        """Begin pass 2: from now on `add` collects the fine histograms inside the wanted bins."""
        self._wanted = {k: g.wanted_bins() for k, g in self.groups.items()}

    def _refine(self, groups: list[str], bits: torch.Tensor, hi: torch.Tensor) -> None:
        bins = sorted(set().union(*(self._wanted.get(g, set()) for g in groups)))
        if not bins:
            return
        wanted = torch.zeros(N_BINS, dtype=torch.bool, device=hi.device)  # a lookup table: 7× faster than isin
        wanted[bins] = True
        sel = wanted[hi]
        hi_s, lo_s = hi[sel], (bits[sel] & 0xFFFF).long()
        for g in groups:
            if g in self._wanted:
                self.groups[g].refine({b: lo_s[hi_s == b] for b in self._wanted[g]})

    def summary(self) -> dict:
        return {k: g.summary() for k, g in self.groups.items()}
