"""The run context: one loaded model with its data windows and the parameters of the run, built once per
process; the manifest every phase writes beside its files; staging folders so a phase's files replace the
previous run's as one set."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import CritlibError, __version__
from ..data import Windows, load_windows
from ..manifest import Timer, git_commit, host, peak_memory, versions
from ..models import Loaded, check_seq_len, device_name, load_model
from ..params import Params


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Context:
    """A loaded model with its data windows, as every phase needs them."""
    params: Params
    loaded: Loaded
    windows: Windows
    timer: Timer

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def with_heldout(self, n: int) -> "Context":
        """The same context evaluating on the first `n` held-out windows only (0 or more than there are: all)."""
        if not n or n >= len(self.windows.heldout):
            return self
        return dataclasses.replace(self, windows=dataclasses.replace(self.windows, heldout=self.windows.heldout[:n]))


def prepare(params: Params, timer: Timer | None = None) -> Context:
    """Seed, load the model and cut the data into scoring and held-out windows."""
    timer = timer or Timer()
    seed_everything(params.seed)
    with timer.stage("load_model"):
        loaded = load_model(params.model, params.dtype, params.device, params.seed, params.tokenizer,
                            params.trust_remote_code, params.revision, params.device_map, params.max_memory)
    check_seq_len(loaded.model, params.seq_len)
    with timer.stage("load_data"):
        windows = load_windows(params.data, loaded.tokenizer, params.seq_len, params.n_sequences,
                               params.n_heldout, params.prepend_bos, params.seed, params.text_field,
                               vocab_size=loaded.model.get_input_embeddings().num_embeddings)
    return Context(params, loaded, windows, timer)


def config_from(cls, params: Params, **overrides):
    """A domain module's frozen config whose field names are Params keys, filled from the run's params."""
    values = {f.name: getattr(params, f.name) for f in dataclasses.fields(cls) if f.name not in overrides}
    return cls(**values, **overrides)


def manifest(ctx: Context, extra: dict | None = None) -> dict:
    """How the files beside it were made: versions, commit, parameters, model, data, timings, peak memory."""
    dev = next(ctx.model.parameters()).device
    out = {"critlib_version": __version__, "git_commit": git_commit(), "params": ctx.params.to_dict(),
           "model": ctx.loaded.info, "device_name": device_name(dev), "data": ctx.windows.describe(),
           "seed": ctx.params.seed, "metrics": ctx.params.metrics,
           "accumulators": {"fisher": ctx.params.fisher_dtype, "statistics": "float64", "scores": "float32"},
           "versions": versions(), "host": host(), "timings_s": ctx.timer.seconds, "memory": peak_memory(dev)}
    out.update(extra or {})
    return out


# ---------------------------------------------------------------- output folders

def check_output_dir(outdir: str | Path) -> Path:
    """Fail before any computation when `outdir` cannot become a folder we can write to."""
    outdir = Path(outdir).resolve()
    if outdir.exists() and not outdir.is_dir():
        raise CritlibError(f"output folder {outdir} is an existing file; pass -o with a folder path")
    parent = outdir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CritlibError(f"output folder {outdir} lies under the file {parent}; pass -o with a folder path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CritlibError(f"cannot write to {parent}; pass -o with a folder you can write to")
    return outdir


def move_into(src: Path, dst: Path) -> None:
    """Move every file under `src` to the same place under `dst`, each with one atomic rename; index.html
    last, so a reader never sees an index that links pages not yet in place."""
    files = sorted((f for f in src.rglob("*") if f.is_file()), key=lambda f: f.name == "index.html")
    for f in files:
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, target)


def new_staging(outdir: Path) -> Path:
    """An empty staging folder beside `outdir` (`.<name>.staging-*`: its phases find the run's cache,
    critlib.run.cache)."""
    outdir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{outdir.name}.staging-", dir=outdir.parent))


@contextmanager
def staged(outdir: str | Path):
    """Yield a staging folder; on success its files replace those in `outdir` as one set (renames only), on
    any failure `outdir` is left exactly as it was and the staging folder is removed."""
    outdir = check_output_dir(outdir)
    staging = new_staging(outdir)
    try:
        yield staging
        move_into(staging, outdir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
