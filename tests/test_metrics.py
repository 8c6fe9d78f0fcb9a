"""Metric names, once: the lists derive from the enum, and a bad list is refused with one clear message."""

import pytest

from critlib import CritlibError
from critlib.metrics import ALL, FUSED, GRADIENT, Metric, checked


def test_lists_derive_from_the_enum():
    assert ALL == tuple(m.value for m in Metric) and len(set(ALL)) == len(ALL)
    assert set(GRADIENT) <= set(ALL) and set(FUSED) <= set(ALL) and "magnitude" not in GRADIENT
    assert Metric.WANDA == "wanda" and str(Metric.FISHER) == "fisher"


@pytest.mark.parametrize("given,message", [
    ("", "metrics is empty"), ([], "metrics is empty"), ("fisher, nope", "unknown metric 'nope'"),
    (["wanda", "wanda"], "lists a metric twice")])
def test_checked_refuses_bad_lists(given, message):
    with pytest.raises(CritlibError, match=message):
        checked(given)


def test_checked_keeps_the_order_and_splits_strings():
    assert checked(" wanda,magnitude ") == ["wanda", "magnitude"]
    assert checked([Metric.FISHER, "grad_x_weight"]) == ["fisher", "grad_x_weight"]
