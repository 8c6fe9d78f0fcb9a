"""The study's claims re-tested: each measured value against a brute force over the full score tensors,
and the table's interval and verdict against their stated rules."""

import numpy as np
import pytest
import torch

from critlib.claims import STUDY, claims_table, is_study_family, measure
from critlib.effects import draws_interval
from critlib.layout import component_at, layer_of, parts_of
from critlib.scores import score_model
from critlib.sensitivity import analyze
from tests.conftest import tiny
from tests.test_rank import full_sort

K = 40


def _windows(seed):
    return torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def runs():
    model = tiny("tiny-llama")
    return model, [analyze(model, _windows(s), metrics=["grad_x_weight", "grad_squared"], topk_global=K,
                           topk_per_layer=3, progress=False) for s in (0, 1, 2)]


def test_measured_values_equal_brute_force(runs):
    model, results = runs
    full = {}
    score_model(model, _windows(0), ["grad_x_weight", "grad_squared"],
                lambda m, n, s: full.setdefault(m, {}).__setitem__(n, s.reshape(-1).double()), progress=False)
    names = list(full["grad_x_weight"])
    x = torch.cat([full["grad_x_weight"][n] for n in names]).numpy()
    y = torch.cat([full["grad_squared"][n] for n in names]).numpy()
    got = measure(results[0], K)
    assert got["gxw_max_over_mean"] == pytest.approx(x.max() / x.mean(), rel=1e-6)
    assert got["gxw_p99"] == pytest.approx(np.percentile(x, 99), rel=1e-6)
    assert got["g2_max_over_gxw_max"] == pytest.approx(y.max() / x.max(), rel=1e-6)
    sizes = np.cumsum([0] + [full["grad_x_weight"][n].numel() for n in names])
    locate = lambda i: (names[np.searchsorted(sizes, i, side="right") - 1], int(i - sizes[np.searchsorted(sizes, i, side="right") - 1]))  # noqa: E731
    top_x = [locate(i) for i in full_sort(x)[:K]]
    top_y = {locate(i) for i in full_sort(y)[:K]}
    assert got["top1000_overlap"] == len(set(top_x) & top_y) / K
    assert got["top1000_jaccard"] == len(set(top_x) & top_y) / len(set(top_x) | top_y)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}

    def where(n, f):
        cols = shapes[n][1] if len(shapes[n]) > 1 else None
        r, c = (f // cols, f % cols) if cols else (f, None)
        return layer_of(n), component_at(parts_of(n, shapes[n]), r, c)

    loc = [where(n, f) for n, f in top_x]
    assert got["top1000_layers01"] == sum(1 for layer, _ in loc if layer in (0, 1)) / K
    assert got["top1000_attention"] == sum(1 for _, c in loc if c.startswith("attn")) / K
    assert got["top1000_embedding"] == sum(1 for _, c in loc if c == "embed") / K


def test_table_is_the_mean_and_t_interval_over_seeds(runs):
    _, results = runs
    other = claims_table(results, same_family=False, k=K)
    assert list(other["claim"]) == [c.key for c in STUDY]
    row = other[other.claim == "gxw_max_over_mean"].iloc[0]
    ci = draws_interval([measure(r, K)["gxw_max_over_mean"] for r in results])
    assert (row.value, row.lo, row.hi, row.n_seeds) == (ci["mean"], ci["lo"], ci["hi"], 3)
    assert set(other.verdict) == {"other model", "not measured by the study"}
    same = claims_table(results, same_family=True, k=K)
    for _, r in same[same.study.notna()].iterrows():
        assert r.verdict == ("consistent" if r.lo <= r.study <= r.hi else "differs"), r.claim
    one = claims_table(results[:1], same_family=True, k=K)
    assert set(one[one.study.notna()].verdict) == {"too few seeds"}


def test_study_family():
    assert is_study_family({}, "meta-llama/Llama-3.1-8B") and is_study_family({"id": "Llama-3.1-8B-Instruct"}, "x")
    assert not is_study_family({}, "default") and not is_study_family({}, "meta-llama/Llama-3.2-1B")
