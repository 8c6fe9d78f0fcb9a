"""The report's findings in plain words, written from a run folder's files: what the model is, how
concentrated the scores are, whether the top weights matter causally (against the random and magnitude
controls, with intervals), the confirmed super weights, how stable the ranking is, and the study's claims;
and the key figures drawn from the same files (`key_figures`), for the index.

Every sentence states only what its numbers support: an effect is called larger than the random control
only when its interval lies wholly above the control's; a ranking's agreement is called "still rising" when
its mean Jaccard at the largest data size exceeds the one before by more than STILL_RISING; a missing file
leaves its sentence (or figure) out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

STILL_RISING = 0.02  # mean Jaccard gained between the two largest data sizes
GGUF_TYPE = re.compile(r"(?i)\b(I?Q\d_[A-Z0-9_]+|Q\d_\d|Q\d|F16|F32|BF16)\b")


def describe_model(info: dict, params: dict | None = None) -> str:
    """What the model is: its file or id, quantization, the dtype it was analysed in, and its size."""
    params = params or {}
    dtype = info.get("dtype") or params.get("dtype", "")
    n = info.get("n_params")
    size = f", {n / 1e9:.2f}B weights" if n and n >= 1e9 else f", {n / 1e6:.1f}M weights" if n else ""
    kind, source = info.get("kind"), str(info.get("source", params.get("model", "")))
    if kind == "gguf":
        name = info.get("file", source)
        q = GGUF_TYPE.search(name.replace(".", " "))
        stem = re.sub(r"(?i)\.gguf$", "", name)
        if q:
            stem = stem[: stem.lower().rfind(q.group(1).lower())].rstrip("._-")
        what = f"{stem} (GGUF {q.group(1).upper() if q else 'file'} {name}" + (", the embedded default" if
                                                                                 source == "default" else "")
        return f"{what}; dequantized to {dtype}{size})"
    if kind == "synthetic":
        cfg = info.get("config", {})
        arch = info.get("architecture", cfg.get("model_type", "model"))
        return f"a randomly initialised {arch} ({source}; {dtype}{size})"
    rev = info.get("revision")
    return f"{source} ({dtype}{size}" + (f", revision {str(rev)[:12]}" if rev else "") + ")"


class _Run:
    """A run's files, each read from the first of `folders` that holds it (a rerun's staging folder, then the
    earlier run's folder)."""

    def __init__(self, folders):
        self.folders = [Path(f) for f in folders]

    def _first(self, name: str) -> Path | None:
        return next((f / name for f in self.folders if (f / name).is_file()), None)

    def json(self, name: str):
        path = self._first(name)
        try:
            return json.loads(path.read_text()) if path else None
        except (OSError, ValueError):
            return None

    def table(self, stem: str) -> pd.DataFrame | None:
        path = self._first(f"{stem}.parquet")
        try:
            return pd.read_parquet(path) if path else None
        except (OSError, ValueError, ImportError):
            return None


def _pct(v: float) -> str:
    return f"{100 * v:.3g}%"


def _ratio(row, col: str = "ppl_ratio") -> str:
    mean = row.get(f"{col}_mean", row.get(col))
    lo, hi = row.get(f"{col}_lo"), row.get(f"{col}_hi")
    text = f"×{mean:.3g}"
    if lo is not None and hi is not None and pd.notna(lo) and pd.notna(hi):
        text += f" [{lo:.3g}, {hi:.3g}]"
    return text


def model_name(*folders: str | Path) -> str | None:
    """`describe_model` of the run in `folders` (None without Phase 1's manifest)."""
    man = _Run(folders).json("manifest.json")
    return describe_model(man.get("model", {}), man.get("params", {})) if man else None


