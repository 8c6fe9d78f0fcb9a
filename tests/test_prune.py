import pandas as pd
import pytest
import torch

from critlib import CritlibError
from critlib.prune import Lowest, linear_scores, lowest, prune_masks, pruned, random_scores
from critlib.quantize import linear_weights
from tests.conftest import tiny


def ref_masks(scores, sparsity, mode, order, protect=None):
    """Full stable sort: ascending score, ties by (tensor order, flat index); protected never pruned."""
    masks = {}
    groups = [[n] for n in order] if mode == "per_layer" else [order]
    for group in groups:
        items = []
        for pos, name in enumerate(group):
            flat = scores[name].reshape(-1).tolist()
            prot = set(protect.get(name, torch.empty(0)).tolist()) if protect else set()
            items += [(v, pos, i, name) for i, v in enumerate(flat) if i not in prot]
        items.sort(key=lambda t: (t[0], t[1], t[2]))
        n = int(round(sparsity * sum(scores[nm].numel() for nm in group)))
        for name in group:
            masks[name] = torch.zeros(scores[name].numel(), dtype=torch.bool)
        for _, _, i, name in items[:n]:
            masks[name][i] = True
    return {n: m.reshape(scores[n].shape) for n, m in masks.items()}


def tied_scores(seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = {"a": torch.randint(0, 4, (6, 9), generator=gen).float() / 8,  # heavy ties
         "b": torch.rand(5, 20, generator=gen),
         "c": torch.zeros(3, 7)}  # all tied at 0 (including -0.0 below)
    s["c"][0, 0] = -0.0
    s["b"][1, 1] = 1e-30  # subnormal-ish range
    return s


@pytest.mark.parametrize("mode", ["per_layer", "global"])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.37, 0.5, 0.7])
def test_masks_equal_full_sort(mode, sparsity):
    s = tied_scores()
    order = ["b", "a", "c"]
    got = prune_masks(s, sparsity, mode, order=order)
    ref = ref_masks(s, sparsity, mode, order)
    for n in order:
        assert torch.equal(got[n], ref[n]), n
    if mode == "global":
        assert sum(int(m.sum()) for m in got.values()) == round(sparsity * sum(x.numel() for x in s.values()))
    else:
        assert all(int(got[n].sum()) == round(sparsity * s[n].numel()) for n in order)


def test_one_lowest_serves_every_sparsity_and_mode_and_leaves_the_scores_alone():
    """What score_and_prune does: one `Lowest` per selector asked again and again, each answer the full sort's."""
    s = tied_scores(2)
    before = {n: t.clone() for n, t in s.items()}
    protect = {"a": torch.tensor([3, 7, 11]), "b": torch.tensor([0])}
    order = ["c", "a", "b"]
    for prot in (None, protect):
        ranked = Lowest(s, order, prot)
        for mode in ("global", "per_layer", "global"):
            for sparsity in (0.7, 0.0, 0.25, 0.5):
                got = ranked.prune_masks(sparsity, mode)
                ref = ref_masks(s, sparsity, mode, order, prot)
                assert all(torch.equal(got[n], ref[n]) for n in order), (prot is None, mode, sparsity)
    for n in s:  # -0.0 stays -0.0, the protected scores stay theirs: keys that differ are copies
        assert torch.equal(s[n].view(torch.int32), before[n].view(torch.int32))


def test_protected_never_pruned_and_count_exact():
    s = tied_scores(1)
    protect = {"a": torch.tensor([0, 1, 2, 3, 50]), "c": torch.arange(10)}
    for mode in ("per_layer", "global"):
        got = prune_masks(s, 0.5, mode, protect, order=list(s))
        ref = ref_masks(s, 0.5, mode, list(s), protect)
        for n in s:
            assert torch.equal(got[n], ref[n])
            if n in protect:
                assert not got[n].reshape(-1)[protect[n]].any()
    with pytest.raises(CritlibError):
        prune_masks({"x": torch.rand(10)}, 0.5, "per_layer", {"x": torch.arange(6)})
    with pytest.raises(CritlibError):
        lowest({"x": -torch.rand(4)}, 1)
    with pytest.raises(CritlibError):
        prune_masks(s, 0.5, "rows")


@pytest.mark.parametrize("mode", ["per_layer", "global"])
def test_pruned_model_has_exact_sparsity_protects_and_restores(mode):
    m = tiny("tiny-llama")
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    weights = linear_weights(m)
    scores = {lw.name: lw.param.detach().abs() for lw in weights}
    top = {weights[0].name: torch.topk(scores[weights[0].name].reshape(-1), 5).indices}
    # the protected weights have the highest |w| of their tensor: protect the LOWEST instead, so it matters
    low = {weights[1].name: torch.topk(scores[weights[1].name].reshape(-1), 5, largest=False).indices}
    masks = prune_masks(scores, 0.4, mode, low, [lw.name for lw in weights])
    with pruned(m, weights, masks) as info:
        n_total = sum(lw.param.numel() for lw in weights)
        zeros = sum(int((lw.param == 0).sum()) for lw in weights)
        assert info.n_weights == n_total and info.n_zero == zeros == info.n_masked == info.n_changed
        if mode == "global":
            assert zeros == round(0.4 * n_total)
        else:
            for lw in weights:
                assert int((lw.param == 0).sum()) == round(0.4 * lw.param.numel())
        p1 = dict(m.named_parameters())[weights[1].name].reshape(-1)
        assert torch.equal(p1[low[weights[1].name]], before[weights[1].name].reshape(-1)[low[weights[1].name]])
        assert (dict(m.named_parameters())[weights[0].name].reshape(-1)[top[weights[0].name]] != 0).all()
    for n, p in m.named_parameters():
        assert torch.equal(p.detach().view(torch.int32), before[n].view(torch.int32))


