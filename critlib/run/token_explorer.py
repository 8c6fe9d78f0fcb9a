"""Phase 5 in a run: every token's embedding and lm_head row scores -> `token_summary` (row totals, ranks)."""

from __future__ import annotations

from pathlib import Path

from ..io import write_json, write_table
from ..models import DTYPES
from ..tokens import TokenScores, token_scores
from .context import Context, manifest
from .headlines import write_headline

KEY = "05_token_explorer"


def run(ctx: Context, outdir: str | Path, progress: bool = True) -> TokenScores:
    p = ctx.params
    outdir = Path(outdir)
    with ctx.timer.stage("token_rows"):
        ts = token_scores(ctx.model, ctx.windows.score, p.metrics, p.batch_size, DTYPES[p.fisher_dtype], progress,
                          ctx.loaded.tokenizer)
    write_table(outdir / "token_summary", ts.summary())
    write_json(outdir / f"manifest_{KEY}.json", manifest(ctx, {"phase": KEY, "roles": ts.roles}))
    m, role = ts.metrics[0], next(iter(ts.roles))
    top = ts.top_tokens(m, role, 5)
    write_headline(outdir, KEY, [("tokens", ts.vocab_size), ("rows", ", ".join(ts.roles)),
                                 (f"top tokens by {m} ({role} row)", ", ".join(ts.text(i) for i in top))])
    return ts
