"""Super weights: detection yields candidates over several prompts with a relative and an absolute threshold;
confirmation zeroes each alone against a random-weight control, on a tiny model built so that two weights
must matter and one spike does not, and on models where nothing matters."""

import copy
import hashlib
import json

import pytest
import torch

from critlib import CritlibError
from critlib.effects import Evaluations, draws_interval, intervention_key, window_set
from critlib.evaluate import evaluate
from critlib.io import write_json
from critlib.models import PRESETS, make_config, synthetic_model
from critlib.perturb import Selection, Zero
from critlib.sensitivity import analyze
from critlib.superweights import (PROMPTS, SuperWeightConfig, activation_profile, default_prompt_ids,
                                  detection_prompts, down_projections, find_candidates, find_super_weights,
                                  rank_in_phase1, spike_ratios, super_weight_study, verdict)
from tests.conftest import ARCHS, tiny

ROW, COL = 5, 7  # hidden (output) channel, intermediate (input) channel
DOWN0 = "model.layers.0.mlp.down_proj.weight"
# the model where weights matter: a second super weight in the same column, a spike that does not matter
ROW_B, ROW_C, COL_C, D0, T = 9, 13, 11, 0, 42


def digest(model) -> str:
    h = hashlib.sha256()
    for _, p in model.named_parameters():
        h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def planted_llama():
    """tiny-llama with a super weight at layer 0 down_proj[ROW, COL]: input channel COL made huge by scaling
    its gate/up rows, the rest of column COL made small so the spike has that one path. Its output (≈ 70)
    passes both thresholds on most prompts, but nothing reads it: zeroing it does not raise perplexity."""
    model = tiny("tiny-llama")
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[COL] *= 30
        mlp.up_proj.weight[COL] *= 30
        mlp.down_proj.weight[:, COL] *= 0.01
        mlp.down_proj.weight[ROW, COL] = 4.0  # 200× the init scale
    return model


def mattering_llama():
    """A 4-layer tiny Llama whose prediction of token T runs through two super weights, and a spike that
    does not matter. Every token embeds 30 on channel D0 (tied: a constant logit, which softmax ignores); layer
    0 turns it into a huge input channel COL, which down_proj writes to ROW (weight 2.6, the larger) and ROW_B
    (1.5, found once ROW's is zeroed); T's logit reads ROW and ROW_B. Layer 2 turns ROW into a spike on ROW_C,
    which no logit reads (it only dilutes the final norm): zeroing it alone lowers perplexity."""
    model = synthetic_model(make_config(dict(PRESETS["tiny-llama"], num_hidden_layers=4)), seed=0)
    emb, layers = model.model.embed_tokens.weight, model.model.layers
    with torch.no_grad():
        emb[:, D0] = 30.0
        emb[:, ROW_C] = 0.0
        emb[T, ROW], emb[T, ROW_B] = 1.0, 0.5
        for layer, col, src, scale in ((0, COL, D0, 1.0), (2, COL_C, ROW, 2.0)):
            mlp = layers[layer].mlp
            for proj in (mlp.gate_proj, mlp.up_proj):
                proj.weight[col] = 0.0
                proj.weight[col, src] = scale
            mlp.down_proj.weight[:, col] *= 0.01
        layers[0].mlp.down_proj.weight[ROW, COL] = 2.6
        layers[0].mlp.down_proj.weight[ROW_B, COL] = 1.5
        layers[2].mlp.down_proj.weight[ROW_C, COL_C] = 1.0
    return model


def mattering_windows(n: int = 8, length: int = 16) -> torch.Tensor:
    """Windows of token T with a random first token and 10% random tokens."""
    g = torch.Generator().manual_seed(3)
    w = torch.full((n, length), T)
    w[:, 0] = torch.randint(0, 96, (n,), generator=g)
    noise = torch.rand(n, length, generator=g) < 0.1
    w[noise] = torch.randint(0, 96, (int(noise.sum()),), generator=g)
    return w


