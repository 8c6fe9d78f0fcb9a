"""Phase 3 in a run: dose-response of held-out quality to perturbing each metric's top-K against random,
magnitude and bottom-K controls (critlib.experiments), on the first `perturb_heldout` held-out windows."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .. import CritlibError
from ..experiments import default_selectors, dose_response, summarize
from ..io import write_json, write_table
from ..params import Params
from .context import Context, manifest
from .headlines import write_headline

KEY = "03_perturbation"


def bottom_k_needed(params: Params) -> int:
    """How many of the lowest-scored weights Phase 1 must keep for the bottom-K controls."""
    return max([int(k) for k in params.perturb_ks or []] + [0])


def compute(ctx: Context, sens, progress: bool = True) -> pd.DataFrame:
    """`dose_response` of every default selector × `perturb_methods` × `perturb_ks`."""
    p = ctx.params
    ks = list(p.perturb_ks)
    if ks and max(ks) > sens.topk_global:
        raise CritlibError(f"perturb_ks has k={max(ks)} but Phase 1 kept an exact top-{sens.topk_global}; raise "
                           f"topk_global to ≥ {max(ks)} or lower perturb_ks")
    selectors = default_selectors(ctx.model, sens, sens.metrics, p.n_random_draws, p.seed)
    return dose_response(ctx.model, ctx.windows.heldout, selectors, list(p.perturb_methods), ks,
                         batch_size=p.batch_size, progress=progress)


def run(ctx: Context, p1, outdir: str | Path, progress: bool = True) -> dict:
    """Phase 3 -> `perturbation` (every draw), `perturbation_summary`, the manifest and the headline."""
    outdir = Path(outdir)
    ctx = ctx.with_heldout(ctx.params.perturb_heldout)
    with ctx.timer.stage("perturbation"):
        df = compute(ctx, p1.sens, progress)
    summary = summarize(df)
    write_table(outdir / "perturbation", df)
    write_table(outdir / "perturbation_summary", summary)
    baseline = df.attrs.get("baseline", {})
    write_json(outdir / f"manifest_{KEY}.json", manifest(ctx, {"phase": KEY, "baseline": baseline,
                                                               "heldout_windows": len(ctx.windows.heldout),
                                                               "phase1_from_cache": p1.from_cache}))
    write_headline(outdir, KEY, headline(summary))
    return {"raw": df, "summary": summary, "baseline": baseline}


def headline(summary: pd.DataFrame) -> list[tuple[str, object]]:
    """At the largest K, zeroing: the perplexity ratio of each metric's top-K, random-K and magnitude-K."""
    if summary.empty:
        return []
    zero = summary[summary["method"] == "zero"]
    if zero.empty:
        zero = summary[summary["method"] == summary["method"].iloc[0]]
    kmax = int(zero["k"].max())
    at = zero[zero["k"] == kmax]
    method = at["method"].iloc[0]
    return [(f"ppl ratio, {method} top-{kmax} of {s}", round(float(v), 4))
            for s, v in zip(at["selector"], at["ppl_ratio_mean"]) if not s.startswith("bottom")]
