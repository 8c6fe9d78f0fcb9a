import numpy as np
import pytest
import torch

from critlib import CritlibError
from critlib.quantize import (OUTLIER_BYTES, QuantConfig, budget, fake_quantize, keep_sets, kept_originals,
                              linear_weights, quantized, size_bytes)
from tests.conftest import tiny


def ref_quantize(w: np.ndarray, bits: int, g: int, symmetric: bool, clip_z: float) -> np.ndarray:
    """Straightforward float64 per-group RTN, one group at a time along each row (last group may be short)."""
    w = w.astype(np.float64)
    out = np.empty_like(w)
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], g):
            x = w[r, start:start + g]
            if symmetric:
                qmax = 2 ** (bits - 1) - 1
                amax = np.abs(x).max()
                if clip_z:
                    amax = min(amax, clip_z * np.sqrt(np.mean(x * x)))
                s = amax / qmax if amax > 0 else 1.0
                out[r, start:start + g] = np.clip(np.round(x / s), -qmax, qmax) * s
            else:
                levels = 2 ** bits - 1
                lo, hi = x.min(), x.max()
                if clip_z:
                    lo, hi = max(lo, x.mean() - clip_z * x.std()), min(hi, x.mean() + clip_z * x.std())
                s = (hi - lo) / levels if hi > lo else 1.0
                zp = np.round(-lo / s)
                out[r, start:start + g] = (np.clip(np.round(x / s) + zp, 0, levels) - zp) * s
    return out


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip_z", [0.0, 2.0])
def test_matches_float64_reference_on_ragged_groups(bits, symmetric, clip_z):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(13, 67, generator=gen)
    w[2, 5] = 40.0  # an outlier that clipping must cut
    w[4, :16] = 0.0  # an all-zero group
    got = fake_quantize(w, QuantConfig(bits, 16, symmetric, clip_z), chunk_elems=200)  # several row chunks
    ref = ref_quantize(w.numpy(), bits, 16, symmetric, clip_z)
    np.testing.assert_array_equal(got.numpy(), ref.astype(np.float32))
    assert (got[4, :16] == 0).all()
    for r in range(13):  # at most 2**bits levels in every group, the ragged one included
        for start in range(0, 67, 16):
            assert len(set(got[r, start:start + 16].tolist())) <= 2 ** bits


def test_conv1d_orientation_quantizes_along_dim0():
    w = torch.randn(40, 9, generator=torch.Generator().manual_seed(0))
    got = fake_quantize(w, QuantConfig(4, 16), in_dim=0)
    ref = ref_quantize(w.t().numpy(), 4, 16, True, 0.0).T
    np.testing.assert_array_equal(got.numpy(), ref.astype(np.float32))


def test_bf16_is_cast_back_and_bad_config_rejected():
    w = torch.randn(8, 32).to(torch.bfloat16)
    got = fake_quantize(w, QuantConfig(4, 8))
    assert got.dtype == torch.bfloat16
    ref = ref_quantize(w.float().numpy(), 4, 8, True, 0.0)
    np.testing.assert_array_equal(got.float().numpy(), torch.from_numpy(ref).to(torch.bfloat16).float().numpy())
    with pytest.raises(CritlibError):
        fake_quantize(w, QuantConfig(9, 8))
    with pytest.raises(CritlibError):
        fake_quantize(w, QuantConfig(4, 0))


def test_size_bytes():
    assert size_bytes((13, 67), QuantConfig(4, 16)) == 13 * 67 * 4 / 8 + 13 * 5 * 2
    assert size_bytes((13, 67), QuantConfig(3, 16, symmetric=False)) == 13 * 67 * 3 / 8 + 13 * 5 * 3
    assert size_bytes((67, 13), QuantConfig(8, 16), in_dim=0) == 13 * 67 + 13 * 5 * 2
    assert OUTLIER_BYTES == 6


def _bits(model):
    return {n: p.detach().clone().view(torch.int32) for n, p in model.named_parameters()}


