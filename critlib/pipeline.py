"""`critlib score`: Phase 1 from a params file to `outputs/<run>/` (all files written atomically at the end)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .data import Windows, load_windows
from .distributed import describe, is_main
from .evaluate import evaluate
from .io import write_json, write_table
from .manifest import Timer, git_commit, host, peak_memory, versions
from .models import DTYPES, Loaded, device_name, load_model
from .params import Params
from .scores import memory_saving
from .sensitivity import Sensitivity, analyze, cross_metric, top_weights_table


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


def prepare(params: Params, timer: Timer | None = None) -> Context:
    timer = timer or Timer()
    seed_everything(params.seed)
    with timer.stage("load_model"):
        loaded = load_model(params.model, params.dtype, params.device, params.seed, params.tokenizer,
                            params.trust_remote_code, params.revision, params.device_map, params.max_memory)
    with timer.stage("load_data"):
        windows = load_windows(params.data, loaded.tokenizer, params.seq_len, params.n_sequences,
                               params.n_heldout, params.prepend_bos, params.seed, params.text_field,
                               vocab_size=loaded.model.get_input_embeddings().num_embeddings)
    return Context(params, loaded, windows, timer)


def run_sensitivity(ctx: Context, progress: bool = True, bottomk: int = 0) -> Sensitivity:
    p = ctx.params
    with ctx.timer.stage("scores"), memory_saving(ctx.loaded.model, p.gradient_checkpointing,
                                                  p.sparse_embedding_grad):
        return analyze(ctx.loaded.model, ctx.windows.score, p.metrics, p.topk_global, p.topk_per_layer,
                       p.batch_size, p.exact_stats, p.chunk_size, DTYPES[p.fisher_dtype], progress,
                       bottomk=bottomk, kernel=p.kernel)


def heldout_baseline(ctx: Context) -> dict:
    """The unchanged model on the held-out windows ({} when there are none)."""
    with ctx.timer.stage("heldout_eval"):
        return evaluate(ctx.loaded.model, ctx.windows.heldout, ctx.params.batch_size) \
            if len(ctx.windows.heldout) else {}


def write_phase1(outdir: Path, result: Sensitivity, table, heldout: dict) -> None:
    """`top_weights.{parquet,csv}` and `sensitivity_stats.json`, each atomically."""
    write_table(outdir / "top_weights", table)
    write_json(outdir / "sensitivity_stats.json", {"metrics": result.stats, "cross_metric": cross_metric(result),
                                                    "unscored": result.unscored, "heldout": heldout})


def manifest(ctx: Context, extra: dict | None = None) -> dict:
    dev = next(ctx.loaded.model.parameters()).device
    out = {"critlib_version": __version__, "git_commit": git_commit(), "params": ctx.params.to_dict(),
           "model": ctx.loaded.info, "device_name": device_name(dev), "data": ctx.windows.describe(),
           "seed": ctx.params.seed, "metrics": ctx.params.metrics,
           "accumulators": {"fisher": ctx.params.fisher_dtype, "statistics": "float64",
                            "scores": "float32"},
           "versions": versions(), "host": host(), "timings_s": ctx.timer.seconds, "memory": peak_memory(dev)}
    out.update(extra or {})
    return out


def score(params: Params, outdir: str | Path | None = None, progress: bool = True) -> Path:
    """Phase 1 end to end; returns the output folder."""
    outdir = Path(outdir or params.output_dir)
    ctx = prepare(params)
    result = run_sensitivity(ctx, progress and is_main())
    if not is_main():  # data-parallel ranks all hold the same result: rank 0 evaluates and writes
        return outdir
    base = heldout_baseline(ctx)
    with ctx.timer.stage("tables"):
        table = top_weights_table(result, ctx.loaded.model, ctx.loaded.tokenizer)
    with ctx.timer.stage("write"):
        write_phase1(outdir, result, table, base)
    write_json(outdir / "manifest.json", manifest(ctx, {"distributed": describe()}))
    return outdir