@pytest.fixture(scope="module")
def heldout():
    return torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def mattering():
    """The study of mattering_llama, with its store, model and windows."""
    model, windows = mattering_llama(), mattering_windows()
    before = digest(model)
    store = Evaluations(model, 4, 0)
    out = super_weight_study(model, windows, config=SuperWeightConfig(sw_random_draws=4), store=store,
                             max_new_tokens=4)
    assert digest(model) == before
    return out, store, model, windows


def _at(out, row, col, param=DOWN0):
    return next(r for r in out["candidates"] if (r["param"], r["row"], r["col"]) == (param, row, col))


# ------------------------------------------------------------------------------------------- detection

@pytest.mark.parametrize("arch", ARCHS)
def test_one_down_projection_per_block(arch):
    model = tiny(arch)
    downs = down_projections(model)
    names = dict(model.named_parameters())
    assert len(downs) == 2 and all(p in names for _, _, p, _ in downs)
    assert [c for *_, c in downs] == [arch == "tiny-gpt2"] * 2


def test_finds_exactly_the_planted_weight():
    model = planted_llama()
    before = digest(model)
    found = find_super_weights(model, default_prompt_ids())
    assert digest(model) == before
    assert [(s.param, s.row, s.col) for s in found] == [(DOWN0, ROW, COL)]
    s = found[0]
    assert (s.layer, s.out_channel, s.in_channel, s.flat, s.weight) == (0, ROW, COL, ROW * 48 + COL, 4.0)
    assert s.spike_ratio > 50 and s.out_activation == pytest.approx(s.weight * s.in_activation, rel=0.05)
    assert s.prompts == (0,) and s.iteration == 0


def test_unplanted_random_model_has_none():
    model = tiny("tiny-llama")
    assert find_super_weights(model, default_prompt_ids()) == []
    assert find_candidates(model, [p["ids"] for p in detection_prompts(None, 8, 96)]) == []


def test_profile_matches_manual_forward():
    model = planted_llama()
    ids = default_prompt_ids()
    seen = {}
    mod = model.model.layers[0].mlp.down_proj
    h = mod.register_forward_hook(lambda m, a, o: seen.update(x=a[0][0].double(), y=o[0].double()))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    b = activation_profile(model, ids)[0]
    y = seen["y"]
    pos, out_ch = divmod(int(y.abs().argmax()), y.shape[1])
    assert (b.position, b.out_channel) == (pos, out_ch) and b.in_channel == int(seen["x"][pos].abs().argmax())
    assert b.out_max == pytest.approx(float(y.abs().max()), rel=1e-6)
    assert b.in_max == pytest.approx(float(seen["x"].abs().max()), rel=1e-6)


def test_gpt2_conv1d_orientation():
    model = tiny("tiny-gpt2")
    mlp = model.transformer.h[0].mlp
    with torch.no_grad():
        mlp.c_fc.bias[COL] = 20.0  # input channel COL of c_proj ≈ gelu(20) on every token
        mlp.c_proj.weight[COL, :] *= 0.01  # Conv1D weight is [in, out]
        mlp.c_proj.weight[COL, ROW] = 3.0
    found = find_super_weights(model, default_prompt_ids())
    assert len(found) == 1
    s = found[0]
    assert (s.param, s.row, s.col, s.in_channel, s.out_channel) == ("transformer.h.0.mlp.c_proj.weight", COL, ROW,
                                                                    COL, ROW)
    assert s.flat == COL * 32 + ROW and s.weight == 3.0