@pytest.mark.parametrize("share", [0.0, 0.5], ids=["values-saved", "tensor-saved"])
def test_pruned_counts_bit_changes_and_restores_signed_zeros(share):
    """Both ways of saving (the masked values, or the whole tensor from a third pruned on) count the same
    changes and put back every bit."""
    m = tiny("tiny-llama")
    weights = linear_weights(m)
    w = weights[0].param
    with torch.no_grad():
        w.view(-1)[:3] = torch.tensor([0.0, -0.0, 1.0])
    before = w.detach().clone()
    mask = torch.zeros(w.shape, dtype=torch.bool)
    mask.view(-1)[:3] = True
    extra = torch.arange(3, w.numel())[torch.randperm(w.numel() - 3, generator=torch.Generator().manual_seed(0))]
    mask.view(-1)[extra[: int(share * w.numel())]] = True
    n = int(mask.sum())
    nonzero_bits = int((before.view(torch.int32)[mask] != 0).sum())  # all but the +0.0
    with pruned(m, weights, {weights[0].name: mask}) as info:
        assert (info.n_masked, info.n_changed) == (n, nonzero_bits)
        assert (w.detach()[mask].view(torch.int32) == 0).all()  # -0.0 became +0.0 too
        assert torch.equal(w.detach()[~mask], before[~mask])
        assert info.n_zero == int((before[~mask] == 0).sum()) + n
    assert torch.equal(w.detach().view(torch.int32), before.view(torch.int32))
    with pytest.raises(CritlibError, match="bool mask shaped like"):
        with pruned(m, weights, {weights[0].name: mask.reshape(-1)[:-1]}):
            pass


def test_linear_scores_magnitude_and_wanda(windows):
    m = tiny("tiny-llama")
    weights = linear_weights(m)
    mag = linear_scores(m, windows, "magnitude", weights)
    assert all(torch.equal(mag[lw.name], lw.param.detach().abs()) for lw in weights)
    wanda = linear_scores(m, windows, "wanda", weights)
    assert list(wanda) == [lw.name for lw in weights]
    # wanda = |w| * ||x_in||: its column ratio to |w| is constant down each column
    w0 = weights[0]
    ratio = wanda[w0.name] / w0.param.detach().abs()
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio), rtol=1e-5)
    r = random_scores(weights, 3)
    assert all(torch.equal(r[k], v) for k, v in random_scores(weights, 3).items())


def test_run_applications_tiny_end_to_end(tmp_path):
    from critlib.applications import ApplicationsConfig, run_applications, selectors
    from critlib.cli import main
    from critlib.params import load_params
    from critlib.run.context import config_from, prepare
    sets = ["model=tiny-llama", "data=random", "seq_len=12", "n_sequences=2", "n_heldout=2", "device=cpu",
            "metrics=[grad_x_weight, wanda]", "quant_group_size=16", "quant_keep_percents=[0, 1]",
            "prune_sparsities=[0.5]", "bitflip_top_n=1", "bitflip_bits=[sign, 30]", "bitflip_cap=8",
            "bitflip_draws=1", "quant_clip_z=3"]
    ctx = prepare(load_params(None, sets))
    before = {n: p.detach().clone() for n, p in ctx.loaded.model.named_parameters()}
    sw = [(linear_weights(ctx.loaded.model)[0].name, 1, 2)]
    out = run_applications(ctx.model, ctx.windows, config_from(ApplicationsConfig, ctx.params), progress=False,
                           superweights=sw)
    sels = selectors(["grad_x_weight", "wanda"])
    assert sels == ["grad_x_weight", "wanda", "magnitude", "random"]
    q, p, b = out["quantization"], out["pruning"], out["bitflip_break"]
    assert len(q) == 1 + len(sels) + 3 and set(q.selector) == set(sels) | {"none", "superweights"}
    assert (q.total_bytes == q.quant_bytes + 6 * q.n_kept).all()
    assert len(p) == 1 + len(sels) * 2 and (p[p["mode"] != "none"].achieved_sparsity == 0.5).all()
    single = out["bitflip_single"]
    assert len(single) == len(sels) * 2 and set(single.bit) == {31, 30}
    assert set(b.order) == {"damage", "random_bits"}
    for df in out.values():
        assert isinstance(df, pd.DataFrame) and len(df)
    for n, prm in ctx.loaded.model.named_parameters():
        assert torch.equal(prm.detach().view(torch.int32), before[n].view(torch.int32))
    rc = main(["prune", "-q", "-o", str(tmp_path)] + [x for s in sets for x in ("--set", s)])
    assert rc == 0 and (tmp_path / "pruning.parquet").is_file() and (tmp_path / "pruning.csv").is_file()
    assert pd.read_parquet(tmp_path / "pruning.parquet").shape == p.shape
