"""Provenance of a run: versions, git commit, model and data identity, timings and peak memory."""

from __future__ import annotations

import platform
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch

from . import __version__

PACKAGES = ("torch", "transformers", "gguf", "numpy", "pandas", "pyarrow", "accelerate", "triton", "papermill",
            "plotly")


def git_commit() -> str | None:
    """The commit of the critlib checkout in use (None when installed from a wheel or git is missing)."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str | None]:
    out = {"python": sys.version.split()[0], "critlib": __version__}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def peak_memory(device: torch.device) -> dict:
    """Peak resident memory of this process (and CUDA's peak allocation on a GPU), in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    out = {"peak_rss_bytes": rss}
    if device.type == "cuda":
        out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


class Timer:
    """Wall-clock seconds per named stage."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def host() -> dict:
    """The machine, and how statistics are summarised on its CPU (compiled C, or torch and why)."""
    from .kernels import cpu
    return {"platform": platform.platform(), "machine": platform.machine(),
            "cpu_threads": torch.get_num_threads(), "cpu_summary": cpu.describe()}
