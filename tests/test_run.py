"""The run layer: CLI verbs and notebooks write the same files through the same phase functions, outputs are
checked before any computation and replace the previous run's as one set, and later phases reuse earlier
phases' results from the run's cache."""

import json

import pytest

from critlib import CritlibError
from critlib.cli import main
from critlib.params import load_params
from critlib.run import applications, commands, sensitivity, super_weights
from critlib.run.context import check_output_dir, prepare, staged

SETS = ["model=tiny-llama", "data=random", "seq_len=12", "n_sequences=2", "n_heldout=2", "batch_size=2",
        "device=cpu", "metrics=[grad_x_weight, magnitude]", "topk_per_layer=5", "topk_global=20",
        "perturb_ks=[1]", "quant_group_size=16", "quant_keep_percents=[0, 1]", "prune_sparsities=[0.5]",
        "bitflip_top_n=1", "bitflip_bits=[sign]", "bitflip_cap=4", "bitflip_draws=1", "stability_data=random"]
PHASE1_FILES = {"top_weights.parquet", "top_weights.csv", "sensitivity_stats.json", "layer_component.parquet",
                "layer_component.csv", "score_histogram.parquet", "score_histogram.csv", "manifest.json",
                "headlines/01_sensitivity.json"}


def _cli(*argv, sets=SETS):
    return main(list(argv) + ["-q"] + [x for s in sets for x in ("--set", s)])


def _files(folder):
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def ctx():
    return prepare(load_params(None, SETS))


def test_score_writes_what_notebook_01_writes(tmp_path, ctx):
    assert _cli("score", "-o", str(tmp_path / "cli")) == 0
    sensitivity.run(ctx, tmp_path / "nb", progress=False)  # the notebook's call
    cli, nb = _files(tmp_path / "cli"), _files(tmp_path / "nb")
    assert set(cli) == set(nb) == PHASE1_FILES  # the cache lies beside the folder a user shares
    assert (tmp_path / ".cli.cache" / "phase1.pt").is_file() and (tmp_path / ".nb.cache" / "phase1.pt").is_file()
    for f in ("top_weights.csv", "sensitivity_stats.json", "layer_component.csv", "score_histogram.csv"):
        assert cli[f] == nb[f], f


