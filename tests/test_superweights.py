import copy
import hashlib
import json

import pytest
import torch

from critlib import CritlibError
from critlib.evaluate import evaluate
from critlib.sensitivity import analyze
from critlib.superweights import (activation_profile, default_prompt_ids, down_projections, find_super_weights,
                                  rank_in_phase1, super_weight_records, super_weight_study, validate_super_weights)
from tests.conftest import ARCHS, tiny

ROW, COL = 5, 7  # hidden (output) channel, intermediate (input) channel


def digest(model) -> str:
    h = hashlib.sha256()
    for _, p in model.named_parameters():
        h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def planted_llama():
    """tiny-llama with a super weight at layer 0 down_proj[ROW, COL]: input channel COL made huge by scaling
    its gate/up rows, the rest of column COL made small so the spike has that one path."""
    model = tiny("tiny-llama")
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[COL] *= 30
        mlp.up_proj.weight[COL] *= 30
        mlp.down_proj.weight[:, COL] *= 0.01
        mlp.down_proj.weight[ROW, COL] = 1.0  # 50× the init scale
    return model


@pytest.fixture(scope="module")
def heldout():
    return torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(2))


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
    assert [(s.param, s.row, s.col) for s in found] == [("model.layers.0.mlp.down_proj.weight", ROW, COL)]
    s = found[0]
    assert (s.layer, s.out_channel, s.in_channel, s.flat, s.weight) == (0, ROW, COL, ROW * 48 + COL, 1.0)
    assert s.spike_ratio > 50 and s.out_activation == pytest.approx(s.weight * s.in_activation, rel=0.05)


def test_unplanted_random_model_has_none():
    assert find_super_weights(tiny("tiny-llama"), default_prompt_ids()) == []


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


def test_gpt2_conv1d_orientation():
    model = tiny("tiny-gpt2")
    mlp = model.transformer.h[0].mlp
    with torch.no_grad():
        mlp.c_fc.bias[COL] = 20.0  # input channel COL of c_proj ≈ gelu(20) on every token
        mlp.c_proj.weight[COL, :] *= 0.01  # Conv1D weight is [in, out]
        mlp.c_proj.weight[COL, ROW] = 1.0
    found = find_super_weights(model, default_prompt_ids())
    assert len(found) == 1
    s = found[0]
    assert (s.param, s.row, s.col, s.in_channel, s.out_channel) == ("transformer.h.0.mlp.c_proj.weight", COL, ROW,
                                                                    COL, ROW)
    assert s.flat == COL * 32 + ROW and s.weight == 1.0


def test_validation_and_records(heldout):
    model = planted_llama()
    before = digest(model)
    found = find_super_weights(model, default_prompt_ids())
    val = validate_super_weights(model, found, heldout, n_random=2, seed=1, batch_size=2, max_new_tokens=6)
    assert digest(model) == before
    # single ablation equals an independent edit of a deep copy
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.model.layers[0].mlp.down_proj.weight[ROW, COL] = 0.0
    base = evaluate(model, heldout, 2, keep_logprobs=True)
    r = evaluate(clone, heldout, 2, reference=base["logprobs"])
    one = val["single"][0]
    assert one["ppl"] == r["ppl"] and one["kl"] == r["kl"] and one["ppl_ratio"] == r["ppl"] / base["ppl"]
    assert val["joint"]["ppl"] == one["ppl"]  # one weight found: joint = single
    assert val["leave_one_out"][0]["ppl_ratio"] == 1.0 and val["leave_one_out"][0]["kl"] == 0.0
    ctrl = val["random_control"]["single_per_tensor"]["model.layers.0.mlp.down_proj.weight"]
    assert ctrl["n"] == 2 and len(ctrl["values"]) == 2 and ctrl["std"] is not None
    gen = val["generation"]
    assert len(gen["before_ids"]) == len(gen["after_ids"]) == 6 and gen["before"] is None
    recs = super_weight_records(found, val)
    need = {"param", "layer", "row", "col", "weight", "in_activation", "out_activation", "ppl_ratio_when_zeroed",
            "loo_ppl_ratio", "random_ppl_ratio_mean", "random_ppl_ratio_std", "random_n"}
    assert need <= set(recs[0]) and recs[0]["ppl_ratio_when_zeroed"] == one["ppl_ratio"]
    json.dumps(val) and json.dumps(recs)


def test_rank_in_phase1_against_full_sort(heldout):
    model = planted_llama()
    sens = analyze(model, heldout, ["magnitude"], topk_global=200, topk_per_layer=10, progress=False)
    found = find_super_weights(model, default_prompt_ids())
    rec = rank_in_phase1(super_weight_records(found), sens)[0]
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


def test_default_prompt_ids_and_errors():
    ids = default_prompt_ids()
    assert ids.shape[0] == 1 and int(ids[0, 0]) == 0
    with pytest.raises(CritlibError):
        find_super_weights(tiny("tiny-llama"), torch.empty(0, dtype=torch.long))
    with pytest.raises(CritlibError):
        find_super_weights(tiny("tiny-llama"), ids, threshold=0.5)


def test_super_weight_study_takes_explicit_inputs(heldout):
    model = planted_llama()
    before = digest(model)
    out = super_weight_study(model, heldout, batch_size=2, n_random=2, max_new_tokens=4)
    assert digest(model) == before
    assert {"super_weights", "joint", "generation", "random_control", "detection"} <= set(out)
    assert [(r["row"], r["col"]) for r in out["super_weights"]] == [(ROW, COL)]
    assert len(out["detection"]["profile"]) == 2
    json.dumps(out)
