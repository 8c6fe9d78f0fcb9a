import copy
import hashlib
import math

import pytest
import torch

from critlib import CritlibError
from critlib.effects import Evaluations, draws_interval, effect, intervention_key, window_set
from critlib.evaluate import evaluate
from critlib.experiments import (COLUMNS, Selector, default_selectors, dose_response, main_interventions, positions,
                                 summarize_draws)
from critlib.params import Params, load_params
from critlib.perturb import BitFlip, Scale, Selection, Zero, parse_method, select_random, select_top
from critlib.sensitivity import analyze
from tests.conftest import tiny


def digest(model) -> str:
    h = hashlib.sha256()
    for _, p in model.named_parameters():
        h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def setup():
    model = tiny("tiny-llama")
    gen = torch.Generator().manual_seed(1)
    score = torch.randint(0, 96, (4, 12), generator=gen)
    heldout = torch.randint(0, 96, (3, 12), generator=gen)
    sens = analyze(model, score, metrics=["grad_x_weight", "magnitude"], topk_global=50, topk_per_layer=10,
                   batch_size=4, progress=False, bottomk=20)
    return model, heldout, sens


def test_grid_rows_properties_and_restoration(setup):
    model, heldout, sens = setup
    before = digest(model)
    selectors = default_selectors(model, sens, n_random_draws=2, seed=0)
    assert list(selectors) == ["top:grad_x_weight", "top:magnitude", "bottom:grad_x_weight", "bottom:magnitude",
                               "random", "magnitude"]
    assert selectors["top:magnitude"](10, 0) == selectors["magnitude"](10, 0)
    methods = ["zero", Scale(4.0), "bitflip:exponent"]
    ks = [0, 1, 10]
    df = dose_response(model, heldout, selectors, methods, ks, batch_size=2, progress=False)
    assert digest(model) == before
    assert list(df.columns) == COLUMNS
    assert len(df) == (5 * 1 + 1 * 2) * len(methods) * len(ks)
    assert df.groupby("selector").size().to_dict()["random"] == 2 * len(methods) * len(ks)
    finite = df.method != "bitflip"  # exponent flips of |w| < 2 give ~1e38 weights: the model may output NaN
    # KL ≥ 0 up to evaluate's fp32 summation (≈1e-8 below 0 for near-zero effects)
    assert (df[finite].kl >= -1e-6).all() and df[finite].ppl.notna().all() and (df.kl.dropna() >= -1e-6).all()
    k0 = df[df.k == 0]
    assert (k0.ppl_ratio == 1.0).all() and (k0.kl == 0.0).all() and (k0.n_selected == 0).all()
    assert (df.n_selected == df.k).all() and (df.n_changed <= df.n_selected).all()
    top = df[(df.selector == "top:grad_x_weight")]
    assert top.metric.eq("grad_x_weight").all() and df[df.selector == "random"].metric.isna().all()
    assert set(df[df.method == "scale"].method_arg) == {"4"} and df[df.method == "zero"].method_arg.isna().all()
    assert set(df[df.method == "bitflip"].method_arg) == {"exponent"}
    cols = ["method", "k", "n_changed", "ppl", "kl"]  # Phase 1's top-|w| and the magnitude control agree
    assert df[df.selector == "top:magnitude"][cols].reset_index(drop=True).equals(
        df[df.selector == "magnitude"][cols].reset_index(drop=True))
    base = evaluate(model, heldout, 2)
    assert df.attrs["baseline"]["ppl"] == base["ppl"]
    # the rows of the table are what they claim: recompute one on an independently edited deep copy
    row = df[(df.selector == "top:grad_x_weight") & (df.method == "zero") & (df.k == 10)].iloc[0]
    clone = copy.deepcopy(model)
    params = dict(clone.named_parameters())
    with torch.no_grad():
        for name, flat, _ in sens.global_top("grad_x_weight", 10):
            params[name].view(-1)[flat] = 0.0
    base_pw = evaluate(model, heldout, 2, keep_logprobs=True, per_window=True)
    r = evaluate(clone, heldout, 2, reference=base_pw["logprobs"], per_window=True)
    assert row.ppl == r["ppl"] and row.accuracy == r["accuracy"]
    assert row.kl == pytest.approx(r["kl"], rel=1e-12)
    # the ratio is exp(ΔNLL per token) from per-window float64 sums: equal to ppl / base ppl to float32 rounding
    assert math.isclose(row.ppl_ratio, r["ppl"] / base["ppl"], rel_tol=1e-6)
    # every effect and its interval is `effects.effect` of the same two evaluations, bit for bit
    want = effect(base_pw, r)
    for c in ("ppl_ratio", "kl", "accuracy_delta"):
        for suffix in ("", "_lo", "_hi"):
            assert row[c + suffix] == want[c + suffix], c + suffix
    assert row.window_set == window_set(heldout) and row.intervention == intervention_key(
        Selection.from_list(sens.global_top("grad_x_weight", 10)), Zero())
    # the intervals lie around the point estimate (finite rows: a broken model's bounds may be NaN/inf)
    ok = df[df.ppl.notna()]
    for c in ("ppl_ratio", "kl", "accuracy_delta"):
        assert (ok[c + "_lo"] <= ok[c] + 1e-12).all() and (ok[c] <= ok[c + "_hi"] + 1e-12).all(), c
    # top-exponent-bit flips of |w| < 2 (all weights of this model) give ~1e38 weights: every value changes
    # and the model's output is no longer finite, which the table shows as NaN, not as a number
    bf = df[(df.method == "bitflip") & (df.k == 10) & (df.selector == "magnitude")].iloc[0]
    assert bf.n_changed == 10 and math.isnan(bf.ppl) and math.isnan(bf.kl)


