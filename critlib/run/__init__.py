"""The run layer: the only code that reads a run's parameters, loads its model once, and writes files.

`context` builds the run context (params, model, windows, timer) and the manifest; one module per phase
(`sensitivity`, `cross_metric`, `perturbation`, `super_weights`, `token_explorer`, `applications`) computes
that phase once, writes its files and headline numbers, and hands its results to later phases through the
run's cache (`cache`); `notebook` starts a phase notebook; `commands` are the CLI verbs. Notebooks and CLI
verbs call the same phase functions and write the same files.

`PHASES` is the report's table of contents: one entry per notebook in `notebooks/`, in run order.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import CritlibError


@dataclass(frozen=True)
class Phase:
    key: str  # notebook file stem in notebooks/
    number: int
    title: str
    summary: str


PHASES: tuple[Phase, ...] = (
    Phase("01_sensitivity", 1, "Sensitivity", "Scores of every weight by each metric: heavy tail, where the "
          "score mass sits (layer × component), top weights with their tokens."),
    Phase("02_cross_metric", 2, "Cross-metric agreement", "Overlap, Jaccard and Spearman between metrics, "
          "against each metric's seed-to-seed and corpus-to-corpus stability."),
    Phase("03_perturbation", 3, "Perturbation (causal test)", "Dose-response of held-out perplexity, accuracy "
          "and KL to perturbing the top-K of each metric vs random, magnitude and bottom-K controls."),
    Phase("04_super_weights", 4, "Super weights", "Data-free super-weight candidates (Yu et al. 2024), the ones "
          "confirmed causally against a random control, and where each ranks in Phase 1."),
    Phase("05_token_explorer", 5, "Token explorer", "Scores of each token's embedding and lm_head rows per "
          "dimension and its rank among all tokens."),
    Phase("06_applications", 6, "Applications", "Quantization with kept outliers, pruning and bit-flip "
          "vulnerability per selector."),
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
