"""Phase 2 in a run: metric-vs-metric agreement of the global top-K, each metric's top-K stability across
window seeds (`stability_seeds`) and corpora (`stability_data`), each compared with Phase 1, its stability as
the scoring data grows (`stability_tokens`, critlib.datasize), and the published study's claims re-tested over
Phase 1 and the other seeds (critlib.claims)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..agreement import cross_table, stability_table, top_sets, with_baseline
from ..claims import GXW, claims_table, is_study_family
from ..data import disjoint_windows, load_windows, window_pool
from ..datasize import COLUMNS, DATA_METRICS, stability_by_tokens, window_counts
from ..io import write_json, write_table
from ..sensitivity import analyze
from .context import Context, manifest
from .headlines import write_headline
from .sensitivity import analyze_config

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
    seeds = [p1.sens]
    # other seeds' windows are disjoint from Phase 1's and from each other's while the corpus has enough: a
    # window scored in both runs would make them agree for no reason
    taken = {w.numpy().tobytes() for w in ctx.windows.score}
    pool = None if p.data == "random" else window_pool(p.data, ctx.loaded.tokenizer, p.seq_len, p.prepend_bos,
                                                         p.text_field, vocab)
    shared = {}
    for name, data, seed, kind in others:
        with ctx.timer.stage(f"stability {name}"):
            if kind == "seed" and pool is not None:
                windows, shared[name] = disjoint_windows(pool, p.n_sequences, seed, taken)
            else:  # another corpus, or random tokens: disjoint by construction
                windows = load_windows(data, ctx.loaded.tokenizer, p.seq_len, p.n_sequences, 0, p.prepend_bos, seed,
                                       p.text_field, vocab_size=vocab).score
            # one pass: exact rankings, statistics within their stated bound (the claims' other seeds); no
            # cross-metric gathering (only Phase 1's scores give the Spearman)
            other = analyze(ctx.model, windows, analyze_config(p, exact_stats=False, gather=False), progress=progress)
            runs[name] = top_sets(other, k)
            kinds[name] = kind
            if kind == "seed":
                seeds.append(other)
    stab = stability_table(runs, base, kinds)
    stab["repeated_windows"] = stab["run_b"].map(shared).fillna(0).astype("int64")  # of Phase 1 or an earlier seed
    table = with_baseline(cross_table(p1.sens, k), stab)
    by_tokens, sizes = _by_tokens(ctx, k, progress, pool)
    write_table(outdir / "cross_metric", table)
    write_table(outdir / "stability", stab)
    write_table(outdir / "stability_tokens", by_tokens)
    claims = None
    if GXW in p.metrics:
        claims = claims_table(seeds, is_study_family(ctx.loaded.info, p.model), k)
        write_table(outdir / "claims", claims)
    write_json(outdir / f"manifest_{KEY}.json", manifest(ctx, {"phase": KEY, "runs": list(runs),
                                                               "claims_seeds": [p.seed] + [s for _, _, s, kind in
                                                                                           others if kind == "seed"],
                                                               "stability_tokens": sizes,
                                                               "seed_windows_shared": shared,
                                                               "phase1_from_cache": p1.from_cache}))
    items = []
    if len(table):
        items.append((f"mean Jaccard between metrics (top-{k})", round(float(table["jaccard"].mean()), 4)))
    for kind in ("seed", "corpus"):  # magnitude is data-free: stable by construction, left out of the mean
        sub = stab[(stab["comparison"] == kind) & (stab["run_a"] == base) & (stab["metric"] != "magnitude")]
        if len(sub):
            items.append((f"mean Jaccard of a data-dependent metric with itself, other {kind}",
                          round(float(sub["jaccard"].mean()), 4)))
    if len(by_tokens):
        mean = by_tokens.groupby("tokens")["jaccard"].mean()
        items.append(("mean Jaccard of a data-dependent metric between two disjoint token sets, by tokens per set",
                      ", ".join(f"{t}: {v:.3f}" for t, v in mean.items())))
    if claims is not None:
        measured = claims[claims["study"].notna()]
        items.append((f"study claims re-tested over {len(seeds)} data seeds",
                      ", ".join(f"{v}: {n}" for v, n in measured["verdict"].value_counts().items())))
    write_headline(outdir, KEY, items)
    return {"cross": table, "stability": stab, "runs": runs, "base": base, "claims": claims,
            "stability_tokens": by_tokens, "token_sizes": sizes}


def _by_tokens(ctx: Context, k: int, progress: bool, pool):
    """The `stability_tokens` table on two disjoint halves of the scoring corpus (`pool`: its windows; None
    for random tokens), and what was measured: the sizes, those the corpus cannot hold twice, and the windows
    it has."""
    p = ctx.params
    sizes = {"tokens": p.stability_tokens, "skipped": [], "corpus_windows": None, "corpus": p.data}
    if not p.stability_tokens or not any(m in DATA_METRICS for m in p.metrics):
        return pd.DataFrame(columns=COLUMNS), sizes
    with ctx.timer.stage("stability by tokens"):
        most = -(-max(p.stability_tokens) // p.seq_len)
        if pool is None:
            pool = window_pool(p.data, ctx.loaded.tokenizer, p.seq_len, p.prepend_bos, p.text_field,
                               ctx.model.get_input_embeddings().num_embeddings, n_random=2 * most, seed=p.seed)
        counts, sizes["skipped"] = window_counts(p.stability_tokens, p.seq_len, len(pool))
        sizes["corpus_windows"] = len(pool)
        sizes["tokens"] = [n * p.seq_len for n in counts]
        return stability_by_tokens(ctx.model, pool, p.metrics, counts, k, p.seed, progress), sizes
