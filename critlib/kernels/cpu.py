"""The statistics' per-step summary on a CPU, compiled from `cpu.c` on first use and called through ctypes.

`torch.bincount` counts in one serial loop (about 2 ns per score on an Intel Xeon, two thirds of the whole
summary): `cpu.c` makes the whole summary of a tensor in one read, its steps shared among torch's threads,
with the ranking's block maxima on the way, with AVX2 where the CPU has it (chosen at run time); picks pass
2's kept scores (`kept`) without torch's index and mask temporaries; and counts them (`count_kept`, the
bits of torch's bincount). Its numbers do not depend on the thread count, the CPU or AVX2 (see `cpu.c`);
the summary's differ from torch's in the last bits of the float64 sums only (torch sums in another order),
and the histogram counts are equal.

The library is built with the system's C compiler (`$CC`, else `cc`) into the critlib cache folder
(`critlib.models.cache_root()`, under `native/`), keyed by the source, flags and compiler, so it is built
once per machine, with OpenMP where the compiler has it: its threads are then the OpenMP threads of torch's
own kernels (on an Intel Xeon, threads of its own shared two cores with them while they spun after the
backward's last kernel: 1.4 s against 0.9 s for a 1B-shape `analyze`'s summaries). Without a compiler, or
with CRITLIB_NATIVE=off, critlib uses torch's path; `describe()` says which, for the manifest.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ..bins import N_BINS

SOURCE = Path(__file__).with_name("cpu.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-pthread", "-ffp-contract=off")
OPENMP = "-fopenmp"  # tried first: the summary's threads are then torch's OpenMP threads (see run_jobs in cpu.c)
MAX_STEP = 1 << 30  # cpu.c folds its 32-bit counters between steps, so one step stays below 2**32 scores


def _compiler() -> tuple[str, str] | None:
    """(path, version line) of the C compiler, or None."""
    cc = shutil.which(os.environ.get("CC", "").strip() or "cc")
    if cc is None:
        return None
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return (cc, (out.stdout or out.stderr).splitlines()[0].strip()) if out.returncode == 0 else None


def _build(cc: str, version: str, flags: tuple[str, ...] = FLAGS) -> tuple[Path, bool]:
    """(the compiled library, whether it lies in a temporary folder): built into the cache unless an identical
    build is there (an atomic rename, so concurrent processes never load a half-written file); into a
    temporary folder where the cache is off or cannot be written."""
    from ..models import cache_root
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(flags).encode(), version.encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    root, name = cache_root(), f"cpu-{key}.so"
    if root is not None and (root / "native" / name).exists():
        return root / "native" / name, False
    temporary = False
    try:
        if root is None:
            raise OSError("no cache")
        folder = root / "native"
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".build-", suffix=".so")
    except OSError:
        folder, temporary = Path(tempfile.mkdtemp(prefix="critlib-native-")), True
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".build-", suffix=".so")
    os.close(fd)
    lib = folder / name
    try:
        out = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            lines = out.stderr.strip().splitlines()
            raise OSError(f"{Path(cc).name} failed: {lines[-1] if lines else f'exit status {out.returncode}'}")
        os.replace(tmp, lib)
    except BaseException:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)
    return lib, temporary


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library or None, how statistics are computed on a CPU, in words)."""
    if os.environ.get("CRITLIB_NATIVE", "").strip().lower() in ("off", "0", "false", "no"):
        return None, "torch (CRITLIB_NATIVE=off)"
    found = _compiler()
    if found is None:
        return None, "torch (no C compiler found: set CC or install gcc for the compiled summary)"
    for flags in (FLAGS + (OPENMP,), FLAGS):  # without OpenMP where the compiler has none (Apple's clang)
        try:
            path, temporary = _build(*found, flags)
            lib = ctypes.CDLL(str(path))
            break
        except (OSError, subprocess.SubprocessError) as e:
            error = e
    else:
        return None, f"torch (the compiled summary could not be built: {error})"
    if temporary:  # loaded: the file is no longer needed
        shutil.rmtree(path.parent, ignore_errors=True)
    fn = lib.critlib_summarize
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.critlib_count_kept.restype = ctypes.c_int
    lib.critlib_count_kept.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                       ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    lib.critlib_kept.restype = ctypes.c_int
    lib.critlib_kept.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
                                 ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64)]
    lib.critlib_free.restype = None
    lib.critlib_free.argtypes = [ctypes.c_void_p]
    threads = "OpenMP threads" if OPENMP in flags else "threads of its own"
    lanes = "AVX2" if lib.critlib_avx2() else "plain C"
    return lib, f"compiled C (critlib/kernels/cpu.c, {found[1]}, {threads}, {lanes})"


