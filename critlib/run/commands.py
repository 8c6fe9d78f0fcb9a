"""The CLI verbs: each checks where it will write before any computation, runs the same phase functions as
the notebooks, and replaces its previous files as one set (critlib.run.context.staged)."""

from __future__ import annotations

from pathlib import Path

from .. import CritlibError
from ..distributed import active as dist_active
from ..distributed import is_main
from ..params import Params, load_params
from . import applications as phase6
from . import sensitivity as phase1
from .context import check_output_dir, prepare, staged

VERBS = {"quantize": ("quantize",), "prune": ("prune",), "bitflip": ("bitflip",),
         "applications": ("quantize", "prune", "bitflip")}


def score(params: Params, outdir: str | Path | None = None, progress: bool = True) -> Path:
    """`critlib score`: Phase 1 -> the files notebook 01 writes."""
    outdir = check_output_dir(outdir or params.output_dir)
    ctx = prepare(params)
    parallel = dist_active()  # every rank takes part in scoring, so none may skip it on a cache hit
    if not is_main():
        phase1.results(ctx, None, progress=False, use_cache=False)
        return outdir
    with staged(outdir) as stage:
        phase1.run(ctx, stage, progress, use_cache=not parallel)
    return outdir


def applications(verb: str, params: Params, outdir: str | Path | None = None, progress: bool = True) -> Path:
    """`critlib quantize|prune|bitflip|applications`: Phase 6 (or one of its experiments) -> the files notebook
    06 writes for it, with Phase 1 and Phase 4 from the folder's cache when they match."""
    which = VERBS[verb]
    outdir = check_output_dir(outdir or params.output_dir)
    ctx = prepare(params)
    with staged(outdir) as stage:
        p1 = phase1.results(ctx, stage, progress) if phase6.needs_phase1(params, which) else None
        phase6.run(ctx, p1, stage, progress, which)
    return outdir


def fingerprint(model: str, output: str | Path, k: int, metrics: list[str], params_file: str | None,
                overrides: list[str]) -> str:
    """`critlib fingerprint MODEL -o FILE`: per-tensor sha256 and the exact bits of the critical weights."""
    from ..integrity import critical_coords, fingerprint as make, save_fingerprint
    from ..models import load_model
    from ..params import METRICS
    output = Path(output)
    if output.is_dir():
        raise CritlibError(f"-o {output} is a folder; name the fingerprint file to write, e.g. {output}/model.json")
    try:
        check_output_dir(output.parent)
    except CritlibError:
        raise CritlibError(f"cannot write the fingerprint file {output}: its folder is a file or not writable; "
                           "pass -o with a file in a folder you can write to") from None
    params = load_params(params_file, list(overrides) + [f"model={model}"])
    metrics = list(dict.fromkeys(metrics or ["magnitude"]))
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise CritlibError(f"unknown metric(s) {', '.join(bad)}; choose from {', '.join(METRICS)}")
    if k < 1:
        raise CritlibError(f"--k {k} must be ≥ 1")
    if metrics == ["magnitude"]:
        loaded, windows = load_model(model, params.dtype, params.device, params.seed, params.tokenizer,
                                     params.trust_remote_code, params.revision), None
    else:
        ctx = prepare(params)
        loaded, windows = ctx.loaded, ctx.windows.score
    crit = critical_coords(loaded.model, metrics, k, windows, params.batch_size)
    meta = {"source": model, "dtype": params.dtype, "metrics": metrics, "k": k}
    if windows is not None:
        meta.update(data=params.data, seq_len=params.seq_len, n_sequences=params.n_sequences)
    fp = make(loaded.model, crit, extra=meta)
    save_fingerprint(fp, output)
    return f"critlib: wrote {output} ({len(fp['tensors'])} tensors, {len(fp['critical'])} critical weights)"


def verify(model: str, file: str | Path, overrides: list[str]) -> tuple[int, str]:
    """`critlib verify MODEL FILE` -> (exit code, report): 0 unchanged, 1 changed or unloadable; a bad
    fingerprint, a missing model or a dtype other than the fingerprint's raise CritlibError (exit 2)."""
    from ..integrity import format_report, load_fingerprint, verify as compare
    from ..models import load_model
    fp = load_fingerprint(file)
    dtype = fp.get("meta", {}).get("dtype", "fp32")
    params = load_params(None, [f"dtype={dtype}"] + list(overrides))
    if params.dtype != load_params(None, [f"dtype={dtype}"]).dtype:
        raise CritlibError(f"the fingerprint was made from the model in {dtype}; verify loads it in that dtype "
                           f"(drop --set dtype={params.dtype})")
    try:
        loaded = load_model(model, params.dtype, params.device, params.seed, None, params.trust_remote_code,
                            params.revision)
    except CritlibError as e:
        if not Path(model).exists():
            raise
        return 1, f"CHANGED: the model at {model} could not be loaded ({e})"
    report = compare(loaded.model, fp)
    return (0 if report["ok"] else 1), format_report(report)
