"""The fused kernels (Triton under TRITON_INTERPRET=1 on the CPU, and the torch reference) against float64
numpy brute force, a full sort, and critlib.stats."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before critlib.kernels.triton_fused is first imported

import numpy as np
import pytest
import torch

from critlib import CritlibError
from critlib.kernels import Backend, block_partials, fused, is_triton_available, reduce, resolve_backend
from critlib.bins import N_BINS
from critlib.stats import Stats

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not is_triton_available("cpu"), reason="triton not installed"))]


def _data(n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, generator=gen) * 0.05).to(dtype)
    g = (torch.randn(n, generator=gen) * 1e-3).to(dtype)
    return w, g


def _np_scores(w, g, metric):
    w32, g32 = w.float().numpy(), g.float().numpy()
    if metric == "grad_x_weight":
        return np.abs(g32 * w32)
    if metric == "grad_squared":
        return g32 * g32
    if metric == "score":
        return w32
    return np.abs(w32)


def _brute(s, block):
    """Per-block statistics and histogram in float64 numpy."""
    nb = -(-len(s) // block)
    blocks = [s[i * block:(i + 1) * block].astype(np.float64) for i in range(nb)]
    hi = (s.view(np.int32) >> 16).astype(np.int64)
    return {"count": np.array([len(b) for b in blocks]), "sum": np.array([b.sum() for b in blocks]),
            "m2": np.array([((b - b.mean()) ** 2).sum() for b in blocks]),
            "min": np.array([b.min() for b in blocks]), "max": np.array([b.max() for b in blocks]),
            "hist_count": np.bincount(hi, minlength=N_BINS)}


def _sorted_topk(s, k):
    order = np.lexsort((np.arange(len(s)), -s.astype(np.float64)))[:k]
    return s[order], order


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["grad_x_weight", "grad_squared", "magnitude", "score"])
@pytest.mark.parametrize("n", [13, 67, 1000, 4097])
def test_partials_match_brute_force(backend, dtype, metric, n):
    w, g = _data(n, dtype, seed=n)
    if metric == "score":
        w = w.abs()
    p = block_partials(w, g, metric, backend, block=256)
    ref = _brute(_np_scores(w, g, metric), 256)
    for key in ("count", "min", "max", "hist_count"):
        np.testing.assert_array_equal(getattr(p, key).double().numpy(), ref[key], err_msg=key)
    for key in ("sum", "m2"):
        np.testing.assert_allclose(getattr(p, key).numpy(), ref[key], rtol=1e-10, atol=1e-300, err_msg=key)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_awkward_size_triton_equals_torch(backend):
    w, g = _data(100_003, torch.bfloat16, seed=5)
    a = block_partials(w, g, "grad_x_weight", "torch")
    b = block_partials(w, g, "grad_x_weight", backend)
    for key in ("count", "min", "max", "hist_count"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    for key in ("sum", "m2"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 7, 100, 5000])
def test_topk_equals_full_sort_with_ties(backend, k):
    gen = torch.Generator().manual_seed(k)
    w = torch.randint(-4, 5, (3001,), generator=gen).float() / 4  # few distinct values: ties everywhere
    g = torch.ones(3001)
    f = fused(w, g, "grad_x_weight", k, backend, block=64)
    v, i = _sorted_topk(_np_scores(w, g, "grad_x_weight"), k)
    np.testing.assert_array_equal(f.values.numpy(), v)
    np.testing.assert_array_equal(f.index.numpy(), i)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_chunks_equal_one_chunk_and_full_sort(backend, dtype):
    """Chunking (what makes > 2**31 elements work) forced down to 3 blocks gives the same answer."""
    w, g = _data(10_007, dtype, seed=2)
    one = fused(w, g, "grad_x_weight", 50, backend, block=64, chunk=1 << 20)
    many = fused(w, g, "grad_x_weight", 50, backend, block=64, chunk=3 * 64)
    for key in ("count", "sum", "m2", "min", "max", "hist_count"):
        torch.testing.assert_close(getattr(one.partials, key), getattr(many.partials, key), rtol=1e-12, atol=0)
    v, i = _sorted_topk(_np_scores(w, g, "grad_x_weight"), 50)
    np.testing.assert_array_equal(many.values.numpy(), v)
    np.testing.assert_array_equal(many.index.numpy(), i)


def test_topk_when_few_blocks_are_nonzero():
    """Mostly-zero scores (an embedding's unseen rows): the k-th block maximum is 0 and every block is a
    candidate; the result is still the exact sorted top-k."""
    w = torch.ones(5000)
    g = torch.zeros(5000)
    g[[17, 4000, 4001]] = torch.tensor([2.0, 3.0, 2.0])
    f = fused(w, g, "grad_x_weight", 10, "torch", block=64)
    v, i = _sorted_topk(_np_scores(w, g, "grad_x_weight"), 10)
    np.testing.assert_array_equal(f.values.numpy(), v)
    np.testing.assert_array_equal(f.index.numpy(), i)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partials_give_the_statistics_of_critlib_stats(backend):
    tensors = [_data(n, torch.float32, seed=n) for n in (333, 4096, 777)]
    stats, fed = Stats(chunk_size=1000), Stats()
    for w, g in tensors:
        stats.add(["global"], (g * w).abs())
        p = block_partials(w, g, "grad_x_weight", backend, block=128)
        fed.merge(["global"], reduce(p), p.hist_count)
    ref = stats.summary()["global"]
    got = fed.summary()["global"]
    assert got["count"] == ref["count"] and got["min"] == ref["min"] and got["max"] == ref["max"]
    assert got["percentiles"] == ref["percentiles"]  # from identical histograms
    for key in ("mean", "std", "sum", "max_over_mean"):
        assert got[key] == pytest.approx(ref[key], rel=1e-12), key
    for key, v in ref["top_share"].items():
        assert got["top_share"][key] == pytest.approx(v, rel=1e-12), key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 1000, 70_001])
def test_summarize_equals_the_statistics_path(backend, n):
    """The fused summary that critlib.stats uses on CUDA equals its plain-torch summary and float64 numpy."""
    from critlib import stats
    from critlib.kernels import summarize
    x = torch.exp(torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3)
    x[: n // 3] = 0.0
    row, counts = summarize(x, backend)
    ref_row, ref_counts = stats.summarize(x)
    assert torch.equal(counts, ref_counts)
    x64 = x.double().numpy()
    brute = [n, x64.sum(), ((x64 - x64.mean()) ** 2).sum(), x64.min(), x64.max()]
    for got in (row, ref_row):
        np.testing.assert_allclose(got.numpy(), brute, rtol=1e-10, atol=1e-300)


def test_backend_choice_and_errors(monkeypatch):
    assert resolve_backend("auto", "cpu", Backend.OFF) is Backend.OFF
    assert resolve_backend("off", "cuda", Backend.OFF) is Backend.OFF
    assert resolve_backend("torch", "cpu", Backend.OFF) is Backend.TORCH
    assert resolve_backend("auto", "cpu") is Backend.TORCH
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(CritlibError, match="Triton backend"):
            resolve_backend("triton", "cpu")
    with pytest.raises(CritlibError, match="no fused kernel"):
        block_partials(torch.ones(4), torch.ones(4), "fisher", "torch")
    with pytest.raises(CritlibError, match="power of two"):
        block_partials(torch.ones(4), torch.ones(4), "grad_x_weight", "torch", block=100)


# memory saving for the gradient pass (critlib.scores.memory_saving): same scores, less memory

@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-mistral", "tiny-gpt2"])
def test_memory_saving_gives_the_same_scores(arch):
    from critlib.scores import memory_saving, score_model
    from tests.conftest import tiny
    model = tiny(arch)
    windows = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(4))
    metrics = ["grad_x_weight", "grad_squared", "fisher", "wanda"]

    def run():
        out = {}
        score_model(model, windows, metrics, lambda m, n, s: out.__setitem__((m, n), s.clone()), batch_size=2,
                    progress=False)
        return out

    inner = [m for n, m in model.named_modules() if ".0." in n and getattr(m, "weight", None) is not None
             and m.weight.ndim == 2 and not list(m.children())][0]
    calls = []
    handle = inner.register_forward_hook(lambda *a: calls.append(1))
    ref = run()
    plain_calls = len(calls)
    forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    with memory_saving(model, checkpointing=True, sparse_embedding=True):
        assert model.get_input_embeddings().sparse
        got = run()
    handle.remove()
    assert len(calls) == 3 * plain_calls  # layers were replayed in backward
    assert not model.get_input_embeddings().sparse
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == forwards  # restored
    assert got.keys() == ref.keys()
    # bit-equal: the replayed layers run the same kernels on the same inputs, and the row-blocked
    # embedding/lm_head gradient sums as autograd does (to 1e-6 where the BLAS sums a slice otherwise)
    from tests.test_scores import assert_same
    for key in ref:
        assert_same(got[key], ref[key], str(key))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-phi3"])
def test_analyze_with_the_fused_kernel_equals_score_tensors(backend, arch, windows):
    """Through the kernel (pass 1: one read of weight and gradient, no score tensor; pass 2: scores made a
    slice at a time) the top-K, statistics, layer/component sums and the scores gathered for cross-metric
    agreement equal those of whole score tensors; Phi-3's split tensors take the tensor path.

    Bit-equal where the order cannot differ: selections, integer counts, radix-selected order statistics
    and elementwise products. Float sums (mean, std, top shares, cell totals) to a stated tolerance."""
    from critlib.sensitivity import analyze
    from tests.conftest import tiny
    model = tiny(arch)
    metrics = ["grad_x_weight", "grad_squared", "magnitude"]
    ref = analyze(model, windows, metrics=metrics, topk_global=30, topk_per_layer=5, progress=False, kernel="off")
    got = analyze(model, windows, metrics=metrics, topk_global=30, topk_per_layer=5, progress=False, kernel=backend)
    for m in metrics:
        assert got.global_top(m) == ref.global_top(m), m
        for name in ref.order:
            for a, b in zip(got.topk[m].per_tensor(name, 5), ref.topk[m].per_tensor(name, 5)):
                assert torch.equal(a, b), (m, name)
        assert got.stats[m]["global"]["percentiles"] == ref.stats[m]["global"]["percentiles"]
        for key in ("count", "min", "max"):
            assert got.stats[m]["global"][key] == ref.stats[m]["global"][key]
        for key in ("mean", "std", "sum"):
            assert got.stats[m]["global"][key] == pytest.approx(ref.stats[m]["global"][key], rel=1e-9)
        assert torch.equal(got.hist[m], ref.hist[m])
        assert got.gathered[m] == ref.gathered[m]  # pass 2 scores slices: the same values at the union
        # the shares sum the same scores in another order (whole tensors vs slices; SIMD width differs by CPU)
        for key, v in ref.stats[m]["global"]["top_share"].items():
            assert got.stats[m]["global"]["top_share"][key] == pytest.approx(v, rel=1e-12), (m, key)
        for layer, st in ref.stats[m]["per_layer"].items():
            assert got.stats[m]["per_layer"][layer]["percentiles"] == st["percentiles"], (m, layer)
            assert got.stats[m]["per_layer"][layer]["std"] == pytest.approx(st["std"], rel=1e-9)
        assert got.cells[m].keys() == ref.cells[m].keys()
        for key, (n, total) in ref.cells[m].items():
            assert got.cells[m][key][0] == n and got.cells[m][key][1] == pytest.approx(total, rel=1e-9)
