"""Stability against the amount of scoring data: running sums against critlib's own scoring of each prefix,
top-K against a full sort, the sets' agreement against set arithmetic."""

import pytest
import torch

from critlib import CritlibError
from critlib.agreement import set_agreement
from critlib.datasize import DATA_METRICS, nested_topk, running_scores, split, stability_by_tokens, window_counts
from critlib.scores import score_model
from tests.conftest import tiny

METRICS = list(DATA_METRICS)


@pytest.fixture(scope="module")
def model():
    return tiny("tiny-llama")


def _pool(n, seed=3):
    return torch.randint(0, 96, (n, 10), generator=torch.Generator().manual_seed(seed))


def _reference(model, windows, metric):
    """critlib's scores of `metric` on `windows`, scored in one call (batches of 2)."""
    out = {}
    score_model(model, windows, [metric], lambda m, name, s: out.__setitem__(name, s.double().clone()), 2,
                progress=False)
    return out


def test_running_scores_equal_scoring_each_prefix(model):
    pool = _pool(5)
    got: dict = {}
    for n, each in running_scores(model, pool, METRICS + ["magnitude"], [2, 5]):
        each(lambda m, name, s, n=n: got.setdefault((n, m), {}).__setitem__(name, s.double()))
    assert {m for _, m in got} == set(METRICS)  # magnitude does not depend on data
    for (n, m), scores in got.items():
        ref = _reference(model, pool[:n], m)
        assert scores.keys() == ref.keys()
        for name in ref:  # sums in another order: float32 rounding of the largest
            torch.testing.assert_close(scores[name], ref[name], rtol=2e-5, atol=1e-6 * ref[name].abs().max())


def test_nested_topk_is_the_full_sort_of_the_running_scores(model):
    pool = _pool(4)
    order = [n for n, _ in model.named_parameters()]
    tops = nested_topk(model, pool, METRICS, [1, 4], k=25)
    for n, each in running_scores(model, pool, METRICS, [1, 4]):
        flat: dict = {}

        def emit(m, name, s):
            flat.setdefault(m, []).extend((-float(v), order.index(name), i) for i, v in enumerate(s.reshape(-1)))
        each(emit)
        for m in METRICS:
            assert tops[n][m] == [(order[p], i) for _, p, i in sorted(flat[m])[:25]]


def test_split_halves_are_disjoint_and_cover_the_pool():
    pool = torch.arange(7 * 3).reshape(7, 3)
    a, b = split(pool, seed=5)
    rows = lambda t: {tuple(r) for r in t.tolist()}  # noqa: E731
    assert len(a) == 4 and len(b) == 3 and not rows(a) & rows(b) and rows(a) | rows(b) == rows(pool)
    assert torch.equal(split(pool, 5)[0], a) and not torch.equal(split(pool, 6)[0], a)


def test_window_counts_round_up_and_skip_what_the_data_cannot_hold():
    assert window_counts([256, 512, 100, 8192], seq_len=128, available=10) == ([1, 2, 4], [8192])
    assert window_counts([], 128, 10) == ([], [])


def test_stability_by_tokens_compares_the_two_sets_at_each_size(model):
    pool = _pool(8, seed=4)
    table = stability_by_tokens(model, pool, METRICS + ["magnitude"], [1, 2, 4], k=20, seed=1)
    a, b = split(pool, 1)
    ta, tb = nested_topk(model, a, METRICS, [1, 2, 4], 20), nested_topk(model, b, METRICS, [1, 2, 4], 20)
    assert list(table["metric"].unique()) == METRICS
    assert sorted(table["tokens"].unique()) == [10, 20, 40]
    for r in table.itertuples():
        assert r.tokens == r.windows * 10 and r.k == 20
        assert (r.overlap, r.jaccard) == tuple(set_agreement(ta[r.windows][r.metric], tb[r.windows][r.metric]).values())
    with pytest.raises(CritlibError, match="give more data"):
        stability_by_tokens(model, pool, METRICS, [5], k=20)
    assert stability_by_tokens(model, pool, ["magnitude"], [1], k=20).empty
