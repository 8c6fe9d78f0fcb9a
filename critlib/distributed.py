"""Data-parallel scoring with torch.distributed, as `torchrun` launches it (NCCL on GPUs, gloo on CPUs).

Every rank holds the whole model and the same windows; each scores its contiguous share of the windows.
The summed-loss gradient of a tensor (for fisher: its per-rank sum of squared per-sequence gradients; for
wanda: its input norms and token count) is all-reduced across ranks inside the post-accumulate-grad hook
that emits it, before any score is computed, so every rank emits the same global scores and rank 0 writes.

Collectives are matched by the order ranks issue them. All ranks run the same model with the same hooks, so
autograd finalises the tensors in the same order; each reduction is preceded by a three-number all-reduce
of a fingerprint of the tensor's name, so a rank that reached another tensor raises instead of mixing two.
"""

from __future__ import annotations

import os
import zlib
from contextlib import contextmanager

import torch
import torch.distributed as dist

from . import CritlibError


def world() -> tuple[int, int]:
    """(rank, world size) of the running process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def active() -> bool:
    return world()[1] > 1


def describe() -> dict:
    rank, n = world()
    return {"world_size": n, "backend": dist.get_backend() if n > 1 else None}


@contextmanager
def session(device: str = "auto"):
    """Join the process group that torchrun describes (WORLD_SIZE > 1) and leave it on exit; a no-op in a
    single process or when a group is already running."""
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n <= 1 or not dist.is_available() or dist.is_initialized():
        yield
        return
    if device.startswith("cuda:"):
        raise CritlibError(f"device={device} would put every rank on one GPU; under torchrun use device: auto "
                           "(each rank takes the GPU of its LOCAL_RANK) or device: cpu")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of `windows` [n, seq_len] (sizes differ by at most one)."""
    rank, n = world()
    if n == 1:
        return windows
    total = windows.shape[0]
    if total < n:
        raise CritlibError(f"{total} scoring windows cannot be shared by {n} ranks; set n_sequences ≥ {n} "
                           "or launch fewer processes")
    return windows[rank * total // n:(rank + 1) * total // n]


class Reducer:
    """Sums tensors and counts over all ranks, checking that every rank reduces the same tensor."""

    def __init__(self):
        self.rank, self.size = world()
        self.nccl = self.size > 1 and dist.get_backend() == "nccl"

    def _device(self, t: torch.Tensor | None = None) -> torch.device:
        if self.nccl:
            return t.device if t is not None and t.is_cuda else torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def total(self, n: int) -> int:
        t = torch.tensor([float(n)], dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return int(round(float(t.item())))

    def _check(self, tag: str, numel: int) -> None:
        h = float(zlib.crc32(tag.encode()) & 0xFFFFF)
        t = torch.tensor([h, h * h, float(numel)], dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        s, s2, m = (float(v) for v in t.tolist())
        if s != self.size * h or s2 != self.size * h * h or m != self.size * numel:
            raise CritlibError(f"rank {self.rank} reduced '{tag}' while another rank reduced a different tensor; "
                               "every rank must run the same model, metrics and hooks")

    def sum_(self, tag: str, t: torch.Tensor) -> torch.Tensor:
        """The fp32 sum of `t` over all ranks (in place when `t` is already a contiguous fp32 tensor on the
        collective's device)."""
        self._check(tag, t.numel())
        dev = self._device(t)
        buf = t if (t.dtype == torch.float32 and t.device == dev and t.is_contiguous()) \
            else t.to(device=dev, dtype=torch.float32, memory_format=torch.contiguous_format)
        dist.all_reduce(buf)
        return buf if buf.device == t.device else buf.to(t.device)
