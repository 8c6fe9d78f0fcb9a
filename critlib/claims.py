"""The published study's headline claims, re-tested on any model: each claim measured on one or more Phase 1
results (one per data seed), reported as the mean over seeds with a 95% t-interval, beside the study's number
and a verdict.

The study (a critical-weight analysis of meta-llama/Llama-3.1-8B, September 2025) measured on one data seed;
its numbers are in `STUDY`. A verdict compares only like with like: on a model of another family the study's
number is context, not a target ("other model"). On the same family, "consistent" means the study's number lies
inside the interval over seeds, "differs" that it does not; "not measured" that the study stated it without a
number.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .effects import draws_interval
from .layout import component_at, layer_of

GXW, G2 = "grad_x_weight", "grad_squared"
ATTENTION = ("attn_q", "attn_k", "attn_v", "attn_o")
MLP = ("mlp_gate", "mlp_up", "mlp_down")
STUDY_MODEL = "meta-llama/Llama-3.1-8B"


@dataclass(frozen=True)
class Claim:
    key: str
    text: str  # the claim as the study made it
    study: float | None  # the study's number (None: stated, not measured)
    unit: str = ""


STUDY = (
    Claim("gxw_max_over_mean", "grad×weight is concentrated: max / mean", 145.4, "×"),
    Claim("gxw_p99", "grad×weight 99th percentile", 0.018),
    Claim("gxw_p95", "grad×weight 95th percentile", 0.005),
    Claim("g2_max_over_gxw_max", "grad² max / grad×weight max", 5.75 / 0.330103, "×"),
    Claim("top1000_overlap", "top-1000 overlap of grad×weight and grad²", 0.145),
    Claim("top1000_jaccard", "top-1000 Jaccard of grad×weight and grad²", 0.078),
    Claim("top1000_layer0_attention", "share of the grad×weight top-1000 in layer 0 attention", 0.40),
    Claim("top1000_layer0_mlp", "share of the grad×weight top-1000 in layer 0 MLP", 0.30),
    Claim("top1000_layer1_attention", "share of the grad×weight top-1000 in layer 1 attention", 0.20),
    Claim("top1000_embedding", "share of the grad×weight top-1000 in the embedding", 0.10),
    Claim("top1000_layers01", "share of the grad×weight top-1000 in layers 0–1", 0.90),
    Claim("top1000_attention", "share of the grad×weight top-1000 in attention", 0.70),
    Claim("gxw_top001_share", "the top 0.01% of weights hold the majority of grad×weight", None),
)


def measure(sens, k: int = 1000) -> dict[str, float]:
    """Every claim's value on one Phase 1 result (needs grad_x_weight; grad² for the cross-metric claims;
    an exact global top-k of at least `k`, else the largest kept)."""
    out: dict[str, float] = {}
    g = sens.stats[GXW]["global"]
    out["gxw_max_over_mean"] = g["max_over_mean"]
    out["gxw_p99"] = g["percentiles"]["99"]
    out["gxw_p95"] = g["percentiles"]["95"]
    out["gxw_top001_share"] = g["top_share"]["0.01%"]
    k = min(k, sens.topk[GXW].k)
    top = [(n, f) for n, f, _ in sens.global_top(GXW, k)]
    if G2 in sens.stats:
        out["g2_max_over_gxw_max"] = sens.stats[G2]["global"]["max"] / g["max"] if g["max"] > 0 else float("nan")
        other = {(n, f) for n, f, _ in sens.global_top(G2, k)}
        both = len(set(top) & other)
        out["top1000_overlap"] = both / k
        out["top1000_jaccard"] = both / len(set(top) | other)
    where = []
    for n, f in top:
        row, col = sens.coords(n, f)
        where.append((layer_of(n), component_at(sens.parts[n], row, col)))
    share = lambda keep: sum(1 for w in where if keep(*w)) / len(where)  # noqa: E731
    out["top1000_layer0_attention"] = share(lambda layer, c: layer == 0 and c in ATTENTION)
    out["top1000_layer0_mlp"] = share(lambda layer, c: layer == 0 and c in MLP)
    out["top1000_layer1_attention"] = share(lambda layer, c: layer == 1 and c in ATTENTION)
    out["top1000_embedding"] = share(lambda layer, c: c == "embed")
    out["top1000_layers01"] = share(lambda layer, c: layer in (0, 1))
    out["top1000_attention"] = share(lambda layer, c: c in ATTENTION)
    return out


def claims_table(results: list, same_family: bool, k: int = 1000) -> pd.DataFrame:
    """One row per claim: the mean over `results` (one Phase 1 result per data seed) with its t-interval,
    the per-seed values, the study's number and the verdict."""
    per_seed = [measure(r, k) for r in results]
    rows = []
    for c in STUDY:
        values = [m[c.key] for m in per_seed if c.key in m]
        ci = draws_interval(values)
        if c.study is None:
            verdict = "not measured by the study"
        elif not same_family:
            verdict = "other model"
        elif ci["n"] < 2 or np.isnan(ci["lo"]):
            verdict = "too few seeds"
        else:
            verdict = "consistent" if ci["lo"] <= c.study <= ci["hi"] else "differs"
        rows.append({"claim": c.key, "text": c.text, "value": ci["mean"], "lo": ci["lo"], "hi": ci["hi"],
                     "n_seeds": ci["n"], "per_seed": ", ".join(f"{v:.4g}" for v in values),
                     "study": c.study, "unit": c.unit, "verdict": verdict})
    return pd.DataFrame(rows)


def is_study_family(model_info: dict, source: str) -> bool:
    """Whether a model belongs to the study's family (Llama-3.x at 8B): by its source name or config."""
    text = f"{source} {model_info}".lower()
    return "llama-3" in text and "8b" in text
