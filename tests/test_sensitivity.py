"""Phase 1's analysis (`critlib.sensitivity`): per-tensor and global rankings against full sorts, statistics
over every weight against numpy, bottom-K, the safe cache file, and `global_topk` against `analyze`."""

import numpy as np
import pytest
import torch

from critlib.scores import score_model
from critlib.sensitivity import analyze, global_topk
from tests.conftest import tiny
from tests.test_rank import full_sort


def test_per_layer_topk_equals_per_tensor_sort(windows):
    model = tiny("tiny-qwen2")
    res = analyze(model, windows, ["grad_x_weight"], topk_global=50, topk_per_layer=8, progress=False,
                  chunk_size=29)
    seen = {}
    score_model(model, windows, ["grad_x_weight"], lambda m, n, s: seen.__setitem__(n, s.reshape(-1).clone()),
                progress=False)
    for name, s in seen.items():
        v, i = res.topk["grad_x_weight"].per_tensor(name, 8)
        ref = full_sort(s.numpy())[:8]
        assert i.tolist() == ref.tolist(), name


def test_bottom_k_is_lowest_scores():
    model = tiny("tiny-llama")
    res = analyze(model, torch.zeros(1, 4, dtype=torch.long), ["magnitude"], topk_global=5, topk_per_layer=5,
                  bottomk=20, exact_stats=False, progress=False)
    allw = torch.cat([p.detach().abs().reshape(-1) for p in model.parameters()]).double().numpy()
    low = np.sort(allw)[:20]
    assert [s for _, _, s in res.global_bottom("magnitude", 20)] == pytest.approx(low.tolist())


def test_sensitivity_round_trips_through_a_safe_file(tmp_path, windows):
    model = tiny("tiny-gpt2")
    res = analyze(model, windows, ["wanda", "fisher"], topk_global=12, topk_per_layer=3, bottomk=4, progress=False)
    res.save(tmp_path / "s.pt", {"key": "k1"})
    back, extra = type(res).load(tmp_path / "s.pt")
    assert extra == {"key": "k1"}
    for m in res.metrics:
        assert back.global_top(m) == res.global_top(m) and back.global_bottom(m, 4) == res.global_bottom(m, 4)
    assert back.stats == res.stats and back.parts == res.parts and back.gathered == res.gathered


def test_model_statistics_cover_every_weight_and_groups_partition(windows):
    model = tiny("tiny-phi3")
    res = analyze(model, windows, ["grad_squared", "magnitude"], topk_global=10, topk_per_layer=4,
                  progress=False, chunk_size=101)
    everything = {}
    score_model(model, windows, ["grad_squared", "magnitude"],
                lambda m, n, s: everything.setdefault(m, []).append(s.reshape(-1).double()), progress=False)
    total = sum(p.numel() for p in model.parameters())
    for m in ("grad_squared", "magnitude"):
        st = res.stats[m]
        x = torch.cat(everything[m]).numpy()
        assert st["global"]["count"] == total == len(x)
        assert st["global"]["percentiles"]["99"] == pytest.approx(np.percentile(x, 99), rel=1e-12)
        assert sum(v["count"] for v in st["per_layer"].values()) == total
        assert sum(v["count"] for v in st["per_component"].values()) == total
        # Phi-3's fused qkv_proj and gate_up_proj are split into their parts
        assert {"attn_q", "attn_k", "attn_v", "mlp_gate", "mlp_up"} <= set(st["per_component"])


def test_global_topk_ranks_as_analyze_does(windows):
    model = tiny("tiny-llama")
    metrics = ["grad_x_weight", "magnitude", "wanda"]
    res = analyze(model, windows, metrics, topk_global=25, topk_per_layer=3, progress=False)
    got = global_topk(model, windows, metrics, 25)
    for m in metrics:
        assert got[m] == res.global_top(m), m
    assert global_topk(model, None, ["magnitude"], 25)["magnitude"] == res.global_top("magnitude")
    with pytest.raises(Exception, match="need scoring windows"):
        global_topk(model, None, ["grad_x_weight"], 5)