def findings(*folders: str | Path) -> list[str]:
    """The run's findings as short sentences, in reading order (see the module docstring for the rules);
    each file is read from the first of `folders` that holds it."""
    run = _Run(folders)
    out: list[str] = []
    man = run.json("manifest.json") or {}
    if man:
        data = man.get("data", {})
        out.append(f"Model: {describe_model(man.get('model', {}), man.get('params', {}))}; scored on "
                   f"{data.get('n_score', '?')} windows of {data.get('seq_len', '?')} tokens from "
                   f"`{data.get('source', '?')}`, perplexity on {data.get('n_heldout', '?')} held-out windows.")
    stats = (run.json("sensitivity_stats.json") or {}).get("metrics", {})
    conc = []
    for m, st in stats.items():
        g = st.get("global", {})
        share = g.get("top_share", {}).get("0.1%")
        if share is not None and m != "magnitude":
            conc.append(f"{m} {_pct(share)}")
    if conc:
        out.append("Concentration: the top 0.1% of weights hold " + ", ".join(conc) + " of each metric's total "
                   "score (exact, over every weight).")
    out += _causal(run)
    out += _super_weights(run)
    out += _stability(run)
    claims = run.table("claims")
    if claims is not None and len(claims):
        measured = claims[claims["study"].notna()]
        counts = measured["verdict"].value_counts()
        n_seeds = int(claims["n_seeds"].max())
        out.append(f"The published study's {len(measured)} measured claims, re-tested over {n_seeds} data seeds: "
                   + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".")
    return out


def phase_answer(key: str, *folders: str | Path) -> str:
    """The two-sentence answer a phase page opens with: its findings (or its first headline numbers)."""
    run = _Run(folders)
    if key == "01_sensitivity":
        parts = [s for s in findings(*folders) if s.startswith(("Model:", "Concentration:"))]
    elif key == "02_cross_metric":
        parts = _stability(run) + [s for s in findings(*folders) if s.startswith("The published study")]
    elif key == "03_perturbation":
        parts = _causal(run)
    elif key == "04_super_weights":
        parts = _super_weights(run)
    else:
        items = (run.json(f"headlines/{key}.json") or {}).get("items", [])[:2]
        parts = [f"{i['label'][:1].upper()}{i['label'][1:]}: {i['value']}." for i in items]
    return " ".join(parts)


def _causal(run: _Run) -> list[str]:
    s = run.table("perturbation_summary")
    if s is None or s.empty:
        return []
    zero = s[s["method"] == "zero"] if (s["method"] == "zero").any() else s[s["method"] == s["method"].iloc[0]]
    k = int(zero["k"].max())
    at = zero[zero["k"] == k]
    tops = at[at["selector"].str.startswith("top:")]
    if tops.empty:
        return []
    best = tops.loc[tops["ppl_ratio_mean"].idxmax()]
    rnd = at[at["selector"] == "random"]
    mag = at[at["selector"] == "magnitude"]
    method = best["method"]
    text = (f"Causal test ({method} the top {k:,} weights): {best['selector'][4:]} raises held-out perplexity "
            f"{_ratio(best)}")
    if len(rnd):
        r = rnd.iloc[0]
        text += f", random weights {_ratio(r)}"
        lo, hi = best.get("ppl_ratio_lo"), r.get("ppl_ratio_hi")
        if lo is not None and hi is not None and pd.notna(lo) and pd.notna(hi):
            text += (" — its interval lies wholly above the random control's" if lo > hi else
                     " — the intervals overlap: not distinguishable from random at this K")
    if len(mag):
        text += f"; magnitude (|w|) {_ratio(mag.iloc[0])}"
    window = best.get("window_set")
    return [text + (f" (window set {window})." if isinstance(window, str) else ".")]


