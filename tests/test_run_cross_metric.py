"""Phase 2 in a run: the claims over every data seed, the seeds' windows disjoint from Phase 1's, and the
stability against the amount of data with the sizes the corpus cannot hold named."""

import json

from critlib.params import load_params
from critlib.run import cross_metric, sensitivity
from critlib.run.context import prepare
from tests.conftest import RUN_SETS as SETS


def test_phase2_writes_the_claims_over_every_seed(tmp_path, run_ctx):
    p1 = sensitivity.results(run_ctx, tmp_path, progress=False)
    r2 = cross_metric.run(run_ctx, p1, tmp_path, progress=False)
    seeds = 1 + len([s for s in run_ctx.params.stability_seeds if s != run_ctx.params.seed])
    claims = r2["claims"]
    assert (tmp_path / "claims.csv").is_file()
    gxw = claims[claims["claim"].str.startswith("gxw_") | claims["claim"].str.startswith("top1000_layer")]
    assert set(gxw["n_seeds"]) == {seeds}  # grad² claims: no values, the run has no grad_squared
    assert set(claims[claims["claim"] == "top1000_jaccard"]["n_seeds"]) == {0}
    assert set(claims["verdict"]) <= {"other model", "not measured by the study"}
    heads = json.loads((tmp_path / "headlines" / "02_cross_metric.json").read_text())["items"]
    assert any("study claims re-tested over" in h["label"] for h in heads)
    assert all("magnitude" not in h["label"] for h in heads)
    by_tokens = r2["stability_tokens"]  # magnitude left out; every size fits twice in the random pool
    assert set(by_tokens["metric"]) == {"grad_x_weight"}
    assert list(by_tokens["tokens"]) == [12 * -(-t // 12) for t in run_ctx.params.stability_tokens]
    assert r2["token_sizes"]["skipped"] == [] and (tmp_path / "stability_tokens.csv").is_file()
    assert any("two disjoint token sets" in h["label"] for h in heads)


def test_phase2_names_the_token_sizes_the_corpus_cannot_hold(tmp_path):
    run_ctx = prepare(load_params(None, [s for s in SETS if not s.startswith("data=")] +
                              ["data=alt", "tokenizer=default", "stability_tokens=[24, 100000]"]))
    r2 = cross_metric.run(run_ctx, sensitivity.results(run_ctx, tmp_path, progress=False), tmp_path, progress=False)
    assert r2["token_sizes"]["skipped"] == [100000] and r2["token_sizes"]["tokens"] == [24]
    manifest = json.loads((tmp_path / "manifest_02_cross_metric.json").read_text())
    assert manifest["stability_tokens"]["skipped"] == [100000]
    assert manifest["seed_windows_shared"] == {"alt seed 1": 0, "alt seed 2": 0}  # the other seeds' are all new
    assert set(r2["stability"]["repeated_windows"]) == {0}
