"""The DataFrames behind the report's figures and tables, built from a phase's results; `critlib.viz` only
draws them.

Histograms come from `Sensitivity.hist`: exact counts of ALL scores in float32 high-16-bit bins (bin b holds
the floats whose bit pattern lies in [b·2¹⁶, (b+1)·2¹⁶)), so bin lower edges are exact float values and no
list of all scores is ever built.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .layout import component_at, layer_of
from .bins import N_BINS

MANTISSA_BITS = 7  # of the 16 high bits of a non-negative float32: 8 exponent bits, 7 mantissa bits
FIRST_NORMAL = 1 << MANTISSA_BITS  # bins below hold zero and subnormals
FIRST_NONFINITE = 255 << MANTISSA_BITS  # bins from here hold inf and NaN


def bin_edges() -> np.ndarray:
    """The lower edge (smallest float32 value) of each of the N_BINS high-16-bit bins, as float64."""
    bits = (np.arange(N_BINS, dtype=np.int64) << 16).astype(np.uint32)
    with np.errstate(invalid="ignore"):  # the NaN bit patterns of the top bins
        return bits.view(np.float32).astype(np.float64)


def _value_of_bin(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, dtype=np.int64) << 16).astype(np.uint32).view(np.float32).astype(np.float64)


def log_histogram(counts, per_octave: int = 4) -> tuple[pd.DataFrame, dict]:
    """Coarsen exact high-16-bit bin counts to `per_octave` bins per power of two (1, 2, 4, ..., 128).

    Returns one row per non-empty bin (lo, hi, count, fraction, per_octave: count / log2(hi/lo)) and the
    counts that a log axis cannot show: {"zero_or_subnormal", "nonfinite", "total"}. Bin [lo, hi) edges are
    exact float32 values; each coarse bin is a whole number of fine bins, so its count is exact.
    """
    if per_octave < 1 or per_octave > 1 << MANTISSA_BITS or per_octave & (per_octave - 1):
        raise ValueError(f"per_octave={per_octave} must be a power of two from 1 to 128")
    counts = np.asarray(counts, dtype=np.int64)
    shift = MANTISSA_BITS - int(math.log2(per_octave))
    total = int(counts.sum())
    coarse = counts[FIRST_NORMAL:FIRST_NONFINITE].reshape(-1, 1 << shift).sum(axis=1)
    first = FIRST_NORMAL >> shift
    g = np.nonzero(coarse)[0] + first
    lo, hi = _value_of_bin(g << shift), _value_of_bin((g + 1) << shift)
    c = coarse[g - first]
    df = pd.DataFrame({"lo": lo, "hi": hi, "count": c,
                       "fraction": c / total if total else np.zeros(len(c)),
                       "per_octave": c / np.log2(hi / lo)})
    extra = {"zero_or_subnormal": int(counts[:FIRST_NORMAL].sum()),
             "nonfinite": int(counts[FIRST_NONFINITE:].sum()), "total": total}
    return df, extra


def ccdf(counts, max_points: int | None = 2000) -> pd.DataFrame:
    """P(score ≥ x) at x = the lower edge of each non-empty normal bin, exact (all scores of a bin lie at
    or above its lower edge and below the next bin's). With `max_points`, keeps an evenly spaced subset
    of the points (always the first and last)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    at_or_above = np.cumsum(counts[::-1])[::-1]
    b = np.nonzero(counts[FIRST_NORMAL:FIRST_NONFINITE])[0] + FIRST_NORMAL
    if max_points and len(b) > max_points:
        b = b[np.unique(np.linspace(0, len(b) - 1, max_points).round().astype(np.int64))]
    return pd.DataFrame({"x": _value_of_bin(b), "n_at_or_above": at_or_above[b],
                         "p": at_or_above[b] / total if total else np.zeros(len(b))})


def histogram_frame(hists: dict, per_octave: int = 4) -> pd.DataFrame:
    """`log_histogram` of every metric in one frame (column `metric`), with the counts a log axis cannot show."""
    frames = []
    for m, counts in hists.items():
        df, extra = log_histogram(np.asarray(counts), per_octave)
        frames.append(df.assign(metric=m, zero_or_subnormal=extra["zero_or_subnormal"], total=extra["total"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def cells_frame(sens, k: int | None = None) -> pd.DataFrame:
    """One row per (metric, layer, component): weights, score sum, share of the metric's total score,
    global top-k count and share, and the parameters in the cell."""
    k = k or sens.topk_global
    names: dict[tuple, list[str]] = {}
    for n in sens.order:
        for p in sens.parts[n]:
            names.setdefault((layer_of(n), p.component), []).append(n)
    rows = []
    for m in sens.metrics:
        tops: dict[tuple, int] = {}
        for n, f, _ in sens.global_top(m, k):
            r, c = sens.coords(n, f)
            key = (layer_of(n), component_at(sens.parts[n], r, c))
            tops[key] = tops.get(key, 0) + 1
        total = sum(v[1] for v in sens.cells[m].values())
        for (layer, comp), (count, s) in sens.cells[m].items():
            rows.append({"metric": m, "layer": layer, "component": comp, "n_weights": count, "score_sum": s,
                         "score_share": s / total if total > 0 else float("nan"), "topk": tops.get((layer, comp), 0),
                         "topk_share": tops.get((layer, comp), 0) / k, "k": k,
                         "params": ", ".join(names.get((layer, comp), []))})
    df = pd.DataFrame(rows)
    df["layer"] = df["layer"].astype("Int64")
    return df


def top_weights_view(table: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    """The first `n` global ranks of each metric, with decoded tokens, for display."""
    g = table[table["scope"] == "global"]
    g = g[g["rank"] <= n]
    return g[["metric", "rank", "param", "layer", "component", "row", "col", "score", "weight", "token_id",
              "token"]].reset_index(drop=True)


def causal_frame(summary: pd.DataFrame) -> pd.DataFrame:
    """Phase 3's causal test from `perturbation_summary`: for zeroing (else the first method), each metric's
    top-K and the random and magnitude controls at every K > 0, the perplexity ratio with its 95% interval."""
    first = summary[summary["method"] == "zero"] if (summary["method"] == "zero").any() else summary
    args = summary["method_arg"].fillna("")
    same = (summary["method"] == first["method"].iloc[0]) & (args == args[first.index[0]])
    keep = summary["selector"].str.startswith("top:") | summary["selector"].isin(["random", "magnitude"])
    cols = ["selector", "method", "method_arg", "k", "ppl_ratio_mean", "ppl_ratio_lo", "ppl_ratio_hi", "n_draws",
            "interval"]
    return summary[same & keep & (summary["k"] > 0)].reindex(columns=cols).reset_index(drop=True)
