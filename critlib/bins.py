"""The float32 bin layout and step sizes shared by statistics (`stats`), ranking (`rank`) and the fused
kernels (`kernels`), kept apart so that none of them imports another to learn them.

Scores are non-negative float32, so their bit patterns sort like their values; bin b holds the floats whose
top 16 bits are b.
"""

from __future__ import annotations

import torch

N_BINS = 1 << 15  # the sign bit of a non-negative float is 0: 15 bits remain above the low 16
CPU_STEP = 1 << 18
GPU_STEP = 1 << 26  # bounds the temporaries (≤ 8 bytes per element) while keeping launches few


def step_for(device: torch.device, chunk_size: int) -> int:
    """Elements handled at once: `chunk_size`, capped at CPU_STEP on a CPU and GPU_STEP elsewhere."""
    return max(1, min(chunk_size, CPU_STEP if device.type == "cpu" else GPU_STEP))


def high_bits(x: torch.Tensor) -> torch.Tensor:
    """The top 16 bits of float32 `x` as bin numbers: int32 on a CPU (half the traffic), int64 elsewhere
    (the index type every CUDA kernel accepts)."""
    hi = x.view(torch.int32) >> 16
    return hi if x.device.type == "cpu" else hi.long()
