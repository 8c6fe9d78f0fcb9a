"""Phase 6 in a run: quantization with kept outliers, pruning and bit flips per selector against the
magnitude and random baselines (critlib.applications), with Phase 4's super weights in the quantization and
Phase 1's critical set fingerprinted and frozen. Notebook 06 and `critlib applications` run `run`;
`critlib quantize|prune|bitflip` run it for one experiment."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .. import CritlibError
from ..applications import APPLICATIONS, ApplicationsConfig, run_applications
from ..io import write_json, write_table
from ..quantize import linear_weights
from . import cache, super_weights
from .context import Context, config_from, manifest
from .headlines import write_headline

KEY = "06_applications"
TABLES = {"quantize": ("quantization",), "prune": ("pruning",),
          "bitflip": ("bitflip_single", "bitflip_ranked", "bitflip_break")}


def needs_phase1(params, which: tuple[str, ...] = APPLICATIONS) -> bool:
    """Phase 1's top-K serves the bit flips, the protected pruning sets and the critical-set protection."""
    return "bitflip" in which or ("prune" in which and params.prune_protect_k > 0) or set(which) == set(APPLICATIONS)


def run(ctx: Context, p1, outdir: str | Path, progress: bool = True, which: tuple[str, ...] = APPLICATIONS) -> dict:
    """Phase 6 (or the experiments in `which`) -> its tables, with every experiment the critical-set
    protection files, the manifest and the headline. Quantization and pruning evaluate on the first
    `applications_heldout` held-out windows (0: all), bit flips on the first `bitflip_eval_windows`."""
    outdir = Path(outdir)
    sw = []
    if "quantize" in which:
        found, _ = super_weights.results(ctx, outdir)
        names = {lw.name for lw in linear_weights(ctx.model, ctx.params.quant_include_head)}
        sw = [c for c in super_weights.coordinates(found) if c[0] in names]
    ctx = ctx.with_heldout(ctx.params.applications_heldout)
    sens = p1.sens if p1 is not None else None
    store = cache.evaluations(ctx, outdir)
    tables = run_applications(ctx.model, ctx.windows, config_from(ApplicationsConfig, ctx.params), sens, progress,
                              which, sw or None, ctx.timer, store)
    cache.save_evaluations(ctx, outdir, store)
    for name in (t for w in which for t in TABLES[w]):
        write_table(outdir / name, tables[name])
    prot = protect_critical(ctx, p1, outdir) if p1 is not None and set(which) == set(APPLICATIONS) else None
    items = headline(tables)
    extra = {}
    if prot is not None:
        items += [("critical weights fingerprinted and frozen (freeze_masks.safetensors)", prot["n_critical"]),
                  ("one flipped bit in the top weight caught by verify", not prot["flipped_report"]["ok"])]
        extra = {"protection": {k: prot[k] for k in ("k", "n_critical", "mask_tensors", "flipped_weight",
                                                     "flipped_bit", "n_changed")},
                 "protection_files": [prot["fingerprint"].name, prot["masks"].name]}
    write_json(outdir / f"manifest_{KEY}.json", manifest(ctx, {
        "phase": KEY, "experiments": list(which), "super_weights": [list(s) for s in sw],
        "heldout_windows": len(ctx.windows.heldout),
        "bitflip_eval_windows": min(ctx.params.bitflip_eval_windows, len(ctx.windows.heldout)),
        "phase1_from_cache": getattr(p1, "from_cache", None), **extra}))
    write_headline(outdir, KEY, items)
    return dict(tables, super_weights=sw, protection=prot, heldout_windows=len(ctx.windows.heldout))


