"""Phase 1's analysis (`critlib.sensitivity`): per-tensor and global rankings against full sorts, statistics
over every weight against numpy, bottom-K, the safe cache file, `global_topk` against `analyze`, and the checked
settings of `analyze` (AnalyzeConfig)."""

import numpy as np
import pytest
import torch

from critlib import CritlibError
from critlib.params import load_params
from critlib.run.sensitivity import analyze_config
from critlib.scores import score_model
from critlib.sensitivity import AnalyzeConfig, analyze, global_topk
from tests.conftest import tiny
from tests.test_rank import full_sort


def test_per_layer_topk_equals_per_tensor_sort(windows):
    model = tiny("tiny-qwen2")
    res = analyze(model, windows, metrics=["grad_x_weight"], topk_global=50, topk_per_layer=8, progress=False,
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
    res = analyze(model, torch.zeros(1, 4, dtype=torch.long), metrics=["magnitude"], topk_global=5, topk_per_layer=5,
                  bottomk=20, exact_stats=False, progress=False)
    allw = torch.cat([p.detach().abs().reshape(-1) for p in model.parameters()]).double().numpy()
    low = np.sort(allw)[:20]
    assert [s for _, _, s in res.global_bottom("magnitude", 20)] == pytest.approx(low.tolist())


def test_sensitivity_round_trips_through_a_safe_file(tmp_path, windows):
    model = tiny("tiny-gpt2")
    res = analyze(model, windows, metrics=["wanda", "fisher"], topk_global=12, topk_per_layer=3, bottomk=4,
                  progress=False)
    res.save(tmp_path / "s.pt", {"key": "k1"})
    back, extra = type(res).load(tmp_path / "s.pt")
    assert extra == {"key": "k1"}
    for m in res.metrics:
        assert back.global_top(m) == res.global_top(m) and back.global_bottom(m, 4) == res.global_bottom(m, 4)
    assert back.stats == res.stats and back.parts == res.parts and back.gathered == res.gathered


def test_model_statistics_cover_every_weight_and_groups_partition(windows):
    model = tiny("tiny-phi3")
    res = analyze(model, windows, metrics=["grad_squared", "magnitude"], topk_global=10, topk_per_layer=4,
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
    res = analyze(model, windows, metrics=metrics, topk_global=25, topk_per_layer=3, progress=False)
    got = global_topk(model, windows, metrics, 25)
    for m in metrics:
        assert got[m] == res.global_top(m), m
    assert global_topk(model, None, ["magnitude"], 25)["magnitude"] == res.global_top("magnitude")
    with pytest.raises(Exception, match="need scoring windows"):
        global_topk(model, None, ["grad_x_weight"], 5)


@pytest.mark.parametrize("settings, message", [
    ({"metrics": []}, "metrics is empty"),
    ({"metrics": ["gradx"]}, "unknown metric 'gradx'; choose from:"),
    ({"metrics": ["magnitude", "magnitude"]}, "metrics lists a metric twice"),
    ({"metrics": ["magnitude"], "topk_global": 0}, "topk_global=0 must be an integer ≥ 1"),
    ({"metrics": ["magnitude"], "batch_size": 2.5}, "batch_size=2.5 must be an integer ≥ 1"),
    ({"metrics": ["magnitude"], "bottomk": -1}, "bottomk=-1 must be an integer ≥ 0"),
    ({"metrics": ["magnitude"], "kernel": "cuda"}, "unknown kernel 'cuda'; choose auto"),
    ({"metrics": ["magnitude"], "fisher_dtype": torch.float16}, "fisher_dtype=torch.float16 must be"),
    ({"metrics": ["magnitude"], "topk": 5}, "analyze has no setting topk; choose from: metrics, topk_global"),
    ({"topk_global": 5}, "analyze needs metrics"),
])
def test_bad_analyze_settings_are_refused_before_scoring(settings, message):
    with pytest.raises(CritlibError, match=message):
        analyze(tiny("tiny-llama"), torch.zeros(1, 4, dtype=torch.long), **settings)


def test_analyze_config_with_settings_put_over_it(windows):
    """Keywords given with a config replace its fields (checked again); the config itself stays as it was."""
    model = tiny("tiny-llama")
    config = AnalyzeConfig(metrics=["grad_x_weight", "magnitude"], topk_global=12, topk_per_layer=3,
                           exact_stats=False)
    assert config.metrics == ("grad_x_weight", "magnitude") and AnalyzeConfig("magnitude").metrics == ("magnitude",)
    got = analyze(model, windows, config, topk_global=20, bottomk=4, progress=False)
    ref = analyze(model, windows, metrics=["grad_x_weight", "magnitude"], topk_global=20, topk_per_layer=3,
                  exact_stats=False, bottomk=4, progress=False)
    assert config.topk_global == 12 and got.topk_global == 20
    assert got.global_top("magnitude") == ref.global_top("magnitude") and got.stats == ref.stats
    assert got.global_bottom("grad_x_weight", 4) == ref.global_bottom("grad_x_weight", 4)
    assert got.gathered == ref.gathered
    with pytest.raises(CritlibError, match="topk_per_layer=0 must be"):
        analyze(model, windows, config, topk_per_layer=0)
    with pytest.raises(CritlibError, match="third argument is an AnalyzeConfig, not a list; pass metrics by name"):
        analyze(model, windows, ["magnitude"])
    p = load_params(None, ["metrics=wanda,magnitude", "fisher_dtype=bf16", "kernel=torch"])
    assert analyze_config(p, bottomk=3, exact_stats=False) == AnalyzeConfig(
        metrics=("wanda", "magnitude"), fisher_dtype=torch.bfloat16, kernel="torch", bottomk=3, exact_stats=False)


def test_without_gather_the_same_ranking_and_statistics_in_one_pass(windows, monkeypatch):
    import critlib.sensitivity as sensitivity
    model = tiny("tiny-llama")
    config = AnalyzeConfig(metrics=["grad_x_weight", "wanda"], topk_global=12, topk_per_layer=3, exact_stats=False)
    both = analyze(model, windows, config, progress=False)
    passes = []
    real = sensitivity.score_model
    monkeypatch.setattr(sensitivity, "score_model", lambda *a, **kw: passes.append(a[5]) or real(*a, **kw))
    one = analyze(model, windows, config, gather=False, progress=False)
    assert len(passes) == 1 and one.gathered == {"grad_x_weight": {}, "wanda": {}} and both.gathered["wanda"]
    for m in config.metrics:
        assert one.global_top(m) == both.global_top(m) and one.stats[m] == both.stats[m]


@pytest.mark.parametrize("chunk_size", [1 << 30, 96, 29])  # steps that hold whole ranking blocks, and one that does not
def test_the_compiled_summary_and_torchs_path_agree(windows, monkeypatch, chunk_size):
    """analyze with the compiled CPU summary (critlib.kernels.cpu) and with CRITLIB_NATIVE=off: the same
    rankings and histogram-derived statistics; moments equal up to float64 rounding."""
    from critlib.kernels import cpu
    if cpu._load()[0] is None:
        pytest.skip(f"no compiled summary here: {cpu.describe()}")
    model = tiny("tiny-mistral")

    def run():
        return analyze(model, windows, metrics=["grad_x_weight", "magnitude"], topk_global=40, topk_per_layer=6,
                       chunk_size=chunk_size, progress=False)
    native = run()
    monkeypatch.setenv("CRITLIB_NATIVE", "off")
    cpu._load.cache_clear()
    try:
        plain = run()
    finally:
        monkeypatch.delenv("CRITLIB_NATIVE")
        cpu._load.cache_clear()
    for m in native.metrics:
        assert native.global_top(m) == plain.global_top(m)
        for name in native.topk[m].candidates:
            assert all(torch.equal(a, b) for a, b in zip(native.topk[m].per_tensor(name, 6),
                                                         plain.topk[m].per_tensor(name, 6)))
        groups = {"global": native.stats[m]["global"]}
        for scope in ("per_layer", "per_component"):
            groups.update({(scope, k): v for k, v in native.stats[m][scope].items()})
        assert len(groups) > 3
        for g, a in groups.items():
            b = plain.stats[m][g] if g == "global" else plain.stats[m][g[0]][g[1]]
            assert (a["count"], a["min"], a["max"], a["percentiles"], a["exact"]) == \
                   (b["count"], b["min"], b["max"], b["percentiles"], b["exact"]), g
            for key in ("mean", "std", "sum"):
                assert a[key] == pytest.approx(b[key], rel=1e-12, abs=0), (g, key)
