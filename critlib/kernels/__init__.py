"""Fused per-tensor scoring: score, per-block statistics, the stats.py histogram and exact top-K candidates
from ONE read of a weight tensor and its gradient.

`block_partials` summarises the scores of each block of `block` consecutive flat elements (count, float64
sum, float64 Σ(x − block mean)², min, max) and counts the top 16 bits of every score (the pass-1 histogram
of `critlib.stats`). `summarize` reduces that to what `critlib.stats` keeps per chunk, on the device: the
statistics of critlib's scoring use it on CUDA. `block_topk` turns the block maxima into the exact
top-k: the k-th largest block maximum τ is a lower bound of the k-th largest score, so only blocks whose
maximum is ≥ τ (usually k of them) can hold a top-k score; those few blocks are re-scored and ranked exactly
(ties by lowest flat index, as `critlib.rank`). Tensors of any size are processed in chunks of `chunk`
elements (a multiple of `block`), so 32-bit offsets never overflow.

Backends: TRITON (a Triton kernel; CUDA, or the CPU interpreter with TRITON_INTERPRET=1) and TORCH (plain
torch: the reference and the CPU fallback). AUTO picks Triton on a CUDA tensor when Triton is installed.

`multi` does the same for many tensors at once (one grid over all their blocks, the top-k candidates found
on the device, one copy to the host at the end); `critlib.sensitivity.analyze` uses it for pass 1.
"""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass

import torch

from .. import CritlibError
from ..bins import N_BINS
from ..metrics import FUSED
from ..rank import merge, topk_exact

METRICS = FUSED + ("score",)  # score: the tensor holds scores already
BLOCK = 1024
CHUNK = 1 << 30


class Backend(str, enum.Enum):
    """Who computes the fused pass: `OFF` makes whole score tensors instead (the reference path)."""
    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"
    OFF = "off"


def is_triton_available(device: torch.device | str | None = None) -> bool:
    """Triton is importable and can run here: on a CUDA device, or anywhere under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    dev = torch.device(device) if device is not None else None
    return torch.cuda.is_available() and (dev is None or dev.type == "cuda")


def backend_named(name: Backend | str) -> Backend:
    """The backend a `kernel` setting names, or the error that lists the names."""
    try:
        return Backend(name)
    except ValueError:
        raise CritlibError(f"unknown kernel '{name}'; choose {', '.join(b.value for b in Backend)}") from None


def resolve_backend(backend: Backend | str, device: torch.device | str, fallback: Backend = Backend.TORCH) -> Backend:
    """The backend that runs for setting `backend` on `device`: AUTO is Triton on a CUDA device with Triton
    installed, else `fallback` (the analysis passes OFF: on a CPU, whole score tensors are as fast)."""
    backend = backend_named(backend)
    if backend is Backend.AUTO:
        return Backend.TRITON if torch.device(device).type == "cuda" and is_triton_available(device) else fallback
    if backend is Backend.TRITON and not is_triton_available(device):
        raise CritlibError(f"the Triton backend cannot run on {device}: it needs the triton package and a CUDA "
                           "device (or TRITON_INTERPRET=1 on a CPU); use kernel: torch or auto")
    return backend


def score(w: torch.Tensor, g: torch.Tensor | None, metric: str) -> torch.Tensor:
    """fp32 scores of flat `w` (and its gradient `g`), elementwise, as critlib.scores computes them."""
    if metric == "magnitude":
        return w.float().abs()
    if metric == "score":
        return w.float()
    if g is None:
        raise CritlibError(f"metric {metric} needs the gradient")
    if metric == "grad_x_weight":
        return (g.float() * w.float()).abs()
    if metric == "grad_squared":
        return g.float().square()
    raise CritlibError(f"metric {metric} has no fused kernel; choose one of {', '.join(METRICS)}")


@dataclass(frozen=True)
class Partials:
    """Per-block summaries of one tensor's scores and the count of each top-16-bit bin."""
    block: int
    count: torch.Tensor  # int64 [n_blocks]
    sum: torch.Tensor  # float64 [n_blocks]
    m2: torch.Tensor  # float64 [n_blocks]: Σ (x − block mean)²
    min: torch.Tensor  # float32 [n_blocks]
    max: torch.Tensor  # float32 [n_blocks]
    hist_count: torch.Tensor  # int64 [N_BINS]


def _check(w: torch.Tensor, g: torch.Tensor | None, metric: str, block: int, chunk: int) -> None:
    if metric not in METRICS:
        raise CritlibError(f"metric {metric} has no fused kernel; choose one of {', '.join(METRICS)}")
    if metric not in ("magnitude", "score") and (g is None or g.shape != w.shape):
        raise CritlibError(f"metric {metric} needs a gradient shaped like the weight {tuple(w.shape)}")
    if block <= 0 or block & (block - 1) or chunk <= 0 or chunk % block:
        raise CritlibError(f"block={block} must be a power of two and chunk={chunk} a positive multiple of it")


