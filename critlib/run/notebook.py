"""Every phase notebook's first cell: the run's parameters from the notebook's variables, figures set up,
the model and data loaded, and the folder it writes to."""

from __future__ import annotations

import os
from pathlib import Path

from ..params import Params, load_params, valid_keys
from .context import Context, prepare


def params_from(namespace: dict) -> Params:
    """The run's Params from a notebook's variables: `params_file` (a YAML, or None for the built-in
    defaults), overridden by any variable named like a Params key that is not None (papermill `-f X.yaml`
    injects every key of X). Opened from `notebooks/` in JupyterLab, relative paths resolve from the
    repository root, as with `make run`."""
    cwd = Path.cwd()
    if cwd.name == "notebooks" and (cwd.parent / "params").is_dir():
        os.chdir(cwd.parent)
    overrides = {k: namespace[k] for k in valid_keys() if namespace.get(k) is not None}
    return load_params(namespace.get("params_file"), overrides)


def outdir_of(params: Params, namespace: dict | None = None) -> Path:
    """Where a notebook writes: its `write_dir` variable when set (critlib run's staging folder, moved to
    output_dir when every phase succeeded), else the params' output_dir."""
    out = Path((namespace or {}).get("write_dir") or params.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def start(namespace: dict) -> tuple[Params, Context, Path]:
    """(params, context, output folder) for a notebook whose variables are `namespace` (its `globals()`)."""
    from ..viz import setup
    params = params_from(namespace)
    setup()
    return params, prepare(params), outdir_of(params, namespace)
