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


def test_protected_pruning_never_touches_each_metrics_global_top_k(monkeypatch):
    """prune_protect_k > 0: per point, one more row per metric, whose masks (recorded as `pruned` gets them)
    are the full sort's with that metric's exact global top-k (Phase 1's) left out, and prune as many weights."""
    import critlib.applications as apps
    from critlib.prune import linear_scores
    from critlib.quantize import linear_weights
    from critlib.sensitivity import analyze
    from tests.test_prune import ref_masks
    cfg = config_from(ApplicationsConfig, load_params(None, ["metrics=[grad_x_weight]", "prune_sparsities=[0.3]",
                                                            "prune_protect_k=300"]))
    model = tiny("tiny-llama")
    w = torch.randint(0, 96, (4, 10), generator=torch.Generator().manual_seed(3))
    windows = Windows(score=w[:2], heldout=w[2:], source="test", sha256="x")
    sens = analyze(model, windows.score, metrics=["grad_x_weight"], topk_global=300, topk_per_layer=4,
                   progress=False)
    seen = []
    real = apps.pruned

    def recording(model_, weights, masks):
        seen.append({n: m.clone() for n, m in masks.items()})
        return real(model_, weights, masks)
    monkeypatch.setattr(apps, "pruned", recording)
    table = run_applications(model, windows, cfg, sens, progress=False, which=("prune",))["pruning"]
    rows = table[table["kind"] != "reference"].reset_index(drop=True)
    masks = seen[1:]  # the first is the reference point's (nothing pruned)
    assert len(rows) == len(masks) == len(apps.selectors(cfg.metrics)) * 2 * 2  # 2 modes, unprotected + top300
    weights = linear_weights(model)
    order = [lw.name for lw in weights]
    protect = {}
    for name, flat, _ in sens.global_top("grad_x_weight", 300):
        if name in order:
            protect.setdefault(name, []).append(flat)
    protect = {n: torch.tensor(v) for n, v in protect.items()}
    assert sum(len(v) for v in protect.values()) >= 20  # enough of the top-300 fall in the pruned weights
    for i, row in rows.iterrows():
        scores = (linear_scores(model, windows.score, row["selector"], weights) if row["selector"] != "random"
                  else apps.random_scores(weights, cfg.seed))
        prot = protect if row["protected"] else None
        assert row["protected"] in ("", "top300:grad_x_weight")
        ref = ref_masks(scores, 0.3, row["mode"], order, prot)
        assert all(torch.equal(masks[i][n], ref[n]) for n in order), (row["selector"], row["mode"], row["protected"])
        assert row["n_masked"] == sum(int(m.sum()) for m in ref.values())
