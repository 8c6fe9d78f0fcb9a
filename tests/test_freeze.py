import pytest
import torch
from safetensors.torch import load_file, save_file

from critlib import CritlibError
from critlib.freeze import freeze_weights, load_masks, masks_from_coords, save_masks
from critlib.perturb import select_magnitude
from critlib.scores import token_loss_sum
from tests.conftest import tiny


def train(model, opt, windows, steps=3):
    for _ in range(steps):
        opt.zero_grad()
        token_loss_sum(model, windows).backward()
        opt.step()


def coords(model, k=12):
    return select_magnitude(model, k).to_list()


def test_masks_roundtrip_through_safetensors(tmp_path):
    m = tiny("tiny-llama")
    c = coords(m)
    masks = masks_from_coords(m, c)
    assert sum(int(x.sum()) for x in masks.values()) == len(c)
    assert all(masks[n].reshape(-1)[f] for n, f in c)
    save_masks(masks, tmp_path / "m.safetensors", {"metric": "magnitude"})
    raw = load_file(str(tmp_path / "m.safetensors"))  # sparse: each mask's flat indices
    assert set(raw) == set(masks) and all(raw[n].tolist() == masks[n].reshape(-1).nonzero().reshape(-1).tolist()
                                          for n in masks)
    assert sum(v.numel() for v in raw.values()) == len(c)
    back = load_masks(tmp_path / "m.safetensors")
    assert set(back) == set(masks) and all(torch.equal(back[n], masks[n]) for n in masks)
    save_file({n: v.contiguous() for n, v in masks.items()}, str(tmp_path / "dense.safetensors"))  # older files
    assert all(torch.equal(load_masks(tmp_path / "dense.safetensors")[n], masks[n]) for n in masks)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CritlibError):
        load_masks(tmp_path / "bad.safetensors")
    with pytest.raises(CritlibError):
        masks_from_coords(m, [("nope", 0)])


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
], ids=["sgd_momentum_wd", "adamw_wd"])
def test_masked_weights_do_not_move(make_opt, windows):
    m = tiny("tiny-llama").train()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    masks = masks_from_coords(m, coords(m))
    opt = make_opt(m.parameters())
    with freeze_weights(m, masks, opt):
        train(m, opt, windows)
    for n, p in m.named_parameters():
        if n in masks:
            frozen = masks[n].reshape(-1)
            now, old = p.detach().reshape(-1), before[n].reshape(-1)
            assert torch.equal(now[frozen].view(torch.int32), old[frozen].view(torch.int32))
            assert (now[~frozen] != old[~frozen]).float().mean() > 0.9
    # hooks are gone after the block: the same weights now move
    train(m, opt, windows, steps=1)
    n0 = next(iter(masks))
    assert not torch.equal(dict(m.named_parameters())[n0].detach()[masks[n0]], before[n0][masks[n0]])


def test_without_optimizer_hook_adamw_decay_moves_frozen_weights(windows):
    """Why the optimizer hook exists: zero gradients alone do not stop AdamW's weight decay."""
    m = tiny("tiny-llama").train()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    masks = masks_from_coords(m, coords(m))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    handle = freeze_weights(m, masks)
    train(m, opt, windows, steps=1)
    handle.remove()
    n0 = next(iter(masks))
    p0 = dict(m.named_parameters())[n0].detach()
    assert not torch.equal(p0[masks[n0]], before[n0][masks[n0]])
    # ... while plain SGD (no decay, no momentum) with the gradient hook alone keeps them
    m2 = tiny("tiny-llama").train()
    b2 = {n: p.detach().clone() for n, p in m2.named_parameters()}
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1)
    with freeze_weights(m2, masks):
        train(m2, opt2, windows)
    for n in masks:
        assert torch.equal(dict(m2.named_parameters())[n].detach()[masks[n]], b2[n][masks[n]])


def test_bad_masks_rejected():
    m = tiny("tiny-llama")
    with pytest.raises(CritlibError):
        freeze_weights(m, {"model.norm.weight": torch.zeros(3, dtype=torch.bool)})
    with pytest.raises(CritlibError):
        freeze_weights(m, {"nope": torch.zeros(3, dtype=torch.bool)})
    w = m.model.embed_tokens.weight
    with pytest.raises(CritlibError):  # the tied head and the embedding are one tensor
        freeze_weights(m, {"model.embed_tokens.weight": torch.zeros(w.shape, dtype=torch.bool),
                           "lm_head.weight": torch.zeros(w.shape, dtype=torch.bool)})
