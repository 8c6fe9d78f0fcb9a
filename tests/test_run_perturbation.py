"""Phase 3 in a run: its tables carry intervals and name their window set, and it measures through the run's
store of evaluations (the run's cache), which a later phase or run reads back with the same numbers
and without evaluating again."""

import json
import math

import pandas as pd
import pytest

import critlib.effects as effects
from critlib.effects import intervention_key
from critlib.experiments import COLUMNS
from critlib.params import load_params
from critlib.perturb import Selection, Zero
from critlib.run import cache, perturbation, sensitivity
from critlib.run.context import prepare
from critlib.run.headlines import read_headlines

SETS = ["model=tiny-llama", "data=random", "seq_len=12", "n_sequences=2", "n_heldout=3", "batch_size=2",
        "device=cpu", "metrics=[grad_x_weight, magnitude]", "topk_per_layer=5", "topk_global=20",
        "perturb_ks=[1, 5]", "perturb_methods=[zero, sign_flip]", "n_random_draws=2", "perturb_heldout=2"]


@pytest.fixture(scope="module")
def phase3(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    ctx = prepare(load_params(None, SETS))
    p1 = sensitivity.results(ctx, out, progress=False)
    return ctx, p1, out, perturbation.run(ctx, p1, out, progress=False)


def test_tables_manifest_and_headline_name_the_window_set(phase3):
    ctx, _, out, r3 = phase3
    df = pd.read_parquet(out / "perturbation.parquet")
    assert list(df.columns) == COLUMNS and pd.read_csv(out / "perturbation.csv").shape == df.shape
    name = effects.window_set(ctx.windows.heldout[:2])  # perturb_heldout: the first 2 held-out windows
    assert set(df.window_set) == {name} and name.startswith("2x12:")
    summary = pd.read_parquet(out / "perturbation_summary.parquet")
    assert set(summary.window_set) == {name} and set(summary.interval) == {"windows", "draws"}
    m = json.loads((out / "manifest_03_perturbation.json").read_text())
    assert m["window_set"]["name"] == name and m["baseline"]["window_set"] == name
    assert m["window_set"]["n_windows"] == 2 and m["baseline"]["n_tokens"] == 2 * 11
    assert m["data"]["prepended_bos"] is None  # random token ids: nothing prepended
    h = {i["label"]: i["value"] for i in read_headlines(out)["03_perturbation"]}
    assert h[f"unperturbed perplexity, window set {name}"] == pytest.approx(m["baseline"]["ppl"], abs=1e-4)
    at = summary[(summary.method == "zero") & (summary.k == 5)].set_index("selector")
    for sel in ("top:grad_x_weight", "top:magnitude", "random", "magnitude"):
        r = at.loc[sel]
        text = h[f"ppl ratio, zero top-5 of {sel}"]
        assert text.startswith(f"{r.ppl_ratio_mean:#.4g} [{r.ppl_ratio_lo:#.4g}, {r.ppl_ratio_hi:#.4g}]"), text
        assert "2×12 held-out windows" in text
        assert ("t over 2 draws" if sel == "random" else "bootstrap over windows") in text
    assert perturbation.interval_text(1.0, 1.0, 1.0) == "1.000 [1.000, 1.000]"
    assert perturbation.interval_text(float("nan"), 1.0, 2.0) == "broken (ppl NaN/inf)"


def test_the_store_is_read_back_with_the_same_numbers(phase3, monkeypatch):
    ctx, p1, out, r3 = phase3
    assert cache.path(out, cache.EVALUATIONS).is_file()
    store = cache.evaluations(ctx, out)
    df = r3["raw"]
    name = df.window_set.iloc[0]
    for _, row in df.iterrows():
        rec = store.get(row.intervention, name)
        assert rec is not None and rec["n_changed"] == row.n_changed
        for c in ("ppl", "ppl_ratio", "ppl_ratio_lo", "ppl_ratio_hi", "kl", "kl_hi", "accuracy_delta_lo"):
            assert rec[c] == row[c] or (math.isnan(row[c]) and rec[c] is None), c
    # Phase 4 zeroing one weight asks for the same key: Phase 3's top-1 of a metric reads the same number
    (pname, flat, _), = p1.sens.global_top("grad_x_weight", 1)
    key = intervention_key(Selection.from_list([(pname, flat)]), Zero())
    row = df[(df.selector == "top:grad_x_weight") & (df.method == "zero") & (df.k == 1)].iloc[0]
    assert row.intervention == key and store.get(key, name)["ppl_ratio"] == row.ppl_ratio
    # a second Phase 3 of the run evaluates nothing and writes the same tables
    monkeypatch.setattr(effects, "evaluate", lambda *a, **k: pytest.fail("evaluated an intervention again"))
    again = perturbation.run(ctx, p1, out, progress=False)
    assert again["raw"].equals(df) and again["summary"].equals(r3["summary"])
    assert again["positions"].equals(r3["positions"])


def test_positions_table(phase3):
    _, _, out, r3 = phase3
    pos = pd.read_parquet(out / "perturbation_positions.parquet")
    assert list(pos.columns[:9]) == ["selector", "metric", "method", "method_arg", "k", "start", "stop",
                                     "nll_increase", "n_tokens"]
    assert set(pos.selector) == {"top:grad_x_weight", "top:magnitude", "random", "magnitude"}
    assert set(pos.k) == {1, 5} and set(pos.method) == {"zero"}
    df = r3["raw"]
    for (sel, k), sub in pos.groupby(["selector", "k"]):
        assert sub.n_tokens.sum() == 2 * 11 and sub.start.iloc[0] == 0 and sub.stop.iloc[-1] == 11
        want = df[(df.selector == sel) & (df.k == k) & (df.method == "zero")].ppl_ratio.map(math.log).mean()
        got = (sub.nll_increase * sub.n_tokens).sum() / sub.n_tokens.sum()
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
