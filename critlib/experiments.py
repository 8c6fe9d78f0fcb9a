"""Phase 3 engine: dose-response of held-out quality to perturbing the top-k weights of each metric, against
random, magnitude and bottom-k controls, every effect with its 95% confidence interval.

Every selection is built before anything is evaluated (a bad k fails at once, not after an hour), each
perturbation is undone bit for bit before the next, and every measurement goes through one store of
evaluations (`critlib.effects.Evaluations`) keyed by `intervention_key(selection, method)` and the window
set: the same method on the same weights (e.g. Phase 1's top-|w| and the magnitude control, or Phase 4
zeroing a super weight that is some metric's top-1) is evaluated once and reads the same everywhere; the
unchanged model is evaluated once per window set, and a perturbation that changes no bits reuses it exactly
(ppl_ratio 1, kl 0).

Intervals: a row (one draw) carries the paired bootstrap interval over held-out windows of its effect;
`summarize_draws` keeps that interval for selectors with one draw and, for selectors with several draws (the random
control), gives the t-interval of the mean over draws instead (`critlib.effects.draws_interval`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch

from . import CritlibError
from .effects import Evaluations, draws_interval, intervention_key
from .perturb import (Selection, magnitude_ranking, parse_method, perturbed,
                      select_bottom, select_random, select_top)
from .progress import Bar

# One row per selector × method × k × draw (`dose_response`):
#   ppl, accuracy: the perturbed model on the window set; ppl_ratio = exp(mean ΔNLL per token), kl = mean
#   KL(unperturbed ‖ perturbed) per token, accuracy_delta = perturbed − unperturbed next-token accuracy;
#   <effect>_lo/_hi: the 95% paired percentile bootstrap interval of that effect over the held-out windows;
#   window_set: the windows' name (`<n>x<len>:<sha256 prefix>`); intervention: the store's key.
NUMBERS = ["ppl", "ppl_ratio", "accuracy", "kl", "ppl_ratio_lo", "ppl_ratio_hi", "kl_lo", "kl_hi", "accuracy_delta",
           "accuracy_delta_lo", "accuracy_delta_hi"]
COLUMNS = ["selector", "metric", "method", "method_arg", "k", "draw", "n_selected", "n_changed", *NUMBERS,
           "window_set", "intervention"]
GROUP = ["selector", "metric", "method", "method_arg", "k"]
VALUES = ["n_selected", "n_changed", "ppl", "ppl_ratio", "accuracy", "kl", "accuracy_delta"]
EFFECTS = ["ppl_ratio", "kl", "accuracy_delta"]
POSITION_COLUMNS = ["selector", "metric", "method", "method_arg", "k", "start", "stop", "nll_increase", "n_tokens",
                    "n_draws", "window_set"]

__all__ = ["COLUMNS", "Selector", "dose_response", "summarize_draws", "positions", "main_interventions",
           "default_selectors", "parse_method"]


@dataclass(frozen=True)
class Selector:
    """A selector `fn(k, draw) -> Selection` with the number of draws it wants by default."""
    fn: Callable[[int, int], Selection]
    draws: int = 1

    def __call__(self, k: int, draw: int) -> Selection:
        return self.fn(k, draw)


def _metric_of(selector: str) -> str | None:
    kind, _, metric = selector.partition(":")
    return metric if kind in ("top", "bottom") and metric else None


def _arg_text(arg) -> str | None:
    if arg is None:
        return None
    return f"{arg:g}" if isinstance(arg, float) else str(arg)


def _n_draws(name: str, selector, draws: dict[str, int] | int) -> int:
    """A dict entry wins, then the selector's own `draws` attribute, then an int `draws`."""
    if isinstance(draws, dict) and name in draws:
        n = draws[name]
    elif getattr(selector, "draws", None) is not None:
        n = selector.draws
    else:
        n = draws if isinstance(draws, int) else 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CritlibError(f"draws for selector '{name}' is {n!r}; it must be an integer ≥ 1")
    return n


