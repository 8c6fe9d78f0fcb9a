"""The compiled CPU summary (critlib/kernels/cpu.c) against torch's path, a float64 reference in numpy that
adds in the order cpu.c states, and its fallbacks."""

import ctypes
import math
import platform
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from critlib import rank, stats
from critlib.bins import N_BINS
from critlib.kernels import cpu
from tests.test_stats import two_pass_summary


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """`cpu._load` re-read under the environment a test sets, and restored afterwards."""
    monkeypatch.setenv("CRITLIB_CACHE", str(tmp_path / "cache"))
    cpu._load.cache_clear()
    yield
    cpu._load.cache_clear()


def needs_native():
    if cpu._load()[0] is None:
        pytest.skip(f"no compiled summary here: {cpu.describe()}")


def lane_sums(x: np.ndarray) -> tuple[float, float]:
    """Σx and Σx² in cpu.c's order: eight float64 lanes summed in sequence, folded pairwise, then the tail."""
    n8 = len(x) // 8 * 8
    lanes = np.zeros((2, 8))
    for row in x[:n8].reshape(-1, 8):  # one row at a time: numpy's pairwise summation would change the order
        lanes[0] += row
        lanes[1] += row * row
    s, q = (((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])) for v in lanes)
    for v in x[n8:]:
        s += v
        q += v * v
    return float(s), float(q)


def scores(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(n, generator=g) * 6)  # many octaves, so many bins
    x[:: 7] = 0.0
    x[1:: 11] = 1e-42  # subnormal
    return x


@pytest.mark.parametrize("n,step", [(1, 4), (7, 4), (8, 8), (9, 8), (1000, 64), (5003, 1024), (70001, 1 << 18)])
def test_equals_the_stated_order_in_float64(n, step):
    needs_native()
    x = scores(n)
    rows, counts, maxima = cpu.summarize_steps(x, step, 8 if step % 8 == 0 else 0)
    assert rows.shape == (-(-n // step), 5)
    for c, row in enumerate(rows.tolist()):
        part = x[c * step:(c + 1) * step]
        s, q = lane_sums(part.double().numpy())
        assert row[0] == part.numel()
        assert row[1] == s  # bit-equal: the same additions in the same order
        assert row[2] == max(q - s * s / part.numel(), 0.0)
        assert row[3] == float(part.min()) and row[4] == float(part.max())
        assert math.isclose(row[1], math.fsum(part.double().tolist()), rel_tol=1e-12)
    ref = np.bincount(x.view(torch.int32).numpy() >> 16, minlength=N_BINS)
    assert np.array_equal(counts.numpy(), ref)
    if step % 8 == 0:  # the maxima of blocks of 8, the last one short
        assert torch.equal(maxima, torch.stack([b.max() for b in x.split(8)]))
    else:
        assert maxima is None


@pytest.mark.parametrize("n", [7, 31, 45, 1013, 70_001])
def test_the_block_maxima_do_not_change_a_bit_of_the_rest(n):
    """With or without the maxima (blocks of 32, the last one short), the same lanes in the same order."""
    needs_native()
    x = scores(n, seed=7)
    with_maxima, without = cpu.summarize_steps(x, 1024, rank.BLOCK), cpu.summarize_steps(x, 1024)
    assert with_maxima[2] is not None and without[2] is None
    assert torch.equal(with_maxima[0], without[0]) and torch.equal(with_maxima[1], without[1])


@pytest.mark.parametrize("n", [31, 32, 33, 4096, 100_003])
def test_block_maxima_are_the_rankings(n):
    """The maxima made on the way equal critlib.rank's own, and the top-k found from them is a full sort's."""
    needs_native()
    x = scores(n, seed=4)
    step = 1024
    _, _, maxima = cpu.summarize_steps(x, step, rank.BLOCK)
    assert torch.equal(maxima, rank._block_maxima(x, step))
    k = max(1, n // 200)
    v, i = rank.topk_chunked(x, k, step, maxima)
    order = sorted(range(n), key=lambda j: (-float(x[j]), j))[:k]
    assert i.tolist() == order and torch.equal(v, x[order])


def test_a_block_that_does_not_fit_the_step_makes_no_maxima():
    needs_native()
    x = scores(100)
    assert cpu.summarize_steps(x, 48, 32)[2] is None and cpu.summarize_steps(x, 64, 12)[2] is None
    assert cpu.summarize_steps(x, cpu.MAX_STEP + 1) is None  # a step its 32-bit counters could not hold


@pytest.mark.parametrize("n,step", [(9, 8), (70001, 1024), (300000, 1 << 18)])
def test_equals_torchs_summary(n, step):
    """Counts, minima and maxima equal; sums and M2 equal up to the order torch adds in."""
    needs_native()
    x = scores(n, seed=1)
    rows, counts, _ = cpu.summarize_steps(x, step)
    parts = [stats._summarize_torch(x[i:i + step]) for i in range(0, n, step)]
    ref = torch.stack([r for r, _ in parts])
    assert torch.equal(counts, sum(c for _, c in parts))
    assert torch.equal(rows[:, [0, 3, 4]], ref[:, [0, 3, 4]])
    torch.testing.assert_close(rows[:, 1:3], ref[:, 1:3], rtol=1e-12, atol=0)


def test_threads_do_not_change_a_bit():
    """Each step is summed by one thread and counts are integers: 1, 2, 3 or 64 threads give the same bits."""
    needs_native()
    x = scores(1_000_003, seed=2)
    before = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2, 3, 64):
            torch.set_num_threads(t)
            results.append(cpu.summarize_steps(x, 4096, 32))
    finally:
        torch.set_num_threads(before)
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, results[0]))


