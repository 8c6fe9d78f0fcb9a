import pytest
import torch

from critlib import CritlibError
from critlib.edit import INT_VIEW, as_bits, edit_weights, edited, n_differ

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAN_BITS = {torch.float32: (0x7FC00001, 0x7FC00002), torch.bfloat16: (0x7FC1, 0x7FC2),
            torch.float16: (0x7E01, 0x7E02)}  # two quiet NaNs with different payloads


def raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes()


def awkward(dtype, n=50, seed=0) -> torch.Tensor:
    """Random values plus a +0.0, a -0.0, a NaN with a payload and an inf."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    x[0], x[1], x[3] = 0.0, -0.0, float("inf")
    as_bits(x)[2] = NAN_BITS[dtype][0]
    return x


def params(dtype) -> dict[str, torch.Tensor]:
    return {"a": awkward(dtype, 60, 0).reshape(6, 10), "b": awkward(dtype, 13, 1)}


def brute_changed(before: torch.Tensor, after: torch.Tensor) -> int:
    """Elements whose bytes differ, compared byte by byte (no integer view)."""
    size = before.element_size()
    b = before.detach().contiguous().view(torch.uint8).reshape(-1, size)
    a = after.detach().contiguous().view(torch.uint8).reshape(-1, size)
    return int((a != b).any(1).sum())


def test_int_view_table_matches_every_float_width():
    for dtype in [torch.float64, *DTYPES]:
        t = torch.ones(3, dtype=dtype)
        assert as_bits(t).dtype == INT_VIEW[t.element_size()] and as_bits(t).element_size() == t.element_size()
    assert n_differ(torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0])) == 1
    nan = torch.tensor([NAN_BITS[torch.float32][0]], dtype=torch.int32).view(torch.float32)
    other = torch.tensor([NAN_BITS[torch.float32][1]], dtype=torch.int32).view(torch.float32)
    assert n_differ(nan, nan.clone()) == 0 and n_differ(nan, other) == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_n_changed_equals_a_byte_by_byte_count(dtype):
    ps = params(dtype)
    before = {n: p.clone() for n, p in ps.items()}

    def new(name, p, index, old):
        out = old.clone()
        out[: len(out) // 2] *= 2  # some change (0 and inf stay put)
        if name == "a":
            out[0] = -0.0  # index 0 holds +0.0: a change of bits, not of value
            as_bits(out)[1] = NAN_BITS[dtype][1]  # index 2 holds another NaN payload (it is the 2nd selected)
        return out

    where = {"a": torch.tensor([0, 2, 3, 7, 8, 9, 40]), "b": torch.arange(13)}
    with edited(ps, where, new) as e:
        want = sum(brute_changed(before[n], ps[n]) for n in ps)
        assert e.n_changed == want and e.n_selected == 7 + 13
        assert e.n_changed > 0
    assert all(raw(ps[n]) == raw(before[n]) for n in ps)
    with edited(ps, where, lambda name, p, index, old: old.clone()) as e:  # same bits back, NaNs too
        assert e.n_changed == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_restores_bit_exactly_after_an_exception(dtype):
    ps = params(dtype)
    before = {n: raw(p) for n, p in ps.items()}
    with pytest.raises(RuntimeError, match="boom"):
        with edited(ps, {"a": None, "b": torch.arange(13)}, lambda *_: 1.5, save_on="cpu") as e:
            assert e.n_changed == 60 + 13 and (ps["a"] == 1.5).all()
            raise RuntimeError("boom")
    assert {n: raw(p) for n, p in ps.items()} == before


def test_failing_new_values_put_back_what_was_already_edited():
    ps = params(torch.float32)
    before = {n: raw(p) for n, p in ps.items()}

    def new(name, p, index, old):
        if name == "b":
            raise ValueError("midway")
        return -old

    with pytest.raises(ValueError, match="midway"):
        edit_weights(ps, {"a": torch.arange(10), "b": torch.arange(3)}, new)  # for good, but it fails
    assert {n: raw(p) for n, p in ps.items()} == before
    with pytest.raises(CritlibError, match="expected torch.float32"):
        edit_weights(ps, {"a": torch.arange(10)}, lambda name, p, index, old: old.double())
    assert {n: raw(p) for n, p in ps.items()} == before


def test_duplicate_and_unsorted_indices_edit_each_weight_once():
    ps = params(torch.float16)
    before = ps["a"].clone()
    seen = []

    def new(name, p, index, old):
        seen.append(index.clone())
        return old + 1

    with edited(ps, {"a": [9, 4, 4, 9, 5, 4]}, new) as e:
        assert seen[0].tolist() == [4, 5, 9]
        assert e.n_selected == 3 and e.n_changed == 3
        assert torch.equal(ps["a"].reshape(-1)[[4, 5, 9]], before.reshape(-1)[[4, 5, 9]] + 1)
    assert raw(ps["a"]) == raw(before)


def test_overlapping_edits_and_tied_names_restore_exactly():
    ps = params(torch.bfloat16)
    before = raw(ps["a"])
    with edited(ps, {"a": torch.arange(0, 30)}, lambda *_: 2.0):
        with edited(ps, {"a": torch.arange(20, 60)}, lambda *_: 3.0) as inner:
            assert inner.n_changed == 40
            assert (ps["a"].reshape(-1)[:20] == 2).all() and (ps["a"].reshape(-1)[20:] == 3).all()
        assert (ps["a"].reshape(-1)[:30] == 2).all()
    assert raw(ps["a"]) == before
    tied = {"a": ps["a"], "a_alias": ps["a"]}  # one tensor under two names, edited twice in one call
    with edited(tied, {"a": torch.arange(10), "a_alias": torch.arange(5, 15)}, lambda *_: 7.0) as e:
        assert e.n_selected == 20 and (ps["a"].reshape(-1)[:15] == 7).all()
    assert raw(ps["a"]) == before


def test_empty_selections_touch_nothing():
    ps = params(torch.float32)
    before = {n: raw(p) for n, p in ps.items()}
    calls = []
    where = {"a": torch.empty(0, dtype=torch.long), "b": torch.zeros(13, dtype=torch.bool)}
    with edited(ps, where, lambda *args: calls.append(args)) as e:
        assert (e.n_selected, e.n_changed, e.saved) == (0, 0, [])
    with edited(ps, {"a": []}, lambda *args: calls.append(args)) as e:
        assert e.n_selected == 0
    with edited(ps, {}, lambda *args: calls.append(args)) as e:
        assert e.n_selected == 0
    assert calls == [] and {n: raw(p) for n, p in ps.items()} == before


def test_mask_index_and_whole_tensor_agree():
    ps = params(torch.float32)
    mask = torch.zeros(6, 10, dtype=torch.bool)
    mask[1, 3] = mask[4, 0] = True
    with edited(ps, {"a": mask}, lambda *_: 0.0) as by_mask:
        got_mask = ps["a"].clone()
    with edited(ps, {"a": torch.tensor([13, 40])}, lambda *_: 0.0) as by_index:
        assert torch.equal(as_bits(ps["a"]), as_bits(got_mask))
    assert by_mask.n_changed == by_index.n_changed == 2
    with edited(ps, {"a": None}, lambda name, p, index, w: torch.where(mask, 0.0, w), save_on="cpu") as whole:
        assert torch.equal(as_bits(ps["a"]), as_bits(got_mask))
        assert whole.n_selected == 60 and whole.n_changed == 2
        assert whole.originals["a"].shape == (6, 10) and whole.originals["a"].device.type == "cpu"


def test_snapshot_is_written_back_every_time():
    ps = params(torch.float32)
    before = raw(ps["b"])
    snap = edit_weights(ps, {"b": torch.tensor([1, 2, 3])})
    assert (snap.n_selected, snap.n_changed) == (3, 0)
    for step in range(2):
        with torch.no_grad():
            ps["b"].add_(1.0)
        snap.restore()
        assert torch.equal(as_bits(ps["b"])[1:4], as_bits(awkward(torch.float32, 13, 1))[1:4])
        assert raw(ps["b"]) != before  # only the snapshot region goes back


def test_bad_regions_are_rejected_before_anything_changes():
    lin = torch.nn.Linear(4, 3)
    before = {n: raw(p) for n, p in lin.named_parameters()}
    for where, match in [({"bias": [0], "weight": [12]}, "out of range"), ({"bias": [-1]}, "out of range"),
                         ({"bias": [0], "nope": [0]}, "nope"), ({"bias": torch.tensor([0.5])}, "int64"),
                         ({"weight": torch.zeros(3, dtype=torch.bool)}, "mask")]:
        with pytest.raises(CritlibError, match=match):
            edit_weights(lin, where, lambda *_: 9.0)
        assert {n: raw(p) for n, p in lin.named_parameters()} == before
    t = torch.zeros(4, 3).t()
    with pytest.raises(CritlibError, match="contiguous"):
        edit_weights({"t": t}, {"t": [0]}, lambda *_: 1.0)


def test_edits_a_module_that_requires_grad_without_recording_autograd():
    lin = torch.nn.Linear(4, 3)
    before = raw(lin.weight)
    with edited(lin, {"weight": [0, 11]}, lambda name, p, index, old: old * 3) as e:
        assert e.n_changed == 2 and lin.weight.grad_fn is None and lin.weight.requires_grad
        lin(torch.ones(2, 4)).sum().backward()
    assert raw(lin.weight) == before


def test_restore_follows_a_parameter_whose_data_was_replaced():
    lin = torch.nn.Linear(4, 3)
    snap = edit_weights(lin, {"weight": [0, 5]})
    want = lin.weight.detach().reshape(-1)[[0, 5]].clone()
    lin.weight.data = torch.zeros(3, 4)  # as Module.to() and .half() do
    snap.restore()
    got = lin.weight.detach().reshape(-1)
    assert torch.equal(got[[0, 5]], want) and int((got != 0).sum()) <= 2
