"""Statistics over ALL scores of a model without holding them: streaming moments plus an exact two-pass
radix selection for percentiles and top-share.

Scores are non-negative float32, so their bit patterns sort like their values. Pass 1 counts the top 16 bits
of every score (one histogram of N_BINS bins) and keeps count, float64 sum, M2, min and max; pass 2 histograms
the low 16 bits inside only the bins that hold a wanted rank, which pins the exact float32 value, and sums the
scores of the bins above the top-share thresholds exactly. Without pass 2 a value is known to within its
bin, a relative error of at most 2**-7 (top-share takes each bin's values at its midpoint: within 2**-8).

Work stays on the scores' device: nothing is copied to the host until a summary is asked for, so a GPU run
does not wait on the host once per tensor. On a CPU the scores are read in steps of `bins.CPU_STEP` elements:
by the compiled summary (`critlib.kernels.cpu`, all steps of a tensor in one call, on torch's threads; pass 2's
kept scores too) where a C compiler is at hand, else by torch, whose temporaries then stay in cache.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .bins import N_BINS, high_bits, step_for
from .kernels import cpu

PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9, 99.99)
TOP_SHARES = (0.0001, 0.001, 0.01)  # fractions of all weights: 0.01%, 0.1%, 1%
APPROX_REL_ERROR = 2.0 ** -7
KEPT_FLUSH = 1 << 22  # pass 2 counts the scores it keeps in batches of about this many


def _value(bits: int) -> float:
    return float(np.array([bits], dtype=np.int32).view(np.float32)[0])


@functools.lru_cache(maxsize=1)
def _midpoints() -> torch.Tensor:
    b = torch.arange(N_BINS, dtype=torch.int64) << 16
    lo = b.to(torch.int32).view(torch.float32).double()
    hi = (b | 0xFFFF).to(torch.int32).view(torch.float32).double()
    mid = 0.5 * (lo + hi)
    return torch.where(torch.isfinite(mid), mid, 0.0)  # inf/NaN bit patterns: scores are finite


def summarize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([count, sum, M2, min, max] as float64, high-16-bit counts) of a non-empty float32 chunk, on its
    device. Counts are exact to 2**53 and M2 = Σx² − (Σx)²/n is taken per chunk in float64. On CUDA with
    Triton installed the fused kernel (critlib.kernels) does it in one read, on a CPU the compiled summary
    (critlib.kernels.cpu), else torch."""
    if x.device.type == "cuda":
        from .kernels import is_triton_available
        from .kernels import summarize as fused_summarize
        if is_triton_available(x.device):
            return fused_summarize(x)
    done = cpu.summarize_steps(x, x.numel())
    if done is not None:
        return done[0][0], done[1]
    return _summarize_torch(x)


def _summarize_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.bincount(high_bits(x), minlength=N_BINS)
    x64 = x.double()
    s = x64.sum()
    m2 = (torch.dot(x64, x64) - s * s / x.numel()).clamp_min_(0)
    lo, hi_v = torch.aminmax(x)
    return torch.stack([s.new_full((), x.numel()), s, m2, lo.double(), hi_v.double()]), counts


def summarize_steps(flat: torch.Tensor, step: int, block: int = 0) -> tuple[torch.Tensor, torch.Tensor,
                                                                            torch.Tensor | None]:
    """`summarize` of each step of `step` elements of the 1-D scores `flat`: ([steps, 5] rows, their summed
    histogram, block maxima or None). On a CPU one call of the compiled summary (`critlib.kernels.cpu`) makes
    them all, and with `block` also the maximum of every `block` scores that `critlib.rank` would read again."""
    done = cpu.summarize_steps(flat, step, block)
    if done is not None:
        return done
    rows, counts = [], None
    for start in range(0, flat.numel(), step):
        r, c = summarize(flat[start:start + step].float().contiguous())
        rows.append(r)
        counts = c if counts is None else counts.add_(c)
    return torch.stack(rows), counts, None


