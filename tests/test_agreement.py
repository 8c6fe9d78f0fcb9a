"""Phase 2 agreement against brute-force set arithmetic and full sorts."""

import itertools

import numpy as np
import pytest
import torch

from critlib import agreement
from critlib.scores import score_model
from critlib.sensitivity import analyze
from tests.conftest import tiny

METRICS = ["grad_x_weight", "fisher", "magnitude", "wanda"]


def _windows(seed):
    return torch.randint(0, 96, (4, 10), generator=torch.Generator().manual_seed(seed))


def _full_sort_topk(model, windows, metric, k):
    """Every score of every tensor, sorted by (score desc, param order, flat index)."""
    allv = []
    order = [n for n, _ in model.named_parameters()]

    def emit(m, name, s):
        if m == metric:
            allv.extend((-float(v), order.index(name), i) for i, v in enumerate(s.reshape(-1).tolist()))

    score_model(model, windows, [metric], emit, 2, progress=False)
    return [(order[p], i) for _, p, i in sorted(allv)[:k]]


@pytest.fixture(scope="module")
def model():
    return tiny("tiny-llama")


def test_set_agreement_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = [(str(x), 0) for x in rng.choice(50, 10, replace=False)]
        b = [(str(x), 0) for x in rng.choice(50, 10, replace=False)]
        got = agreement.set_agreement(a, b)
        inter = sum(1 for x in a if x in b)
        union = len(a) + len(b) - inter
        assert got == {"overlap": inter, "jaccard": inter / union}
    assert agreement.set_agreement([], []) == {"overlap": 0, "jaccard": 1.0}


def test_topk_sets_equal_full_sort(model):
    w = _windows(1)
    got = agreement.topk_sets(model, w, ["grad_x_weight", "magnitude"], 30, batch_size=2, progress=False)
    for m in ("grad_x_weight", "magnitude"):
        assert got[m] == _full_sort_topk(model, w, m, 30)


def test_topk_sets_match_phase1(model):
    w = _windows(2)
    sens = analyze(model, w, metrics=METRICS, topk_global=25, topk_per_layer=5, batch_size=2, progress=False)
    one_pass = agreement.topk_sets(model, w, METRICS, 25, batch_size=2, progress=False)
    assert one_pass == agreement.top_sets(sens, 25)


def test_stability_table_and_baseline(model):
    runs = {"base": agreement.topk_sets(model, _windows(1), METRICS, 20, 2, progress=False),
            "seed 1": agreement.topk_sets(model, _windows(2), METRICS, 20, 2, progress=False),
            "seed 2": agreement.topk_sets(model, _windows(3), METRICS, 20, 2, progress=False),
            "alt": agreement.topk_sets(model, _windows(4), METRICS, 20, 2, progress=False)}
    kinds = {"base": "base", "seed 1": "seed", "seed 2": "seed", "alt": "corpus"}
    st = agreement.stability_table(runs, "base", kinds)
    pairs = {(r.run_a, r.run_b) for r in st.itertuples()}
    assert pairs == {("base", "seed 1"), ("base", "seed 2"), ("base", "alt"), ("seed 1", "seed 2")}
    for r in st.itertuples():
        a, b = set(runs[r.run_a][r.metric]), set(runs[r.run_b][r.metric])
        assert r.overlap == len(a & b) and r.jaccard == pytest.approx(len(a & b) / len(a | b))
        assert r.comparison == ("corpus" if r.run_b == "alt" else "seed")
    mag = st[st["metric"] == "magnitude"]
    assert (mag["jaccard"] == 1.0).all()  # |w| does not depend on the data
    sens = analyze(model, _windows(1), metrics=METRICS, topk_global=20, topk_per_layer=5, batch_size=2, progress=False)
    table = agreement.with_baseline(agreement.cross_table(sens, 20), st)
    seed_mean = st[st["comparison"] == "seed"].groupby("metric")["jaccard"].mean()
    for r in table.itertuples():
        assert r.seed_baseline == pytest.approx(min(seed_mean[r.metric_a], seed_mean[r.metric_b]))
        ta, tb = (set(agreement.top_sets(sens, 20)[m]) for m in (r.metric_a, r.metric_b))
        assert r.overlap == len(ta & tb) and r.overlap_fraction == pytest.approx(len(ta & tb) / 20)


def test_rank_pairs_are_ranks_within_the_union(model):
    sens = analyze(model, _windows(5), metrics=METRICS, topk_global=15, topk_per_layer=5, batch_size=2, progress=False)
    for a, b in itertools.combinations(METRICS, 2):
        df = agreement.rank_pairs(sens, a, b)
        ta = {(n, f) for n, f, _ in sens.global_top(a, 15)}
        tb = {(n, f) for n, f, _ in sens.global_top(b, 15)}
        assert set(zip(df["param"], df["flat"])) == ta | tb
        for s, r in (("score_a", "rank_a"), ("score_b", "rank_b")):
            assert sorted(df[r]) == list(range(1, len(df) + 1))
            by_rank = df.sort_values(r)
            assert np.all(np.diff(by_rank[s].to_numpy()) <= 0)
        top_of_a = df[df["in_top_a"]]
        assert top_of_a["rank_a"].max() == len(ta)  # a's own top-K ranks first under a