def dose_response(model: torch.nn.Module, heldout: torch.Tensor, selectors: dict[str, Callable[[int, int], Selection]],
                  methods: list, ks: list[int], draws: dict[str, int] | int = 1, batch_size: int = 8,
                  progress: bool = True, store: Evaluations | None = None) -> pd.DataFrame:
    """One row per selector × method × k × draw (columns `COLUMNS`): held-out ppl, accuracy and KL to the
    unperturbed model, each effect with its bootstrap interval over the windows.

    `methods` are method objects or `name[:arg]` strings; `draws` per selector name (dict) or for every
    selector without its own `draws` attribute (int). Every intervention is measured through `store` (a new
    one when None; pass a run's store to reuse what other phases measured): once per (intervention, window
    set). `df.attrs["baseline"]` holds the unperturbed ppl, nll, accuracy, n_tokens and window_set.
    """
    if heldout is None or len(heldout) == 0:
        raise CritlibError("there are no held-out windows to evaluate on; set n_heldout ≥ 1")
    methods = [parse_method(m) if isinstance(m, str) else m for m in methods]
    if not methods or not selectors:
        raise CritlibError("dose_response needs at least one method and one selector")
    ks = [int(k) for k in ks]
    if any(k < 0 for k in ks):
        raise CritlibError(f"ks={ks} must all be ≥ 0")
    if store is None:
        store = Evaluations(model, batch_size)
    elif store.model is not model:
        raise CritlibError("the evaluation store belongs to another model; pass the store made for this model")
    plan = []
    for name, sel in selectors.items():
        for k in ks:
            for d in range(_n_draws(name, sel, draws)):
                selection = sel(k, d)
                if not isinstance(selection, Selection):
                    raise CritlibError(f"selector '{name}' returned {type(selection).__name__}, not a Selection")
                plan.append((name, k, d, selection))
    base = store.unchanged(heldout)
    rows = []
    bar = Bar(total=len(plan) * len(methods), desc="perturbation", disable=not progress)
    for name, k, d, selection in plan:
        for method in methods:
            key = intervention_key(selection, method)
            r = store.measure(key, heldout, lambda s=selection, m=method: perturbed(model, s, m))
            n_changed = r["n_changed"]
            if n_changed is None:  # stored by a phase that changed the model itself: count without evaluating
                with perturbed(model, selection, method) as applied:
                    n_changed = applied.n_changed
            rows.append((name, _metric_of(name), method.name, _arg_text(method.arg), k, d, len(selection),
                         n_changed, *(_num(r.get(c)) for c in NUMBERS), r["window_set"], key))
            bar.update()
    bar.close()
    df = pd.DataFrame(rows, columns=COLUMNS)
    for c in ("k", "draw", "n_selected", "n_changed"):
        df[c] = df[c].astype("int64")
    for c in NUMBERS:
        df[c] = df[c].astype("float64")
    df.attrs["baseline"] = {k: base[k] for k in ("ppl", "nll", "accuracy", "n_tokens", "window_set")}
    return df


def _num(v) -> float:
    """A stored number as a float; JSON keeps NaN and ±inf as null, read back as NaN."""
    return float("nan") if v is None else float(v)


def summarize_draws(df: pd.DataFrame) -> pd.DataFrame:
    """Per (selector, metric, method, method_arg, k): `<value>_mean` and `<value>_std` (ddof 1; NaN for one
    draw) over draws of n_selected, n_changed, ppl, ppl_ratio, accuracy, kl and accuracy_delta, `n_draws`,
    `window_set`, and a 95% interval `<effect>_lo`/`<effect>_hi` of ppl_ratio, kl and accuracy_delta whose kind
    `interval` names:
    - "windows" (one draw: the top-k, bottom-k and magnitude selectors): that draw's paired bootstrap interval
      over the held-out windows, around `<effect>_mean` (= the draw's value);
    - "draws" (several draws: the random control): the t-interval of the mean over draws
      (`critlib.effects.draws_interval`), which holds the draw-to-draw spread, around `<effect>_mean`.
    """
    g = df.groupby(GROUP, dropna=False, sort=False)
    out = g[VALUES].agg(["mean", "std"])
    out.columns = [f"{a}_{b}" for a, b in out.columns]
    out["n_draws"] = g.size()
    bounds = {f"{e}_{side}": [] for e in EFFECTS for side in ("lo", "hi")}
    kind, sets = [], []
    for _, sub in g:
        several = len(sub) > 1
        kind.append("draws" if several else "windows")
        sets.append(sub["window_set"].iloc[0])
        for e in EFFECTS:
            if several:
                iv = draws_interval(sub[e].to_numpy())
                lo, hi = iv["lo"], iv["hi"]
            else:
                lo, hi = sub[f"{e}_lo"].iloc[0], sub[f"{e}_hi"].iloc[0]
            bounds[f"{e}_lo"].append(lo)
            bounds[f"{e}_hi"].append(hi)
    for c, v in bounds.items():
        out[c] = pd.Series(v, index=out.index, dtype="float64")
    out["interval"] = kind
    out["window_set"] = sets
    return out.reset_index()


