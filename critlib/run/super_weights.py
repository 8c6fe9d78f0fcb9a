"""Phase 4 in a run: data-free super-weight detection and its validation (critlib.superweights), computed
once per run and cached, so Phase 6 keeps the same super weights in its quantization."""

from __future__ import annotations

from pathlib import Path

from ..io import write_json
from ..superweights import rank_in_phase1, super_weight_study
from . import cache
from .context import Context, manifest
from .headlines import write_headline

KEY = "04_super_weights"
PARAM_KEYS = ("model", "tokenizer", "revision", "data", "text_field", "seq_len", "n_sequences", "n_heldout",
              "batch_size", "prepend_bos", "seed", "dtype")
CODE = ("superweights", "evaluate", "perturb", "models", "data")
CACHE = "phase4.json"


def results(ctx: Context, outdir: str | Path) -> tuple[dict, bool]:
    """(detection + validation, from the cache?): from the run's cache when its key matches, else computed
    and cached under `outdir`."""
    key = cache.key(ctx, PARAM_KEYS, CODE)
    hit = cache.load_json(outdir, CACHE, key)
    if hit is not None:
        return hit, True
    with ctx.timer.stage("super_weights"):
        result = super_weight_study(ctx.model, ctx.windows.heldout, ctx.loaded.tokenizer, ctx.params.seed,
                                    ctx.params.batch_size)
    cache.save_json(outdir, CACHE, key, result)
    return result, False


def coordinates(result: dict) -> list[tuple[str, int, int]]:
    """(param, row, col) of every super weight in a Phase 4 result."""
    return [(r["param"], r["row"], r["col"]) for r in result.get("super_weights", [])]


def run(ctx: Context, p1, outdir: str | Path) -> dict:
    """Phase 4 -> `superweights.json` (with each super weight's rank in Phase 1), the manifest, the headline."""
    outdir = Path(outdir)
    result, from_cache = results(ctx, outdir)
    if p1 is not None:
        result = dict(result, super_weights=rank_in_phase1(result["super_weights"], p1.sens))
    write_json(outdir / "superweights.json", result)
    write_json(outdir / f"manifest_{KEY}.json", manifest(ctx, {"phase": KEY, "from_cache": from_cache,
                                                               "phase1_from_cache": getattr(p1, "from_cache", None)}))
    sw = result.get("super_weights", [])
    items: list[tuple[str, object]] = [("super weights found", len(sw))]
    for r in sw[:4]:
        items.append((f"{r['param']}[{r['row']},{r['col']}]: ppl ratio when zeroed", r.get("ppl_ratio_when_zeroed")))
    joint = result.get("joint") or {}
    if isinstance(joint, dict) and joint.get("ppl_ratio") is not None:
        items.append(("all super weights zeroed: ppl ratio", joint["ppl_ratio"]))
    write_headline(outdir, KEY, items)
    return result
