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
    res = analyze(model, windows, metrics=["grad_x_weight", "magnitude"], topk_global=40, topk_per_layer=5,
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
    ref = analyze(model, windows, metrics=metrics, topk_global=40, topk_per_layer=5, progress=False, kernel="off")
    got = analyze(model, windows, metrics=metrics, topk_global=40, topk_per_layer=5, progress=False, kernel="triton")
    for m in metrics:
        assert got.global_top(m) == ref.global_top(m)
        assert got.stats[m]["global"]["percentiles"] == ref.stats[m]["global"]["percentiles"]
        assert got.stats[m]["global"]["std"] == pytest.approx(ref.stats[m]["global"]["std"], rel=1e-9)


# the multi-tensor pass 1 (critlib.kernels.multi, issue 14), compiled

@pytest.mark.parametrize("hist", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_multi_pass1_on_cuda_equals_torch_on_cpu(dtype, hist, monkeypatch):
    """Many tensors of awkward sizes, each its own allocation, in one launch set: statistics rows,
    histograms and exact top-k equal the per-tensor torch path on the CPU (histogram per score or
    pre-aggregated per program)."""
    from critlib.kernels import multi, triton_multi
    monkeypatch.setattr(triton_multi, "HIST", hist)
    gen = torch.Generator().manual_seed(7)
    sizes = [1, 13, 67, 1025, 4097, 1_000_003] + torch.randint(1, 5000, (50,), generator=gen).tolist()
    ws = [(torch.randn(n, generator=gen) * 0.05).to(dtype) for n in sizes]
    gs = [(torch.randn(n, generator=gen) * 1e-3).to(dtype) for n in sizes]
    ws[2] = torch.full((67,), 0.5, dtype=dtype)  # all equal: ties throughout
    for metric in ("grad_x_weight", "grad_squared", "magnitude"):
        ref = multi.pass1(ws, gs, metric, 100, "torch")
        got = multi.pass1([w.cuda() for w in ws], [g.cuda() for g in gs], metric, 100, "triton")
        assert torch.equal(got.hist.cpu(), ref.hist), metric
        assert torch.equal(got.keys.cpu(), ref.keys), metric
        assert torch.equal(got.rows[:, [0, 3, 4]].cpu(), ref.rows[:, [0, 3, 4]]), metric
        torch.testing.assert_close(got.rows[:, 1:3].cpu(), ref.rows[:, 1:3], rtol=1e-10, atol=1e-300)


def test_multi_pass1_waits_on_the_device_only_at_the_end():
    """analyze's batching: tensors handed in one at a time, several multi-tensor passes, statistics merged;
    no operation waits on the device (torch's sync debug mode raises on any) until `finish`'s one copy."""
    from critlib.kernels import multi
    from critlib.rank import TopK
    gen = torch.Generator().manual_seed(8)
    sizes = torch.randint(1, 300_000, (60,), generator=gen).tolist()
    ws = [(torch.randn(n, generator=gen) * 0.05).bfloat16().cuda() for n in sizes]
    gs = [(torch.randn(n, generator=gen) * 1e-3).bfloat16().cuda() for n in sizes]
    multi.pass1(ws[:3], gs[:3], "grad_x_weight", 100, "triton")  # compile outside the check
    torch.cuda.synchronize()
    stats, top = {"grad_x_weight": Stats()}, {"grad_x_weight": TopK(100)}
    batch = multi.Pass1(100, "triton", stats, top, lambda name: ["global", f"layer:{int(name) % 4}"],
                        budget=1 << 22)
    multi.COUNTS.clear()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t, (w, g) in enumerate(zip(ws, gs)):
            batch.add("grad_x_weight", str(t), w, g)
        batch.flush()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    passes = len(batch.done)
    assert passes >= 2 and multi.COUNTS["launches"] <= 4 * passes and multi.COUNTS["to_host"] == 0
    batch.finish()
    assert multi.COUNTS["to_host"] == 1
    ref = multi.pass1([w.cpu() for w in ws], [g.cpu() for g in gs], "grad_x_weight", 100, "torch")
    for t, (v, i) in enumerate(ref.topk()):
        got_v, got_i = top["grad_x_weight"].candidates[str(t)]
        assert torch.equal(got_v, v) and torch.equal(got_i, i), t
    assert stats["grad_x_weight"].summary()["global"]["count"] == sum(sizes)


def test_fused_analyze_on_cuda_uses_few_launches(windows):
    """analyze's fused pass 1 on CUDA: a few Triton launches per multi-tensor pass, one copy to the host."""
    from critlib.kernels import multi
    model = tiny("tiny-llama").cuda()
    multi.COUNTS.clear()
    analyze(model, windows, metrics=["grad_x_weight", "grad_squared"], topk_global=40, topk_per_layer=5,
            progress=False, exact_stats=False, kernel="triton")
    assert multi.COUNTS["to_host"] == 1 and multi.COUNTS["launches"] <= 8, multi.COUNTS
