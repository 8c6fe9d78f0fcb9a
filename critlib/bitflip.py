"""Bit-flip vulnerability: what one flipped bit of a critical weight does, and how many flips break a model.

Every flip goes through `critlib.perturb` (`BitFlip`), so the model is restored bit for bit after each
measurement. Bit positions count from 0 = the lowest mantissa bit of the stored dtype.

`flips_to_break` finds how many flips of an ordered list it takes to reach ppl ≥ factor × baseline by
doubling k (1, 2, 4, ...) up to the cap, then bisecting between the last unbroken and the first broken k.
Both neighbours are measured, so the reported k is a real crossing (ppl(k−1) < target ≤ ppl(k)); it is the
first crossing whenever damage grows with k, which is not guaranteed. A NaN/inf perplexity counts as broken.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager

import pandas as pd
import torch

from . import CritlibError
from .effects import Evaluations, effect, intervention_key, window_set
from .evaluate import evaluate
from .perturb import BitFlip, Selection, exponent_bits, mantissa_bits, perturbed, sign_bit
from .scores import scored_parameters

Flip = tuple[str, int, int]  # (param, flat index, bit position)


def bit_kind(dtype: torch.dtype, bit: int) -> str:
    if bit == sign_bit(dtype):
        return "sign"
    return "exponent" if bit in exponent_bits(dtype) else "mantissa"


def bit_positions(dtype: torch.dtype, spec: list[str | int]) -> list[int]:
    """Positions named by `spec` items: 'sign', 'exponent' (all exponent bits), 'exponent_top' / 'exponent_low'
    (its highest / lowest bit: ×2^±2^(e−1) / ×2^±1), 'mantissa' (all), 'mantissa_top' (its highest bit), 'all',
    or an integer position. Highest position first, no repeats."""
    out: set[int] = set()
    for item in spec:
        item = item.strip() if isinstance(item, str) else item
        if item == "sign":
            out.add(sign_bit(dtype))
        elif item == "exponent":
            out.update(exponent_bits(dtype))
        elif item == "mantissa":
            out.update(mantissa_bits(dtype))
        elif item == "mantissa_top":
            out.add(mantissa_bits(dtype)[-1])
        elif item == "exponent_top":
            out.add(exponent_bits(dtype)[-1])
        elif item == "exponent_low":
            out.add(exponent_bits(dtype)[0])
        elif item == "all":
            out.update(range(sign_bit(dtype) + 1))
        else:
            try:
                pos = int(item)
            except (TypeError, ValueError):
                raise CritlibError(f"bit {item!r} is not sign, exponent, exponent_top, exponent_low, mantissa, "
                                   "mantissa_top, all or a position") from None
            if not 0 <= pos <= sign_bit(dtype):
                raise CritlibError(f"bit position {pos} does not exist in {dtype}; use 0..{sign_bit(dtype)}")
            out.add(pos)
    return sorted(out, reverse=True)


@contextmanager
def flipped(model: torch.nn.Module, flips: list[Flip]):
    """All `flips` applied at once (one BitFlip selection per bit position); restored bit for bit on exit.
    A (param, flat, bit) listed twice is flipped once."""
    by_bit: dict[int, list[tuple[str, int]]] = {}
    for name, flat, bit in flips:
        by_bit.setdefault(int(bit), []).append((name, int(flat)))
    with ExitStack() as stack:
        n = 0
        for bit, pairs in by_bit.items():
            n += stack.enter_context(perturbed(model, Selection.from_list(pairs), BitFlip(bit))).n_changed
        yield n


class Evaluator:
    """Held-out evaluation against the unperturbed model: ppl, nll, accuracy, and the effects ppl_ratio, kl
    (KL(base ‖ perturbed) per token) and accuracy_delta, each with its 95% bootstrap interval over the windows
    (`<effect>_lo`/`_hi`, critlib.effects). `ev()` measures the model as it is now; `ev.measure(key, apply)`
    measures a keyed intervention through `store` (an `Evaluations`; pass a run's store to share its
    evaluations), once per key and window set. A NaN/inf perplexity has ppl_ratio inf (broken)."""

    def __init__(self, model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8,
                 store: Evaluations | None = None):
        if not len(windows):
            raise CritlibError("bit-flip and application experiments need held-out windows; set n_heldout ≥ 1")
        self.model, self.windows, self.batch_size = model, windows, batch_size
        self.store = store if store is not None else Evaluations(model, batch_size)
        self._base = self.store.baseline(windows)  # once per window set, with per-window sums and log-probs
        self.reference = self._base["logprobs"]
        self.base = {k: self._base[k] for k in ("ppl", "nll", "accuracy", "n_tokens")}
        self.window_set = window_set(windows)
        self.n_evals = 0

    def __call__(self) -> dict:
        self.n_evals += 1
        out = evaluate(self.model, self.windows, self.batch_size, reference=self.reference, per_window=True)
        return self._result(out, effect(self._base, out, seed=self.store.seed))

    def measure(self, key: str, apply) -> dict:
        """The keyed intervention `key` (critlib.effects.intervention_key), `apply()` a context manager that
        makes it; evaluated only when the store does not hold it for these windows."""
        before = self.store.n_evaluations
        rec = self.store.measure(key, self.windows, apply)
        self.n_evals += self.store.n_evaluations - before
        return self._result(rec, rec)

    def _result(self, point: dict, eff: dict) -> dict:
        ppl = _number(point["ppl"])
        out = {"ppl": ppl, "nll": _number(point.get("nll")), "accuracy": _number(point["accuracy"]),
               **{k: _number(eff.get(k)) for k in EFFECT_KEYS}, "window_set": self.window_set}
        if not math.isfinite(ppl):
            out["ppl_ratio"] = float("inf")
        return out


EFFECT_KEYS = ("ppl_ratio", "ppl_ratio_lo", "ppl_ratio_hi", "kl", "kl_lo", "kl_hi", "accuracy_delta",
               "accuracy_delta_lo", "accuracy_delta_hi")


def _number(v) -> float:
    return float("nan") if v is None else float(v)


def _value(p: torch.Tensor, flat: int) -> float:
    return float(p.detach().reshape(-1)[flat])


def single_flips(model: torch.nn.Module, candidates: list[tuple[str, int, str, int]], bits: list[str | int],
                 ev: Evaluator, progress=None) -> pd.DataFrame:
    """Damage of flipping each bit of `bits` in each candidate (selector, rank, param, flat), one flip at a
    time, with 95% intervals over the windows (`ev.measure`, keyed `bitflip:<position> param[flat]`). A
    (param, flat, bit) shared by several selectors is measured once. One row per (candidate, bit)."""
    params = dict(scored_parameters(model))
    cache: dict[Flip, dict] = {}
    rows = []
    for selector, rank, name, flat in candidates:
        p = params[name]
        row, col = (flat // p.shape[-1], flat % p.shape[-1]) if p.ndim == 2 else (flat, None)
        for bit in bit_positions(p.dtype, bits):
            key = (name, flat, bit)
            if key not in cache:
                before = _value(p, flat)
                with flipped(model, [key]):
                    after = _value(p, flat)
                one, flip = Selection.from_list([(name, flat)]), BitFlip(bit)
                res = ev.measure(intervention_key(one, flip), lambda s=one, f=flip: perturbed(model, s, f))
                cache[key] = dict(value_before=before, value_after=after, ppl=res["ppl"], ppl_ratio=res["ppl_ratio"],
                                  kl=res["kl"], accuracy=res["accuracy"],
                                  **{k: res[k] for k in EFFECT_KEYS if k not in ("ppl_ratio", "kl")},
                                  window_set=res["window_set"])
                if progress is not None:
                    progress.update(1)
            rows.append(dict(selector=selector, rank=rank, param=name, row=row, col=col, flat=flat, bit=bit,
                             bit_kind=bit_kind(p.dtype, bit), dtype=str(p.dtype).removeprefix("torch."),
                             **cache[key]))
    df = pd.DataFrame(rows)
    if len(df):
        df["col"] = df["col"].astype("Int64")
    return df


def ranked(table: pd.DataFrame) -> pd.DataFrame:
    """Distinct single flips, most damaging first (ppl ratio, then KL; NaN counts as the worst)."""
    t = table.drop_duplicates(["param", "flat", "bit"]).copy()
    t["_r"] = t["ppl_ratio"].fillna(float("inf"))
    t["_k"] = t["kl"].fillna(float("inf"))
    t = t.sort_values(["_r", "_k", "param", "flat", "bit"], ascending=[False, False, True, True, False], kind="stable")
    return t.drop(columns=["_r", "_k"]).reset_index(drop=True)


def flips_to_break(model: torch.nn.Module, flips: list[Flip], ev: Evaluator, factor: float = 10.0,
                   cap: int | None = None) -> dict:
    """The number k of leading `flips` that first brings ppl to ≥ factor × baseline (doubling, then
    bisection), with ppl at k and k−1; n_flips is None when all `cap` flips leave the model unbroken."""
    flips = list(dict.fromkeys((n, int(f), int(b)) for n, f, b in flips))[: cap or None]
    target = factor * ev.base["ppl"]
    seen: dict[int, float] = {0: ev.base["ppl"]}

    def ppl_at(k: int) -> float:
        if k not in seen:
            with flipped(model, flips[:k]):
                seen[k] = ev()["ppl"]
        return seen[k]

    def broken(k: int) -> bool:
        v = ppl_at(k)
        return not (v < target)

    out = dict(n_available=len(flips), target_ppl=target, n_flips=None, ppl_at=None, ppl_before=None,
               ppl_at_cap=None, n_evals=0)
    if not flips:
        return out
    lo, hi = 0, 1
    while not broken(hi):
        lo = hi
        if hi == len(flips):
            out.update(ppl_at_cap=seen[hi], n_evals=len(seen) - 1)
            return out
        hi = min(2 * hi, len(flips))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if broken(mid):
            hi = mid
        else:
            lo = mid
    out.update(n_flips=hi, ppl_at=ppl_at(hi), ppl_before=ppl_at(hi - 1), n_evals=len(seen) - 1)
    return out


def random_flips(model: torch.nn.Module, n: int, seed: int, params: list[str] | None = None) -> list[Flip]:
    """n distinct weights drawn uniformly (over `params`, default all), in random order, each at a uniformly
    drawn bit position of its dtype."""
    from .perturb import select_random
    pairs = select_random(model, n, seed, params).to_list()
    gen = torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(len(pairs), generator=gen).tolist()
    named = dict(scored_parameters(model))
    out = []
    for j in order:
        name, flat = pairs[j]
        width = sign_bit(named[name].dtype) + 1
        out.append((name, flat, int(torch.randint(0, width, (1,), generator=gen))))
    return out