@pytest.mark.parametrize("bad", [-1.0, -0.0, math.inf, math.nan])
def test_negative_or_non_finite_scores_go_to_torch(bad):
    """cpu.c refuses them; torch's path then reports them as it always has."""
    needs_native()
    x = scores(1000)
    x[517] = bad
    assert cpu.summarize_steps(x, 64) is None
    if math.copysign(1.0, bad) < 0:  # the sign bit makes a negative bin: torch.bincount refuses it
        with pytest.raises(RuntimeError):
            stats.summarize(x)
    else:
        assert not math.isfinite(float(stats.summarize(x)[0][1]))


@pytest.mark.parametrize("n,step", [(1, 4), (1000, 64), (70001, 1024)])
@pytest.mark.parametrize("threads", [1, 3])
def test_pass_two_keeps_what_torch_keeps_in_order(n, step, threads):
    needs_native()
    x = scores(n, seed=5)
    g = torch.Generator().manual_seed(n)
    keep = torch.rand(N_BINS, generator=g) < 0.3
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu.kept(x, keep, step)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, x[keep[(x.view(torch.int32) >> 16).long()]])
    assert cpu.kept(x, torch.zeros(N_BINS, dtype=torch.bool), step).numel() == 0


@pytest.mark.parametrize("floor", [0, 15000, N_BINS])
def test_pass_two_counts_are_torchs_bit_for_bit(floor):
    """cpu.count_kept adds each bin's scores in index order from 0.0, then into the running sums, as
    `high += torch.bincount(..., weights=)` does: the same bits, and the same integer counts."""
    needs_native()
    x = scores(200_001, seed=6)
    bins = sorted({int(b) for b in (x.view(torch.int32) >> 16)[::5000]})
    slot = torch.full((N_BINS,), len(bins), dtype=torch.int64)
    slot[bins] = torch.arange(len(bins))
    start = torch.rand(N_BINS, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fine, high = torch.zeros((len(bins), 1 << 16), dtype=torch.int64), start.clone()
    assert cpu.count_kept(x, slot, floor, fine, high)
    hi, lo = (x.view(torch.int32) >> 16).long(), (x.view(torch.int32) & 0xFFFF).long()
    rows = slot[hi]
    mine = rows < len(bins)
    ref = torch.bincount((rows[mine] << 16) | lo[mine], minlength=len(bins) << 16).view(len(bins), -1)
    up = hi >= floor
    assert torch.equal(fine, ref) and int(fine.sum()) == int(mine.sum())
    assert torch.equal(high, start + torch.bincount(hi[up], weights=x[up].double(), minlength=N_BINS))
    x[7] = -1.0
    counted = fine.clone(), high.clone()
    assert not cpu.count_kept(x, slot, floor, fine, high)
    assert torch.equal(fine, counted[0]) and torch.equal(high, counted[1])  # refused before counting: torch's
    # path then counts the whole chunk once, not on top of a part


def test_statistics_agree_with_and_without_the_compiled_summary(monkeypatch):
    """The same Stats, once through cpu.c and once through torch: identical counts and histogram-derived
    values, moments within float64 rounding."""
    needs_native()
    chunks = [scores(50_000, seed=s) for s in range(3)]

    def run():
        return two_pass_summary(chunks, 1 << 12, ["global", "layer:0"])

    native = run()
    monkeypatch.setenv("CRITLIB_NATIVE", "off")
    cpu._load.cache_clear()
    try:
        assert cpu.describe() == "torch (CRITLIB_NATIVE=off)"
        plain = run()
    finally:
        monkeypatch.delenv("CRITLIB_NATIVE")
        cpu._load.cache_clear()
    for g in native:
        a, b = native[g], plain[g]
        assert a["count"] == b["count"] and a["min"] == b["min"] and a["max"] == b["max"]
        assert a["percentiles"] == b["percentiles"] and a["exact"] and b["exact"]
        for key in ("mean", "std", "sum"):
            assert math.isclose(a[key], b[key], rel_tol=1e-12)
        for q in a["top_share"]:
            assert math.isclose(a["top_share"][q], b["top_share"][q], rel_tol=1e-12)


def test_built_once_into_the_cache(fresh_load, tmp_path):
    cc = cpu._compiler()
    if cc is None:
        pytest.skip("no C compiler here")
    lib, temporary = cpu._build(*cc)
    assert not temporary and lib.parent == tmp_path / "cache" / "native" and lib.exists()
    mtime = lib.stat().st_mtime_ns
    assert cpu._build(*cc) == (lib, False) and lib.stat().st_mtime_ns == mtime
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]  # no build leftovers
    assert cpu.describe().startswith("compiled C (critlib/kernels/cpu.c, ")


