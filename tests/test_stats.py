"""Streaming statistics over all scores equal numpy computed on everything at once."""

import math

import numpy as np
import pytest
import torch

from critlib.stats import APPROX_REL_ERROR, PERCENTILES, TOP_SHARES, Stats


def datasets():
    g = torch.Generator().manual_seed(0)
    yield "lognormal", [torch.exp(torch.randn(5000, generator=g) * 4) for _ in range(3)]
    yield "ties_and_zeros", [torch.zeros(100), torch.full((333,), 0.5), torch.randint(0, 4, (700,), generator=g).float()]
    yield "tiny", [torch.tensor([3.0])]
    yield "subnormal", [torch.tensor([1e-40, 0.0, 1e-38, 1.0]), torch.rand(50, generator=g)]


def reference(x: np.ndarray) -> dict:
    srt = np.sort(x)[::-1]
    return {"pct": {p: np.percentile(x, p) for p in PERCENTILES},
            "share": {q: srt[:max(1, math.ceil(q * len(x)))].sum() / x.sum() if x.sum() > 0 else None
                      for q in TOP_SHARES}}


@pytest.mark.parametrize("name,chunks", list(datasets()))
@pytest.mark.parametrize("chunk_size", [7, 1 << 20])
def test_exact_two_pass_matches_numpy(name, chunks, chunk_size):
    st = Stats(chunk_size)
    for c in chunks:
        st.add(["global"], c)
    st.start_refine()
    for c in chunks:
        st.add(["global"], c)
    s = st.summary()["global"]
    x = torch.cat(chunks).double().numpy()
    ref = reference(x)
    assert s["exact"] is True
    assert s["count"] == len(x)
    assert s["min"] == x.min() and s["max"] == x.max()
    assert s["mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert s["std"] == pytest.approx(x.std(), rel=1e-9, abs=1e-300)
    for p in PERCENTILES:
        assert s["percentiles"][f"{p:g}"] == pytest.approx(ref["pct"][p], rel=1e-12), p
    for q in TOP_SHARES:
        if ref["share"][q] is not None:
            assert s["top_share"][f"{q * 100:g}%"] == pytest.approx(ref["share"][q], rel=1e-9)


def test_one_pass_is_within_stated_bound():
    g = torch.Generator().manual_seed(3)
    x = torch.exp(torch.randn(20000, generator=g) * 3)
    st = Stats()
    st.add(["global"], x)
    s = st.summary()["global"]
    assert s["exact"] is False and s["percentile_relative_error_bound"] == APPROX_REL_ERROR
    for p in PERCENTILES:
        ref = np.percentile(x.double().numpy(), p)
        assert abs(s["percentiles"][f"{p:g}"] - ref) <= APPROX_REL_ERROR * ref
    srt = np.sort(x.double().numpy())[::-1]
    for q in TOP_SHARES:
        ref = srt[:math.ceil(q * len(srt))].sum() / srt.sum()
        assert abs(s["top_share"][f"{q * 100:g}%"] - ref) <= APPROX_REL_ERROR * ref


def two_pass_summary(chunks: list[torch.Tensor], chunk_size: int, groups: list[str]) -> dict:
    """Both passes of `Stats` over `chunks`, each chunk fed to `groups`."""
    st = Stats(chunk_size=chunk_size)
    for c in chunks:
        st.add(groups, c)
    st.start_refine()
    for c in chunks:
        st.add(groups, c)
    return st.summary()


def test_pass_two_in_small_batches_gives_the_same_answer(monkeypatch):
    """Pass 2 counts the scores it keeps in batches (stats.KEPT_FLUSH); tiny batches change nothing."""
    from critlib import stats as stats_mod
    gen = torch.Generator().manual_seed(5)
    chunks = [torch.exp(torch.randn(n, generator=gen) * 2) for n in (1000, 3333, 17)]

    ref = two_pass_summary(chunks, 100, ["global", "other"])
    monkeypatch.setattr(stats_mod, "KEPT_FLUSH", 3)
    assert two_pass_summary(chunks, 100, ["global", "other"]) == ref and ref["global"]["exact"]