def test_linear_weights_excludes_head_and_embedding():
    m = tiny("tiny-mistral")  # untied lm_head
    names = [lw.name for lw in linear_weights(m)]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" not in names
    assert "lm_head.weight" in [lw.name for lw in linear_weights(m, include_head=True)]
    assert [lw.name for lw in linear_weights(m, pattern="mlp")] == [n for n in names if "mlp" in n]
    g = tiny("tiny-gpt2")
    assert {lw.in_dim for lw in linear_weights(g)} == {0}
    with pytest.raises(CritlibError):
        linear_weights(m, pattern="nothing-matches")


def test_quantized_keeps_outliers_restores_super_weights_and_restores_bits():
    m = tiny("tiny-llama")
    before = _bits(m)
    weights = linear_weights(m)
    cfg = QuantConfig(3, 16)
    first = weights[0]
    keep = {first.name: torch.tensor([0, 5, 100])}
    sw = [(weights[1].name, 2, 3)]
    with quantized(m, cfg, weights, keep=keep, restore=sw) as q:
        w0 = first.param.detach()
        expect = fake_quantize(before[first.name].view(torch.float32), cfg)
        orig0 = before[first.name].view(torch.float32)
        assert torch.equal(w0.reshape(-1)[keep[first.name]], orig0.reshape(-1)[keep[first.name]])
        other = torch.ones(w0.numel(), dtype=torch.bool)
        other[keep[first.name]] = False
        assert torch.equal(w0.reshape(-1)[other], expect.reshape(-1)[other])
        assert weights[1].param[2, 3] == before[weights[1].name].view(torch.float32)[2, 3]
        assert q.n_kept == 4 and q.n_weights == sum(lw.param.numel() for lw in weights)
        emb = m.model.embed_tokens.weight
        assert torch.equal(emb.detach().view(torch.int32), before["model.embed_tokens.weight"])
        # a keep set applied on top, then taken back
        extra = {weights[2].name: torch.tensor([7])}
        q_val = weights[2].param.detach().reshape(-1)[7].clone()
        with kept_originals(weights, q, extra):
            assert weights[2].param.reshape(-1)[7] == before[weights[2].name].view(torch.float32).reshape(-1)[7]
        assert weights[2].param.reshape(-1)[7] == q_val
    after = _bits(m)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_quantized_keeps_flat_indices_of_conv1d_weights():
    m = tiny("tiny-gpt2")  # Conv1D weights [in, out], quantized along dim 0
    weights = linear_weights(m)
    lw = weights[0]
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    keep = {lw.name: torch.tensor([0, 3, lw.param.numel() - 1])}
    cfg = QuantConfig(3, 16)
    with quantized(m, cfg, weights, keep=keep, restore=[(lw.name, 1, 2)]) as q:
        want = fake_quantize(before[lw.name], cfg, in_dim=0).reshape(-1)
        flat_kept = torch.tensor([0, 3, lw.param.numel() - 1, lw.param.shape[1] + 2])
        want[flat_kept] = before[lw.name].reshape(-1)[flat_kept]
        assert torch.equal(lw.param.detach().reshape(-1), want) and q.n_kept == 4
        assert q.n_changed == sum(int((p.detach() != before[n]).sum()) for n, p in m.named_parameters())
    assert all(torch.equal(p.detach().view(torch.int32), before[n].view(torch.int32)) for n, p in m.named_parameters())


def test_quantized_restores_on_error():
    m = tiny("tiny-llama")
    before = _bits(m)
    with pytest.raises(RuntimeError):
        with quantized(m, QuantConfig(4, 16)):
            raise RuntimeError("boom")
    assert all(torch.equal(before[n], v) for n, v in _bits(m).items())
    with pytest.raises(CritlibError):
        with quantized(m, QuantConfig(4, 16), restore=[("model.embed_tokens.weight", 0, 0)]):
            pass


def test_keep_sets_equal_full_sort_and_budget():
    gen = torch.Generator().manual_seed(3)
    scores = {"a": torch.randint(0, 5, (7, 11), generator=gen).float(), "b": torch.rand(300, generator=gen)}
    n = {"a": 9, "b": 4}
    got = keep_sets(scores, n)
    for name, s in scores.items():
        flat = s.reshape(-1)
        ref = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[: n[name]]
        assert got[name].tolist() == ref

    class W:
        def __init__(self, name, k):
            self.name, self.param = name, torch.zeros(k)
    assert budget([W("x", 1000), W("y", 30)], 1.0) == {"x": 10, "y": 0}
