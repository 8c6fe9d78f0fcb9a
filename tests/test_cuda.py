"""On a CUDA device (skipped elsewhere): the compiled Triton kernel, the device-side statistics and ranking,
and accelerate placement give what the CPU reference gives."""

import numpy as np
import pytest
import torch

from critlib.kernels import fused
from critlib.rank import topk_chunked
from critlib.sensitivity import analyze
from critlib.scores import score_model
from critlib.stats import PERCENTILES, Stats
from tests.conftest import tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [13, 4097, 1_000_003])
def test_triton_on_cuda_equals_torch_on_cpu(dtype, n):
    gen = torch.Generator().manual_seed(n)
    w = (torch.randn(n, generator=gen) * 0.05).to(dtype)
    g = (torch.randn(n, generator=gen) * 1e-3).to(dtype)
    for metric in ("grad_x_weight", "grad_squared", "magnitude"):
        ref = fused(w, g, metric, 100, "torch")
        got = fused(w.cuda(), g.cuda(), metric, 100, "triton")
        for key in ("count", "min", "max", "hist_count"):
            assert torch.equal(getattr(ref.partials, key), getattr(got.partials, key).cpu()), (metric, key)
        for key in ("sum", "m2"):
            torch.testing.assert_close(getattr(got.partials, key).cpu(), getattr(ref.partials, key),
                                       rtol=1e-10, atol=1e-300)
        assert torch.equal(got.values.cpu(), ref.values) and torch.equal(got.index.cpu(), ref.index), metric


def test_statistics_on_cuda_equal_cpu():
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.exp(torch.randn(n, generator=gen) * 3) for n in (5, 70_000, 1_000_003)]
    chunks[1][:1000] = 0.0
    out = {}
    for dev in ("cpu", "cuda"):
        st = Stats(chunk_size=1 << 18)
        for c in chunks:
            st.add(["global"], c.to(dev))
        st.start_refine()
        for c in chunks:
            st.add(["global"], c.to(dev))
        out[dev] = st.summary()["global"]
    a, b = out["cpu"], out["cuda"]
    assert b["exact"] and a["count"] == b["count"] and a["min"] == b["min"] and a["max"] == b["max"]
    assert a["percentiles"] == b["percentiles"]
    x = torch.cat(chunks).double().numpy()
    for p in PERCENTILES:
        assert b["percentiles"][f"{p:g}"] == pytest.approx(np.percentile(x, p), rel=1e-12)
    for key in ("mean", "std", "sum"):
        assert b[key] == pytest.approx(a[key], rel=1e-9), key
    for key, v in a["top_share"].items():
        assert b["top_share"][key] == pytest.approx(v, rel=1e-9), key


def test_topk_on_cuda_equals_full_sort():
    x = torch.randint(0, 1000, (3_000_001,), generator=torch.Generator().manual_seed(1)).float()
    for chunk in (1 << 30, 1 << 20):
        v, i = topk_chunked(x.cuda(), 500, chunk_size=chunk)
        ref = np.argsort(-x.numpy().astype(np.float64), kind="stable")[:500]
        assert i.cpu().tolist() == ref.tolist()


def test_analyze_on_cuda_ranks_what_it_scores(windows):
    model = tiny("tiny-llama").cuda()
    res = analyze(model, windows, ["grad_x_weight", "magnitude"], topk_global=40, topk_per_layer=5,
                  progress=False)
    seen = {}
    score_model(model, windows, ["grad_x_weight"], lambda m, n, s: seen.__setitem__(n, s.reshape(-1).cpu()),
                progress=False)
    names = list(seen)
    allv = torch.cat([seen[n].double() for n in names]).numpy()
    keys = [(n, j) for n in names for j in range(seen[n].numel())]
    ref = [keys[j] for j in np.argsort(-allv, kind="stable")[:40]]
    assert [(n, f) for n, f, _ in res.global_top("grad_x_weight")] == ref
    assert res.stats["grad_x_weight"]["global"]["percentiles"]["99"] == pytest.approx(np.percentile(allv, 99),
                                                                                      rel=1e-6)


def test_device_map_scores_equal_one_device(tmp_path, windows):
    from critlib.models import load_model
    model = tiny("tiny-llama")
    model.save_pretrained(tmp_path / "m")
    ref = {}
    score_model(model.cuda(), windows, ["grad_x_weight"], lambda m, n, s: ref.__setitem__(n, s.cpu()),
                progress=False)
    placed = load_model(str(tmp_path / "m"), device_map="auto", max_memory="0:1GiB").model
    assert hasattr(placed, "hf_device_map")
    got = {}
    score_model(placed, windows, ["grad_x_weight"], lambda m, n, s: got.__setitem__(n, s.cpu()), progress=False)
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-10)


def test_fused_pass_on_cuda_equals_score_tensors(windows):
    model = tiny("tiny-mistral").cuda()
    metrics = ["grad_x_weight", "grad_squared"]
    ref = analyze(model, windows, metrics, topk_global=40, topk_per_layer=5, progress=False, kernel="off")
    got = analyze(model, windows, metrics, topk_global=40, topk_per_layer=5, progress=False, kernel="triton")
    for m in metrics:
        assert got.global_top(m) == ref.global_top(m)
        assert got.stats[m]["global"]["percentiles"] == ref.stats[m]["global"]["percentiles"]
        assert got.stats[m]["global"]["std"] == pytest.approx(ref.stats[m]["global"]["std"], rel=1e-9)