def describe() -> str:
    """How the statistics' summary runs on a CPU here: the compiled C summary, or torch's and why."""
    return _load()[1]


def summarize_steps(x: torch.Tensor, step: int, block: int = 0) -> tuple[torch.Tensor, torch.Tensor,
                                                                         torch.Tensor | None] | None:
    """`critlib.stats.summarize` of each step of `step` elements of the 1-D float32 CPU tensor `x`: ([steps, 5]
    float64 rows, int64 histogram, and where `block` (a multiple of 8 dividing `step`) is given the maximum of
    every `block` scores, as `critlib.rank` ranks by), in one read. None where the compiled summary is not to
    be had, or where a score is negative or not finite (torch's path then reports those as it always has)."""
    lib = _load()[0]
    if lib is None or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 1 or not x.numel() \
            or step > MAX_STEP:
        return None
    x = x.contiguous()
    rows = torch.empty((-(-x.numel() // step), 5), dtype=torch.float64)
    counts = torch.zeros(N_BINS, dtype=torch.int64)
    fits = block > 0 and block % 8 == 0 and step % block == 0
    maxima = torch.empty(-(-x.numel() // block), dtype=torch.float32) if fits else None
    status = lib.critlib_summarize(x.data_ptr(), x.numel(), step, torch.get_num_threads(), rows.data_ptr(),
                                   counts.data_ptr(), None if maxima is None else maxima.data_ptr(), block)
    return (rows, counts, maxima) if status == 0 else None


def kept(x: torch.Tensor, keep: torch.Tensor, step: int) -> torch.Tensor | None:
    """The scores of the 1-D float32 CPU tensor `x` whose bin (top 16 bits) the bool table `keep` [N_BINS]
    marks, in their order (pass 2 of `critlib.stats`), read once in steps of `step` shared among torch's
    threads; None where the compiled summary is not to be had."""
    lib = _load()[0]
    if lib is None or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 1 or not x.numel():
        return None
    x, keep = x.contiguous(), keep.to(device="cpu", dtype=torch.bool).contiguous()
    buf, count = ctypes.c_void_p(), ctypes.c_int64()
    try:
        if lib.critlib_kept(x.data_ptr(), x.numel(), step, keep.data_ptr(), torch.get_num_threads(),
                            ctypes.byref(buf), ctypes.byref(count)):
            return None
        out = torch.empty(count.value, dtype=torch.float32)
        ctypes.memmove(out.data_ptr(), buf, count.value * 4)
        return out
    finally:
        lib.critlib_free(buf)


def count_kept(x: torch.Tensor, slot: torch.Tensor, floor: int, fine: torch.Tensor, high: torch.Tensor) -> bool:
    """Pass 2's counts of one group's kept scores `x` (1-D float32): `fine` [rows, 2**16] (int64) counts the low
    16 bits of the scores whose bin b has a row slot[b] < rows, and `high` [N_BINS] (float64) adds up those in
    the bins from `floor` on, with the bits of torch's bincount. False (nothing counted) where the compiled
    summary is not to be had, and for negative scores."""
    lib = _load()[0]
    if lib is None or any(t.device.type != "cpu" or not t.is_contiguous() for t in (x, slot, fine, high)) \
            or x.dtype != torch.float32 or slot.dtype != torch.int64 or fine.dtype != torch.int64 \
            or high.dtype != torch.float64 or slot.numel() != N_BINS or high.numel() != N_BINS:
        return False
    return lib.critlib_count_kept(x.data_ptr(), x.numel(), slot.data_ptr(), fine.shape[0], floor, fine.data_ptr(),
                                  high.data_ptr()) == 0
