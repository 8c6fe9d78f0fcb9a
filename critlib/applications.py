"""Applications of the rankings, each a measured experiment on one model and its held-out windows, every score
next to the magnitude and random baselines:

- quantization: held-out ppl of round-to-nearest per-group fake quantization of every Linear weight, with the
  top p% of each tensor (per-tensor budget) kept in original precision, chosen by each selector;
- pruning: held-out ppl at each sparsity, per layer and global, pruning the lowest-scored weights;
- bit flips: damage of single-bit flips in the top-N weights of each selector, and flips needed to break the
  model (ppl ≥ factor × baseline) in damage order vs random flips.

`run_applications(model, windows, config)` returns tidy DataFrames (one row per measured point); the run layer
(`critlib.run.applications`) writes them for notebook 06 and `critlib quantize|prune|bitflip|applications`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import pandas as pd
import torch

from . import CritlibError
from .bitflip import EFFECT_KEYS, Evaluator, flips_to_break, random_flips, ranked, single_flips
from .models import DTYPES
from .progress import Bar, track
from .prune import Lowest, linear_scores, pruned, random_scores
from .quantize import (OUTLIER_BYTES, QuantConfig, budget, keep_sets, kept_originals, linear_weights,
                       quantized)
from .sensitivity import global_topk

BASELINES = ("magnitude", "random")
APPLICATIONS = ("quantize", "prune", "bitflip")


@dataclass(frozen=True)
class ApplicationsConfig:
    """What the application experiments measure (field names are the params' keys; see params/default.yaml)."""
    metrics: list[str]
    seed: int
    batch_size: int
    fisher_dtype: str
    quant_bits: list[int]
    quant_group_size: int
    quant_symmetric: bool
    quant_keep_percents: list[float]
    quant_clip_z: float
    quant_include_head: bool
    prune_sparsities: list[float]
    prune_modes: list[str]
    prune_protect_k: int
    bitflip_top_n: int
    bitflip_bits: list[str]
    bitflip_eval_windows: int
    bitflip_break_factor: float
    bitflip_cap: int
    bitflip_draws: int


def selectors(metrics: list[str]) -> list[str]:
    """The params' metrics, then the baselines magnitude (if not already a metric) and random."""
    return list(metrics) + [b for b in BASELINES if b not in metrics]


def _kind(selector: str) -> str:
    return "baseline" if selector in BASELINES else "reference" if selector in ("none", "superweights") else "metric"


def _point(res: dict) -> dict:
    """A measured point's columns: ppl, nll, accuracy, each effect with its interval, the window set."""
    return {k: res[k] for k in ("ppl", "nll", "accuracy", *EFFECT_KEYS, "window_set")}


def _selector_scores(model, windows, cfg: ApplicationsConfig, selector: str, weights,
                     progress: bool) -> dict[str, torch.Tensor]:
    if selector == "random":
        return random_scores(weights, cfg.seed)
    return linear_scores(model, windows.score, selector, weights, cfg.batch_size, DTYPES[cfg.fisher_dtype],
                         progress)


def _protect_sets(model, windows, cfg: ApplicationsConfig, sens, weights) -> dict[str, dict[str, torch.Tensor]]:
    """Per metric, its global top-k restricted to the pruned Linear weights (flat indices per tensor)."""
    k = cfg.prune_protect_k
    if not k or sens is None:
        return {}
    names = {lw.name for lw in weights}
    out = {}
    for m in sens.metrics:
        coords: dict[str, list[int]] = {}
        for name, flat, _ in _global_top(model, windows, cfg, sens, m, k):
            if name in names:
                coords.setdefault(name, []).append(flat)
        out[m] = {n: torch.tensor(v) for n, v in coords.items()}
    return out


def score_and_prune(model, windows, cfg: ApplicationsConfig, sens, ev: Evaluator, want_quant: bool,
                    want_prune: bool, progress: bool = True):
    """One scoring pass per selector: derive the quantization keep sets (small) and run the pruning points
    while that selector's scores are in memory. Returns (keep sets per selector, pruning DataFrame)."""
    p = cfg
    weights = linear_weights(model, p.quant_include_head)
    sels = selectors(p.metrics)
    n_max = budget(weights, max(p.quant_keep_percents)) if want_quant else None
    keeps: dict[str, dict[str, torch.Tensor]] = {}
    rows = []
    protect = _protect_sets(model, windows, cfg, sens, weights) if want_prune else {}
    if want_prune:
        with pruned(model, weights, {}) as info:
            rows.append(dict(mode="none", sparsity=0.0, selector="none", kind="reference", protected="",
                             n_weights=info.n_weights, n_masked=0, n_changed=0,
                             achieved_sparsity=info.sparsity, **_point(ev())))
    n_points = len(sels) * len(p.prune_modes) * len(p.prune_sparsities) * (1 + len(protect)) if want_prune else 0
    bar = Bar(total=n_points, desc="pruning", disable=not progress or not want_prune)
    for sel in sels:
        scores = _selector_scores(model, windows, cfg, sel, weights, progress)
        if want_quant:
            keeps[sel] = keep_sets(scores, n_max)
        if want_prune:
            ranked = {pname: Lowest(scores, [lw.name for lw in weights], prot)
                      for pname, prot in [("", None)] + list(protect.items())}
            for mode in p.prune_modes:
                for s in p.prune_sparsities:
                    for pname in ranked:
                        masks = ranked[pname].prune_masks(s, mode)
                        with pruned(model, weights, masks) as info:
                            rows.append(dict(mode=mode, sparsity=s, selector=sel, kind=_kind(sel),
                                             protected=pname and f"top{p.prune_protect_k}:{pname}",
                                             n_weights=info.n_weights, n_masked=info.n_masked,
                                             n_changed=info.n_changed, achieved_sparsity=info.sparsity,
                                             **_point(ev())))
                        del masks
                        bar.update(1)
            del ranked
        del scores
    bar.close()
    return keeps, pd.DataFrame(rows)


def quantization_points(model, cfg: ApplicationsConfig, keeps: dict, ev: Evaluator,
                        superweights: list[tuple[str, int, int]] | None = None, progress: bool = True) -> pd.DataFrame:
    """Held-out ppl per (bits, selector, keep percent); one quantization per bit width serves every keep set.
    With quant_clip_z > 0 or `superweights`, adds the super-weight-aware points (clip, restore)."""
    p = cfg
    weights = linear_weights(model, p.quant_include_head)
    rows = []
    pcts = sorted(set(p.quant_keep_percents))
    n_points = len(p.quant_bits) * (int(0 in pcts) + len(keeps) * len([x for x in pcts if x > 0]))
    bar = Bar(total=n_points, desc="quantization", disable=not progress)

    def row(cfg, q, selector, pct, n_kept, res):
        outl = n_kept * OUTLIER_BYTES
        return dict(bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric, clip_z=cfg.clip_z,
                    selector=selector, kind=_kind(selector), keep_percent=pct, n_kept=n_kept,
                    n_weights=q.n_weights, n_quant_changed=q.n_changed, quant_bytes=q.quant_bytes,
                    outlier_bytes=outl, total_bytes=q.quant_bytes + outl, fp16_bytes=q.fp16_bytes,
                    bits_per_weight=8 * (q.quant_bytes + outl) / q.n_weights, **_point(res))

    for bits in p.quant_bits:
        cfg = QuantConfig(bits, p.quant_group_size, p.quant_symmetric).check()
        with quantized(model, cfg, weights) as q:
            if 0 in pcts:
                rows.append(row(cfg, q, "none", 0.0, 0, ev()))
                bar.update(1)
            for sel, keep in keeps.items():
                for pct in [x for x in pcts if x > 0]:
                    n = budget(weights, pct)
                    subset = {name: idx[: n[name]] for name, idx in keep.items()}
                    with kept_originals(weights, q, subset):
                        rows.append(row(cfg, q, sel, pct, sum(int(v.numel()) for v in subset.values()), ev()))
                    bar.update(1)
        variants = []
        if p.quant_clip_z > 0:
            variants.append((QuantConfig(bits, p.quant_group_size, p.quant_symmetric, p.quant_clip_z), None))
        if superweights:
            variants.append((cfg, superweights))
            if p.quant_clip_z > 0:
                variants.append((variants[0][0], superweights))
        for vcfg, sw in variants:
            with quantized(model, vcfg, weights, restore=sw) as q:
                rows.append(row(vcfg, q, "superweights" if sw else "none", 0.0, q.n_kept, ev()))
    bar.close()
    return pd.DataFrame(rows)


def _global_top(model, windows, cfg: ApplicationsConfig, sens, metric: str, n: int) -> list[tuple[str, int, float]]:
    """The exact global top-n (param, flat, score) of `metric`: from Phase 1 when it kept enough, else scored."""
    if sens is not None and metric in sens.topk and n <= sens.topk[metric].k:
        return sens.global_top(metric, n)
    return global_topk(model, windows.score, [metric], n, cfg.batch_size, DTYPES[cfg.fisher_dtype])[metric]


def bitflip_points(model, windows, cfg: ApplicationsConfig, sens, progress: bool = True,
                   store=None) -> dict[str, pd.DataFrame]:
    """Single-flip damage table, its ranking, and flips-to-break per selector (damage order) and for random
    flips (random weights, random bit positions, `bitflip_draws` draws, at most `bitflip_cap` flips)."""
    p = cfg
    ev = Evaluator(model, windows.heldout[: p.bitflip_eval_windows], p.batch_size, store)
    cands = []
    for sel in selectors(p.metrics):
        if sel == "random":
            pairs = [(n, f) for n, f in random_flip_weights(model, p.bitflip_top_n, p.seed)]
        else:
            pairs = [(n, f) for n, f, _ in _global_top(model, windows, cfg, sens, sel, p.bitflip_top_n)]
        cands += [(sel, r, n, f) for r, (n, f) in enumerate(pairs, 1)]
    bar = Bar(desc="bit flips", disable=not progress)
    table = single_flips(model, cands, p.bitflip_bits, ev, bar)
    bar.close()
    for c in ("ppl_ratio", "kl"):
        table[c] = table[c].astype("float64")
    breaks = []
    base = dict(base_ppl=ev.base["ppl"], factor=p.bitflip_break_factor, eval_windows=len(ev.windows))
    if len(table):
        for sel in track(list(table["selector"].unique()) + ["all"], "flips to break"):
            sub = table if sel == "all" else table[table["selector"] == sel]
            order = ranked(sub)
            flips = list(zip(order["param"], order["flat"], order["bit"]))
            res = flips_to_break(model, flips, ev, p.bitflip_break_factor, p.bitflip_cap)
            breaks.append(dict(selector=sel, kind=_kind(sel) if sel != "all" else "combined", order="damage",
                               draw=0, **base, **res))
    for d in track(range(p.bitflip_draws), "flips to break, random draws"):
        flips = random_flips(model, p.bitflip_cap, p.seed + 1000 + d)
        res = flips_to_break(model, flips, ev, p.bitflip_break_factor, p.bitflip_cap)
        breaks.append(dict(selector="random", kind="baseline", order="random_bits", draw=d, **base, **res))
    breaks = pd.DataFrame(breaks)
    if len(breaks):
        breaks["n_flips"] = breaks["n_flips"].astype("Int64")
    return {"bitflip_single": table, "bitflip_ranked": ranked(table) if len(table) else table,
            "bitflip_break": breaks}


def random_flip_weights(model, n: int, seed: int) -> list[tuple[str, int]]:
    from .perturb import select_random
    return select_random(model, n, seed).to_list()


def run_applications(model, windows, cfg: ApplicationsConfig, sens=None, progress: bool = True,
                     which: tuple[str, ...] = APPLICATIONS, superweights: list[tuple[str, int, int]] | None = None,
                     timer=None, store=None) -> dict[str, pd.DataFrame]:
    """Every application experiment on `model` and `windows` (`.score` to rank, `.heldout` to evaluate) -> tidy
    tables: `quantization`, `pruning`, `bitflip_single`, `bitflip_ranked`, `bitflip_break`. `sens` (Phase 1)
    supplies the top-N weights for the bit flips and the protected sets (rescored when missing);
    `superweights` ((param, row, col)) adds super-weight-aware quantization points; `timer` (a
    `critlib.manifest.Timer`) times each part; `store` (critlib.effects.Evaluations) shares evaluations with
    other experiments on the same model."""
    unknown = set(which) - set(APPLICATIONS)
    if unknown:
        raise CritlibError(f"unknown application(s) {', '.join(sorted(unknown))}; choose {', '.join(APPLICATIONS)}")
    stage = timer.stage if timer is not None else lambda name: nullcontext()
    out: dict[str, pd.DataFrame] = {}
    if "quantize" in which or "prune" in which:
        ev = Evaluator(model, windows.heldout, cfg.batch_size, store)
        with stage("applications_scores_prune"):
            keeps, prune_df = score_and_prune(model, windows, cfg, sens, ev, "quantize" in which, "prune" in which,
                                              progress)
        if "prune" in which:
            out["pruning"] = prune_df
        if "quantize" in which:
            with stage("applications_quantize"):
                out["quantization"] = quantization_points(model, cfg, keeps, ev, superweights, progress)
        del ev
    if "bitflip" in which:
        with stage("applications_bitflip"):
            out.update(bitflip_points(model, windows, cfg, sens, progress, store))
    return out
