"""Phase 4 in a run: super-weight candidates and their confirmation (critlib.superweights), computed once per
run and cached, so Phase 6 protects exactly the confirmed super weights in its quantization.

Effects are measured on Phase 3's window set (the first `perturb_heldout` held-out windows) through the run's
evaluation store (cache/evaluations.json), so zeroing one weight reads the same number in Phase 3 and here."""

from __future__ import annotations

from pathlib import Path

from ..io import write_json
from ..superweights import SuperWeightConfig, rank_in_phase1, super_weight_study
from . import cache
from .context import Context, config_from, manifest
from .headlines import write_headline

KEY = "04_super_weights"
PARAM_KEYS = ("model", "tokenizer", "revision", "data", "text_field", "seq_len", "n_sequences", "n_heldout",
              "batch_size", "prepend_bos", "seed", "dtype", "perturb_heldout", "sw_spike_ratio",
              "sw_min_activation", "sw_effect_size", "sw_prompts", "sw_random_draws")
CODE = ("superweights", "effects", "evaluate", "perturb", "edit", "models", "data")
CACHE = "phase4.json"


def results(ctx: Context, outdir: str | Path) -> tuple[dict, bool]:
    """(candidates + confirmation, from the cache?): from the run's cache when its key matches, else computed
    (with the run's evaluation store, saved back) and cached under `outdir`."""
    key = cache.key(ctx, PARAM_KEYS, CODE)
    hit = cache.load_json(outdir, CACHE, key)
    if hit is not None:
        return hit, True
    windows = ctx.with_heldout(ctx.params.perturb_heldout).windows.heldout
    store = cache.evaluations(ctx, outdir)
    with ctx.timer.stage("super_weights"):
        config = config_from(SuperWeightConfig, ctx.params)
        result = super_weight_study(ctx.model, windows, ctx.loaded.tokenizer, config, store)
    cache.save_evaluations(ctx, outdir, store)
    cache.save_json(outdir, CACHE, key, result)
    return result, False


def coordinates(result: dict) -> list[tuple[str, int, int]]:
    """(param, row, col) of every confirmed super weight in a Phase 4 result (candidates left out)."""
    return [(r["param"], r["row"], r["col"]) for r in result.get("candidates", []) if r.get("confirmed")]


def _interval(v, lo, hi) -> str | None:
    fmt = lambda x: "n/a" if x is None else f"{x:.4g}"
    return None if v is None else f"{fmt(v)} [{fmt(lo)}, {fmt(hi)}]"


def headline(result: dict) -> list[tuple[str, object]]:
    """Confirmed ones of all candidates, each confirmed one's ratio with its interval, all of them zeroed."""
    base = result.get("baseline", {})
    sw = result.get("super_weights", [])
    items: list[tuple[str, object]] = [
        ("confirmed super weights", f"{len(sw)} of {result.get('n_candidates', len(sw))} candidates"),
        ("effect windows (Phase 3's)", f"{base.get('n_windows')} windows, {base.get('window_set')}")]
    for r in sw[:4]:
        items.append((f"{r['param']}[{r['row']},{r['col']}] zeroed: ppl ratio [95% CI]",
                      _interval(r["ppl_ratio_when_zeroed"], r["ppl_ratio_when_zeroed_lo"],
                                r["ppl_ratio_when_zeroed_hi"])))
    joint = result.get("joint") or {}
    if joint.get("ppl_ratio") is not None:
        items.append(("all confirmed super weights zeroed: ppl ratio [95% CI]",
                      _interval(joint["ppl_ratio"], joint.get("ppl_ratio_lo"), joint.get("ppl_ratio_hi"))))
    return items


def run(ctx: Context, p1, outdir: str | Path) -> dict:
    """Phase 4 -> `superweights.json` (every candidate with its rank in Phase 1), the manifest, the headline."""
    outdir = Path(outdir)
    result, from_cache = results(ctx, outdir)
    if p1 is not None:
        cands = rank_in_phase1(result["candidates"], p1.sens)
        result = dict(result, candidates=cands, super_weights=[r for r in cands if r["confirmed"]])
    write_json(outdir / "superweights.json", result)
    write_json(outdir / f"manifest_{KEY}.json", manifest(ctx, {
        "phase": KEY, "from_cache": from_cache, "phase1_from_cache": getattr(p1, "from_cache", None),
        "window_set": result["baseline"]["window_set"], "heldout_windows": result["baseline"]["n_windows"],
        "rule": result["rule"]["text"], "n_candidates": result["n_candidates"], "n_confirmed": result["n_confirmed"]}))
    write_headline(outdir, KEY, headline(result))
    return result
