"""Every phase notebook's first cell: the run's parameters from the notebook's variables, figures set up,
the model and data loaded, and the folder it writes to."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ..params import Params, load_params, valid_keys
from .context import Context, prepare


NOTEBOOK_PARAMETERS = (
    ("params_file", "params YAML; None: built-in defaults, the embedded default model"),
    ("output_dir", "folder for tables and JSON; None: the output_dir of the params"),
    ("write_dir", "where files are written; None: output_dir (critlib run writes to a staging folder)"),
)


def parameters_cell() -> str:
    """The source of every phase notebook's `parameters` cell: the notebook's own variables, then every run
    parameter as None, so that papermill's `-f params/X.yaml` and `-p key value` set known variables (no
    "Passed unknown parameter" warnings) and a user edits one cell. After a new key in `Params`, paste this
    into each notebook: `python -c "from critlib.run.notebook import parameters_cell; print(parameters_cell())"`.
    """
    own = [name for name, _ in NOTEBOOK_PARAMETERS]
    lines = [f"{name} = None  # {doc}" for name, doc in NOTEBOOK_PARAMETERS]
    lines += ["# Any run parameter (params/default.yaml, README \"Parameters\"): None takes it from params_file, else",
              "# the built-in default; a value here, or papermill's `-p key value` / `-f params/X.yaml`, overrides it."]
    lines += [f"{k} = None" for k in valid_keys() if k not in own]
    return "\n".join(lines)


def params_from(namespace: dict) -> Params:
    """The run's Params from a notebook's variables: `params_file` (a YAML, or None for the built-in
    defaults), overridden by any variable named like a Params key that is not None (the `parameters` cell
    declares them all; papermill `-f X.yaml` sets every key of X). Opened from `notebooks/` in JupyterLab,
    relative paths resolve from the repository root, as with `make run`."""
    cwd = Path.cwd()
    if cwd.name == "notebooks" and (cwd.parent / "params").is_dir():
        os.chdir(cwd.parent)
    check_checkout(Path.cwd())
    overrides = {k: namespace[k] for k in valid_keys() if namespace.get(k) is not None}
    return load_params(namespace.get("params_file"), overrides)


def check_checkout(root: Path) -> None:
    """Warn when the checkout at `root` is not the one whose critlib this kernel imports: the "critlib"
    kernel is the .venv of the checkout where `make setup` (or `make kernel`) last ran, so a notebook opened in
    another checkout would silently run that one's code."""
    import critlib
    here = root / "critlib" / "__init__.py"
    used = Path(critlib.__file__)
    if here.is_file() and not here.resolve().samefile(used.resolve()):
        warnings.warn(f"this notebook's checkout is {root.resolve()}, but its kernel imports critlib from "
                      f"{used.resolve().parent}; run `make kernel` in {root.resolve()} to make the 'critlib' "
                      "kernel this checkout's .venv", stacklevel=3)


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
