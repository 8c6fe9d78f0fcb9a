"""The sensitivity metrics, named once: every list of metric names in critlib derives from `Metric`."""

from __future__ import annotations

import enum

from . import CritlibError


class Metric(str, enum.Enum):
    """A per-weight sensitivity score (a str: `Metric.WANDA == "wanda"`, so plain names work everywhere)."""
    GRAD_X_WEIGHT = "grad_x_weight"  # |g ⊙ w|
    GRAD_SQUARED = "grad_squared"  # g²
    FISHER = "fisher"  # Σᵢ gᵢ², per-sequence gradients (empirical Fisher diagonal)
    MAGNITUDE = "magnitude"  # |w|
    WANDA = "wanda"  # |w| · ‖x‖₂ of the weight's input channel

    def __str__(self) -> str:
        return self.value


ALL = tuple(m.value for m in Metric)
GRADIENT = (Metric.GRAD_X_WEIGHT.value, Metric.GRAD_SQUARED.value, Metric.FISHER.value)  # need a backward pass
FUSED = (Metric.GRAD_X_WEIGHT.value, Metric.GRAD_SQUARED.value, Metric.MAGNITUDE.value)  # one read of w and g


def checked(metrics) -> list[str]:
    """`metrics` as a list of names (a string is split at commas), refusing none, an unknown name or a repeat."""
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    if not metrics:
        raise CritlibError(f"metrics is empty; name at least one metric, e.g. metrics=magnitude; choose from: "
                           f"{', '.join(ALL)}")
    metrics = [str(m) for m in metrics]
    for m in metrics:
        if m not in ALL:
            raise CritlibError(f"unknown metric '{m}'; choose from: {', '.join(ALL)}")
    if len(set(metrics)) != len(metrics):
        raise CritlibError(f"metrics lists a metric twice: {metrics}")
    return metrics
