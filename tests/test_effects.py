"""Effects with intervals: the paired bootstrap against a direct resampling loop, the evaluation store
(one evaluation per key and window set), position damage and the draws interval against scipy."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from critlib.effects import Evaluations, draws_interval, effect, position_damage, window_set
from critlib.evaluate import evaluate
from critlib.perturb import Selection, Zero, perturbed
from tests.conftest import tiny


@pytest.fixture(scope="module")
def setup():
    model = tiny("tiny-llama")
    windows = torch.randint(0, 96, (6, 10), generator=torch.Generator().manual_seed(5))
    top = max(((n, int(p.detach().abs().argmax())) for n, p in model.named_parameters() if p.ndim == 2),
              key=lambda t: float(dict(model.named_parameters())[t[0]].detach().reshape(-1)[t[1]].abs()))
    return model, windows, Selection.from_list([top])


def test_per_window_sums_add_up_to_the_totals(setup):
    model, windows, _ = setup
    r = evaluate(model, windows, 4, per_window=True)
    w = r["windows"]
    assert w["nll"].sum() / w["n_tokens"].sum() == pytest.approx(r["nll"], rel=1e-6)
    assert w["correct"].sum() / w["n_tokens"].sum() == pytest.approx(r["accuracy"], rel=1e-12)
    assert np.allclose(w["position_nll"].sum(1), w["nll"])
    assert w["position_nll"].shape == (6, 9)


def test_interval_equals_a_direct_bootstrap(setup):
    model, windows, sel = setup
    base = evaluate(model, windows, 4, keep_logprobs=True, per_window=True)
    with perturbed(model, sel, Zero()):
        changed = evaluate(model, windows, 4, reference=base["logprobs"], per_window=True)
    got = effect(base, changed, n_boot=500, seed=3)
    assert got["ppl_ratio"] == pytest.approx(changed["ppl"] / base["ppl"], rel=1e-5)
    assert got["kl"] == pytest.approx(changed["kl"], rel=1e-6)
    rng = np.random.default_rng(3)
    draws = rng.integers(0, 6, size=(500, 6))
    ratios = []
    for d in draws:  # a fresh perplexity ratio of each resampled window set, from per-window NLL sums
        b = sum(base["windows"]["nll"][i] for i in d) / (9 * len(d))
        c = sum(changed["windows"]["nll"][i] for i in d) / (9 * len(d))
        ratios.append(math.exp(c) / math.exp(b))
    ratios.sort()
    assert got["ppl_ratio_lo"] == pytest.approx(ratios[math.floor(0.025 * 499)], rel=1e-9)
    assert got["ppl_ratio_hi"] == pytest.approx(ratios[math.ceil(0.975 * 499)], rel=1e-9)
    assert got["ppl_ratio_lo"] <= got["ppl_ratio"] <= got["ppl_ratio_hi"]


def test_store_evaluates_each_key_once(setup):
    model, windows, sel = setup
    store = Evaluations(model, batch_size=4)
    a = store.measure("zero top-1", windows, lambda: perturbed(model, sel, Zero()))
    n = store.n_evaluations
    assert n == 2  # the baseline and the intervention
    b = store.measure("zero top-1", windows, lambda: pytest.fail("evaluated again"))
    assert a is b and store.n_evaluations == n
    other = store.measure("zero top-1", windows[:3], lambda: perturbed(model, sel, Zero()))
    assert other["window_set"] == window_set(windows[:3]) != a["window_set"] and store.n_evaluations == n + 2
    nothing = store.measure("zero nothing", windows, lambda: perturbed(model, Selection(), Zero()))
    assert nothing["ppl_ratio"] == 1.0 and nothing["kl"] == 0.0 and store.n_evaluations == n + 2
    assert store.get("zero top-1", windows) is a and store.get("zero top-1", a["window_set"]) is a
    assert store.get("zero top-1", windows[:2]) is None
    # the unchanged model's numbers, kept with the effects: no evaluation when its baseline is known
    base = store.unchanged(windows)
    assert base["ppl"] == a["base_ppl"] and base["n_tokens"] == 6 * 9 and store.n_evaluations == n + 2
    assert a["nll"] == pytest.approx(math.log(a["ppl"]), rel=1e-12)
    fresh = Evaluations(model, batch_size=4, records=dict(store.records))
    assert fresh.unchanged(windows) == base and fresh.n_evaluations == 0


def test_position_damage_is_the_bucket_mean(setup):
    model, windows, sel = setup
    base = evaluate(model, windows, 4, keep_logprobs=True, per_window=True)
    with perturbed(model, sel, Zero()):
        changed = evaluate(model, windows, 4, reference=base["logprobs"], per_window=True)
    rows = position_damage(base, changed, buckets=(0, 2, 5))
    d = changed["windows"]["position_nll"] - base["windows"]["position_nll"]
    assert [(r["start"], r["stop"]) for r in rows] == [(0, 2), (2, 5), (5, 9)]
    assert rows[1]["nll_increase"] == pytest.approx(d[:, 2:5].mean()) and rows[1]["n_tokens"] == 18


def test_draws_interval_is_the_t_interval():
    v = [1.1, 1.4, 0.9, 1.2]
    lo, hi = stats.t.interval(0.95, 3, loc=np.mean(v), scale=stats.sem(v))
    got = draws_interval(v)
    assert got["lo"] == pytest.approx(lo) and got["hi"] == pytest.approx(hi) and got["n"] == 4
    assert math.isnan(draws_interval([1.0])["lo"])
