"""Peak memory of pruning (`critlib.prune.pruned`) at one sparsity: weights of a model's Linear shapes in a
dtype, their masks from random scores, and the block that zeroes and restores them. Prints the resident set
before and at the peak, and the peak's extra over the weights, as a multiple of the weights' bytes
(BENCHMARKS.md, "Memory of pruning").

    .venv/bin/python bench/bench_prune_memory.py [--dtype bf16] [--sparsity 0.7] [--layers 16]

Each run is its own process (the peak is the process's), so compare runs of this script, not one in a loop.
"""

from __future__ import annotations

import argparse
import json
import resource

import torch

from critlib.prune import Lowest, pruned
from critlib.quantize import LinearWeight

SHAPES = [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192)]  # Llama-3.2-1B
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--layers", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    weights = [LinearWeight(f"l{i}.w{j}", torch.nn.Parameter(torch.randn(s).to(DTYPES[args.dtype]),
                                                            requires_grad=False), s[1])
               for i in range(args.layers) for j, s in enumerate(SHAPES)]
    masks = {lw.name: Lowest({lw.name: torch.rand(lw.param.shape)}).prune_masks(args.sparsity)[lw.name]
             for lw in weights}  # one score tensor at a time: the peak before the block is weights + masks
    weight_mib = sum(lw.param.numel() * lw.param.element_size() for lw in weights) / 2**20
    mask_mib = sum(m.numel() for m in masks.values()) / 2**20
    before = rss_mib()
    with pruned(None, weights, masks) as info:
        inside = rss_mib()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"dtype": args.dtype, "sparsity": args.sparsity, "weights_mib": round(weight_mib, 1),
                      "masks_mib": round(mask_mib, 1), "rss_before_mib": round(before, 1),
                      "rss_inside_mib": round(inside, 1), "peak_mib": round(peak, 1),
                      "held_inside_x_weights": round((inside - before) / weight_mib, 2),
                      "peak_extra_x_weights": round((peak - before) / weight_mib, 2),
                      "n_masked": info.n_masked}))


if __name__ == "__main__":
    main()