@dataclass
class Group:
    """Running statistics of one set of scores (the whole model, a layer or a component)."""
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    total: float = 0.0
    hist_count: torch.Tensor = field(default_factory=lambda: torch.zeros(N_BINS, dtype=torch.int64))
    pending: list[torch.Tensor] = field(default_factory=list)  # [count, sum, M2, min, max] rows, on device
    fine: dict[int, torch.Tensor] = field(default_factory=dict)  # pass 2: hi bin -> low-16-bit counts
    fine_rows: torch.Tensor | None = None  # pass 2: the rows of `fine`, in one [bins, 2**16] block
    high_sum: torch.Tensor | None = None  # pass 2: float64 sum per bin, for bins ≥ the lowest top-share bin

    device: torch.device = torch.device("cpu")  # where the scores were

    def merge(self, rows: torch.Tensor, counts: torch.Tensor) -> None:
        """Fold in `summarize` rows ([m, 5] or [5]) and their histogram, without leaving the device."""
        self.device = counts.device
        if self.hist_count.device != counts.device:
            self.hist_count = self.hist_count.to(counts.device)
        self.hist_count += counts
        self.pending.append(rows.reshape(-1, 5))

    def settle(self) -> None:
        """Move what is pending to the host and fold it in (Chan's parallel update of mean and M2)."""
        if not self.pending:
            return
        r = torch.cat([p.cpu() for p in self.pending]).numpy()
        self.pending = []
        n, s = np.append(r[:, 0], self.count), np.append(r[:, 1], self.mean * self.count)
        m2 = np.append(r[:, 2], self.m2)
        total = int(n.sum())
        mean = float(s.sum()) / total
        keep = n > 0
        self.m2 = float(m2.sum() + (n[keep] * (s[keep] / n[keep] - mean) ** 2).sum())
        self.count, self.mean = total, mean
        self.total += float(r[:, 1].sum())
        self.min = min(self.min, float(r[:, 3].min()))
        self.max = max(self.max, float(r[:, 4].max()))
        self.hist_count = self.hist_count.cpu()

    def wanted_ranks(self) -> list[int]:
        n = self.count
        ranks = set()
        for p in PERCENTILES:
            pos = p / 100 * (n - 1)
            ranks.update((math.floor(pos), math.ceil(pos)))
        return sorted(ranks | set(self.share_ranks()))

    def share_ranks(self) -> list[int]:
        return [self.count - _top_count(q, self.count) for q in TOP_SHARES]

    def _locate(self, rank: int) -> tuple[int, int]:
        cum = torch.cumsum(self.hist_count.cpu(), 0)
        b = int(torch.searchsorted(cum, torch.tensor([rank]), right=True)[0])
        before = int(cum[b - 1]) if b else 0
        return b, rank - before

    def wanted_bins(self) -> list[int]:
        self.settle()
        return sorted({self._locate(r)[0] for r in self.wanted_ranks()}) if self.count else []

    def share_floor(self) -> int:
        """The lowest bin that holds a top-share rank: pass 2 sums every bin from here up."""
        self.settle()
        return min(self._locate(r)[0] for r in self.share_ranks()) if self.count else N_BINS

    def exact(self) -> bool:
        bins = self.wanted_bins()
        return bool(bins) and self.high_sum is not None and \
            all(b in self.fine and int(self.fine[b].sum()) == int(self.hist_count[b]) for b in bins)

    def value_at(self, rank: int, exact: bool) -> float:
        b, within = self._locate(rank)
        if not exact:
            return 0.5 * (_value(b << 16) + _value((b << 16) | 0xFFFF))
        cum = torch.cumsum(self.fine[b].cpu(), 0)
        lo = int(torch.searchsorted(cum, torch.tensor([within]), right=True)[0])
        return _value((b << 16) | lo)

    def sum_from(self, rank: int, exact: bool) -> float:
        """Sum of the scores at ascending ranks ≥ rank."""
        b, within = self._locate(rank)
        if not exact:  # each bin's values taken at the bin's midpoint
            mid = _midpoints()
            c = int(self.hist_count[b])
            return float((self.hist_count[b + 1:].double() * mid[b + 1:]).sum()) + float(mid[b]) * (c - within)
        above = float(self.high_sum[b + 1:].sum())
        fine = self.fine[b].cpu()
        cum = torch.cumsum(fine, 0)
        lo = int(torch.searchsorted(cum, torch.tensor([within]), right=True)[0])
        vals = ((b << 16) | torch.arange(lo + 1, 1 << 16, dtype=torch.int32)).view(torch.float32).double()
        part = float((fine[lo + 1:].double() * vals).sum())
        return above + part + (int(cum[lo]) - within) * _value((b << 16) | lo)

    def summary(self) -> dict:
        self.settle()
        n = self.count
        if n == 0:
            return {"count": 0}
        exact = self.exact()
        pct = {}
        for p in PERCENTILES:
            pos = p / 100 * (n - 1)
            lo_v, hi_v = self.value_at(math.floor(pos), exact), self.value_at(math.ceil(pos), exact)
            pct[_fmt(p)] = lo_v + (hi_v - lo_v) * (pos - math.floor(pos))
        shares = {}
        for q in TOP_SHARES:
            r = n - _top_count(q, n)
            shares[f"{_fmt(q * 100)}%"] = self.sum_from(r, exact) / self.total if self.total > 0 else float("nan")
        out = {"count": n, "min": self.min, "max": self.max, "mean": self.mean,
               "std": math.sqrt(self.m2 / n), "sum": self.total,
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

    def __init__(self, chunk_size: int = 1 << 30):
        self.groups: dict[str, Group] = {}
        self.chunk_size = chunk_size
        self._plan: dict[str, tuple[list[int], int]] | None = None  # pass 2: group -> (wanted bins, share floor)
        self._tables: dict = {}
        self._kept: dict[str, list[torch.Tensor]] = {}  # pass 2, per group: kept scores not yet counted
        self._n_kept = 0
        self._slots: dict = {}

    def add(self, groups: list[str], x: torch.Tensor) -> torch.Tensor | None:
        """Feed the scores `x` to `groups`; returns their float64 sum (a 0-d tensor on x's device) in pass 1."""
        flat = x.detach().reshape(-1)
        if not flat.numel():
            return None
        step = step_for(flat.device, self.chunk_size)
        if self._plan is not None:
            self._refine(groups, flat, step)
            return None
        rows, counts, _ = summarize_steps(flat, step)
        return self.merge(groups, rows, counts)

    def merge(self, groups: list[str], rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Feed `groups` already summarised scores (`summarize` rows and their histogram); returns their sum."""
        for g in groups:
            self.groups.setdefault(g, Group()).merge(rows, counts)
        return rows.reshape(-1, 5)[:, 1].sum()

    def start_refine(self) -> None:
        """Begin pass 2: from now on `add` collects the fine histograms inside the wanted bins. Their
        counters are made here, all at once on the scores' device, rather than piecemeal during the next
        backward pass (small long-lived blocks scattered among its activations keep a CPU heap from
        shrinking)."""
        self._plan = {k: (g.wanted_bins(), g.share_floor()) for k, g in self.groups.items()}
        for k, g in self.groups.items():
            bins = self._plan[k][0]
            block = torch.zeros((len(bins), 1 << 16), dtype=torch.int64, device=g.device)
            g.fine_rows, g.fine = block, {b: block[j] for j, b in enumerate(bins)}
            g.high_sum = torch.zeros(N_BINS, dtype=torch.float64, device=g.device)

    def _table(self, groups: list[str], device: torch.device):
        """Per set of groups: a lookup of the bins pass 2 keeps, and per group its wanted bins and floor."""
        key = (tuple(groups), device)
        if key not in self._tables:
            keep = torch.zeros(N_BINS, dtype=torch.bool)
            for g in groups:
                bins, floor = self._plan[g]
                keep[bins] = True
                keep[floor:] = True
            self._tables[key] = keep.to(device)
        return self._tables[key]

    def _refine(self, groups: list[str], flat: torch.Tensor, step: int) -> None:
        groups = [g for g in groups if g in self._plan]
        if not groups:
            return
        keep = self._table(groups, flat.device)
        done = cpu.kept(flat, keep, step)
        pieces = [done] if done is not None else (
            x[keep[high_bits(x)]] for x in (flat[s:s + step].float() for s in range(0, flat.numel(), step)))
        for kept in pieces:
            for g in groups:
                self._kept.setdefault(g, []).append(kept)
            self._n_kept += kept.numel()
            if self._n_kept >= KEPT_FLUSH:
                self._flush()

    def _flush(self) -> None:
        """Histogram the kept scores, per group: the low 16 bits inside its wanted bins, and float64 sums per
        bin from its share floor up. In batches (a few bincounts per group per batch, none per tensor), in
        slices that bound the temporaries."""
        for g, parts in self._kept.items():
            for x in torch.cat(parts).split(KEPT_FLUSH):
                self._count_kept(g, x)
        self._kept, self._n_kept = {}, 0

    def _slot(self, g: str, device: torch.device) -> torch.Tensor:
        """Bin -> its row among group g's wanted bins; every other bin -> a discarded row."""
        slot = self._slots.get((g, device))
        if slot is None:
            bins = self._plan[g][0]
            slot = torch.full((N_BINS,), len(bins), dtype=torch.int64)
            slot[bins] = torch.arange(len(bins))
            slot = self._slots[(g, device)] = slot.to(device)
        return slot

    def _count_kept(self, g: str, x: torch.Tensor) -> None:
        grp = self.groups[g]
        bins, floor = self._plan[g]
        if cpu.count_kept(x, self._slot(g, x.device), floor, grp.fine_rows, grp.high_sum):
            return
        bits = x.view(torch.int32)
        hi, lo = (bits >> 16).long(), (bits & 0xFFFF).long()
        if bins:
            slot = self._slot(g, x.device)
            rows = slot[hi]
            mine = rows < len(bins)  # count only this group's bins: a catch-all bin would be contended on a GPU
            fine = torch.bincount((rows[mine] << 16) | lo[mine], minlength=len(bins) << 16)
            for j, b in enumerate(bins):
                grp.fine[b] += fine[j << 16:(j + 1) << 16]
        up = hi >= floor
        grp.high_sum += torch.bincount(hi[up], weights=x[up].double(), minlength=N_BINS)

    def summary(self) -> dict:
        self._flush()
        return {k: g.summary() for k, g in self.groups.items()}