def test_each_intervention_is_evaluated_once(setup):
    model, heldout, sens = setup
    selectors = default_selectors(model, sens, n_random_draws=2, seed=0)
    store = Evaluations(model, batch_size=2)
    df = dose_response(model, heldout, selectors, ["zero", "sign_flip"], [0, 1, 10], progress=False, store=store)
    # top:magnitude and the magnitude control select the same weights: one key, one evaluation
    mag = df[df.selector == "magnitude"].intervention.tolist()
    assert mag == df[df.selector == "top:magnitude"].intervention.tolist()
    changed = df[df.n_changed > 0].intervention.nunique()
    assert store.n_evaluations == 1 + changed  # the baseline once, each changing intervention once
    assert len(df) > changed + 1
    # the same store again: nothing evaluated, the same numbers
    again = dose_response(model, heldout, selectors, ["zero", "sign_flip"], [0, 1, 10], progress=False, store=store)
    assert store.n_evaluations == 1 + changed and again.equals(df)
    # a store of another model is refused
    with pytest.raises(CritlibError, match="another model"):
        dose_response(tiny("tiny-llama", seed=1), heldout, selectors, ["zero"], [1], progress=False, store=store)


def test_summary_intervals_and_positions(setup):
    model, heldout, sens = setup
    selectors = default_selectors(model, sens, ["grad_x_weight"], n_random_draws=3, seed=0)
    store = Evaluations(model, batch_size=2)
    df = dose_response(model, heldout, selectors, ["zero"], [1, 10], progress=False, store=store)
    s = summarize_draws(df)
    for _, r in s.iterrows():
        raw = df[(df.selector == r.selector) & (df.k == r.k)]
        if r.selector == "random":  # several draws: the t-interval over draws
            assert r.interval == "draws" and r.n_draws == 3
            iv = draws_interval(raw.ppl_ratio.to_numpy())
            assert (r.ppl_ratio_lo, r.ppl_ratio_hi) == pytest.approx((iv["lo"], iv["hi"]), rel=1e-12)
        else:  # one draw: its bootstrap interval over windows
            assert r.interval == "windows" and r.n_draws == 1
            row = raw.iloc[0]
            assert (r.ppl_ratio_lo, r.ppl_ratio_hi, r.kl_lo, r.accuracy_delta_hi) == (
                row.ppl_ratio_lo, row.ppl_ratio_hi, row.kl_lo, row.accuracy_delta_hi)
        assert r.ppl_ratio_lo <= r.ppl_ratio_mean <= r.ppl_ratio_hi and r.window_set == window_set(heldout)
    main = main_interventions(df)
    assert set(main.selector) == {"top:grad_x_weight", "random", "magnitude"} and set(main.k) == {1, 10}
    pos = positions(df, store)
    assert list(pos.columns[:9]) == ["selector", "metric", "method", "method_arg", "k", "start", "stop",
                                     "nll_increase", "n_tokens"]
    for (sel, k), sub in pos.groupby(["selector", "k"]):
        assert sub.n_tokens.sum() == heldout.shape[0] * (heldout.shape[1] - 1)
        assert list(sub.start[1:]) == list(sub.stop[:-1]) and sub.start.iloc[0] == 0
        # the buckets add up to the mean NLL increase per token: log of the ppl ratio (mean over draws)
        mean_nll = (sub.nll_increase * sub.n_tokens).sum() / sub.n_tokens.sum()
        want = df[(df.selector == sel) & (df.k == k)].ppl_ratio.map(math.log).mean()
        assert mean_nll == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert (sub.n_draws == (3 if sel == "random" else 1)).all()


