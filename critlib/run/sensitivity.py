"""Phase 1 in a run: score every weight (critlib.sensitivity.analyze), the top-weights table, the unperturbed
held-out evaluation; `critlib score` and notebook 01 write the same files through `run`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from ..distributed import describe, is_main
from ..evaluate import evaluate
from ..io import write_json, write_table
from ..models import DTYPES
from ..params import Params
from ..scores import memory_saving
from ..sensitivity import AnalyzeConfig, Sensitivity, analyze, cross_metric, top_weights_table
from . import cache, perturbation
from .context import Context, manifest
from .headlines import write_headline

KEY = "01_sensitivity"
PARAM_KEYS = ("model", "tokenizer", "revision", "data", "text_field", "seq_len", "n_sequences", "n_heldout",
              "batch_size", "prepend_bos", "metrics", "topk_per_layer", "topk_global", "seed", "dtype",
              "exact_stats", "chunk_size", "fisher_dtype", "kernel")
CODE = ("scores", "sensitivity", "rank", "stats", "data", "models", "layout")
CACHE = "phase1.pt"


@dataclass
class Phase1:
    sens: Sensitivity
    table: pd.DataFrame  # top_weights
    heldout: dict  # unperturbed held-out evaluation ({} without held-out windows)
    from_cache: bool = False


def compute(ctx: Context, progress: bool = True) -> Sensitivity:
    """Scores, exact top-K and statistics of every metric, with the bottom-K Phase 3's controls need."""
    p = ctx.params
    with ctx.timer.stage("scores"), memory_saving(ctx.model, p.gradient_checkpointing, p.sparse_embedding_grad):
        return analyze(ctx.model, ctx.windows.score, analyze_config(p, bottomk=perturbation.bottom_k_needed(p)),
                       progress=progress)


def analyze_config(p: Params, **overrides) -> AnalyzeConfig:
    """The `analyze` settings a run's parameters give (`overrides`: AnalyzeConfig fields a phase sets itself)."""
    return replace(AnalyzeConfig(metrics=p.metrics, topk_global=p.topk_global, topk_per_layer=p.topk_per_layer,
                                 batch_size=p.batch_size, exact_stats=p.exact_stats, chunk_size=p.chunk_size,
                                 fisher_dtype=DTYPES[p.fisher_dtype], kernel=p.kernel), **overrides)


def heldout_baseline(ctx: Context) -> dict:
    """The unchanged model on the held-out windows ({} when there are none)."""
    if not len(ctx.windows.heldout):
        return {}
    with ctx.timer.stage("heldout_eval"):
        return evaluate(ctx.model, ctx.windows.heldout, ctx.params.batch_size)


def cache_key(ctx: Context) -> str:
    return cache.key(ctx, PARAM_KEYS, CODE, bottomk=perturbation.bottom_k_needed(ctx.params))


def results(ctx: Context, outdir: str | Path | None, progress: bool = True, use_cache: bool = True) -> Phase1:
    """Phase 1 from the run's cache when its key matches, else computed and cached under `outdir`. Without
    `use_cache` (data-parallel ranks, which must all take part in computing) it is always computed."""
    hit = False
    if use_cache:
        path = cache.path(outdir, CACHE)
        key = cache_key(ctx)
        try:
            sens, extra = Sensitivity.load(path)
            hit = extra.get("key") == key
        except Exception:  # a missing, truncated, old-format or tampered cache is simply recomputed
            hit = False
    if hit:
        heldout = extra.get("heldout", {})
    else:
        sens = compute(ctx, progress and is_main())
        if not is_main():  # data-parallel ranks all hold the same result: rank 0 evaluates and writes
            return Phase1(sens, pd.DataFrame(), {})
        heldout = heldout_baseline(ctx)
        if use_cache:
            sens.save(path, {"key": key, "heldout": heldout})
    with ctx.timer.stage("tables"):
        table = top_weights_table(sens, ctx.model, ctx.loaded.tokenizer)
    return Phase1(sens, table, heldout, from_cache=hit)


def run(ctx: Context, outdir: str | Path, progress: bool = True, use_cache: bool = True) -> Phase1:
    """Phase 1 -> `top_weights`, `sensitivity_stats.json`, `layer_component`, `score_histogram`, the manifest
    and the headline numbers."""
    from ..tables import cells_frame, histogram_frame
    outdir = Path(outdir)
    p1 = results(ctx, outdir, progress, use_cache)
    if not is_main():
        return p1
    sens = p1.sens
    with ctx.timer.stage("write"):
        write_table(outdir / "top_weights", p1.table)
        write_json(outdir / "sensitivity_stats.json", {"metrics": sens.stats, "cross_metric": cross_metric(sens),
                                                        "unscored": sens.unscored, "heldout": p1.heldout})
        write_table(outdir / "layer_component", cells_frame(sens))
        hist = histogram_frame(sens.hist)
        if len(hist):
            write_table(outdir / "score_histogram", hist)
    write_json(outdir / "manifest.json", manifest(ctx, {"phase": KEY, "phase1_cache_hit": p1.from_cache,
                                                        "distributed": describe()}))
    write_headline(outdir, KEY, headline(sens, p1.heldout))
    return p1


def headline(sens: Sensitivity, heldout: dict) -> list[tuple[str, object]]:
    items = [("weights scored", sens.stats[sens.metrics[0]]["global"].get("count", 0))]
    if heldout:
        items.append(("held-out perplexity", round(heldout["ppl"], 4)))
    for m in sens.metrics:
        g = sens.stats[m]["global"]
        items.append((f"{m}: share of score in the top 0.1% of weights", g.get("top_share", {}).get("0.1%")))
        items.append((f"{m}: max / mean", g.get("max_over_mean")))
    return items
