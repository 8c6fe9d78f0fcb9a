"""The applications' domain entry: its selectors, the parts it runs on request, and the reference point that
every table measures against (the unchanged model: ratio 1)."""

import pytest
import torch

from critlib import CritlibError
from critlib.applications import ApplicationsConfig, run_applications, selectors
from critlib.data import Windows
from critlib.params import load_params
from critlib.run.context import config_from
from tests.conftest import tiny


def test_selectors_add_the_baselines_once():
    assert selectors(["fisher", "magnitude"]) == ["fisher", "magnitude", "random"]
    assert selectors(["wanda"]) == ["wanda", "magnitude", "random"]


def test_only_the_parts_asked_for_and_the_reference_is_the_unchanged_model():
    cfg = config_from(ApplicationsConfig, load_params(None, ["metrics=[magnitude]", "prune_sparsities=[0.5]",
                                                            "prune_modes=[global]"]))
    w = torch.randint(0, 96, (4, 10), generator=torch.Generator().manual_seed(2))
    windows = Windows(score=w[:2], heldout=w[2:], source="test", sha256="x")
    tables = run_applications(tiny("tiny-llama"), windows, cfg, progress=False, which=("prune",))
    assert set(tables) == {"pruning"}
    ref = tables["pruning"][tables["pruning"]["kind"] == "reference"]
    assert len(ref) == 1 and float(ref["ppl_ratio"].iloc[0]) == 1.0
    assert set(tables["pruning"]["selector"]) >= {"magnitude", "random"}
    with pytest.raises(CritlibError, match="unknown application"):
        run_applications(tiny("tiny-llama"), windows, cfg, which=("nope",))
