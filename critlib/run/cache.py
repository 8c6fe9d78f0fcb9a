"""Results one phase hands to later ones, kept beside the run folder (`<parent>/.<run>.cache/`, so the folder
a user shares holds none of it) under a key of everything they depend on (parameters, data windows, model
identity, the code that computes them): the notebooks of one run compute each phase once, reruns and CLI
verbs writing to the same folder reuse them, and a notebook run alone recomputes whatever is missing. Each
file is written atomically; nothing here is ever unpickled: tensors are read with weights_only, the rest is
JSON."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from .. import __version__
from ..io import write_json
from .context import Context

CODE = Path(__file__).resolve().parent.parent


def code_hash(modules: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for mod in modules:
        h.update((CODE / f"{mod}.py").read_bytes())
    return h.hexdigest()


def key(ctx: Context, param_keys: tuple[str, ...], modules: tuple[str, ...], **extra) -> str:
    """sha256 of the named params, the windows, the model, the device, critlib's version and its code."""
    p = ctx.params
    ident = {k: getattr(p, k) for k in param_keys}
    ident.update(windows=ctx.windows.sha256, model_info=ctx.loaded.info, critlib=__version__,
                 device=str(next(ctx.model.parameters()).device), code=code_hash(modules), **extra)
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def home(outdir: str | Path) -> Path:
    """The cache folder of run folder `outdir`, or of the run a staging folder (`.<run>.staging-*`) will become."""
    folder = Path(outdir).resolve()
    run = re.sub(r"^\.(.+)\.staging-[^/]*$", r"\1", folder.name)
    return folder.parent / f".{run}.cache"


def path(outdir: str | Path, name: str) -> Path:
    return home(outdir) / name


def load_json(outdir: str | Path, name: str, want: str):
    """The cached JSON value stored under key `want`, or None (missing, unreadable or another key)."""
    try:
        data = json.loads(path(outdir, name).read_text())
    except (OSError, ValueError):
        return None
    return data.get("value") if isinstance(data, dict) and data.get("key") == want else None


def save_json(outdir: str | Path, name: str, key_: str, value) -> None:
    write_json(path(outdir, name), {"key": key_, "value": value})


EVALUATIONS = "evaluations.json"
EVALUATION_PARAMS = ("model", "tokenizer", "revision", "dtype", "batch_size", "seed")


def evaluations(ctx: Context, outdir: str | Path):
    """The run's store of measured effects (critlib.effects.Evaluations), with every effect an earlier phase
    of this run measured on this model: Phase 3 and Phase 4 read the same number for the same intervention."""
    from ..effects import Evaluations
    store = Evaluations(ctx.model, ctx.params.batch_size, ctx.params.seed)
    store.records.update(load_json(outdir, EVALUATIONS, _evaluations_key(ctx)) or {})
    return store


def save_evaluations(ctx: Context, outdir: str | Path, store) -> None:
    save_json(outdir, EVALUATIONS, _evaluations_key(ctx), store.records)


def _evaluations_key(ctx: Context) -> str:
    return key(ctx, EVALUATION_PARAMS, ("evaluate", "effects", "perturb", "edit", "models"))