def main_interventions(df: pd.DataFrame) -> pd.DataFrame:
    """The rows whose damage by position Phase 3 reports: zeroing (else the first method) each metric's top-k
    and the magnitude and random controls, at the smallest and the largest k > 0."""
    method = "zero" if (df["method"] == "zero").any() else df["method"].iloc[0] if len(df) else "zero"
    at = df[(df["method"] == method) & (df["k"] > 0)]
    if at.empty:
        return at
    ks = {int(at["k"].min()), int(at["k"].max())}
    keep = at["selector"].str.startswith("top:") | at["selector"].isin(["magnitude", "random"])
    return at[keep & at["k"].isin(ks)]


def positions(df: pd.DataFrame, store: Evaluations, rows: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per-position damage (`critlib.effects.position_damage`) of `rows` of a `dose_response` table (default
    `main_interventions(df)`), read from the store that measured them: per (selector, method, k) and position
    bucket [start, stop), the mean NLL increase per token (averaged over draws) and the bucket's tokens per
    draw. Σ nll_increase·n_tokens / Σ n_tokens = log(ppl_ratio) (the mean over draws for several draws)."""
    rows = main_interventions(df) if rows is None else rows
    out = []
    for (sel, metric, method, arg, k), sub in rows.groupby(GROUP, dropna=False, sort=False):
        recs = [store.get(key, ws) for key, ws in zip(sub["intervention"], sub["window_set"])]
        recs = [r for r in recs if r is not None and r.get("positions")]
        if not recs:
            continue
        for i, b in enumerate(recs[0]["positions"]):
            vals = [_num(r["positions"][i]["nll_increase"]) for r in recs]
            out.append(dict(selector=sel, metric=metric, method=method, method_arg=arg, k=int(k),
                            start=int(b["start"]), stop=int(b["stop"]),
                            nll_increase=sum(vals) / len(vals) if all(map(math.isfinite, vals)) else float("nan"),
                            n_tokens=int(b["n_tokens"]), n_draws=len(recs), window_set=recs[0]["window_set"]))
    return pd.DataFrame(out, columns=POSITION_COLUMNS)


def default_selectors(model: torch.nn.Module, sens, metrics: list[str] | None = None, n_random_draws: int = 3,
                      seed: int = 0) -> dict[str, Selector]:
    """{top:<m> per metric, bottom:<m> where Phase 1 kept bottom-K, random (n_random_draws draws, nested over
    k within a draw), magnitude (exact global top-|w|)}."""
    metrics = list(metrics or sens.metrics)
    out: dict[str, Selector] = {}
    for m in metrics:
        out[f"top:{m}"] = Selector(lambda k, d, m=m: select_top(sens, m, k))
    for m in metrics:
        if m in getattr(sens, "bottom", {}):
            out[f"bottom:{m}"] = Selector(lambda k, d, m=m: select_bottom(sens, m, k))
    out["random"] = Selector(lambda k, d: select_random(model, k, seed * 1_000_003 + d), draws=n_random_draws)
    cache: dict = {"ranking": []}

    def magnitude(k: int, d: int) -> Selection:
        if len(cache["ranking"]) < k:  # the exact top-k is a prefix of the exact top-K for K ≥ k
            cache["ranking"] = magnitude_ranking(model, k)
        return Selection.from_list(cache["ranking"][:k])

    out["magnitude"] = Selector(magnitude)
    return out
