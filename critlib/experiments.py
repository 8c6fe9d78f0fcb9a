"""Phase 3: dose-response of held-out quality to perturbing the top-k weights of each metric, against
random, magnitude and bottom-k controls.

Every selection is built before anything is evaluated (a bad k fails at once, not after an hour), each
perturbation is undone bit for bit before the next, and a perturbation that changes no bits reuses the
unperturbed result exactly (ppl_ratio 1, kl 0) instead of re-evaluating an identical model; the same
method on the same selection (e.g. Phase 1's top-|w| and the magnitude control) is evaluated once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import CritlibError
from .evaluate import evaluate
from .perturb import (Method, Selection, magnitude_ranking, method_label, parse_method, perturbed,
                      select_bottom, select_random, select_top)

COLUMNS = ["selector", "metric", "method", "method_arg", "k", "draw", "n_selected", "n_changed", "ppl",
           "ppl_ratio", "accuracy", "kl"]
GROUP = ["selector", "metric", "method", "method_arg", "k"]
VALUES = ["n_selected", "n_changed", "ppl", "ppl_ratio", "accuracy", "kl"]

__all__ = ["COLUMNS", "Selector", "dose_response", "summarize", "default_selectors", "parse_method"]


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
                  progress: bool = True) -> pd.DataFrame:
    """One row per selector × method × k × draw: held-out ppl, accuracy and KL to the unperturbed model.

    `methods` are method objects or `name[:arg]` strings; `draws` per selector name (dict) or for every
    selector without its own `draws` attribute (int). `df.attrs["baseline"]` holds the unperturbed result.
    """
    if heldout is None or len(heldout) == 0:
        raise CritlibError("there are no held-out windows to evaluate on; set n_heldout ≥ 1")
    methods = [parse_method(m) if isinstance(m, str) else m for m in methods]
    if not methods or not selectors:
        raise CritlibError("dose_response needs at least one method and one selector")
    ks = [int(k) for k in ks]
    if any(k < 0 for k in ks):
        raise CritlibError(f"ks={ks} must all be ≥ 0")
    plan = []
    for name, sel in selectors.items():
        for k in ks:
            for d in range(_n_draws(name, sel, draws)):
                selection = sel(k, d)
                if not isinstance(selection, Selection):
                    raise CritlibError(f"selector '{name}' returned {type(selection).__name__}, not a Selection")
                plan.append((name, k, d, selection))
    base = evaluate(model, heldout, batch_size, keep_logprobs=True)
    ref = base.pop("logprobs")
    rows = []
    done: dict = {}  # (method, selection) -> result: e.g. top:magnitude and the magnitude control coincide
    bar = tqdm(total=len(plan) * len(methods), desc="perturbation", disable=not progress)
    for name, k, d, selection in plan:
        for method in methods:
            key = (repr(method), _key(selection))
            with perturbed(model, selection, method) as applied:
                if not applied.n_changed:
                    r = dict(base, kl=0.0)
                elif key in done:
                    r = done[key]
                else:
                    r = done[key] = evaluate(model, heldout, batch_size, reference=ref)
            rows.append((name, _metric_of(name), method.name, _arg_text(method.arg), k, d, applied.n_selected,
                         applied.n_changed, r["ppl"], r["ppl"] / base["ppl"], r["accuracy"], r["kl"]))
            bar.update()
    bar.close()
    df = pd.DataFrame(rows, columns=COLUMNS)
    for c in ("k", "draw", "n_selected", "n_changed"):
        df[c] = df[c].astype("int64")
    for c in ("ppl", "ppl_ratio", "accuracy", "kl"):
        df[c] = df[c].astype("float64")
    df.attrs["baseline"] = {k: v for k, v in base.items()}
    return df


def _key(selection: Selection) -> tuple:
    return tuple((n, idx.numpy().tobytes()) for n, idx in sorted(selection.coords.items()))


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std (ddof 1; NaN for one draw) over draws of each (selector, metric, method,
    method_arg, k), with the draw count; columns `<value>_mean`, `<value>_std`, `n_draws`."""
    g = df.groupby(GROUP, dropna=False, sort=False)
    out = g[VALUES].agg(["mean", "std"])
    out.columns = [f"{a}_{b}" for a, b in out.columns]
    out["n_draws"] = g.size()
    return out.reset_index()


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


def describe_methods(methods: list[Method | str]) -> list[str]:
    return [m if isinstance(m, str) else method_label(m) for m in methods]