def block_partials(w: torch.Tensor, g: torch.Tensor | None, metric: str, backend: Backend | str = Backend.AUTO,
                   block: int = BLOCK, chunk: int = CHUNK) -> Partials:
    """Score `w`/`g` (any shape, flattened) and summarise each block; reads each element once."""
    _check(w, g, metric, block, chunk)
    backend = resolve_backend(backend, w.device)
    if backend is Backend.OFF:
        raise CritlibError("block_partials needs a backend that computes: torch, triton or auto")
    wf = w.detach().reshape(-1)
    gf = g.detach().reshape(-1) if g is not None and metric not in ("magnitude", "score") else None
    n = wf.numel()
    nb = math.ceil(n / block)
    dev = w.device
    out = Partials(block, torch.empty(nb, dtype=torch.int64, device=dev), torch.empty(nb, dtype=torch.float64, device=dev),
                   torch.empty(nb, dtype=torch.float64, device=dev), torch.empty(nb, dtype=torch.float32, device=dev),
                   torch.empty(nb, dtype=torch.float32, device=dev), torch.zeros(N_BINS, dtype=torch.int64, device=dev))
    if backend is Backend.TRITON:
        from .triton_fused import partials_chunk
    else:
        from .reference import partials_chunk
    if backend is Backend.TORCH:  # bound the reference path's float64 temporaries
        chunk = min(chunk, max(block, (1 << 22) // block * block))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        b0, b1 = start // block, math.ceil(stop / block)
        partials_chunk(wf[start:stop], None if gf is None else gf[start:stop], metric, block,
                       [t[b0:b1] for t in (out.count, out.sum, out.m2, out.min, out.max)],
                       out.hist_count)
    return out


def block_topk(w: torch.Tensor, g: torch.Tensor | None, metric: str, block_max: torch.Tensor, block: int, k: int,
               group: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k (values desc, flat indices; ties → lowest index) from the block maxima, re-scoring only the
    blocks that can hold a top-k score (those reaching τ, the k-th largest block maximum: the k-th largest
    score is ≥ τ), `group` blocks at a time. One wait on the device to learn which blocks those are."""
    wf = w.detach().reshape(-1)
    gf = g.detach().reshape(-1) if g is not None and metric not in ("magnitude", "score") else None
    n = wf.numel()
    k = min(k, n)
    if k == 0:
        return torch.empty(0, device=w.device), torch.empty(0, dtype=torch.long, device=w.device)
    tau = torch.topk(block_max, min(k, block_max.numel()), sorted=False).values.min()
    blocks = (block_max >= tau).nonzero().flatten()
    vals, idxs = [], []
    lane = torch.arange(block, device=w.device)
    for i in range(0, blocks.numel(), group):
        idx = (blocks[i:i + group, None] * block + lane).reshape(-1)  # ascending: ties go to the lowest index
        s = score(wf[idx.clamp_max(n - 1)], None if gf is None else gf[idx.clamp_max(n - 1)], metric)
        s = torch.where(idx < n, s, -math.inf)  # lanes past the end of the last block never win
        v, pos = topk_exact(s, k)
        vals.append(v)
        idxs.append(idx[pos])
    return (vals[0], idxs[0]) if len(vals) == 1 else merge(torch.cat(vals), torch.cat(idxs), k)


@dataclass(frozen=True)
class Fused:
    partials: Partials
    values: torch.Tensor  # the exact top-k scores, descending
    index: torch.Tensor  # their flat indices


def fused(w: torch.Tensor, g: torch.Tensor | None, metric: str, k: int, backend: Backend | str = Backend.AUTO,
          block: int = BLOCK, chunk: int = CHUNK) -> Fused:
    """Per-block statistics, histogram and exact top-k of one tensor's scores."""
    p = block_partials(w, g, metric, backend, block, chunk)
    v, i = block_topk(w, g, metric, p.max, block, k)
    return Fused(p, v, i)


def reduce(p: Partials) -> torch.Tensor:
    """The [count, sum, M2, min, max] float64 row of `critlib.stats` from block partials, on their device
    (Chan's merge of the block moments)."""
    c = p.count.double()
    n, total = c.sum(), p.sum.sum()
    m2 = p.m2.sum() + (c * (p.sum / c - total / n).square()).sum()
    return torch.stack([n, total, m2, p.min.min().double(), p.max.max().double()])


def summarize(x: torch.Tensor, backend: Backend | str = Backend.AUTO) -> tuple[torch.Tensor, torch.Tensor]:
    """`critlib.stats.summarize` of non-empty float32 scores by the fused kernel: one read of `x`."""
    p = block_partials(x, None, "score", backend)
    return reduce(p), p.hist_count
