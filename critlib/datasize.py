"""How much scoring data makes a ranking stable: each metric's exact global top-K on two disjoint sets of
windows, compared as both sets grow (256, 512, … tokens).

One backward per window, in order, and running sums: the scores on the first n windows are made from the sums
at n, so every size costs only the windows it adds (the largest size once, not the sum of all sizes). The
scores are critlib's definitions (`critlib.scores`): g the gradient of the mean token loss over the n windows'
tokens, Fisher the mean over windows of each window's own gᵢ², wanda's input norms over the n windows.
Magnitude does not depend on data (its top-K is the same on any two sets), so it is left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd
import torch

from . import CritlibError
from .agreement import set_agreement
from .metrics import GRADIENT
from .progress import Bar
from .rank import TopK
from .scores import InputNorms, check_weights, hooks, scored_parameters, token_loss_sum

DATA_METRICS = (*GRADIENT, "wanda")
COLUMNS = ["metric", "tokens", "windows", "k", "overlap", "jaccard"]

Coord = tuple[str, int]
Scores = Callable[[Callable[[str, str, torch.Tensor], None]], None]


def running_scores(model: torch.nn.Module, windows: torch.Tensor, metrics: list[str], sizes: list[int],
                   progress: bool = False, desc: str = "windows") -> Iterator[tuple[int, Scores]]:
    """For each n in `sizes` (ascending window counts), (n, each) where `each(emit)` calls
    emit(metric, param name, fp32 scores) for every parameter, scored on the first n windows. Holds a float32
    gradient sum and a Fisher sum of the model's size while it runs (only those the metrics need); wanda's
    hooks stay on the model until the iteration ends, so run nothing else on it in between."""
    metrics = [m for m in metrics if m in DATA_METRICS]
    sizes = sorted(set(sizes))
    if not sizes or sizes[0] < 1 or sizes[-1] > len(windows):
        raise CritlibError(f"window counts {sizes} must lie in 1..{len(windows)} (the windows given)")
    params = scored_parameters(model)
    check_weights(params)
    need_g = any(m in ("grad_x_weight", "grad_squared") for m in metrics)
    fisher = "fisher" in metrics
    backward = need_g or fisher
    gsum = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params} if need_g else {}
    fsum = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params} if fisher else {}
    norms = InputNorms(model) if "wanda" in metrics else None
    windows = windows.to(params[0][1].device)
    per_seq = windows.shape[1] - 1
    with hooks([]) as handles:
        if norms is not None:
            norms.attach(model, handles)
        done = 0
        for n in Bar(sizes, desc=desc, disable=not progress):
            for i in range(done, n):
                ids = windows[i:i + 1]
                if not backward:
                    with torch.no_grad():
                        model(input_ids=ids)
                    continue
                model.zero_grad(set_to_none=False)  # in place: no fresh gradient buffers for every window
                (token_loss_sum(model, ids) / per_seq).backward()
                for name, p in params:
                    g = p.grad.to_dense() if p.grad.is_sparse else p.grad
                    if need_g:
                        gsum[name].add_(g)
                    if fisher:
                        fsum[name].addcmul_(g, g)
            model.zero_grad(set_to_none=True)
            done = n
            if norms is not None:
                norms.n_sequences, norms.n_tokens = n, n * windows.shape[1]

            def each(emit, n=n):
                for name, p in params:
                    if need_g:
                        g = gsum[name] / n
                        if "grad_x_weight" in metrics:
                            emit("grad_x_weight", name, (g * p.detach().float()).abs_())
                        if "grad_squared" in metrics:
                            emit("grad_squared", name, g.square())
                    if fisher:
                        emit("fisher", name, fsum[name] / n)
                    if norms is not None and norms.covers(p):
                        emit("wanda", name, norms.score(p))
            yield n, each


def nested_topk(model: torch.nn.Module, windows: torch.Tensor, metrics: list[str], sizes: list[int], k: int,
                progress: bool = False, desc: str = "windows") -> dict[int, dict[str, list[Coord]]]:
    """Each data-dependent metric's exact global top-k (param, flat index) on the first n windows, for every
    n in `sizes`: {n: {metric: [(param, flat), …]}}, ranked as `critlib.rank` ranks (ties: model order)."""
    order = [n for n, _ in scored_parameters(model)]
    out = {}
    for n, each in running_scores(model, windows, metrics, sizes, progress, desc):
        tops: dict[str, TopK] = {}

        def keep(metric, name, s):
            tops.setdefault(metric, TopK(k)).add(name, s)
        each(keep)
        out[n] = {m: [(p, f) for p, f, _ in t.global_topk(k, order)] for m, t in tops.items()}
    return out


def split(pool: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint halves of `pool`'s windows, drawn by a seeded shuffle (every other window of it)."""
    order = np.random.default_rng(seed).permutation(len(pool))
    return pool[torch.from_numpy(order[0::2])], pool[torch.from_numpy(order[1::2])]


def window_counts(tokens: list[int], seq_len: int, available: int) -> tuple[list[int], list[int]]:
    """(window counts per set for the token counts that two disjoint sets of `available` // 2 windows can
    hold, the token counts left out). A count of tokens rounds up to whole windows of `seq_len`."""
    counts, skipped = [], []
    for t in sorted(set(tokens)):
        n = -(-t // seq_len)
        if n <= available // 2:
            counts.append(n)
        else:
            skipped.append(t)
    return sorted(set(counts)), skipped


def stability_by_tokens(model: torch.nn.Module, pool: torch.Tensor, metrics: list[str], counts: list[int], k: int,
                        seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """Overlap and Jaccard of each data-dependent metric's global top-k between two disjoint window sets drawn
    from `pool`, for each window count in `counts` (the sets grow by adding windows: each size holds the
    smaller ones). One row per metric × size."""
    metrics = [m for m in metrics if m in DATA_METRICS]
    if not metrics or not counts:
        return pd.DataFrame(columns=COLUMNS)
    a, b = split(pool, seed)
    if max(counts) > min(len(a), len(b)):
        raise CritlibError(f"{max(counts)} windows per set need {2 * max(counts)} windows; the data gives "
                           f"{len(pool)}: give more data or smaller sizes")
    tops_a = nested_topk(model, a, metrics, counts, k, progress, "set A")
    tops_b = nested_topk(model, b, metrics, counts, k, progress, "set B")
    rows = []
    for n in sorted(counts):
        for m in metrics:
            if m in tops_a[n] and m in tops_b[n]:
                rows.append({"metric": m, "tokens": n * pool.shape[1], "windows": n, "k": len(tops_a[n][m]),
                             **set_agreement(tops_a[n][m], tops_b[n][m])})
    return pd.DataFrame(rows, columns=COLUMNS)