def test_a_failure_between_two_writes_keeps_the_previous_set(tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert _cli("score", "-o", str(out)) == 0
    before = _files(out)
    from critlib.run import sensitivity as phase1
    real = phase1.write_json

    def failing(path, obj):
        if path.name == "sensitivity_stats.json":
            raise KeyboardInterrupt  # after top_weights.* were written into the staging folder
        real(path, obj)

    monkeypatch.setattr(phase1, "write_json", failing)
    assert _cli("score", "-o", str(out), sets=SETS + ["seed=1"]) == 130
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.cache", "out"]  # no staging folder left


@pytest.mark.parametrize("where", ["a_file", "a_file/under", "missing/../a_file"])
def test_output_location_checked_before_any_computation(tmp_path, monkeypatch, capsys, where):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(commands, "prepare", lambda *a: pytest.fail("computed before checking the output"))
    for verb in ("score", "applications", "prune"):
        assert _cli(verb, "-o", str(tmp_path / where)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("critlib: error: output folder") and "-o" in err[0], err
    assert (tmp_path / "a_file").read_text() == "x"


def test_run_checks_its_output_before_running_notebooks(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    assert main(["run", "-p", "params/tiny.yaml", "-o", str(tmp_path / "a_file"), "-q"]) == 2
    assert "is an existing file" in capsys.readouterr().err


def test_check_output_dir_refuses_what_cannot_be_a_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    assert check_output_dir(tmp_path / "new" / "deeper") == (tmp_path / "new" / "deeper").resolve()
    with pytest.raises(CritlibError, match="existing file"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(CritlibError, match="lies under the file"):
        check_output_dir(tmp_path / "f" / "x")


def test_staged_replaces_files_only_on_success(tmp_path):
    out = tmp_path / "out"
    with staged(out) as stage:
        (stage / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with staged(out) as stage:
            (stage / "a.txt").write_text("2")
            raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_phase6_uses_phase4s_super_weights_from_the_cache(tmp_path, ctx, monkeypatch):
    p1 = sensitivity.results(ctx, tmp_path, progress=False)
    r4 = super_weights.run(ctx, p1, tmp_path)
    assert json.loads((tmp_path / "superweights.json").read_text())["super_weights"] == r4["super_weights"]
    monkeypatch.setattr(super_weights, "super_weight_study", lambda *a, **k: pytest.fail("detected again"))
    again, from_cache = super_weights.results(ctx, tmp_path)
    assert from_cache and again["super_weights"] == [{k: v for k, v in r.items() if not k.startswith("rank_")}
                                                      for r in r4["super_weights"]]
    r6 = applications.run(ctx, p1, tmp_path, progress=False)
    names = {r["param"] for r in r4["super_weights"]}
    assert r6["super_weights"] == [c for c in super_weights.coordinates(again) if c[0] in names]
    man = json.loads((tmp_path / "manifest_06_applications.json").read_text())
    assert man["super_weights"] == [list(c) for c in r6["super_weights"]]


def test_applications_verb_writes_what_notebook_06_writes(tmp_path, ctx):
    assert _cli("applications", "-o", str(tmp_path / "cli")) == 0
    p1 = sensitivity.results(ctx, tmp_path / "nb", progress=False)
    applications.run(ctx, p1, tmp_path / "nb", progress=False)
    cli, nb = _files(tmp_path / "cli"), _files(tmp_path / "nb")
    assert set(cli) == set(nb)
    assert {"quantization.csv", "pruning.csv", "bitflip_break.csv", "critical_fingerprint.json",
            "freeze_masks.safetensors", "manifest_06_applications.json", "headlines/06_applications.json"} <= set(cli)
    assert {"phase1.pt", "phase4.json", "evaluations.json"} <= set(_files(tmp_path / ".cli.cache"))
    for f in ("quantization.csv", "pruning.csv", "bitflip_single.csv", "critical_fingerprint.json"):
        assert cli[f] == nb[f], f


def test_one_experiment_verb_writes_its_own_tables(tmp_path):
    assert _cli("prune", "-o", str(tmp_path)) == 0
    written = set(_files(tmp_path))
    assert {"pruning.csv", "pruning.parquet", "manifest_06_applications.json"} <= written
    assert not {"quantization.csv", "bitflip_break.csv"} & written
    assert json.loads((tmp_path / "manifest_06_applications.json").read_text())["experiments"] == ["prune"]


def test_with_heldout_limits_the_windows(ctx):
    assert len(ctx.with_heldout(1).windows.heldout) == 1
    assert ctx.with_heldout(0) is ctx and ctx.with_heldout(99) is ctx


def test_fingerprint_checks_its_output_and_verify_its_dtype(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["fingerprint", "tiny-llama", "-o", str(tmp_path / "f" / "fp.json")]) == 2
    assert "cannot write the fingerprint file" in capsys.readouterr().err
    assert main(["fingerprint", "tiny-llama", "-o", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["fingerprint", "tiny-llama", "-o", str(tmp_path / "fp.json")]) == 0
    assert main(["verify", "tiny-llama", str(tmp_path / "fp.json")]) == 0
    capsys.readouterr()
    assert main(["verify", "tiny-llama", str(tmp_path / "fp.json"), "--set", "dtype=bf16"]) == 2
    assert "drop --set dtype=bf16" in capsys.readouterr().err


def test_phase2_writes_the_claims_over_every_seed(tmp_path, ctx):
    from critlib.run import cross_metric
    p1 = sensitivity.results(ctx, tmp_path, progress=False)
    r2 = cross_metric.run(ctx, p1, tmp_path, progress=False)
    seeds = 1 + len([s for s in ctx.params.stability_seeds if s != ctx.params.seed])
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
    assert list(by_tokens["tokens"]) == [12 * -(-t // 12) for t in ctx.params.stability_tokens]
    assert r2["token_sizes"]["skipped"] == [] and (tmp_path / "stability_tokens.csv").is_file()
    assert any("two disjoint token sets" in h["label"] for h in heads)


def test_phase2_names_the_token_sizes_the_corpus_cannot_hold(tmp_path):
    from critlib.run import cross_metric
    ctx = prepare(load_params(None, [s for s in SETS if not s.startswith("data=")] +
                              ["data=alt", "tokenizer=default", "stability_tokens=[24, 100000]"]))
    r2 = cross_metric.run(ctx, sensitivity.results(ctx, tmp_path, progress=False), tmp_path, progress=False)
    assert r2["token_sizes"]["skipped"] == [100000] and r2["token_sizes"]["tokens"] == [24]
    manifest = json.loads((tmp_path / "manifest_02_cross_metric.json").read_text())
    assert manifest["stability_tokens"]["skipped"] == [100000]
    assert manifest["seed_windows_shared"] == {"alt seed 1": 0, "alt seed 2": 0}  # the other seeds' are all new
    assert set(r2["stability"]["repeated_windows"]) == {0}