def test_candidates_count_the_prompts_they_spike_on():
    """Each threshold against a direct profile of every prompt: relative (× the median block) and absolute."""
    model = planted_llama()
    prompts = [p["ids"] for p in detection_prompts(None, 8, 96)]
    profiles = [activation_profile(model, p) for p in prompts]

    def expected(ratio, minimum):
        return tuple(i for i, prof in enumerate(profiles)
                     if spike_ratios(prof)[0] >= ratio and prof[0].out_max >= minimum)

    for ratio, minimum in ((10.0, 50.0), (10.0, 0.0), (10.0, 100.0), (1e9, 0.0)):
        found = find_candidates(model, prompts, ratio, minimum)
        want = expected(ratio, minimum)
        assert [c.prompts for c in found] == ([want] if want else []), (ratio, minimum)
    some = expected(10.0, 50.0)
    assert 0 < len(some) < len(prompts)  # the absolute threshold leaves out the prompts where it stays small
    strongest = max(some, key=lambda i: profiles[i][0].out_max)
    c = find_candidates(model, prompts)[0]
    assert c.out_activation == pytest.approx(profiles[strongest][0].out_activation)
    assert c.as_dict()["n_prompts"] == len(some)


def test_detection_prompts_and_errors():
    ids = default_prompt_ids()
    assert ids.shape[0] == 1 and int(ids[0, 0]) == 0
    prompts = detection_prompts(None, 5, 96)
    assert len(prompts) == 5 and prompts[0]["ids"] == ids[0].tolist() and len({tuple(p["ids"]) for p in prompts}) == 5
    assert all(max(p["ids"]) < 20 for p in detection_prompts(None, 3, 20)) and len(PROMPTS) == 8
    with pytest.raises(CritlibError):
        find_super_weights(tiny("tiny-llama"), torch.empty(0, dtype=torch.long))
    for bad in (dict(spike_ratio=0.5), dict(min_activation=-1.0)):
        with pytest.raises(CritlibError):
            find_candidates(tiny("tiny-llama"), ids, **bad)
    for bad in (dict(sw_effect_size=1.0), dict(sw_random_draws=1), dict(sw_prompts=9), dict(sw_spike_ratio=1.0)):
        with pytest.raises(CritlibError):
            SuperWeightConfig(**bad)
    with pytest.raises(CritlibError, match="held-out"):
        super_weight_study(tiny("tiny-llama"), torch.empty(0, 10, dtype=torch.long))


# ------------------------------------------------------------------------------------------- confirmation

def test_verdict_is_the_stated_rule():
    ctrl = {"mean": 1.0, "lo": 0.999, "hi": 1.001}
    assert verdict({"ppl_ratio": 1.2, "ppl_ratio_lo": 1.1}, ctrl, 1.05) == "confirmed"
    assert verdict({"ppl_ratio": 1.04, "ppl_ratio_lo": 1.03}, ctrl, 1.05) == "below the effect size"
    assert verdict({"ppl_ratio": 1.2, "ppl_ratio_lo": 1.0005}, ctrl, 1.05) == "interval overlaps the random control"
    assert verdict({"ppl_ratio": 1.2, "ppl_ratio_lo": 1.1}, dict(ctrl, hi=float("nan")), 1.05) != "confirmed"
    assert verdict({"ppl_ratio": float("inf"), "ppl_ratio_lo": float("inf")}, ctrl, 1.05) == "confirmed"
    assert verdict({"ppl_ratio": 1.01, "ppl_ratio_lo": 1.0}, None, 1.05) == "below the effect size"
    with pytest.raises(CritlibError):
        verdict({"ppl_ratio": 1.2, "ppl_ratio_lo": 1.1}, None, 1.05)


