"""Phase 2 in a run: metric-vs-metric agreement of the global top-K, and each metric's top-K stability
across window seeds (`stability_seeds`) and corpora (`stability_data`), each compared with Phase 1."""

from __future__ import annotations

from pathlib import Path

from ..agreement import cross_table, stability_table, top_sets, topk_sets, with_baseline
from ..data import load_windows
from ..io import write_json, write_table
from ..models import DTYPES
from .context import Context, manifest
from .headlines import write_headline

KEY = "02_cross_metric"


def run(ctx: Context, p1, outdir: str | Path, progress: bool = True) -> dict:
    """Phase 2 -> `cross_metric`, `stability`, the manifest and the headline."""
    p = ctx.params
    outdir = Path(outdir)
    k = p.topk_global
    base = f"{p.data} seed {p.seed}"
    runs = {base: top_sets(p1.sens, k)}
    kinds = {base: "base"}
    vocab = ctx.model.get_input_embeddings().num_embeddings
    others = [(f"{p.data} seed {s}", p.data, s, "seed") for s in p.stability_seeds if s != p.seed]
    if p.stability_data and p.stability_data != p.data:
        others.append((f"{p.stability_data} seed {p.seed}", p.stability_data, p.seed, "corpus"))
    for name, data, seed, kind in others:
        with ctx.timer.stage(f"stability {name}"):
            w = load_windows(data, ctx.loaded.tokenizer, p.seq_len, p.n_sequences, 0, p.prepend_bos, seed,
                             p.text_field, vocab_size=vocab)
            runs[name] = topk_sets(ctx.model, w.score, p.metrics, k, p.batch_size, p.chunk_size,
                                   DTYPES[p.fisher_dtype], progress, desc=name)
            kinds[name] = kind
    stab = stability_table(runs, base, kinds)
    table = with_baseline(cross_table(p1.sens, k), stab)
    write_table(outdir / "cross_metric", table)
    write_table(outdir / "stability", stab)
    write_json(outdir / f"manifest_{KEY}.json", manifest(ctx, {"phase": KEY, "runs": list(runs),
                                                               "phase1_from_cache": p1.from_cache}))
    items = []
    if len(table):
        items.append((f"mean Jaccard between metrics (top-{k})", round(float(table["jaccard"].mean()), 4)))
    for kind in ("seed", "corpus"):
        sub = stab[(stab["comparison"] == kind) & (stab["run_a"] == base)]
        if len(sub):
            items.append((f"mean Jaccard of a metric with itself, other {kind}", round(float(sub["jaccard"].mean()), 4)))
    write_headline(outdir, KEY, items)
    return {"cross": table, "stability": stab, "runs": runs, "base": base}
