"""What each phase computes and writes, so the notebooks stay thin and `critlib run` runs the same code.

`PHASES` is the report's table of contents: one entry per notebook in `notebooks/`, in run order. Each
phase writes its tables/JSON into the run folder (atomically), a `manifest_<key>.json`, and
`headlines/<key>.json` (the numbers `index.html` shows).

Phase 1's result is cached in `<run>/cache/phase1.pt` (tensors and plain data, read with weights_only) under a key of everything it depends on (params,
data windows, model identity, scoring code), so the notebooks of one run score the model once; a notebook
run alone recomputes whatever is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import CritlibError, __version__
from .io import write_json, write_table
from .params import Params, load_params, valid_keys
from .pipeline import Context, manifest, prepare


@dataclass(frozen=True)
class Phase:
    key: str  # notebook file stem in notebooks/
    number: int
    title: str
    summary: str
    requires: tuple[str, ...] = ()  # critlib modules it needs


PHASES: tuple[Phase, ...] = (
    Phase("01_sensitivity", 1, "Sensitivity", "Scores of every weight by each metric: heavy tail, where the "
          "score mass sits (layer × component), top weights with their tokens."),
    Phase("02_cross_metric", 2, "Cross-metric agreement", "Overlap, Jaccard and Spearman between metrics, "
          "against each metric's seed-to-seed and corpus-to-corpus stability."),
    Phase("03_perturbation", 3, "Perturbation (causal test)", "Dose-response of held-out perplexity, accuracy "
          "and KL to perturbing the top-K of each metric vs random, magnitude and bottom-K controls.",
          ("critlib.experiments",)),
    Phase("04_super_weights", 4, "Super weights", "Data-free super-weight detection (Yu et al. 2024), its "
          "validation, and where each super weight ranks in Phase 1.", ("critlib.superweights",)),
    Phase("05_token_explorer", 5, "Token explorer", "Scores of each token's embedding and lm_head rows per "
          "dimension and its rank among all tokens."),
    Phase("06_applications", 6, "Applications", "Quantization with kept outliers, pruning and bit-flip "
          "vulnerability per selector.", ("critlib.applications",)),
)


def phase(which: int | str) -> Phase:
    for p in PHASES:
        if str(which) in (str(p.number), p.key, f"{p.number:02d}"):
            return p
    raise CritlibError(f"unknown phase '{which}'; choose from {', '.join(f'{p.number} ({p.key})' for p in PHASES)}")


def select(spec: str | list | None) -> list[Phase]:
    """Phases from '1,3' / ['01_sensitivity'] / None (all), in run order."""
    if spec is None or spec == "" or spec == []:
        return list(PHASES)
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    chosen = {phase(s).key for s in items if s}
    return [p for p in PHASES if p.key in chosen]


# ---------------------------------------------------------------- notebook parameters

def params_from(namespace: dict) -> Params:
    """The run's Params from a notebook's variables: `params_file` (a YAML, or None for the built-in
    defaults), overridden by any variable named like a Params key that is not None (papermill `-f X.yaml`
    injects every key of X). Opened from `notebooks/` in JupyterLab, relative paths resolve from the
    repository root, as with `make run`."""
    cwd = Path.cwd()
    if cwd.name == "notebooks" and (cwd.parent / "params").is_dir():
        os.chdir(cwd.parent)
    overrides = {k: namespace[k] for k in valid_keys() if namespace.get(k) is not None}
    return load_params(namespace.get("params_file"), overrides)


def outdir_of(params: Params, namespace: dict | None = None) -> Path:
    """Where a notebook writes: its `write_dir` variable when set (critlib run's staging folder, moved to
    output_dir when every phase succeeded), else the params' output_dir."""
    out = Path((namespace or {}).get("write_dir") or params.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def start(namespace: dict) -> tuple[Params, Context, Path]:
    """Every notebook's first step: the Params of its `parameters` cell, figures set up, the model and
    data loaded, and the folder it writes to."""
    from .viz import setup
    params = params_from(namespace)
    setup()
    return params, prepare(params), outdir_of(params, namespace)


# ---------------------------------------------------------------- headlines

def write_headline(outdir: str | Path, key: str, items: list[tuple[str, object]] | dict) -> None:
    """The numbers of a phase that `index.html` shows: [(label, value), ...]."""
    items = list(items.items()) if isinstance(items, dict) else list(items)
    write_json(Path(outdir) / "headlines" / f"{key}.json",
               {"phase": key, "items": [{"label": str(k), "value": _plain(v)} for k, v in items]})


def read_headlines(outdir: str | Path) -> dict[str, list[dict]]:
    out = {}
    for f in sorted((Path(outdir) / "headlines").glob("*.json")):
        try:
            out[f.stem] = json.loads(f.read_text())["items"]
        except (OSError, ValueError, KeyError):
            continue
    return out


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and v != v:
        return None
    return v


# ---------------------------------------------------------------- phase 1

@dataclass
class Phase1:
    sens: object  # critlib.sensitivity.Sensitivity
    table: pd.DataFrame  # top_weights
    heldout: dict  # unperturbed held-out evaluation ({} without held-out windows)
    from_cache: bool = False


def _bottomk(params: Params) -> int:
    ks = getattr(params, "perturb_ks", None) or []
    return max([int(k) for k in ks] + [0])


def _code_hash() -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for mod in ("scores", "sensitivity", "rank", "stats", "data", "models", "layout"):
        h.update((here / f"{mod}.py").read_bytes())
    return h.hexdigest()


def phase1_key(ctx: Context) -> str:
    p = ctx.params
    keys = ("model", "tokenizer", "revision", "data", "text_field", "seq_len", "n_sequences", "n_heldout",
            "batch_size", "prepend_bos", "metrics", "topk_per_layer", "topk_global", "seed", "dtype",
            "exact_stats", "chunk_size", "fisher_dtype", "kernel")
    ident = {k: getattr(p, k) for k in keys}
    ident.update(windows=ctx.windows.sha256, model_info=ctx.loaded.info, bottomk=_bottomk(p),
                 device=str(next(ctx.loaded.model.parameters()).device), critlib=__version__, code=_code_hash())
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def _load_cache(path: Path, key: str):
    """The cached Phase 1 result if its key matches; any unreadable or foreign file is ignored (and never
    unpickled: `Sensitivity.load` reads tensors and plain data only)."""
    from .sensitivity import Sensitivity
    try:
        sens, extra = Sensitivity.load(path)
    except Exception:  # a missing, truncated, old-format or tampered cache is simply recomputed
        return None
    return {"sens": sens, "heldout": extra.get("heldout", {})} if extra.get("key") == key else None


def sensitivity(ctx: Context, outdir: str | Path, progress: bool = True, write: bool = True) -> Phase1:
    """Phase 1 scores (from the run's cache when its key matches), the top-weights table and the unperturbed
    held-out evaluation; with `write`, the files of `critlib score` plus the figures' tables."""
    from .pipeline import heldout_baseline, run_sensitivity, write_phase1
    from .sensitivity import top_weights_table
    outdir = Path(outdir)
    p = ctx.params
    cache = outdir / "cache" / "phase1.pt"
    key = phase1_key(ctx)
    hit = _load_cache(cache, key)
    if hit is not None:
        sens, heldout = hit["sens"], hit["heldout"]
    else:
        sens = run_sensitivity(ctx, progress, bottomk=_bottomk(p))
        heldout = heldout_baseline(ctx)
        sens.save(cache, {"key": key, "heldout": heldout})
    with ctx.timer.stage("tables"):
        table = top_weights_table(sens, ctx.loaded.model, ctx.loaded.tokenizer)
    if write:
        from .viz import cells_frame, log_histogram
        write_phase1(outdir, sens, table, heldout)
        write_table(outdir / "layer_component", cells_frame(sens))
        hist = []
        for m, counts in sens.hist.items():
            df, extra = log_histogram(counts.numpy(), per_octave=4)
            hist.append(df.assign(metric=m, zero_or_subnormal=extra["zero_or_subnormal"], total=extra["total"]))
        if hist:
            write_table(outdir / "score_histogram", pd.concat(hist, ignore_index=True))
        write_json(outdir / "manifest.json", manifest(ctx, {"phase": "01_sensitivity", "phase1_cache_hit": hit is not None}))
        items = [("weights scored", sens.stats[sens.metrics[0]]["global"].get("count", 0))]
        if heldout:
            items.append(("held-out perplexity", round(heldout["ppl"], 4)))
        for m in sens.metrics:
            g = sens.stats[m]["global"]
            items.append((f"{m}: share of score in the top 0.1% of weights", g.get("top_share", {}).get("0.1%")))
            items.append((f"{m}: max / mean", g.get("max_over_mean")))
        write_headline(outdir, "01_sensitivity", items)
    return Phase1(sens, table, heldout, from_cache=hit is not None)


# ---------------------------------------------------------------- phase 2

def cross_metric_phase(ctx: Context, p1: Phase1, outdir: str | Path, progress: bool = True) -> dict:
    """Metric-vs-metric agreement of the global top-K, and each metric's top-K stability across window seeds
    (`stability_seeds`) and across corpora (`stability_data`), each compared with the Phase 1 run."""
    from .agreement import cross_table, stability_table, top_sets, topk_sets, with_baseline
    from .data import load_windows
    from .models import DTYPES
    p = ctx.params
    outdir = Path(outdir)
    sens = p1.sens
    k = p.topk_global
    base = f"{p.data} seed {p.seed}"
    runs = {base: top_sets(sens, k)}
    kinds = {base: "base"}
    vocab = ctx.loaded.model.get_input_embeddings().num_embeddings
    others = [(f"{p.data} seed {s}", p.data, s, "seed") for s in p.stability_seeds if s != p.seed]
    if p.stability_data and p.stability_data != p.data:
        others.append((f"{p.stability_data} seed {p.seed}", p.stability_data, p.seed, "corpus"))
    for name, data, seed, kind in others:
        with ctx.timer.stage(f"stability {name}"):
            w = load_windows(data, ctx.loaded.tokenizer, p.seq_len, p.n_sequences, 0, p.prepend_bos, seed,
                             p.text_field, vocab_size=vocab)
            runs[name] = topk_sets(ctx.loaded.model, w.score, p.metrics, k, p.batch_size, p.chunk_size,
                                   DTYPES[p.fisher_dtype], progress, desc=name)
            kinds[name] = kind
    cross = cross_table(sens, k)
    stab = stability_table(runs, base, kinds)
    table = with_baseline(cross, stab)
    write_table(outdir / "cross_metric", table)
    write_table(outdir / "stability", stab)
    write_json(outdir / "manifest_02_cross_metric.json", manifest(ctx, {"phase": "02_cross_metric",
                                                                         "runs": list(runs),
                                                                         "phase1_from_cache": p1.from_cache}))
    items = []
    if len(table):
        items.append((f"mean Jaccard between metrics (top-{k})", round(float(table["jaccard"].mean()), 4)))
    for kind in ("seed", "corpus"):
        sub = stab[(stab["comparison"] == kind) & (stab["run_a"] == base)]
        if len(sub):
            items.append((f"mean Jaccard of a metric with itself, other {kind}",
                          round(float(sub["jaccard"].mean()), 4)))
    write_headline(outdir, "02_cross_metric", items)
    return {"cross": table, "stability": stab, "runs": runs, "base": base}


# ---------------------------------------------------------------- phase 3

def perturbation_phase(ctx: Context, p1: Phase1, outdir: str | Path, progress: bool = True) -> dict:
    """Dose-response over `perturb_ks` of every selector × method (critlib.experiments)."""
    from .experiments import run_perturbation, summarize
    outdir = Path(outdir)
    n = ctx.params.perturb_heldout
    if n and n < len(ctx.windows.heldout):
        ctx = dataclasses.replace(ctx, windows=dataclasses.replace(ctx.windows, heldout=ctx.windows.heldout[:n]))
    with ctx.timer.stage("perturbation"):
        df = run_perturbation(ctx, p1.sens, progress=progress)
    summary = summarize(df)
    write_table(outdir / "perturbation", df)
    write_table(outdir / "perturbation_summary", summary)
    baseline = df.attrs.get("baseline", {})
    write_json(outdir / "manifest_03_perturbation.json", manifest(ctx, {"phase": "03_perturbation",
                                                                         "baseline": baseline,
                                                                         "heldout_windows": len(ctx.windows.heldout),
                                                                         "phase1_from_cache": p1.from_cache}))
    write_headline(outdir, "03_perturbation", perturbation_headline(summary))
    return {"raw": df, "summary": summary, "baseline": baseline}


def perturbation_headline(summary: pd.DataFrame) -> list[tuple[str, object]]:
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


# ---------------------------------------------------------------- phase 4

def super_weights_phase(ctx: Context, p1: Phase1 | None, outdir: str | Path) -> dict:
    """Data-free super-weight detection and validation (critlib.superweights) -> superweights.json."""
    from .superweights import run_super_weights
    outdir = Path(outdir)
    with ctx.timer.stage("super_weights"):
        result = run_super_weights(ctx, p1.sens if p1 is not None else None)
    write_json(outdir / "superweights.json", result)
    write_json(outdir / "manifest_04_super_weights.json", manifest(ctx, {"phase": "04_super_weights",
                                                                          "phase1_from_cache": getattr(p1, "from_cache", None)}))
    sw = result.get("super_weights", [])
    items: list[tuple[str, object]] = [("super weights found", len(sw))]
    for r in sw[:4]:
        items.append((f"{r['param']}[{r['row']},{r['col']}]: ppl ratio when zeroed", r.get("ppl_ratio_when_zeroed")))
    joint = result.get("joint") or {}
    if isinstance(joint, dict) and joint.get("ppl_ratio") is not None:
        items.append(("all super weights zeroed: ppl ratio", joint["ppl_ratio"]))
    write_headline(outdir, "04_super_weights", items)
    return result


# ---------------------------------------------------------------- phase 5

def token_explorer_phase(ctx: Context, outdir: str | Path, progress: bool = True):
    """Every token's embedding/lm_head row scores -> token_summary table (row totals and ranks)."""
    from .models import DTYPES
    from .tokens import token_scores
    p = ctx.params
    outdir = Path(outdir)
    with ctx.timer.stage("token_rows"):
        ts = token_scores(ctx.loaded.model, ctx.windows.score, p.metrics, p.batch_size, DTYPES[p.fisher_dtype],
                          progress, ctx.loaded.tokenizer)
    write_table(outdir / "token_summary", ts.summary())
    write_json(outdir / "manifest_05_token_explorer.json", manifest(ctx, {"phase": "05_token_explorer",
                                                                           "roles": ts.roles}))
    m, role = ts.metrics[0], next(iter(ts.roles))
    top = ts.top_tokens(m, role, 5)
    write_headline(outdir, "05_token_explorer", [("tokens", ts.vocab_size), ("rows", ", ".join(ts.roles)),
                                                 (f"top tokens by {m} ({role} row)", ", ".join(ts.text(i) for i in top))])
    return ts


# ---------------------------------------------------------------- phase 6

APPLICATION_TABLES = ("quantization", "pruning", "bitflip_single", "bitflip_ranked", "bitflip_break")


def applications_phase(ctx: Context, p1: Phase1 | None, outdir: str | Path, progress: bool = True) -> dict:
    """Quantization with kept outliers, pruning and bit flips per selector against the magnitude and random
    baselines (critlib.applications). Super weights, found data-free as in Phase 4, add the super-weight-aware
    quantization points. Quantization and pruning evaluate on the first `applications_heldout` held-out windows
    (0: all), bit flips on the first `bitflip_eval_windows`. With Phase 1, also `protect_critical`. Writes each table (parquet + csv), a manifest
    and the headline numbers."""
    from .applications import run_applications
    from .quantize import linear_weights
    from .superweights import default_prompt_ids, find_super_weights
    outdir = Path(outdir)
    n = ctx.params.applications_heldout
    if n and n < len(ctx.windows.heldout):
        ctx = dataclasses.replace(ctx, windows=dataclasses.replace(ctx.windows, heldout=ctx.windows.heldout[:n]))
    model = ctx.loaded.model
    with ctx.timer.stage("super_weight_detection"):
        found = find_super_weights(model, default_prompt_ids(ctx.loaded.tokenizer))
    names = {lw.name for lw in linear_weights(model, ctx.params.quant_include_head)}
    sw = [(s.param, s.row, s.col) for s in found if s.param in names]
    tables = run_applications(ctx, p1.sens if p1 is not None else None, progress, superweights=sw or None)
    for name in APPLICATION_TABLES:
        write_table(outdir / name, tables[name])
    prot = protect_critical(ctx, p1, outdir) if p1 is not None else None
    items = applications_headline(tables)
    extra = {}
    if prot is not None:
        items += [("critical weights fingerprinted and frozen (freeze_masks.safetensors)", prot["n_critical"]),
                  ("one flipped bit in the top weight caught by verify", not prot["flipped_report"]["ok"])]
        extra = {"protection": {k: prot[k] for k in ("k", "n_critical", "mask_tensors", "flipped_weight",
                                                     "flipped_bit", "n_changed")},
                 "protection_files": [prot["fingerprint"].name, prot["masks"].name]}
    write_json(outdir / "manifest_06_applications.json", manifest(ctx, {
        "phase": "06_applications", "super_weights": [list(s) for s in sw], "heldout_windows": len(ctx.windows.heldout),
        "bitflip_eval_windows": min(ctx.params.bitflip_eval_windows, len(ctx.windows.heldout)),
        "phase1_from_cache": getattr(p1, "from_cache", None), **extra}))
    write_headline(outdir, "06_applications", items)
    return dict(tables, super_weights=sw, protection=prot, heldout_windows=len(ctx.windows.heldout))


def _ratio(v) -> float | str:
    v = float(v)
    return round(v, 4) if v == v and v not in (float("inf"), float("-inf")) else "broken (ppl NaN/inf)"


def applications_headline(tables: dict[str, pd.DataFrame]) -> list[tuple[str, object]]:
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


def protect_critical(ctx: Context, p1: Phase1, outdir: str | Path, k: int | None = None) -> dict:
    """The critical weights (union of each metric's Phase 1 global top-k, default topk_global) written as an
    integrity fingerprint (`critical_fingerprint.json`) and as freeze masks (`freeze_masks.safetensors`), and
    verify run twice: with the top weight's highest exponent bit flipped (it must be caught) and after the
    flip is undone (it must pass)."""
    from .freeze import masks_from_coords, save_masks
    from .integrity import fingerprint, save_fingerprint, verify
    from .perturb import BitFlip, Selection, perturbed
    from .scores import scored_parameters
    outdir = Path(outdir)
    model, sens = ctx.loaded.model, p1.sens
    k = min(int(k or ctx.params.topk_global), min(sens.topk[m].k for m in sens.metrics))
    found: dict[tuple[str, int], list[str]] = {}
    for m in sens.metrics:
        for name, flat, _ in sens.global_top(m, k):
            found.setdefault((name, flat), []).append(m)
    pos = {n: i for i, n in enumerate(sens.order)}
    crit = [(n, f, ms) for (n, f), ms in sorted(found.items(), key=lambda kv: (pos[kv[0][0]], kv[0][1]))]
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


__all__ = ["PHASES", "Phase", "Phase1", "phase", "select", "params_from", "outdir_of", "prepare", "sensitivity",
           "cross_metric_phase", "perturbation_phase", "super_weights_phase", "token_explorer_phase",
           "applications_phase", "applications_headline", "protect_critical", "write_headline", "read_headlines"]