def _super_weights(run: _Run) -> list[str]:
    sw = run.json("superweights.json")
    if not sw:
        return []
    cands = sw.get("candidates", sw.get("super_weights", []))
    confirmed = [c for c in cands if c.get("confirmed")]
    if not any("confirmed" in c for c in cands):
        return [f"Super-weight detection found {len(cands)} candidate(s) (not tested against the confirmation "
                "rule)."]
    if not confirmed:
        return [f"Super weights: none of {len(cands)} candidate(s) passed the confirmation rule."]
    ratio_of = lambda c: c.get("ppl_ratio_when_zeroed", c.get("ppl_ratio")) or 0.0  # noqa: E731
    confirmed.sort(key=ratio_of, reverse=True)
    parts = []
    for c in confirmed[:3]:
        where = f"{c['param']}[{c['row']},{c['col']}]"
        ratio = c.get("ppl_ratio_when_zeroed", c.get("ppl_ratio"))
        lo, hi = c.get("ppl_ratio_when_zeroed_lo"), c.get("ppl_ratio_when_zeroed_hi")
        parts.append(where + (f" ×{ratio:.3g}" if ratio is not None else "")
                     + (f" [{lo:.3g}, {hi:.3g}]" if lo is not None and hi is not None else ""))
    more = f"; and {len(confirmed) - 3} more on the Phase 4 page" if len(confirmed) > 3 else ""
    return [f"Confirmed super weights: {len(confirmed)} of {len(cands)} candidate(s) — zeroing each alone, "
            "strongest first: " + "; ".join(parts) + more + "."]


def _stability(run: _Run) -> list[str]:
    st = run.table("stability")
    if st is None or st.empty:
        return []
    seed = st[(st["comparison"] == "seed") & (st["metric"] != "magnitude")]
    if seed.empty:
        return []
    per = seed.groupby("metric", sort=False)["jaccard"].mean()
    out = ["Stability: top-K Jaccard between data seeds " + ", ".join(f"{m} {v:.2f}" for m, v in per.items())
           + " (1 = the same weights; magnitude is data-free and left out)."]
    by = run.table("stability_tokens")
    if by is not None and not by.empty:
        mean = by.groupby("tokens")["jaccard"].mean()
        out.append("With more data: the mean Jaccard of the data-dependent metrics between two disjoint token "
                   "sets is " + ", ".join(f"{v:.2f} at {t:,} tokens" for t, v in mean.items())
                   + (" (still rising: score on more tokens before trusting the exact top-K)."
                      if len(mean) > 1 and mean.iloc[-1] > mean.iloc[-2] + STILL_RISING else "."))
    return out


SW_FIELDS = ("layer", "row", "col", "param", "confirmed", "verdict", "ppl_ratio_when_zeroed",
             "ppl_ratio_when_zeroed_lo", "ppl_ratio_when_zeroed_hi")


def key_figures(*folders: str | Path) -> list[tuple[str, str, object]]:
    """The index's key figures as (phase key, caption, plotly Figure), each only where its phase's file is in
    `folders`: Phase 1's share of the score per layer × component, Phase 3's causal test (top-K against the
    random and magnitude controls, with intervals), Phase 4's candidates with their intervals."""
    from . import tables, viz
    run = _Run(folders)
    out = []
    cells = run.table("layer_component")
    if cells is not None and len(cells) and {"metric", "layer", "component", "score_share"} <= set(cells.columns):
        out.append(("01_sensitivity", "Where the score sits: each metric's share of its total score per layer and "
                    "component (log colour scale; pick the metric in the menu).",
                    viz.layer_component_heatmap(cells, "score_share")))
    s = run.table("perturbation_summary")
    if s is not None and len(s) and {"ppl_ratio_lo", "ppl_ratio_hi"} <= set(s.columns):
        frame = tables.causal_frame(s)
        if len(frame):
            out.append(("03_perturbation", "The causal test: held-out perplexity ratio when each metric's top-K "
                        "weights are perturbed, against the random and magnitude controls (95% intervals).",
                        viz.causal_test(frame)))
    sw = run.json("superweights.json") or {}
    cands = sw.get("candidates") or []
    if cands and all(f in c for c in cands for f in SW_FIELDS) and "effect_size" in sw.get("rule", {}):
        out.append(("04_super_weights", "Super weights: the perplexity ratio when each candidate is zeroed alone "
                    "(95% interval; red: confirmed), against a random weight of the same tensor.",
                    viz.super_weight_candidates(cands, sw["rule"]["effect_size"])))
    return out
