"""The multi-tensor pass 1 (critlib.kernels.multi): Triton under TRITON_INTERPRET=1 against the per-tensor
torch reference, float64 numpy and full sorts; and its launches and waits on the device per pass, counted.

The interpreter runs each program in Python (its `tl.sort` alone takes ≈ 0.1 s a program), so the tensors
are small, the blocks 64 scores, and only the tests of the pre-aggregated histogram use it (HIST=2); the
others count one atomic per score (HIST=1), which gives the same histogram."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before critlib.kernels.triton_multi is first imported

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from critlib import CritlibError
from critlib.bins import N_BINS
from critlib.kernels import is_triton_available, multi
from critlib.stats import Stats

pytestmark = pytest.mark.skipif(not is_triton_available("cpu"), reason="triton not installed")

SIZES = [1, 13, 67, 1025]
BLOCK, SUB = 64, 16


@pytest.fixture
def hist_mode(request, monkeypatch):
    from critlib.kernels import triton_multi
    monkeypatch.setattr(triton_multi, "HIST", getattr(request, "param", 1))
    return triton_multi.HIST


def _data(sizes, dtype, seed=0, scale=1e-3):
    gen = torch.Generator().manual_seed(seed)
    ws = [(torch.randn(n, generator=gen) * 0.05).to(dtype) for n in sizes]
    gs = [(torch.randn(n, generator=gen) * scale).to(dtype) for n in sizes]
    return ws, gs


def _np_scores(w, g, metric):
    w32 = w.float().reshape(-1).numpy()
    if metric == "magnitude":
        return np.abs(w32)
    if metric == "score":
        return w32
    g32 = g.float().reshape(-1).numpy()
    return np.abs(g32 * w32) if metric == "grad_x_weight" else g32 * g32


def _sorted_topk(s, k):
    order = np.lexsort((np.arange(len(s)), -s.astype(np.float64)))[:k]
    return s[order], order


def _check_against_numpy(m, ws, gs, metric, k):
    for t, ((v, i), w, g) in enumerate(zip(m.topk(), ws, gs)):
        s = _np_scores(w, g, metric)
        rv, ri = _sorted_topk(s, k)
        np.testing.assert_array_equal(v.numpy(), rv, err_msg=f"tensor {t}")
        np.testing.assert_array_equal(i.numpy(), ri, err_msg=f"tensor {t}")
        s64 = s.astype(np.float64)
        np.testing.assert_allclose(m.rows[t].numpy(), [len(s), s64.sum(), ((s64 - s64.mean()) ** 2).sum(),
                                                       s64.min(), s64.max()], rtol=1e-10, atol=1e-300)
        if metric != "score":
            np.testing.assert_array_equal(m.hist[t].numpy(),
                                          np.bincount(s.view(np.int32) >> 16, minlength=N_BINS))


def _same(a, b):
    """Triton and reference results: identical but for the order of float64 sums."""
    assert torch.equal(a.hist, b.hist)
    assert torch.equal(a.keys, b.keys)
    assert torch.equal(a.rows[:, [0, 3, 4]], b.rows[:, [0, 3, 4]])
    torch.testing.assert_close(a.rows[:, 1:3], b.rows[:, 1:3], rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_awkward_sizes_in_one_launch_equal_reference_and_numpy(dtype, hist_mode):
    ws, gs = _data(SIZES, dtype, seed=3)
    multi.COUNTS.clear()
    got = multi.pass1(ws, gs, "grad_x_weight", 20, "triton", block=BLOCK, sub=SUB)
    assert multi.COUNTS["launches"] == 3  # pass, statistics merge, gather: for all four tensors
    _same(got, multi.pass1(ws, gs, "grad_x_weight", 20, "torch", block=BLOCK, sub=SUB))
    _check_against_numpy(got, ws, gs, "grad_x_weight", 20)


@pytest.mark.parametrize("metric", ["grad_squared", "magnitude"])
def test_other_metrics(metric, hist_mode):
    ws, gs = _data([5, 200], torch.bfloat16, seed=4)
    got = multi.pass1(ws, gs, metric, 7, "triton", block=BLOCK, sub=SUB)
    _same(got, multi.pass1(ws, gs, metric, 7, "torch", block=BLOCK, sub=SUB))
    _check_against_numpy(got, ws, gs, metric, 7)


def test_raw_scores_with_negatives_and_signed_zeros(hist_mode):
    """metric 'score' ranks values as they are (negatives last; −0.0 ties +0.0, lowest index first)."""
    w = torch.tensor([-1.0, 0.0, -0.0, 2.0, -3.0, 0.0, 2.0, -0.0] * 9)
    m = multi.pass1([w], None, "score", 40, "triton", block=BLOCK, sub=SUB)
    (v, i), = m.topk()
    rv, ri = _sorted_topk(w.numpy(), 40)
    np.testing.assert_array_equal(i.numpy(), ri)
    assert v.tolist() == rv.tolist()


@pytest.mark.parametrize("k", [1, 5, 64, 300])
def test_ties_and_all_equal_tensors_equal_full_sort(k, hist_mode):
    gen = torch.Generator().manual_seed(k)
    few = torch.randint(-4, 5, (301,), generator=gen).float() / 4  # few distinct values: ties everywhere
    ws = [few, torch.full((130,), 0.5), torch.zeros(67), torch.full((13,), 3.0)]
    gs = [torch.ones_like(w) for w in ws]
    got = multi.pass1(ws, gs, "grad_x_weight", k, "triton", block=BLOCK, sub=SUB)
    _same(got, multi.pass1(ws, gs, "grad_x_weight", k, "torch", block=BLOCK, sub=SUB))
    _check_against_numpy(got, ws, gs, "grad_x_weight", k)


@pytest.mark.parametrize("hist_mode", [2], indirect=True)
def test_pre_aggregated_histogram(hist_mode):
    """HIST=2: each program sorts its bins and adds each run once; runs across sub-blocks, a whole block of
    one value, a partial last block and empty tensors' slots."""
    ws = [torch.full((70,), 0.25), torch.arange(64.0).repeat_interleave(2)[:100] / 7, torch.rand(13)]
    gs = [torch.ones_like(w) for w in ws]
    got = multi.pass1(ws, gs, "grad_x_weight", 5, "triton", slots=[1, 0, 1], n_slots=3, block=BLOCK, sub=SUB)
    ref = multi.pass1(ws, gs, "grad_x_weight", 5, "torch", slots=[1, 0, 1], n_slots=3, block=BLOCK, sub=SUB)
    _same(got, ref)
    assert int(got.hist[2].sum()) == 0 and int(got.hist[1].sum()) == 83


