"""Phase 3 in a run: dose-response of held-out quality to perturbing each metric's top-K against random,
magnitude and bottom-K controls (critlib.experiments), on the first `perturb_heldout` held-out windows (the
phase's window set), measured through the run's store of evaluations (critlib.run.cache), so Phase 4
reads the same number for the same intervention on the same windows."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .. import CritlibError
from ..effects import Evaluations
from ..experiments import default_selectors, dose_response, positions, summarize_draws
from ..io import write_json, write_table
from ..params import Params
from . import cache
from .context import Context, manifest
from .headlines import write_headline

KEY = "03_perturbation"


def bottom_k_needed(params: Params) -> int:
    """How many of the lowest-scored weights Phase 1 must keep for the bottom-K controls."""
    return max([int(k) for k in params.perturb_ks or []] + [0])


def compute(ctx: Context, sens, progress: bool = True, store: Evaluations | None = None) -> pd.DataFrame:
    """`dose_response` of every default selector × `perturb_methods` × `perturb_ks` through `store`."""
    p = ctx.params
    ks = list(p.perturb_ks)
    if ks and max(ks) > sens.topk_global:
        raise CritlibError(f"perturb_ks has k={max(ks)} but Phase 1 kept an exact top-{sens.topk_global}; raise "
                           f"topk_global to ≥ {max(ks)} or lower perturb_ks")
    selectors = default_selectors(ctx.model, sens, sens.metrics, p.n_random_draws, p.seed)
    return dose_response(ctx.model, ctx.windows.heldout, selectors, list(p.perturb_methods), ks,
                         batch_size=p.batch_size, progress=progress, store=store)


def run(ctx: Context, p1, outdir: str | Path, progress: bool = True) -> dict:
    """Phase 3 -> `perturbation` (every draw), `perturbation_summary`, `perturbation_positions`, the run's
    store of evaluations, the manifest and the headline."""
    outdir = Path(outdir)
    ctx = ctx.with_heldout(ctx.params.perturb_heldout)
    store = cache.evaluations(ctx, outdir)
    with ctx.timer.stage("perturbation"):
        df = compute(ctx, p1.sens, progress, store)
    cache.save_evaluations(ctx, outdir, store)
    summary = summarize_draws(df)
    pos = positions(df, store)
    write_table(outdir / "perturbation", df)
    write_table(outdir / "perturbation_summary", summary)
    write_table(outdir / "perturbation_positions", pos)
    baseline = df.attrs.get("baseline", {})
    windows = describe_windows(ctx, baseline)
    write_json(outdir / f"manifest_{KEY}.json", manifest(ctx, {"phase": KEY, "baseline": baseline,
                                                               "heldout_windows": len(ctx.windows.heldout),
                                                               "window_set": windows,
                                                               "phase1_from_cache": p1.from_cache}))
    write_headline(outdir, KEY, headline(summary, baseline, windows))
    return {"raw": df, "summary": summary, "positions": pos, "baseline": baseline, "window_set": windows}


def describe_windows(ctx: Context, baseline: dict) -> dict:
    """The phase's window set: its name (`<n>x<len>:<sha256 prefix>`), size and the BOS its windows start with."""
    n, length = (int(v) for v in ctx.windows.heldout.shape)
    return {"name": baseline.get("window_set"), "n_windows": n, "seq_len": length, "bos": ctx.windows.bos}


def interval_text(value: float, lo: float, hi: float) -> str:
    """`1.230 [1.100, 1.410]` (4 significant digits, trailing zeros kept); a non-finite value reads
    `broken (ppl NaN/inf)`, a missing interval (one draw) none."""
    if not math.isfinite(value):
        return "broken (ppl NaN/inf)"
    return f"{value:#.4g} [{lo:#.4g}, {hi:#.4g}]" if not (math.isnan(lo) and math.isnan(hi)) else f"{value:#.4g}"


def headline(summary: pd.DataFrame, baseline: dict | None = None,
             windows: dict | None = None) -> list[tuple[str, object]]:
    """The unperturbed ppl on the window set, then at the largest K, zeroing: the perplexity ratio of each
    metric's top-K, random-K and magnitude-K with its 95% interval (bootstrap over windows; t over draws for
    random) and the windows it was measured on."""
    items: list[tuple[str, object]] = []
    where = f"{windows['n_windows']}×{windows['seq_len']} held-out windows" if windows else "held-out windows"
    if baseline:
        items.append((f"unperturbed perplexity, window set {baseline.get('window_set')}",
                      round(float(baseline["ppl"]), 4)))
    if summary.empty:
        return items
    zero = summary[summary["method"] == "zero"]
    if zero.empty:
        zero = summary[summary["method"] == summary["method"].iloc[0]]
    kmax = int(zero["k"].max())
    at = zero[zero["k"] == kmax]
    method = at["method"].iloc[0]
    for _, r in at.iterrows():
        if r["selector"].startswith("bottom"):
            continue
        how = f"t over {r['n_draws']} draws" if r["interval"] == "draws" else "bootstrap over windows"
        items.append((f"ppl ratio, {method} top-{kmax} of {r['selector']}",
                      f"{interval_text(r['ppl_ratio_mean'], r['ppl_ratio_lo'], r['ppl_ratio_hi'])} ({where}; 95% CI, "
                      f"{how})"))
    return items