def test_planted_super_weights_are_confirmed_and_the_harmless_spike_stays_a_candidate(mattering):
    out, _, _, _ = mattering
    a, b, c = _at(out, ROW, COL), _at(out, ROW_B, COL), _at(out, ROW_C, COL_C, "model.layers.2.mlp.down_proj.weight")
    assert len(out["candidates"]) == 3 and out["n_candidates"] == 3 and out["n_confirmed"] == 2
    assert a["confirmed"] and a["iteration"] == 0 and a["ppl_ratio_when_zeroed"] > 2
    assert b["confirmed"] and b["iteration"] == 1  # hidden behind the larger one in its column until it is zeroed
    assert not c["confirmed"] and c["verdict"] == "below the effect size" and c["ppl_ratio_when_zeroed"] < 1.05
    assert c["n_prompts"] == 8 and c["iteration"] == 0
    assert c["random_n"] is None and set(out["random_control"]["single_per_tensor"]) == {DOWN0}  # not needed below
    assert [(r["row"], r["col"]) for r in out["super_weights"]] == [(ROW, COL), (ROW_B, COL)]
    for r in out["candidates"]:  # the rule, from the record's own numbers
        rule = r["ppl_ratio_when_zeroed"] >= 1.05 and r["ppl_ratio_when_zeroed_lo"] > r["random_ppl_ratio_hi"]
        assert r["confirmed"] == rule
        assert r["ppl_ratio_when_zeroed_lo"] <= r["ppl_ratio_when_zeroed"] <= r["ppl_ratio_when_zeroed_hi"]
    assert out["joint"]["weights"] == [{"param": DOWN0, "row": ROW, "col": COL, "flat": a["flat"]},
                                       {"param": DOWN0, "row": ROW_B, "col": COL, "flat": b["flat"]}]
    assert out["joint"]["ppl_ratio"] > a["ppl_ratio_when_zeroed"] and out["generation"]["n_zeroed"] == 2


def test_iteration_stops_when_a_round_adds_nothing(mattering):
    out, _, _, _ = mattering
    assert [(r["iteration"], r["new_candidates"], r["new_confirmed"]) for r in out["iterations"]] == \
        [(0, 2, 1), (1, 1, 1), (2, 0, 0)]
    assert out["iterations"][1]["zeroed"] == [[DOWN0, ROW * 48 + COL]] and out["stopped"] == "no new candidate"
    windows = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(2))
    none = super_weight_study(planted_llama(), windows, config=SuperWeightConfig(sw_random_draws=2), batch_size=3,
                              max_new_tokens=2)
    assert none["stopped"] == "no new candidate confirmed" and len(none["iterations"]) == 1
    assert none["n_candidates"] == 1 and none["n_confirmed"] == 0 and none["super_weights"] == []
    assert none["candidates"][0]["verdict"] == "below the effect size" and none["joint"] is None
    assert none["generation"]["before_ids"] == none["generation"]["after_ids"]


def test_random_control_is_same_tensor_draws_with_their_interval(mattering):
    out, store, _, _ = mattering
    ctrl = out["random_control"]["single_per_tensor"][DOWN0]
    assert ctrl["n"] == len(ctrl["values"]) == 4 and out["rule"]["random_draws"] == 4
    assert {k: ctrl[k] for k in ("mean", "lo", "hi", "n")} == draws_interval(ctrl["values"])
    zeroed = {r["key"] for r in out["candidates"]}
    random_keys = [k for k in store.records if k.startswith(f"zero {DOWN0}[") and k.split(" @ ")[0] not in zeroed
                   and "," not in k]
    values = sorted(store.records[k]["ppl_ratio"] for k in random_keys)
    assert sorted(ctrl["values"]) == values  # one same-tensor weight per draw, none of them a candidate
    a = _at(out, ROW, COL)
    assert (a["random_ppl_ratio_lo"], a["random_ppl_ratio_hi"], a["random_n"]) == (ctrl["lo"], ctrl["hi"], 4)
    joint = out["random_control"]["joint"]
    assert joint["n"] == 4 and joint["hi"] < out["joint"]["ppl_ratio_lo"]