def test_many_tensors_mixed_dtypes_and_multilevel_merge(hist_mode, monkeypatch):
    """40 tensors in one call (two dtype groups: a launch set each), statistics merged over several levels
    (TILE forced to 4), top-k taken a few tensors at a time (STAGE forced down): all as the reference."""
    from critlib.kernels import triton_multi
    monkeypatch.setattr(triton_multi, "TILE", 4)
    monkeypatch.setattr(multi, "STAGE", 3 * 6 * (BLOCK // SUB))
    gen = torch.Generator().manual_seed(9)
    sizes = torch.randint(1, 400, (40,), generator=gen).tolist() + [1100]
    ws, gs = _data(sizes, torch.float32, seed=10)
    for j in range(0, len(ws), 3):
        ws[j], gs[j] = ws[j].bfloat16(), gs[j].bfloat16()
    ws[5], gs[5] = torch.empty(0), torch.empty(0)  # nothing to score: an empty row, no candidates
    got = multi.pass1(ws, gs, "grad_x_weight", 6, "triton", block=BLOCK, sub=SUB)
    ref = multi.pass1(ws, gs, "grad_x_weight", 6, "torch", block=BLOCK, sub=SUB)
    _same(got, ref)
    assert got.rows[5].tolist() == list(multi.EMPTY_ROW) and got.topk()[5][0].numel() == 0
    keep = [t for t in range(len(ws)) if t != 5]
    sub = multi.Multi(got.rows[keep], got.hist[keep], got.keys[keep], [sizes[t] for t in keep])
    _check_against_numpy(sub, [ws[t] for t in keep], [gs[t] for t in keep], "grad_x_weight", 6)


def test_views_strided_and_2d_tensors(hist_mode):
    """Offsets from one base tensor: slices of one storage, a transposed (copied) matrix, 2-D shapes."""
    base = torch.randn(3000, generator=torch.Generator().manual_seed(2))
    grad = torch.randn(3000, generator=torch.Generator().manual_seed(3))
    ws = [base[7:140], base[1001:1901].view(30, 30), base[:600].view(20, 30).t()]
    gs = [grad[7:140], grad[1001:1901].view(30, 30), grad[:600].view(20, 30).t()]
    got = multi.pass1(ws, gs, "grad_x_weight", 10, "triton", block=BLOCK, sub=SUB)
    _same(got, multi.pass1(ws, gs, "grad_x_weight", 10, "torch", block=BLOCK, sub=SUB))
    _check_against_numpy(got, ws, gs, "grad_x_weight", 10)


COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from critlib.bins import N_BINS
from critlib.kernels import multi, triton_multi as tm

def compile_(fn, types, constexprs):
    sig = {a: types.get(a, "constexpr" if a in constexprs else "*i64") for a in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))

data = {"w_base": "*bf16", "g_base": "*bf16", "T": "i32", "KS": "i32"}
stats = {"sum_ptr": "*fp64", "m2_ptr": "*fp64", "min_ptr": "*fp32", "max_ptr": "*fp32", "sub_ptr": "*fp32",
         "sum_out": "*fp64", "m2_out": "*fp64", "min_out": "*fp32", "max_out": "*fp32"}
for hist in (2, 1):
    k = compile_(tm._pass1, {**data, **stats}, dict(LOG=12, ALIGN=16, METRIC=0, BLOCK=multi.BLOCK, SUB=multi.SUB,
                                                    NBINS=N_BINS, HIST=hist))
    assert "atom" in k.asm["ptx"]
compile_(tm._gather, data, dict(ALIGN=16, METRIC=1, SUB=multi.SUB, NS=multi.BLOCK // multi.SUB, ROWS=tm.ROWS))
compile_(tm._segreduce, stats, dict(TILE=tm.TILE))
print("compiled")
"""


def test_kernels_compile_for_an_h200():
    """The interpreter runs what the compiler would refuse (a global that is not a constexpr, say): every
    kernel compiled for sm_90 (an H200) on the CPU, as a GPU compiles it on first use (no interpreter: a
    fresh process; the CUDA backend and its ptxas ship with the triton wheel)."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


def test_errors():
    with pytest.raises(CritlibError, match="no fused kernel"):
        multi.pass1([torch.ones(3)], [torch.ones(3)], "fisher", 2, "torch")
    with pytest.raises(CritlibError, match="needs a gradient"):
        multi.pass1([torch.ones(3)], [torch.ones(4)], "grad_x_weight", 2, "torch")
    with pytest.raises(CritlibError, match="powers of two"):
        multi.pass1([torch.ones(3)], None, "magnitude", 2, "torch", block=100)


def test_merge_groups_equals_merging_each_tensor():
    ws, gs = _data([300, 41, 1000, 7], torch.float32, seed=6)
    m = multi.pass1(ws, gs, "grad_x_weight", 3, "torch", block=BLOCK)
    groups = [["global", "layer:0", "component:q"], ["global", "layer:0", "component:k"],
              ["global", "layer:1", "component:q"], ["global", "layer:none", "component:norm"]]
    one, each = Stats(), Stats()
    multi.merge_groups(one, groups, m.rows, m.hist)
    for t, names in enumerate(groups):
        each.merge(names, m.rows[t].reshape(1, 5), m.hist[t])
    a, b = one.summary(), each.summary()
    assert a.keys() == b.keys()
    for g in a:
        assert a[g]["count"] == b[g]["count"] and a[g]["percentiles"] == b[g]["percentiles"], g
        for key in ("min", "max", "mean", "std", "sum"):
            assert a[g][key] == pytest.approx(b[g][key], rel=1e-13), (g, key)


# launches and waits on the device per pass

SYNCING = {"_local_scalar_dense", "item", "nonzero", "masked_select", "is_nonzero", "equal", "unique_dim",
           "_unique", "_unique2", "unique_consecutive", "repeat_interleave", "bincount"}
METADATA = {"detach", "view", "_unsafe_view", "reshape", "slice", "select", "unsqueeze", "squeeze", "expand",
            "t", "transpose", "permute", "alias", "as_strided", "lift_fresh", "split", "unbind", "_reshape_alias",
            "empty", "empty_strided", "scalar_tensor"}  # allocations and host scalars launch nothing either


class DeviceOps(TorchDispatchMode):
    """Counts the torch operations that would run on the device (metadata and allocations left out) and those
    that make the host wait for the device (on CUDA: a data-dependent size, a value read on the host)."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncing, self.paused = Counter(), Counter(), False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and name not in METADATA:
            self.ops[name] += 1
            bool_index = name.startswith("index") and any(
                isinstance(a, (list, tuple)) and any(isinstance(x, torch.Tensor) and x.dtype == torch.bool
                                                     for x in a) for a in args)
            if name in SYNCING or bool_index:
                self.syncing[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def counted(monkeypatch):
    """A DeviceOps mode that ignores what the Triton interpreter does inside a launch (its own copies)."""
    mode = DeviceOps()
    launch = multi._launch

    def quiet(*a, **kw):
        mode.paused = True
        try:
            launch(*a, **kw)
        finally:
            mode.paused = False
    monkeypatch.setattr(multi, "_launch", quiet)
    multi.COUNTS.clear()
    return mode


def _one_pass(n_tensors, mode):
    ws, gs = _data([13, 200, 67, 130] * (n_tensors // 4), torch.bfloat16, seed=n_tensors)
    multi.COUNTS.clear()
    mode.ops.clear()
    with mode:
        m = multi.pass1(ws, gs, "grad_x_weight", 8, "triton", block=BLOCK, sub=SUB)
    ops_in_pass = sum(mode.ops.values())
    launches = multi.COUNTS["launches"]
    assert not mode.syncing and multi.COUNTS["to_host"] == 0  # nothing waited on the device in the pass
    with mode:
        m.topk()
    assert multi.COUNTS["to_host"] == 1
    return launches, ops_in_pass, dict(mode.syncing)


def test_launches_and_waits_per_pass_do_not_grow_with_the_tensors(counted, hist_mode):
    few = _one_pass(4, counted)
    many = _one_pass(40, counted)
    assert few == many, (few, many)
    launches, ops, syncing = many
    assert launches == 3  # Triton: the pass, the statistics merge (one level here), the gather
    assert ops <= 36  # torch: tables, the candidate search and the result's rows, whatever the tensor count
    assert syncing == {}  # the one copy to the host (`to_host`) is the only wait, counted above


def test_pass1_batch_waits_once_per_pass(counted, hist_mode):
    """What analyze does: tensors handed in one at a time, one multi-tensor pass when the budget fills (one
    here), statistics merged on the device, and one copy to the host at the end for every tensor."""
    for n_tensors in (4, 24):
        ws, gs = _data([13, 200, 67, 1100] * (n_tensors // 4), torch.float32, seed=1)
        stats = {"grad_x_weight": Stats()}
        topk = {"grad_x_weight": _Keep()}
        cells = []
        batch = multi.Pass1(8, "triton", stats, topk, lambda name: ["global", f"layer:{int(name) % 3}"],
                            cell=lambda m, name, n, total: cells.append((name, n, total)), budget=1 << 40)
        multi.COUNTS.clear()
        with counted:
            for t, (w, g) in enumerate(zip(ws, gs)):
                batch.add("grad_x_weight", str(t), w, g)
            assert multi.COUNTS["launches"] == 0  # all waiting for the budget
            batch.finish()
        assert multi.COUNTS == Counter(launches=3, to_host=1), multi.COUNTS
        assert not counted.syncing
        ref = multi.pass1(ws, gs, "grad_x_weight", 8, "torch", block=multi.BLOCK)
        for t, (v, i) in enumerate(ref.topk()):
            assert torch.equal(topk["grad_x_weight"].kept[str(t)][0], v)
            assert torch.equal(topk["grad_x_weight"].kept[str(t)][1], i)
        total = sum(float(c[2]) for c in cells)
        assert total == pytest.approx(float(ref.rows[:, 1].sum()), rel=1e-12) and len(cells) == n_tensors
        got = stats["grad_x_weight"].summary()["global"]
        assert got["count"] == sum(w.numel() for w in ws)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_analyze_pass1_launches_and_waits(arch, counted, monkeypatch, windows):
    """analyze's fused pass 1, two metrics, 20 or 28 tensors: three Triton launches per metric, no operation
    that waits on the device while the batched passes run, and one copy to the host."""
    from critlib.sensitivity import analyze
    from tests.conftest import tiny
    flush = multi.Pass1.flush

    def watched(self):
        with counted:
            flush(self)
    monkeypatch.setattr(multi.Pass1, "flush", watched)
    analyze(tiny(arch), windows, metrics=["grad_x_weight", "grad_squared"], topk_global=30, topk_per_layer=5,
            progress=False, kernel="triton", exact_stats=False)
    assert multi.COUNTS == Counter(launches=6, to_host=1), multi.COUNTS
    assert counted.ops and not counted.syncing


def test_pass1_batch_refuses_nonfinite_scores(hist_mode):
    ws, gs = _data([13, 200], torch.float32)
    gs[1][50] = float("nan")
    batch = multi.Pass1(4, "triton", {"grad_squared": Stats()}, {"grad_squared": _Keep()},
                        lambda name: ["global"])
    for t, (w, g) in enumerate(zip(ws, gs)):
        batch.add("grad_squared", f"p{t}", w, g)
    with pytest.raises(CritlibError, match="gradient of p1 has NaN or inf"):
        batch.finish()


class _Keep:
    def __init__(self):
        self.kept = {}

    def add_candidates(self, name, values, index):
        self.kept[name] = (values, index)