def test_random_draws_differ_and_nest(setup):
    model, heldout, sens = setup
    sel = default_selectors(model, sens, ["grad_x_weight"], n_random_draws=3, seed=5)["random"]
    assert sel.draws == 3
    a, b = sel(10, 0), sel(10, 1)
    assert a.to_list() != b.to_list() and set(sel(3, 1).to_list()) <= set(b.to_list())


def test_empty_selection_and_draw_rules(setup):
    model, heldout, sens = setup
    before = digest(model)
    calls = []

    def nothing(k, d):
        calls.append((k, d))
        return Selection()

    df = dose_response(model, heldout, {"none": nothing, "fixed": Selector(nothing, draws=2)}, [Zero()], [5],
                       draws=3, progress=False)
    assert (df.ppl_ratio == 1.0).all() and (df.kl == 0.0).all() and (df.n_changed == 0).all()
    assert df.groupby("selector").size().to_dict() == {"none": 3, "fixed": 2}
    df = dose_response(model, heldout, {"none": nothing}, [Zero()], [5], draws={"none": 4}, progress=False)
    assert len(df) == 4 and digest(model) == before


def test_summarize_draws(setup):
    model, heldout, sens = setup
    selectors = {"random": Selector(lambda k, d: select_random(model, k, 100 + d), draws=3),
                 "top:grad_x_weight": lambda k, d: select_top(sens, "grad_x_weight", k)}
    df = dose_response(model, heldout, selectors, ["sign_flip", "noise:1.0"], [2, 5], progress=False)
    s = summarize_draws(df)
    assert len(s) == 2 * 2 * 2
    r = s[(s.selector == "random") & (s.method == "noise") & (s.k == 5)].iloc[0]
    raw = df[(df.selector == "random") & (df.method == "noise") & (df.k == 5)]
    # a grouped mean and Series.mean sum in different orders: equal to the last few bits only
    assert r.n_draws == 3
    assert r.ppl_ratio_mean == pytest.approx(raw.ppl_ratio.mean(), rel=1e-12)
    assert r.kl_std == pytest.approx(raw.kl.std(), rel=1e-9)
    assert s[s.selector == "top:grad_x_weight"].n_draws.eq(1).all()


def test_errors_fail_before_evaluating(setup):
    model, heldout, sens = setup
    with pytest.raises(CritlibError, match="topk_global"):
        dose_response(model, heldout, default_selectors(model, sens, ["grad_x_weight"]), ["zero"], [1, 51],
                      progress=False)
    with pytest.raises(CritlibError, match="bottomk"):
        dose_response(model, heldout, default_selectors(model, sens), ["zero"], [21], progress=False)
    with pytest.raises(CritlibError, match="held-out"):
        dose_response(model, heldout[:0], {"r": lambda k, d: Selection()}, ["zero"], [1], progress=False)
    with pytest.raises(CritlibError, match="unknown perturbation method"):
        dose_response(model, heldout, {"r": lambda k, d: Selection()}, ["explode"], [1], progress=False)


def test_params_fields_and_validation():
    p = Params().validate()
    assert p.perturb_ks == [1, 10, 100, 1000] and p.n_random_draws == 3
    assert [parse_method(m) for m in p.perturb_methods][-1] == BitFlip("exponent")
    p = load_params(None, ["perturb_ks=0,5", "perturb_methods=zero,scale:2"])
    assert p.perturb_ks == [0, 5] and p.perturb_methods == ["zero", "scale:2"]
    for bad, msg in [("perturb_ks=1,x", "perturb_ks"), ("perturb_ks=-1", "perturb_ks"),
                     ("perturb_methods=zap", "perturbation method"), ("n_random_draws=0", "n_random_draws"),
                     ("perturb_methods=[]", "perturb_methods")]:
        with pytest.raises(CritlibError, match=msg):
            load_params(None, [bad])