def test_effects_come_from_the_store_under_the_shared_keys(mattering):
    out, store, model, windows = mattering
    a = _at(out, ROW, COL)
    key = intervention_key(Selection.from_list([(DOWN0, a["flat"])]), Zero())
    rec = store.records[f"{key} @ {window_set(windows)}"]
    assert a["key"] == key and a["ppl_ratio_when_zeroed"] == rec["ppl_ratio"] and a["ppl_ratio_when_zeroed_lo"] == \
        rec["ppl_ratio_lo"] and a["kl_when_zeroed"] == rec["kl"] and a["positions_when_zeroed"] == rec["positions"]
    clone = copy.deepcopy(model)  # the same number from an independent edit
    with torch.no_grad():
        clone.model.layers[0].mlp.down_proj.weight[ROW, COL] = 0.0
    assert rec["ppl"] == pytest.approx(evaluate(clone, windows, 4)["ppl"], rel=1e-6)
    n = store.n_evaluations  # a second study with the same store evaluates nothing again
    again = super_weight_study(model, windows, config=SuperWeightConfig(sw_random_draws=4), store=store,
                               max_new_tokens=4)
    assert store.n_evaluations == n and again["candidates"] == out["candidates"]
    b = _at(out, ROW_B, COL)  # leave-one-out over the candidates and the joint effects
    others = Selection.from_list([(DOWN0, a["flat"]), ("model.layers.2.mlp.down_proj.weight", ROW_C * 48 + COL_C)])
    assert b["loo_ppl_ratio"] == store.measure(intervention_key(others, Zero()), windows)["ppl_ratio"]
    assert out["joint_candidates"]["n_changed"] == 3 and out["joint"]["n_changed"] == 2
    assert out["baseline"]["window_set"] == window_set(windows) and out["baseline"]["n_windows"] == 8


def test_output_is_json_ready(mattering, tmp_path):
    out, _, _, _ = mattering
    json.dumps(out)
    write_json(tmp_path / "sw.json", out)
    back = json.loads((tmp_path / "sw.json").read_text())
    assert back["candidates"][0]["prompts"] == out["candidates"][0]["prompts"]
    need = {"param", "layer", "row", "col", "flat", "weight", "in_activation", "out_activation", "spike_ratio",
            "n_prompts", "iteration", "confirmed", "verdict", "ppl_ratio_when_zeroed", "ppl_ratio_when_zeroed_lo",
            "ppl_ratio_when_zeroed_hi", "loo_ppl_ratio", "loo_ppl_ratio_lo", "loo_ppl_ratio_hi",
            "random_ppl_ratio_mean", "random_ppl_ratio_lo", "random_ppl_ratio_hi", "random_n"}
    assert all(need <= set(r) for r in back["candidates"])
    assert {"candidates", "super_weights", "joint", "joint_candidates", "iterations", "rule", "random_control",
            "baseline", "generation", "detection"} <= set(back)
    d = back["detection"]
    assert len(d["prompts"]) == 8 and len(d["profiles"]) == 8 and len(d["profile"]) == 4


def test_rank_in_phase1_against_full_sort(heldout):
    model = planted_llama()
    sens = analyze(model, heldout, metrics=["magnitude"], topk_global=200, topk_per_layer=10, progress=False)
    found = find_super_weights(model, default_prompt_ids())
    rec = rank_in_phase1([found[0].as_dict()], sens)[0]
    params = list(model.named_parameters())
    allw = torch.cat([p.detach().reshape(-1).double().abs() for _, p in params])
    offset = sum(p.numel() for n, p in params[:[n for n, _ in params].index(rec["param"])])
    order = torch.sort(-allw, stable=True).indices.tolist()
    rank = order.index(offset + rec["flat"]) + 1
    assert rec["rank_magnitude"] == (rank if rank <= 200 else None)
    outside = rank_in_phase1([dict(rec, flat=0, param="model.layers.1.mlp.down_proj.weight")], sens)[0]
    want = order.index(sum(p.numel() for n, p in params[:[n for n, _ in params].index(
        "model.layers.1.mlp.down_proj.weight")])) + 1
    assert outside["rank_magnitude"] == (want if want <= 200 else None)


def test_none_where_nothing_spikes(heldout):
    model = tiny("tiny-llama")
    before = digest(model)
    out = super_weight_study(model, heldout, batch_size=2, max_new_tokens=4)
    assert digest(model) == before
    assert out["candidates"] == out["super_weights"] == [] and out["joint"] is None and out["joint_candidates"] is None
    assert out["stopped"] == "no new candidate" and out["random_control"] == {"single_per_tensor": {}, "joint": None}
    assert len(out["detection"]["profile"]) == 2
    json.dumps(out)
