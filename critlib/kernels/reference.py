"""The plain-torch path of the fused kernel: the reference for the Triton kernel and the CPU fallback."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..bins import N_BINS


def partials_chunk(w: torch.Tensor, g: torch.Tensor | None, metric: str, block: int, blocks: list[torch.Tensor],
                   hist_count: torch.Tensor) -> None:
    """Fill the per-block outputs `blocks` = [count, sum, m2, min, max] of this chunk and add its histogram."""
    from . import score
    s = score(w, g, metric)
    n = s.numel()
    nb = math.ceil(n / block)
    pad = nb * block - n
    count, total, m2, lo, hi = blocks
    count.fill_(block)
    count[-1] = block - pad
    x = F.pad(s.double(), (0, pad)).view(nb, block)
    total.copy_(x.sum(1))
    valid = F.pad(torch.ones(n, dtype=torch.bool, device=s.device), (0, pad)).view(nb, block)
    d = torch.where(valid, x - (total / count)[:, None], 0.0)
    m2.copy_(d.square().sum(1))
    lo.copy_(F.pad(s, (0, pad), value=math.inf).view(nb, block).amin(1))
    hi.copy_(F.pad(s, (0, pad), value=-math.inf).view(nb, block).amax(1))
    bins = (s.view(torch.int32) >> 16).long()
    hist_count += torch.bincount(bins, minlength=N_BINS)
