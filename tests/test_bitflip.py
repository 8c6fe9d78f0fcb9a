import struct

import pytest
import torch

from critlib import CritlibError
from critlib.bitflip import (Evaluator, bit_kind, bit_positions, flipped, flips_to_break, random_flips, ranked,
                             single_flips)
from critlib.evaluate import evaluate
from tests.conftest import tiny


def flip_f32(x: float, bit: int) -> float:
    (u,) = struct.unpack("<I", struct.pack("<f", x))
    return struct.unpack("<f", struct.pack("<I", u ^ (1 << bit)))[0]


def test_bit_positions_and_kinds():
    assert bit_positions(torch.float32, ["sign", "exponent"]) == list(range(31, 22, -1))
    assert bit_positions(torch.bfloat16, ["sign", "mantissa_top"]) == [15, 6]
    assert bit_positions(torch.float16, ["all"]) == list(range(15, -1, -1))
    assert bit_positions(torch.float32, ["3", 3]) == [3]
    assert bit_positions(torch.float32, ["exponent_low", "exponent_top", "mantissa_top"]) == [30, 23, 22]
    assert [bit_kind(torch.bfloat16, b) for b in (15, 14, 7, 6)] == ["sign", "exponent", "exponent", "mantissa"]
    with pytest.raises(CritlibError):
        bit_positions(torch.float16, [16])
    with pytest.raises(CritlibError):
        bit_positions(torch.float32, ["exp"])


def test_single_flips_match_an_independent_flip(windows):
    m = tiny("tiny-llama")
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    ev = Evaluator(m, windows[:2], 2)
    name = "model.layers.0.mlp.down_proj.weight"
    cands = [("a", 1, name, 7), ("b", 1, name, 7), ("b", 2, "model.norm.weight", 3)]
    table = single_flips(m, cands, ["sign", "exponent"], ev)
    assert len(table) == 3 * 9 and ev.n_evals == 2 * 9  # the shared weight is measured once
    row = table[(table.selector == "a") & (table.bit == 26)].iloc[0]
    w = float(before[name].reshape(-1)[7])
    assert row.value_after == flip_f32(w, 26) and (row.row, row.col) == (0, 7)
    # independent: a copy of the model with the bit flipped by struct
    other = tiny("tiny-llama")
    with torch.no_grad():
        dict(other.named_parameters())[name].view(-1)[7] = flip_f32(w, 26)
    base = evaluate(other, windows[:2], 2)
    assert row.ppl == pytest.approx(base["ppl"], rel=1e-6)
    assert row.ppl_ratio == pytest.approx(base["ppl"] / ev.base["ppl"], rel=1e-6)
    for n, p in m.named_parameters():
        assert torch.equal(p.detach().view(torch.int32), before[n].view(torch.int32))
    r = ranked(table)
    assert len(r) == 2 * 9
    finite = r.ppl_ratio.fillna(float("inf")).tolist()
    assert finite == sorted(finite, reverse=True)


class CountingEval:
    """ppl = 1 + number of weights of `p` that differ from 1.0: monotone in the number of flips."""

    def __init__(self, p):
        self.p, self.base, self.calls = p, {"ppl": 1.0}, 0

    def __call__(self):
        self.calls += 1
        return {"ppl": 1.0 + float((self.p != 1.0).sum())}


@pytest.mark.parametrize("need", [1, 2, 9, 13, 40])
def test_flips_to_break_finds_the_first_crossing(need):
    model = torch.nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ev = CountingEval(model.weight)
    flips = [("weight", i, 0) for i in range(40)]
    res = flips_to_break(model, flips, ev, factor=float(need) + 1, cap=40)
    # linear reference: the first k with 1 + k ≥ factor · 1
    assert res["n_flips"] == need and res["ppl_at"] >= need + 1 > res["ppl_before"]
    assert (model.weight == 1.0).all()
    res = flips_to_break(model, flips, ev, factor=100.0, cap=40)
    assert res["n_flips"] is None and res["ppl_at_cap"] == 41.0


def test_flipped_restores_and_random_flips_are_seeded():
    m = tiny("tiny-llama")
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    flips = random_flips(m, 50, seed=4)
    assert flips == random_flips(m, 50, seed=4) and flips != random_flips(m, 50, seed=5)
    assert len({(n, f) for n, f, _ in flips}) == 50 and all(0 <= b < 32 for _, _, b in flips)
    with flipped(m, flips + flips[:3]) as n_changed:
        assert n_changed == 50
        changed = sum(int((p.detach().view(torch.int32) != before[n].view(torch.int32)).sum())
                      for n, p in m.named_parameters())
        assert changed == 50
    for n, p in m.named_parameters():
        assert torch.equal(p.detach().view(torch.int32), before[n].view(torch.int32))


def test_flips_carry_intervals_and_share_the_store(windows):
    from critlib.effects import Evaluations, effect, intervention_key
    from critlib.experiments import dose_response
    from critlib.perturb import BitFlip, Selection
    m = tiny("tiny-llama")
    name = "model.layers.0.mlp.down_proj.weight"
    store = Evaluations(m, batch_size=2)
    # Phase 3 flips bit 26 of one weight; the bit-flip table then reads that measurement instead of redoing it
    sel = Selection.from_list([(name, 7)])
    df = dose_response(m, windows[:2], {"one": lambda k, d: sel}, [BitFlip(26)], [1], progress=False, store=store)
    ev = Evaluator(m, windows[:2], 2, store=store)
    table = single_flips(m, [("a", 1, name, 7)], [26, 25], ev)
    assert ev.n_evals == 1  # only bit 25 was new
    row26 = table[table.bit == 26].iloc[0]
    assert row26.ppl_ratio == df.ppl_ratio.iloc[0] and row26.ppl_ratio_lo == df.ppl_ratio_lo.iloc[0]
    assert store.get(intervention_key(sel, BitFlip(26)), windows[:2]) is not None
    # the intervals are effects.effect of the same evaluations, and lie around the point estimate
    row25 = table[table.bit == 25].iloc[0]
    base = evaluate(m, windows[:2], 2, keep_logprobs=True, per_window=True)
    with flipped(m, [(name, 7, 25)]):
        changed = evaluate(m, windows[:2], 2, reference=base["logprobs"], per_window=True)
    want = effect(base, changed)
    for c in ("ppl_ratio", "ppl_ratio_lo", "ppl_ratio_hi", "kl_lo", "kl_hi", "accuracy_delta_hi"):
        assert row25[c] == want[c], c
    assert row25.ppl_ratio_lo <= row25.ppl_ratio <= row25.ppl_ratio_hi and row25.window_set == ev.window_set
    # the un-keyed call (the model as it is) carries the same intervals
    with flipped(m, [(name, 7, 25)]):
        now = ev()
    assert now["ppl_ratio_hi"] == want["ppl_ratio_hi"] and now["kl"] == want["kl"] and ev.n_evals == 2
