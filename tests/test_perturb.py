import hashlib

import numpy as np
import pytest
import torch

from critlib import CritlibError
from critlib.perturb import (BitFlip, Noise, Scale, Selection, SignFlip, TensorMean, Zero, exponent_bits,
                             magnitude_ranking, mantissa_bits, parse_method, perturb, perturbed, select_magnitude,
                             select_random, sign_bit)
from tests.conftest import tiny

METHODS = [Zero(), SignFlip(), Scale(10.0), Noise(1.0, seed=3), TensorMean(), BitFlip(0), BitFlip("sign"),
           BitFlip("exponent"), BitFlip("mantissa")]


def digest(model) -> dict[str, str]:
    return {n: hashlib.sha256(p.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for n, p in model.named_parameters()}


def some_selection(model, n=40, seed=0) -> Selection:
    return select_random(model, n, seed)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_restores_bit_identically_every_method(dtype):
    model = tiny("tiny-llama", dtype=dtype)
    before = digest(model)
    sel = some_selection(model)
    for method in METHODS:
        with perturbed(model, sel, method) as applied:
            assert applied.n_selected == len(sel) == 40
            assert digest(model) != before or applied.n_changed == 0
        assert digest(model) == before, method


def test_restores_on_exception():
    model = tiny("tiny-llama")
    before = digest(model)
    sel = some_selection(model)
    with pytest.raises(RuntimeError, match="boom"):
        with perturbed(model, sel, BitFlip("exponent")) as applied:
            assert applied.n_changed == len(sel)
            raise RuntimeError("boom")
    assert digest(model) == before


def test_restores_when_the_method_fails_midway():
    model = tiny("tiny-llama")
    before = digest(model)
    sel = some_selection(model, 200)

    class Fails:
        name, arg, calls = "fails", None, [0]

        def apply(self, values, param, pname):
            self.calls[0] += 1
            if self.calls[0] == 3:
                raise ValueError("midway")
            return -values

    with pytest.raises(ValueError):
        with perturbed(model, sel, Fails()):
            pass
    assert digest(model) == before
    with pytest.raises(ValueError):
        Fails.calls[0] = 0
        perturb(model, sel, Fails())
    assert digest(model) == before


def test_changes_exactly_the_selected_coordinates():
    model = tiny("tiny-llama")
    orig = {n: p.detach().clone() for n, p in model.named_parameters()}
    sel = Selection.from_list([("model.layers.0.mlp.down_proj.weight", 5), ("model.layers.0.mlp.down_proj.weight", 5),
                               ("model.norm.weight", 3), ("model.embed_tokens.weight", 100)])
    assert len(sel) == 3
    with perturbed(model, sel, Scale(3.0)):
        for n, p in model.named_parameters():
            mask = torch.zeros(p.numel(), dtype=torch.bool)
            if n in sel.coords:
                mask[sel.coords[n]] = True
            new, old = p.detach().reshape(-1), orig[n].reshape(-1)
            assert torch.equal(new[~mask], old[~mask])
            assert torch.equal(new[mask], old[mask] * 3.0)


def test_n_changed_counts_bitwise_changes():
    model = tiny("tiny-llama")
    name = "model.layers.1.mlp.up_proj.weight"
    p = dict(model.named_parameters())[name]
    with torch.no_grad():
        p.view(-1)[:10] = 0.0
    sel = Selection({name: torch.arange(20)})
    with perturbed(model, sel, Zero()) as a:
        assert (a.n_selected, a.n_changed) == (20, 10)
    with perturbed(model, sel, Scale(1.0)) as a:
        assert a.n_changed == 0
    with perturbed(model, sel, Noise(0.5)) as a:  # relative noise leaves zeros at zero
        assert a.n_changed == 10
    with perturbed(model, Selection(), Zero()) as a:
        assert (a.n_selected, a.n_changed) == (0, 0)


def test_method_values():
    model = tiny("tiny-llama")
    name = "model.layers.0.self_attn.q_proj.weight"
    p = dict(model.named_parameters())[name]
    idx = torch.tensor([0, 7, 99])
    sel = Selection({name: idx})
    w = p.detach().reshape(-1)[idx].clone()
    cases = [(Zero(), torch.zeros(3)), (SignFlip(), -w), (Scale(-2.5), w * -2.5),
             (TensorMean(), torch.full((3,), p.detach().double().mean().item()))]
    for method, want in cases:
        with perturbed(model, sel, method):
            assert torch.equal(p.detach().reshape(-1)[idx], want.float()), method
    with perturbed(model, sel, Noise(0.3, seed=5)):
        a = p.detach().reshape(-1)[idx].clone()
    with perturbed(model, sel, Noise(0.3, seed=5)):
        b = p.detach().reshape(-1)[idx].clone()
    with perturbed(model, sel, Noise(0.3, seed=6)):
        c = p.detach().reshape(-1)[idx].clone()
    assert torch.equal(a, b) and not torch.equal(a, c)
    z = (a.double() - w.double()) / (0.3 * w.double().abs())
    assert z.abs().max() < 6 and not torch.allclose(z, torch.zeros_like(z))


def test_bit_positions():
    assert sign_bit(torch.float32) == 31 and sign_bit(torch.bfloat16) == 15 and sign_bit(torch.float16) == 15
    assert exponent_bits(torch.float32) == list(range(23, 31))
    assert exponent_bits(torch.bfloat16) == list(range(7, 15))
    assert exponent_bits(torch.float16) == list(range(10, 15))
    assert mantissa_bits(torch.float16) == list(range(10))
    assert BitFlip("exponent").position(torch.float32) == 30 and BitFlip("mantissa").position(torch.bfloat16) == 6
    with pytest.raises(CritlibError):
        BitFlip(16).position(torch.float16)


def test_sign_bitflip_is_negation_fp32():
    model = tiny("tiny-llama")
    name = "model.layers.0.mlp.gate_proj.weight"
    p = dict(model.named_parameters())[name]
    sel = Selection({name: torch.arange(p.numel())})
    w = p.detach().clone()
    with perturbed(model, sel, BitFlip(31)) as a:
        assert torch.equal(p.detach(), -w) and a.n_changed == p.numel()


@pytest.mark.parametrize("dtype,np_uint", [("fp32", np.uint32), ("bf16", np.uint16), ("fp16", np.uint16)])
@pytest.mark.parametrize("bit", ["exponent", "mantissa", 0, 12])
def test_bitflip_matches_numpy_reference(dtype, np_uint, bit):
    model = tiny("tiny-llama", dtype=dtype)
    name = "model.layers.1.self_attn.v_proj.weight"
    p = dict(model.named_parameters())[name]
    idx = torch.tensor([1, 2, 30, 31, 200])
    pos = BitFlip(bit).position(p.dtype)
    raw = p.detach().reshape(-1)[idx].clone().view(torch.int16 if np_uint == np.uint16 else torch.int32)
    want = raw.numpy().view(np_uint) ^ np_uint(1 << pos)
    with perturbed(model, Selection({name: idx}), BitFlip(bit)) as a:
        got = p.detach().reshape(-1)[idx].clone().view(raw.dtype).numpy().view(np_uint)
        assert a.n_changed == 5
    np.testing.assert_array_equal(got, want)
    if dtype == "fp32" and bit == "exponent":  # the top exponent bit of a small weight: ×2^128
        w = p.detach().reshape(-1)[idx].double()
        np.testing.assert_array_equal(got.view(np.float32).astype(np.float64), (w * 2.0 ** 128).numpy())


def test_selection_helpers():
    a = Selection.from_list([("x", 3), ("x", 1), ("y", 2)])
    b = Selection.from_list([("x", 3), ("z", 0)])
    u = a.union(b)
    assert len(a) == 3 and len(u) == 4
    assert u.coords["x"].tolist() == [1, 3] and u.coords["x"].dtype == torch.int64
    assert ("z", 0) in u and ("z", 1) not in u
    assert sorted(u.to_list()) == [("x", 1), ("x", 3), ("y", 2), ("z", 0)]
    assert len(Selection({"x": torch.empty(0, dtype=torch.long)})) == 0


def test_bad_selection_names_tied_alias():
    model = tiny("tiny-llama")
    with pytest.raises(CritlibError, match="tied to model.embed_tokens.weight"):
        with perturbed(model, Selection.from_list([("lm_head.weight", 0)]), Zero()):
            pass
    with pytest.raises(CritlibError, match="out of range"):
        with perturbed(model, Selection.from_list([("model.norm.weight", 32)]), Zero()):
            pass


def test_perturb_applies_for_good():
    model = tiny("tiny-llama")
    sel = Selection.from_list([("model.norm.weight", 0)])
    assert perturb(model, sel, Zero()) == 1
    assert float(dict(model.named_parameters())["model.norm.weight"].detach()[0]) == 0.0


def test_parse_method():
    assert parse_method("zero") == Zero() and parse_method("scale:10") == Scale(10.0)
    assert parse_method("noise:1.0") == Noise(1.0) and parse_method("noise:0.5:7") == Noise(0.5, 7)
    assert parse_method("bitflip:exponent") == BitFlip("exponent") and parse_method("bitflip:3") == BitFlip(3)
    assert parse_method("mean") == TensorMean() and parse_method("sign_flip") == SignFlip()
    assert [parse_method(s).name for s in ("zero", "sign_flip", "scale:2", "noise:1", "mean", "bitflip:sign")] == \
        ["zero", "sign_flip", "scale", "noise", "mean", "bitflip"]
    for bad in ("", "nope", "scale", "scale:x", "zero:1", "noise:-1", "bitflip:foo", "bitflip:99"):
        with pytest.raises(CritlibError):
            parse_method(bad)


def test_select_random_properties():
    model = tiny("tiny-llama")
    params = list(model.named_parameters())
    total = sum(p.numel() for _, p in params)
    a, b = select_random(model, 500, seed=1), select_random(model, 500, seed=1)
    assert len(a) == 500 and a.to_list() == b.to_list()
    assert select_random(model, 500, seed=2).to_list() != a.to_list()
    small = set(select_random(model, 100, seed=1).to_list())
    assert small <= set(a.to_list())  # nested over k for one seed
    full = select_random(model, total, seed=4)
    assert len(full) == total  # every weight exactly once
    only = select_random(model, 20, seed=0, params=["model.norm.weight"])
    assert list(only.coords) == ["model.norm.weight"] and len(only) == 20
    # uniform: each weight's selection frequency over many seeds is close to k/total
    k, n_seeds = total // 4, 60
    counts = torch.zeros(total)
    offsets = {n: o for n, o in zip([n for n, _ in params],
                                    np.cumsum([0] + [p.numel() for _, p in params])[:-1].tolist())}
    for s in range(n_seeds):
        for n, idx in select_random(model, k, seed=100 + s).coords.items():
            counts[offsets[n] + idx] += 1
    freq = counts / n_seeds
    assert abs(freq.mean().item() - k / total) < 1e-9
    per_param = [freq[o:o + p.numel()].mean().item() for (n, p), o in zip(params, offsets.values())]
    assert all(abs(f - 0.25) < 0.03 for f in per_param)
    assert freq.std().item() < 2 * (0.25 * 0.75 / n_seeds) ** 0.5


def test_select_random_too_many():
    model = tiny("tiny-llama")
    with pytest.raises(CritlibError):
        select_random(model, 33, seed=0, params=["model.norm.weight"])


@pytest.mark.parametrize("largest", [True, False])
def test_select_magnitude_equals_full_sort(largest):
    model = tiny("tiny-gpt2")
    with torch.no_grad():  # plant exact ties across and within tensors
        for _, p in list(model.named_parameters())[:4]:
            p.view(-1)[:3] = 0.5 if largest else 0.0
    params = list(model.named_parameters())
    allw = torch.cat([p.detach().reshape(-1).double().abs() for _, p in params])
    names = [(n, f) for n, p in params for f in range(p.numel())]
    order = torch.sort(allw if not largest else -allw, stable=True).indices
    for k in (1, 7, 300):
        want = [names[i] for i in order[:k].tolist()]
        got = [(n, f) for n, f, _ in magnitude_ranking(model, k, largest)]
        assert got == want
        assert sorted(select_magnitude(model, k, largest).to_list()) == sorted(want)
