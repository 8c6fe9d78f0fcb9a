"""Phase 6 in a run: Phase 4's super weights and Phase 1's scores come from the cache, and the application
verbs write what notebook 06 writes (each verb its own tables)."""

import json

import pytest

from critlib.run import applications, sensitivity, super_weights
from tests.conftest import folder_files as _files
from tests.conftest import run_cli as _cli


def test_phase6_uses_phase4s_super_weights_from_the_cache(tmp_path, run_ctx, monkeypatch):
    p1 = sensitivity.results(run_ctx, tmp_path, progress=False)
    r4 = super_weights.run(run_ctx, p1, tmp_path)
    assert json.loads((tmp_path / "superweights.json").read_text())["super_weights"] == r4["super_weights"]
    monkeypatch.setattr(super_weights, "super_weight_study", lambda *a, **k: pytest.fail("detected again"))
    again, from_cache = super_weights.results(run_ctx, tmp_path)
    assert from_cache and again["super_weights"] == [{k: v for k, v in r.items() if not k.startswith("rank_")}
                                                      for r in r4["super_weights"]]
    r6 = applications.run(run_ctx, p1, tmp_path, progress=False)
    names = {r["param"] for r in r4["super_weights"]}
    assert r6["super_weights"] == [c for c in super_weights.coordinates(again) if c[0] in names]
    man = json.loads((tmp_path / "manifest_06_applications.json").read_text())
    assert man["super_weights"] == [list(c) for c in r6["super_weights"]]


def test_applications_verb_writes_what_notebook_06_writes(tmp_path, run_ctx):
    assert _cli("applications", "-o", str(tmp_path / "cli")) == 0
    p1 = sensitivity.results(run_ctx, tmp_path / "nb", progress=False)
    applications.run(run_ctx, p1, tmp_path / "nb", progress=False)
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
