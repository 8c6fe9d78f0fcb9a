"""Phase 4 in a run: effects on Phase 3's window set through the run's evaluation store, the parameters'
thresholds and rule, superweights.json, headlines that count confirmed super weights only, and Phase 6's
coordinates (confirmed only) from the cache."""

import hashlib
import json

import pytest

from critlib.data import Windows
from critlib.effects import intervention_key, window_set
from critlib.manifest import Timer
from critlib.models import Loaded
from critlib.params import load_params
from critlib.perturb import Selection, Zero
from critlib.run import cache, super_weights
from critlib.run.context import Context
from critlib.run.headlines import read_headlines
from tests.test_superweights import COL, DOWN0, ROW, ROW_B, mattering_llama, mattering_windows

SETS = ["model=planted", "n_heldout=8", "perturb_heldout=6", "batch_size=4", "device=cpu", "sw_random_draws=3"]


def planted_ctx(*extra) -> Context:
    """A run context around mattering_llama (two confirmed super weights, one harmless spike) and its windows."""
    params = load_params(None, SETS + list(extra))
    w = mattering_windows(10)
    sha = hashlib.sha256(w.numpy().tobytes()).hexdigest()
    windows = Windows(score=w[:2], heldout=w[2:], source="planted", sha256=sha)
    return Context(params, Loaded(mattering_llama(), None, {"source": "planted"}), windows, Timer())


@pytest.fixture(scope="module")
def ctx():
    return planted_ctx()


def test_run_writes_candidates_and_counts_confirmed_ones(tmp_path, ctx):
    r = super_weights.run(ctx, None, tmp_path)
    sw = json.loads((tmp_path / "superweights.json").read_text())
    assert sw["n_candidates"] == len(sw["candidates"]) == 3 and sw["n_confirmed"] == 2
    assert [c["confirmed"] for c in sw["candidates"]] == [True, False, True]
    assert sw["super_weights"] == [c for c in sw["candidates"] if c["confirmed"]]
    assert super_weights.coordinates(r) == [(DOWN0, ROW, COL), (DOWN0, ROW_B, COL)]
    items = {i["label"]: i["value"] for i in read_headlines(tmp_path)["04_super_weights"]}
    assert items["confirmed super weights"] == "2 of 3 candidates"
    a = sw["super_weights"][0]
    assert items[f"{DOWN0}[{ROW},{COL}] zeroed: ppl ratio [95% CI]"] == \
        f"{a['ppl_ratio_when_zeroed']:.4g} [{a['ppl_ratio_when_zeroed_lo']:.4g}, {a['ppl_ratio_when_zeroed_hi']:.4g}]"
    man = json.loads((tmp_path / "manifest_04_super_weights.json").read_text())
    assert (man["n_candidates"], man["n_confirmed"], man["heldout_windows"]) == (3, 2, 6)
    assert man["params"]["sw_random_draws"] == 3 and "random control" in man["rule"]


def test_effects_are_on_phase3s_windows_in_the_runs_store(tmp_path, ctx):
    r, from_cache = super_weights.results(ctx, tmp_path)
    assert not from_cache
    windows = ctx.windows.heldout[:6]  # the first perturb_heldout held-out windows, as Phase 3 evaluates on
    assert r["baseline"]["window_set"] == window_set(windows) and r["baseline"]["n_windows"] == 6
    store = cache.evaluations(ctx, tmp_path)  # what Phase 3 gets: a fresh store with the run's records
    a = r["super_weights"][0]
    key = intervention_key(Selection.from_list([(DOWN0, a["flat"])]), Zero())
    assert f"{key} @ {window_set(windows)}" in store.records
    rec = store.measure(key, windows, lambda: pytest.fail("measured again"))
    assert store.n_evaluations == 0 and rec["ppl_ratio"] == a["ppl_ratio_when_zeroed"]
    assert (rec["ppl_ratio_lo"], rec["ppl_ratio_hi"]) == (a["ppl_ratio_when_zeroed_lo"], a["ppl_ratio_when_zeroed_hi"])


def test_cached_and_reused_by_phase6_and_keyed_by_the_rule(tmp_path, ctx, monkeypatch):
    first, _ = super_weights.results(ctx, tmp_path)
    real = super_weights.super_weight_study
    monkeypatch.setattr(super_weights, "super_weight_study", lambda *a, **k: pytest.fail("detected again"))
    again, from_cache = super_weights.results(ctx, tmp_path)
    assert from_cache and super_weights.coordinates(again) == super_weights.coordinates(first)
    monkeypatch.setattr(super_weights, "super_weight_study", real)
    strict = planted_ctx("sw_effect_size=2.5")  # above the second one's ratio: it stays a candidate
    r, from_cache = super_weights.results(strict, tmp_path)
    assert not from_cache and r["n_candidates"] == 3
    want = [(DOWN0, c["row"], c["col"]) for c in first["candidates"] if c["ppl_ratio_when_zeroed"] >= 2.5]
    assert super_weights.coordinates(r) == want and len(want) == 1
    loose = planted_ctx("sw_min_activation=1000")  # nothing is that large: no candidate, nothing to protect
    r, _ = super_weights.results(loose, tmp_path)
    assert r["candidates"] == [] and super_weights.coordinates(r) == [] and r["joint"] is None
    assert super_weights.headline(r)[0] == ("confirmed super weights", "0 of 0 candidates")
