"""The float32 bin layout: a score's bin is its top 16 bits, bins sort like the scores, and steps are capped."""

import numpy as np
import torch

from critlib.bins import CPU_STEP, GPU_STEP, N_BINS, high_bits, step_for


def test_high_bits_are_the_top_16_bits_and_sort_like_the_scores():
    x = torch.cat([torch.tensor([0.0, 1e-45, 1.0, torch.finfo(torch.float32).max]), torch.rand(10_000) * 1e3])
    bins = high_bits(x)
    ref = (x.numpy().view(np.uint32) >> 16).astype(np.int64)
    assert bins.dtype == torch.int32 and (bins.numpy() == ref).all()
    assert int(bins.max()) < N_BINS  # the sign bit of a non-negative score is 0
    order = torch.argsort(x, stable=True)
    assert (torch.diff(bins[order].long()) >= 0).all()


def test_step_for_caps_the_chunk_by_device():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert step_for(cpu, 1 << 30) == CPU_STEP and step_for(cpu, 100) == 100 and step_for(cpu, 0) == 1
    assert step_for(meta, 1 << 30) == GPU_STEP
