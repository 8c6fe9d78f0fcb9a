"""The frames behind the figures: histogram arithmetic against numpy on the raw scores, layer x component
cells against brute-force sums over the parameters."""

import numpy as np
import pytest
import torch

from critlib import tables
from critlib.stats import Stats
from tests.conftest import tiny


def _scores(n=20000, seed=0):
    rng = np.random.default_rng(seed)
    x = np.exp(rng.normal(-6, 4, n)).astype(np.float32)
    x[:37] = 0.0
    x[37:40] = np.float32(1e-42)  # subnormal
    return x


def _counts(x):
    s = Stats(chunk_size=4096)
    s.add(["global"], torch.from_numpy(x))
    return s.groups["global"].hist_count.numpy()


def test_bin_edges_are_the_float32_values_of_the_bit_patterns():
    edges = tables.bin_edges()
    assert edges[0] == 0.0
    b = 127 << 7  # exponent 127, mantissa 0 -> 1.0
    assert edges[b] == 1.0 and edges[b + 1] == np.float32(1 + 2 ** -7)
    assert np.all(np.diff(edges[:tables.FIRST_NONFINITE]) > 0)


@pytest.mark.parametrize("per_octave", [1, 4, 128])
def test_log_histogram_counts_equal_brute_force(per_octave):
    x = _scores()
    df, extra = tables.log_histogram(_counts(x), per_octave)
    for lo, hi, c in zip(df["lo"], df["hi"], df["count"]):
        assert c == np.count_nonzero((x >= lo) & (x < hi))
    assert extra["zero_or_subnormal"] == np.count_nonzero(x < np.finfo(np.float32).tiny)
    assert extra["total"] == len(x) and extra["nonfinite"] == 0
    assert df["count"].sum() + extra["zero_or_subnormal"] == len(x)
    assert np.allclose(df["per_octave"], df["count"] / np.log2(df["hi"] / df["lo"]))
    if per_octave == 1:
        assert np.allclose(df["hi"] / df["lo"], 2.0)


def test_log_histogram_rejects_bad_resolution():
    with pytest.raises(ValueError):
        tables.log_histogram(np.zeros(tables.N_BINS, dtype=np.int64), 3)


def test_ccdf_is_exact_at_its_points():
    x = _scores(seed=1)
    df = tables.ccdf(_counts(x), max_points=None)
    for xv, n, p in zip(df["x"], df["n_at_or_above"], df["p"]):
        assert n == np.count_nonzero(x >= xv)
        assert p == pytest.approx(n / len(x))
    assert np.all(np.diff(df["p"]) < 0)
    thin = tables.ccdf(_counts(x), max_points=50)
    assert len(thin) == 50 and thin["x"].iloc[0] == df["x"].iloc[0] and thin["x"].iloc[-1] == df["x"].iloc[-1]


def test_sensitivity_hist_and_cells_cover_every_weight(sens):
    model = tiny("tiny-qwen2")
    total = sum(p.numel() for p in model.parameters())
    w = torch.cat([p.detach().abs().reshape(-1) for p in model.parameters()]).numpy()
    assert int(sens.hist["magnitude"].sum()) == total
    assert np.array_equal(sens.hist["magnitude"].numpy(), _counts(w))
    cells = tables.cells_frame(sens)
    for m in sens.metrics:
        sub = cells[cells["metric"] == m]
        assert sub["n_weights"].sum() == total
        assert sub["score_share"].sum() == pytest.approx(1.0)
        assert sub["topk"].sum() == 40
    mag = cells[cells["metric"] == "magnitude"]
    by_param = {n: float(p.detach().double().abs().sum()) for n, p in model.named_parameters()}
    row = mag[(mag["layer"] == 1) & (mag["component"] == "attn_q")].iloc[0]
    assert row["score_sum"] == pytest.approx(sum(v for n, v in by_param.items() if "layers.1.self_attn.q_proj" in n))


def test_histogram_frame_holds_every_metric(sens):
    df = tables.histogram_frame(sens.hist)
    assert set(df["metric"]) == set(sens.metrics)
    for m in sens.metrics:
        sub = df[df["metric"] == m]
        assert sub["count"].sum() + sub["zero_or_subnormal"].iloc[0] == int(sens.hist[m].sum()) == sub["total"].iloc[0]