def protect_critical(ctx: Context, p1, outdir: str | Path, k: int | None = None) -> dict:
    """The critical weights (union of each metric's Phase 1 global top-k, default topk_global) written as an
    integrity fingerprint (`critical_fingerprint.json`) and as freeze masks (`freeze_masks.safetensors`), and
    verify run twice: with the top weight's highest exponent bit flipped (it must be caught) and after the
    flip is undone (it must pass)."""
    from ..freeze import masks_from_coords, save_masks
    from ..integrity import critical_union, fingerprint, save_fingerprint, verify
    from ..perturb import BitFlip, Selection, perturbed
    from ..scores import scored_parameters
    outdir = Path(outdir)
    model, sens = ctx.model, p1.sens
    k = min(int(k or ctx.params.topk_global), min(sens.topk[m].k for m in sens.metrics))
    crit = critical_union({m: sens.global_top(m, k) for m in sens.metrics}, sens.order)
    with ctx.timer.stage("fingerprint"):
        fp = fingerprint(model, crit, extra={"source": ctx.params.model, "dtype": ctx.params.dtype,
                                             "metrics": list(sens.metrics), "k": k})
        save_fingerprint(fp, outdir / "critical_fingerprint.json")
        top = sens.global_top(sens.metrics[0], 1)[0]
        flip = BitFlip("exponent")
        with perturbed(model, Selection.from_list([top]), flip) as applied:
            flipped = verify(model, fp)
        restored = verify(model, fp)
    if not restored["ok"]:
        raise CritlibError("the model differs from its fingerprint after the demonstration flip was undone; "
                           "report this as a critlib bug")
    masks = masks_from_coords(model, crit)
    save_masks(masks, outdir / "freeze_masks.safetensors", {"metrics": ",".join(sens.metrics), "k": k,
                                                            "n_frozen": len(crit)})
    return {"k": k, "n_critical": len(crit), "fingerprint": outdir / "critical_fingerprint.json",
            "masks": outdir / "freeze_masks.safetensors", "n_frozen": sum(int(m.sum()) for m in masks.values()),
            "mask_tensors": len(masks), "flipped_weight": (top[0], top[1], sens.metrics[0]),
            "flipped_bit": flip.position(dict(scored_parameters(model))[top[0]].dtype),
            "n_changed": applied.n_changed, "flipped_report": flipped, "restored_report": restored}


def _ratio(v) -> float | str:
    v = float(v)
    return round(v, 4) if v == v and v not in (float("inf"), float("-inf")) else "broken (ppl NaN/inf)"


def headline(tables: dict[str, pd.DataFrame]) -> list[tuple[str, object]]:
    """Perplexity ratios at the fewest bits and most kept outliers, at the highest sparsity per mode (the best
    metric, magnitude, random), the worst single flip, and flips to break: all selectors' damage order vs
    random flips (median over draws)."""
    items: list[tuple[str, object]] = []
    q = tables.get("quantization")
    if q is not None and len(q):
        q = q[(q["bits"] == q["bits"].min()) & (q["clip_z"] == 0)]
        bits = int(q["bits"].iloc[0])
        none = q[(q["selector"] == "none") & (q["keep_percent"] == 0)]
        if len(none):
            items.append((f"{bits}-bit quantization, no outliers kept: ppl ratio", _ratio(none["ppl_ratio"].iloc[0])))
        pct = q["keep_percent"].max()
        at = q[q["keep_percent"] == pct]
        items += _best_and_baselines(at, f"{bits}-bit + top {pct:g}% of each tensor kept")
    pr = tables.get("pruning")
    if pr is not None and len(pr):
        pr = pr[(pr["kind"] != "reference") & (pr["protected"] == "")]
        for mode, sub in pr.groupby("mode", sort=False):
            s = sub["sparsity"].max()
            items += _best_and_baselines(sub[sub["sparsity"] == s], f"{s:.0%} pruned ({mode})")
    r = tables.get("bitflip_ranked")
    if r is not None and len(r):
        w = r.iloc[0]
        at = f"[{w['row']}, {w['col']}]" if not pd.isna(w["col"]) else f"[{w['row']}]"
        items.append((f"worst single bit flip: {w['param']}{at} bit {w['bit']} ({w['bit_kind']}): ppl ratio",
                      _ratio(w["ppl_ratio"])))
    b = tables.get("bitflip_break")
    if b is not None and len(b):
        cap = int(b["n_available"].max())
        both = b[b["selector"] == "all"]
        if len(both):
            n = both["n_flips"].iloc[0]
            items.append((f"flips to break (ppl ≥ {b['factor'].iloc[0]:g}× base), most damaging first",
                          int(n) if not pd.isna(n) else f"> {int(both['n_available'].iloc[0])}"))
        rnd = b[b["order"] == "random_bits"]
        if len(rnd):
            n = rnd["n_flips"].astype("Float64").fillna(float("inf")).median()
            items.append((f"flips to break, random weights and bits (median of {len(rnd)} draws)",
                          f"> {cap}" if n == float("inf") else int(n) if n == int(n) else float(n)))
    return items


def _best_and_baselines(at: pd.DataFrame, what: str) -> list[tuple[str, object]]:
    items = []
    metrics = at[at["kind"] == "metric"]
    if len(metrics):
        best = metrics.loc[metrics["ppl_ratio"].fillna(float("inf")).idxmin()]
        items.append((f"{what}, best metric ({best['selector']}): ppl ratio", _ratio(best["ppl_ratio"])))
    for sel in ("magnitude", "random"):
        row = at[at["selector"] == sel]
        if len(row):
            items.append((f"{what}, {sel}: ppl ratio", _ratio(row["ppl_ratio"].iloc[0])))
    return items
