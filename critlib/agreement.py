"""Phase 2: how much the metrics agree with each other, and how much each agrees with itself when the data
windows (seed) or the corpus change — the baseline any "low overlap between metrics" claim needs.

Top-K sets are exact global top-K of (parameter, flat index), ties broken as in `critlib.rank`.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import torch

from .sensitivity import Sensitivity, cross_metric, global_topk

Coord = tuple[str, int]


def set_agreement(a, b) -> dict:
    """Overlap (|A ∩ B|) and Jaccard (|A ∩ B| / |A ∪ B|) of two top-K sets."""
    sa, sb = set(a), set(b)
    union = len(sa | sb)
    return {"overlap": len(sa & sb), "jaccard": len(sa & sb) / union if union else 1.0}


def top_sets(sens: Sensitivity, k: int | None = None) -> dict[str, list[Coord]]:
    k = k or sens.topk_global
    return {m: [(n, f) for n, f, _ in sens.global_top(m, k)] for m in sens.metrics}


def topk_sets(model: torch.nn.Module, windows: torch.Tensor, metrics: list[str], k: int, batch_size: int = 8,
              chunk_size: int = 1 << 30, fisher_dtype: torch.dtype = torch.float32,
              progress: bool = True, desc: str = "top-K") -> dict[str, list[Coord]]:
    """Each metric's exact global top-k on `windows` in one scoring pass (no statistics, no pass 2)."""
    tops = global_topk(model, windows, metrics, k, batch_size, fisher_dtype, chunk_size, progress, desc)
    return {m: [(n, f) for n, f, _ in top] for m, top in tops.items()}


def cross_table(sens: Sensitivity, k: int | None = None) -> pd.DataFrame:
    """`cross_metric` as a table, with the overlap as a fraction of K."""
    df = pd.DataFrame(cross_metric(sens, k), columns=["metric_a", "metric_b", "k", "overlap", "jaccard",
                                                       "n_union", "spearman"])
    df["overlap_fraction"] = df["overlap"] / df["k"]
    df["spearman"] = df["spearman"].astype("float64")
    return df


def stability_table(runs: dict[str, dict[str, list[Coord]]], base: str, kinds: dict[str, str]) -> pd.DataFrame:
    """Agreement of each metric's top-K between run `base` and every other run, and between every pair of
    runs of the same kind (e.g. two other seeds). `kinds`: run name -> "seed" or "corpus"."""
    rows = []
    names = list(runs)
    pairs = [(base, r) for r in names if r != base]
    pairs += [(a, b) for a, b in itertools.combinations([r for r in names if r != base], 2)
              if kinds.get(a) == kinds.get(b) == "seed"]
    for a, b in pairs:
        kind = kinds.get(b, "seed") if a == base else "seed"
        for m in runs[a]:
            if m not in runs[b]:
                continue
            ag = set_agreement(runs[a][m], runs[b][m])
            rows.append({"metric": m, "comparison": kind, "run_a": a, "run_b": b, "k": len(runs[a][m]), **ag})
    return pd.DataFrame(rows, columns=["metric", "comparison", "run_a", "run_b", "k", "overlap", "jaccard"])


def with_baseline(cross: pd.DataFrame, stability: pd.DataFrame) -> pd.DataFrame:
    """Cross-metric rows plus each metric's mean seed-to-seed Jaccard and the pair's baseline (the lower)."""
    seed = stability[stability["comparison"] == "seed"].groupby("metric")["jaccard"].mean()
    corpus = stability[stability["comparison"] == "corpus"].groupby("metric")["jaccard"].mean()
    out = cross.copy()
    out["seed_jaccard_a"] = out["metric_a"].map(seed)
    out["seed_jaccard_b"] = out["metric_b"].map(seed)
    out["seed_baseline"] = out[["seed_jaccard_a", "seed_jaccard_b"]].min(axis=1, skipna=False)
    out["corpus_jaccard_a"] = out["metric_a"].map(corpus)
    out["corpus_jaccard_b"] = out["metric_b"].map(corpus)
    return out


def rank_pairs(sens: Sensitivity, a: str, b: str, k: int | None = None) -> pd.DataFrame:
    """The union of metric a's and b's global top-k, each weight's scores under both (from Phase 1's pass 2)
    and its rank within the union under each (1 = highest, ties by (param order, index))."""
    k = k or sens.topk_global
    top_a, top_b = ({(n, f) for n, f, _ in sens.global_top(m, k)} for m in (a, b))
    pos = {n: i for i, n in enumerate(sens.order)}
    union = sorted(top_a | top_b, key=lambda c: (pos[c[0]], c[1]))
    ga, gb = sens.gathered.get(a, {}), sens.gathered.get(b, {})
    df = pd.DataFrame({"param": [c[0] for c in union], "flat": [c[1] for c in union],
                       "score_a": [ga.get(c, np.nan) for c in union], "score_b": [gb.get(c, np.nan) for c in union],
                       "in_top_a": [c in top_a for c in union], "in_top_b": [c in top_b for c in union]})
    for s, r in (("score_a", "rank_a"), ("score_b", "rank_b")):
        order = np.lexsort((np.arange(len(df)), -df[s].to_numpy()))  # score desc, then (param, flat) asc
        rank = np.empty(len(df), dtype=np.int64)
        rank[order] = np.arange(1, len(df) + 1)
        df[r] = rank
    return df
