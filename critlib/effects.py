"""Effects of interventions on held-out quality, each with its 95% confidence interval, and one store of
evaluations so the same intervention on the same windows is measured once and reads the same everywhere.

An effect compares the model with an intervention applied against the unchanged model on the same windows:
the perplexity ratio exp(ΔNLL per token), the mean KL(unchanged ‖ changed) per token and the change of
next-token accuracy. Windows are the resampling unit (tokens within a window are not independent): the
interval is a paired percentile bootstrap over windows, so with few windows it is wide, as it should be.
Random controls vary with the draw: `draws_interval` gives a t-interval of their mean over draws.

Keys: an evaluation is stored under (what was changed, how, which windows); `window_set` names a window
set by its count, length and sha256, the name every page prints next to an effect.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from . import CritlibError
from .evaluate import evaluate

LEVEL = 0.95
N_BOOT = 2000
UNCHANGED = "unchanged"  # the key of the unchanged model's record


def window_set(windows: torch.Tensor) -> str:
    """A name for a window set: `<n>x<len>:<sha256 prefix of the token ids>`."""
    ids = windows.detach().cpu().to(torch.int64).contiguous().numpy()
    return f"{ids.shape[0]}x{ids.shape[1] if ids.ndim > 1 else 0}:{hashlib.sha256(ids.tobytes()).hexdigest()[:12]}"


def intervention_key(selection, method) -> str:
    """`<method label> <weights>`: the weights listed when few (`name[flat]`), else their count and a sha256
    of the sorted coordinates; the same weights changed the same way give the same key in every phase."""
    from .perturb import method_label
    coords = sorted(selection.to_list())
    if len(coords) <= 4:
        where = ", ".join(f"{n}[{f}]" for n, f in coords)
    else:
        where = f"{len(coords)} weights:{hashlib.sha256(repr(coords).encode()).hexdigest()[:12]}"
    return f"{method_label(method)} {where}"


def _resample(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    """Nearest-rank percentiles; a resample of broken windows (NaN) counts as infinite, never dropped."""
    s = np.sort(np.where(np.isnan(samples), np.inf, samples))
    last = len(s) - 1
    return float(s[int(math.floor((1 - level) / 2 * last))]), float(s[int(math.ceil((1 + level) / 2 * last))])


def effect(base: dict, changed: dict, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> dict:
    """Paired effect of `changed` against `base`, both `evaluate(..., per_window=True)` results on the same
    windows (`changed` with `reference=` base's log-probs for KL): ppl_ratio, kl and accuracy_delta, each
    with `_lo`/`_hi` bounds of a percentile bootstrap over windows."""
    b, c = base["windows"], changed["windows"]
    if len(b["nll"]) != len(c["nll"]) or not np.array_equal(b["n_tokens"], c["n_tokens"]):
        raise CritlibError("an effect compares evaluations of the same windows; these differ")
    n_tok = b["n_tokens"]
    idx = _resample(len(n_tok), n_boot, seed)
    tokens = n_tok[idx].sum(1)
    with np.errstate(over="ignore", invalid="ignore"):
        d_nll = (c["nll"] - b["nll"])
        out = {"ppl_ratio": _exp(d_nll.sum() / n_tok.sum()),
               "accuracy_delta": float((c["correct"].sum() - b["correct"].sum()) / n_tok.sum())}
        out["ppl_ratio_lo"], out["ppl_ratio_hi"] = _percentiles(np.exp(d_nll[idx].sum(1) / tokens), level)
        out["accuracy_delta_lo"], out["accuracy_delta_hi"] = _percentiles(
            (c["correct"] - b["correct"])[idx].sum(1) / tokens, level)
        if "kl" in c:
            out["kl"] = float(c["kl"].sum() / n_tok.sum())
            out["kl_lo"], out["kl_hi"] = _percentiles(c["kl"][idx].sum(1) / tokens, level)
    return out


def _exp(x: float) -> float:
    return math.inf if x > 709 else math.exp(x)


def draws_interval(values, level: float = LEVEL) -> dict:
    """Mean of a control's draws with a t-interval ({mean, lo, hi, n}); one draw has no interval (NaN)."""
    from scipy import stats
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    mean = float(v.mean())
    if n < 2 or not np.isfinite(v).all():
        return {"mean": mean, "lo": float("nan") if n < 2 else float(v.min()), "hi": float("nan") if n < 2
                else float(v.max()), "n": n}
    half = float(stats.t.ppf((1 + level) / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def position_damage(base: dict, changed: dict, buckets: tuple[int, ...] = (0, 8, 16, 32, 64, 128, 256, 512)
                    ) -> list[dict]:
    """Mean NLL increase per token by position bucket [start, stop): where in the context the damage sits."""
    d = changed["windows"]["position_nll"] - base["windows"]["position_nll"]
    length = d.shape[1]
    edges = [e for e in buckets if e < length] + [length]
    return [{"start": a, "stop": b, "nll_increase": float(d[:, a:b].mean()), "n_tokens": int(d[:, a:b].size)}
            for a, b in zip(edges[:-1], edges[1:])]


@dataclass
class Evaluations:
    """One store of evaluations of one model: `baseline(windows)` once per window set, and `measure(key,
    windows, apply)` once per (intervention key, window set), where `apply()` is a context manager that
    changes the model and restores it (e.g. `lambda: perturbed(model, selection, Zero())`). `records` holds
    every measured effect and, per window set, the unchanged model's numbers (`unchanged`), JSON-ready, for a
    run to keep and reuse."""
    model: torch.nn.Module
    batch_size: int = 8
    seed: int = 0
    records: dict[str, dict] = field(default_factory=dict)
    _base: dict = field(default_factory=dict, repr=False)
    n_evaluations: int = 0

    def baseline(self, windows: torch.Tensor) -> dict:
        name = window_set(windows)
        if name not in self._base:
            self.n_evaluations += 1
            self._base[name] = evaluate(self.model, windows, self.batch_size, keep_logprobs=True, per_window=True)
        return self._base[name]

    def unchanged(self, windows: torch.Tensor) -> dict:
        """The unchanged model on `windows` ({key: "unchanged", window_set, ppl, nll, accuracy, n_tokens}), kept
        with the effects, so a later run that finds every effect stored need not evaluate the baseline."""
        store_key = f"{UNCHANGED} @ {window_set(windows)}"
        if store_key not in self.records:
            base = self.baseline(windows)
            self.records[store_key] = {"key": UNCHANGED, "window_set": window_set(windows), "n_changed": 0,
                                       **{k: base[k] for k in ("ppl", "nll", "accuracy", "n_tokens")}}
        return self.records[store_key]

    def get(self, key: str, windows: torch.Tensor | str) -> dict | None:
        """The stored record of `key` on `windows` (or a `window_set` name), None if not measured yet."""
        return self.records.get(f"{key} @ {windows if isinstance(windows, str) else window_set(windows)}")

    def measure(self, key: str, windows: torch.Tensor, apply=None) -> dict:
        """The effect of intervention `key` on `windows` ({ppl, ppl_ratio(_lo/_hi), kl(..), accuracy(..),
        accuracy_delta(..), window_set, n_changed}), evaluated only the first time the pair is asked for."""
        name = window_set(windows)
        store_key = f"{key} @ {name}"
        if store_key in self.records:
            return self.records[store_key]
        base = self.baseline(windows)
        with (apply() if apply is not None else nullcontext()) as applied:
            n_changed = getattr(applied, "n_changed", None)
            if n_changed == 0:
                changed = dict(base, kl=0.0, windows=dict(base["windows"], kl=np.zeros_like(base["windows"]["nll"])))
            else:
                self.n_evaluations += 1
                changed = evaluate(self.model, windows, self.batch_size, reference=base["logprobs"], per_window=True)
        rec = {"key": key, "window_set": name, "n_changed": n_changed, "ppl": changed["ppl"], "nll": changed["nll"],
               "accuracy": changed["accuracy"], "base_ppl": base["ppl"],
               **effect(base, changed, seed=self.seed), "positions": position_damage(base, changed)}
        self.records[store_key] = rec
        return rec
