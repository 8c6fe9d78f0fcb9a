"""Per-tensor and global top-K equal full sorts, ties broken by (param order, flat index)."""

import numpy as np
import pytest
import torch

from critlib.rank import TopK, topk_chunked, topk_exact
from critlib.scores import score_model
from tests.conftest import tiny


def full_sort(values: np.ndarray) -> np.ndarray:
    """Indices of `values` by value descending, index ascending (numpy's stable sort of the negation)."""
    return np.argsort(-values.astype(np.float64), kind="stable")


@pytest.mark.parametrize("n,k,chunk", [(1000, 10, 1 << 20), (1000, 10, 7), (997, 50, 64), (13, 13, 4), (67, 1, 5)])
def test_topk_chunked_equals_full_sort_with_ties(n, k, chunk):
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randint(0, 20, (n,), generator=gen).float()  # heavy ties
    v, i = topk_chunked(x, k, chunk_size=chunk)
    ref = full_sort(x.numpy())[:k]
    assert i.tolist() == ref.tolist()
    assert torch.equal(v, x[ref])


@pytest.mark.parametrize("kind", ["increasing", "decreasing", "negated_zeros", "random"])
@pytest.mark.parametrize("chunk", [1, 3, 100, 1 << 20])
def test_streamed_topk_equals_full_sort(kind, chunk):
    """Steps whose values keep rising (every step replaces candidates), falling (none after the first), and
    negated scores full of -0.0 (the bottom-k path) give a full sort's answer."""
    gen = torch.Generator().manual_seed(chunk)
    x = {"increasing": torch.arange(500.0), "decreasing": torch.arange(500.0).flip(0),
         "negated_zeros": -torch.cat([torch.zeros(300), torch.rand(200, generator=gen)])[torch.randperm(500, generator=gen)],
         "random": torch.randn(500, generator=gen)}[kind]
    for k in (1, 17, 500):
        v, i = topk_chunked(x, k, chunk_size=chunk)
        ref = full_sort(x.numpy())[:k]
        assert i.tolist() == ref.tolist(), (kind, k)
        assert torch.equal(v, x[ref])


@pytest.mark.parametrize("kind", ["increasing", "random", "ties", "zeros"])
@pytest.mark.parametrize("chunk", [100, 1 << 20])
def test_block_maxima_path_equals_full_sort(kind, chunk):
    """Tensors with many blocks per k take the block-maxima path: a partial last block holding the largest
    values, heavy ties (a few distinct values) and all-equal values (the fallback) included."""
    n = 100_003
    gen = torch.Generator().manual_seed(n)
    x = {"increasing": torch.arange(float(n)), "random": torch.randn(n, generator=gen),
         "ties": torch.randint(0, 50, (n,), generator=gen).float(), "zeros": torch.zeros(n)}[kind]
    for k in (1, 50, 700):
        v, i = topk_chunked(x, k, chunk_size=chunk)
        ref = full_sort(x.numpy())[:k]
        assert i.tolist() == ref.tolist(), (kind, k)
        assert torch.equal(v, x[ref])


@pytest.mark.parametrize("kind", ["increasing", "decreasing", "random", "ties", "spikes", "zeros"])
def test_grouped_block_maxima_path_equals_full_sort(kind):
    """With ≥ 4k groups of BLOCK blocks, τ is looked for only in the groups that reach the k-th largest group
    maximum: the largest values at either end (the last, partial group), few distinct values, all the
    largest values in one group, and all-equal values (the fallback)."""
    n = 1_500_007
    gen = torch.Generator().manual_seed(n)
    x = {"increasing": torch.arange(float(n)), "decreasing": torch.arange(float(n)).flip(0),
         "random": torch.randn(n, generator=gen), "ties": torch.randint(0, 400, (n,), generator=gen).float(),
         "spikes": torch.rand(n, generator=gen), "zeros": torch.zeros(n)}[kind]
    if kind == "spikes":
        x[70_000:70_300] = 2 + torch.rand(300, generator=gen)
    for k in (1, 37, 300):
        v, i = topk_chunked(x, k)
        ref = full_sort(x.numpy())[:k]
        assert i.tolist() == ref.tolist(), (kind, k)
        assert torch.equal(v, x[ref])


@pytest.mark.parametrize("kind", ["increasing", "random", "ties"])
def test_untrimmed_candidates_as_on_a_gpu_give_the_same_topk(kind):
    from critlib.rank import _candidates
    n = 10_007
    gen = torch.Generator().manual_seed(2)
    x = {"increasing": torch.arange(float(n)), "random": torch.randn(n, generator=gen),
         "ties": torch.randint(0, 3000, (n,), generator=gen).float()}[kind]  # about 3 copies of each value
    for k in (1, 40):
        ref = full_sort(x.numpy())[:k]
        for trim in (True, False):
            found = _candidates(x, k, 320, trim=trim)
            assert found is not None and len(found[0]) < n // 4
            v, i = topk_exact(found[1], k)
            assert found[0][i].tolist() == ref.tolist(), (kind, k, trim)


def test_topk_exact_offset_and_k_larger_than_tensor():
    x = torch.tensor([1.0, 3.0, 3.0, 2.0])
    v, i = topk_exact(x, 10, offset=100)
    assert i.tolist() == [101, 102, 103, 100] and v.tolist() == [3.0, 3.0, 2.0, 1.0]


def test_global_topk_equals_full_sort_over_model():
    model = tiny("tiny-mistral")
    with torch.no_grad():  # coarse weights make many exact ties across and within tensors
        for p in model.parameters():
            p.copy_((p * 50).round() / 50)
    names = [n for n, _ in model.named_parameters()]
    tk = TopK(300, chunk_size=37)
    allv, allkey = [], []

    def emit(metric, name, s):
        tk.add(name, s)
        allv.append(s.reshape(-1).double())
        allkey.extend((names.index(name), j) for j in range(s.numel()))

    score_model(model, torch.zeros(1, 2, dtype=torch.long), ["magnitude"], emit, progress=False)
    vals = torch.cat(allv).numpy()
    # emission order is model order here, so a stable sort on -value gives the (param, index) tie-break
    order = full_sort(vals)[:300]
    ref = [(names[allkey[j][0]], allkey[j][1]) for j in order]
    got = tk.global_topk(300, names)
    assert [(n, f) for n, f, _ in got] == ref
    assert [s for _, _, s in got] == pytest.approx(vals[order].tolist())


@pytest.mark.parametrize("kind", ["normal", "ties", "negative", "zeros", "signed_zeros"])
def test_prefiltered_topk_equals_full_sort(kind):
    """Large float32 inputs take the bit-histogram prefilter; it must not change the answer."""
    g = torch.Generator().manual_seed(7)
    n = 300_000
    x = {"normal": torch.randn(n, generator=g),
         "ties": torch.randint(0, 50, (n,), generator=g).float() * 0.25,
         "negative": -torch.rand(n, generator=g),
         "zeros": torch.where(torch.rand(n, generator=g) < 0.999, torch.tensor(-0.0), torch.tensor(0.0)),
         "signed_zeros": torch.cat([torch.full((n // 2,), -0.0), torch.zeros(50), -torch.rand(n // 2, generator=g)])}[kind]
    for k in (1, 100, 3000):
        v, i = topk_exact(x, k)
        ref = full_sort(x.numpy())[:k]
        assert i.tolist() == ref.tolist(), (kind, k)
        assert torch.equal(v, x[ref])
