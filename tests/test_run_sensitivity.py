"""Phase 1 in a run: `critlib score` writes what notebook 01 writes, and the result is cached beside the run
folder and read back by later phases without scoring again."""

import pytest

from critlib.run import sensitivity
from tests.conftest import folder_files as _files
from tests.conftest import run_cli as _cli

PHASE1_FILES = {"top_weights.parquet", "top_weights.csv", "sensitivity_stats.json", "layer_component.parquet",
                "layer_component.csv", "score_histogram.parquet", "score_histogram.csv", "manifest.json",
                "headlines/01_sensitivity.json"}


def test_score_writes_what_notebook_01_writes(tmp_path, run_ctx):
    assert _cli("score", "-o", str(tmp_path / "cli")) == 0
    sensitivity.run(run_ctx, tmp_path / "nb", progress=False)  # the notebook's call
    cli, nb = _files(tmp_path / "cli"), _files(tmp_path / "nb")
    assert set(cli) == set(nb) == PHASE1_FILES  # the cache lies beside the folder a user shares
    assert (tmp_path / ".cli.cache" / "phase1.pt").is_file() and (tmp_path / ".nb.cache" / "phase1.pt").is_file()
    for f in ("top_weights.csv", "sensitivity_stats.json", "layer_component.csv", "score_histogram.csv"):
        assert cli[f] == nb[f], f


def test_results_are_cached_beside_the_folder_and_read_back_without_scoring(tmp_path, run_ctx, monkeypatch):
    first = sensitivity.results(run_ctx, tmp_path / "run", progress=False)
    assert not first.from_cache and (tmp_path / ".run.cache" / "phase1.pt").is_file()
    monkeypatch.setattr(sensitivity, "analyze", lambda *a, **k: pytest.fail("scored again"))
    again = sensitivity.results(run_ctx, tmp_path / "run", progress=False)
    assert again.from_cache
    for m in first.sens.metrics:
        assert again.sens.global_top(m) == first.sens.global_top(m) and again.sens.stats[m] == first.sens.stats[m]