def test_a_cache_that_cannot_be_written_builds_in_a_temporary_folder(fresh_load, monkeypatch, tmp_path):
    cc = cpu._compiler()
    if cc is None:
        pytest.skip("no C compiler here")
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv("CRITLIB_CACHE", str(afile / "cache"))  # a path under a file: no folder can be made
    lib, temporary = cpu._build(*cc)
    assert temporary and lib.exists() and not str(lib).startswith(str(tmp_path))
    shutil.rmtree(lib.parent)
    monkeypatch.setenv("CRITLIB_CACHE", "off")
    assert cpu.describe().startswith("compiled C")  # built, loaded, and its temporary folder removed
    assert cpu.summarize_steps(scores(10), 4) is not None


def _built(tmp_path, *flags):
    """critlib_summarize of cpu.c built here with `flags`, and a caller of it: (x, step, threads, block)."""
    cc = cpu._compiler()
    out = tmp_path / "built.so"
    subprocess.run([cc[0], *flags, "-o", str(out), str(cpu.SOURCE)], check=True)
    fn = ctypes.CDLL(str(out)).critlib_summarize
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int64]

    def call(x, step, threads, block):
        rows = torch.empty((-(-x.numel() // step), 5), dtype=torch.float64)
        counts = torch.zeros(N_BINS, dtype=torch.int64)
        maxima = torch.empty(-(-x.numel() // block), dtype=torch.float32)
        assert fn(x.data_ptr(), x.numel(), step, threads, rows.data_ptr(), counts.data_ptr(), maxima.data_ptr(),
                  block) == 0
        return rows, counts, maxima
    return call


def test_counters_folded_before_they_overflow(tmp_path):
    """cpu.c folds each thread's 32-bit counters every FOLD_EVERY scores; built with a small FOLD_EVERY, the
    counts stay exact across many folds."""
    needs_native()
    call = _built(tmp_path, *cpu.FLAGS, "-DFOLD_EVERY=100")
    x = scores(10_007, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(call(x, 64, 2, 8), cpu.summarize_steps(x, 64, 8)))


@pytest.mark.parametrize("flags", [(), ("-DCRITLIB_PORTABLE",), (cpu.OPENMP, "-DCRITLIB_PORTABLE")],
                         ids=["own-threads", "own-threads-portable", "openmp-portable"])
def test_every_build_gives_the_same_bits(tmp_path, flags):
    """Without OpenMP (a compiler that has none) cpu.c starts threads of its own; without AVX2 (another CPU, or
    built CRITLIB_PORTABLE) it sums the same lanes in plain C: the same bits."""
    needs_native()
    try:
        call = _built(tmp_path, *cpu.FLAGS, *flags)
    except subprocess.CalledProcessError:
        pytest.skip(f"this compiler cannot build {flags}")
    for n, step, block in ((100_003, 1024, 32), (5003, 64, 8), (7, 8, 8)):
        x = scores(n, seed=4)
        for threads in (1, 3):
            assert all(torch.equal(a, b) for a, b in zip(call(x, step, threads, block),
                                                         cpu.summarize_steps(x, step, block)))


def test_openmp_threads_where_the_compiler_has_openmp(fresh_load, tmp_path):
    needs_native()
    try:
        _built(tmp_path, *cpu.FLAGS, cpu.OPENMP)
    except subprocess.CalledProcessError:
        pytest.skip("this compiler has no OpenMP")
    assert ", OpenMP threads, " in cpu.describe()


def test_avx2_lanes_where_the_cpu_has_avx2():
    needs_native()
    info = Path("/proc/cpuinfo")
    if platform.machine() != "x86_64" or not info.exists():
        pytest.skip("not an x86-64 Linux machine")
    assert cpu.describe().endswith(", AVX2)") == (" avx2" in info.read_text())


def test_a_compiler_without_openmp_builds_threads_of_its_own(fresh_load, monkeypatch, tmp_path):
    cc = cpu._compiler()
    if cc is None:
        pytest.skip("no C compiler here")
    plain = tmp_path / "plain-cc"
    plain.write_text(f"#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = {cpu.OPENMP} ] && "
                     f"{{ echo 'unsupported option {cpu.OPENMP}' >&2; exit 1; }}; done\nexec {cc[0]} \"$@\"\n")
    plain.chmod(plain.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CC", str(plain))
    assert ", threads of its own, " in cpu.describe()
    assert cpu.summarize_steps(scores(10), 4) is not None


def test_off_or_without_a_compiler_torch_is_used_and_said(fresh_load, monkeypatch, tmp_path):
    monkeypatch.setenv("CRITLIB_NATIVE", "off")
    assert cpu.describe() == "torch (CRITLIB_NATIVE=off)" and cpu.summarize_steps(scores(10), 4) is None
    monkeypatch.delenv("CRITLIB_NATIVE")
    cpu._load.cache_clear()
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert cpu.describe().startswith("torch (no C compiler found")
    rows, counts, maxima = stats.summarize_steps(scores(100), 16, 8)  # torch's path, still complete
    assert rows.shape == (7, 5) and int(counts.sum()) == 100 and maxima is None


def test_a_failing_build_falls_back_and_says_why(fresh_load, monkeypatch, tmp_path):
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'broken-cc 1.0'; exit 0; fi\n"
                      "echo 'cpu.c:1: error: nothing works' >&2; exit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CC", str(broken))
    assert cpu.describe() == "torch (the compiled summary could not be built: broken-cc failed: " \
                             "cpu.c:1: error: nothing works)"
    assert cpu.summarize_steps(scores(10), 4) is None
    assert not list((tmp_path / "cache" / "native").iterdir())  # no half-built library left behind
