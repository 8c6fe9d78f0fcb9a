"""The CPU cost of each step of torch's `critlib.stats.summarize`, of the compiled summary that replaces it
(`critlib.kernels.cpu`) and of the top-K, per weight, on one score tensor read in the chunks `Stats` uses,
with the alternatives tried for the histogram (BENCHMARKS.md, "Ranking + statistics on an Intel Xeon").
Prints ns per weight, best and median of --repeats runs.

    .venv/bin/python bench/bench_summary_steps.py [--numel 65667072] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from critlib.bins import CPU_STEP, N_BINS
from critlib.rank import BLOCK, topk_chunked
from critlib.kernels import cpu
from critlib.stats import _summarize_torch, summarize_steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--numel", type=int, default=250 * CPU_STEP)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    step = CPU_STEP
    n = args.numel // step * step
    x = torch.rand(n) ** 3  # non-negative scores spread over several octaves
    xi = x.view(torch.int32)
    hi = xi >> 16
    chunks = range(0, n, step)
    ibuf, fbuf = torch.empty(step, dtype=torch.int32), torch.empty(step, dtype=torch.float64)
    rnd = torch.randint(0, N_BINS, (n,), dtype=torch.int32)
    off4 = (torch.arange(step, dtype=torch.int32) % 4) << 15
    hn = hi.numpy()
    maxima = summarize_steps(x, step, BLOCK)[2]

    cases = {
        "torch's per-chunk summary (stats._summarize_torch)": lambda: [_summarize_torch(x[i:i + step]) for i in chunks],
        "compiled C summary, all chunks (stats.summarize_steps)": lambda: summarize_steps(x, step),
        "  the same, with the top-K's block maxima": lambda: summarize_steps(x, step, BLOCK),
        "top-k from those block maxima": lambda: topk_chunked(x, 1000, 1 << 30, maxima),
        "top-16-bit shift": lambda: [torch.bitwise_right_shift(xi[i:i + step], 16, out=ibuf) for i in chunks],
        "torch.bincount of the top 16 bits": lambda: [torch.bincount(hi[i:i + step], minlength=N_BINS) for i in chunks],
        "  its min + max reductions": lambda: [(hi[i:i + step].min(), hi[i:i + step].max()) for i in chunks],
        "torch.bincount of uniformly random bins": lambda: [torch.bincount(rnd[i:i + step], minlength=N_BINS)
                                                            for i in chunks],
        "float64 copy + sum + dot": lambda: [(fbuf.copy_(x[i:i + step]), fbuf.sum(), torch.dot(fbuf, fbuf))
                                             for i in chunks],
        "aminmax": lambda: [torch.aminmax(x[i:i + step]) for i in chunks],
        "top-k (critlib.rank.topk_chunked, k=1000)": lambda: topk_chunked(x, 1000, 1 << 30),
        "alt: numpy.bincount": lambda: [np.bincount(hn[i:i + step], minlength=N_BINS) for i in chunks],
        "alt: torch.histc of the bin numbers": lambda: [torch.histc(hi[i:i + step].float(), bins=N_BINS, min=0,
                                                                    max=N_BINS) for i in chunks],
        "alt: 4 interleaved sub-histograms, folded": lambda: [
            torch.bincount(hi[i:i + step] + off4, minlength=4 * N_BINS).view(4, -1).sum(0) for i in chunks],
    }
    print(f"{n} float32 scores in chunks of {step}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"CPU summary: {cpu.describe()}")
    for label, fn in cases.items():
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        runs.sort()
        print(f"{label:46s} best {runs[0] / n * 1e9:5.2f}  median {runs[len(runs) // 2] / n * 1e9:5.2f} ns/weight")


if __name__ == "__main__":
    main()
