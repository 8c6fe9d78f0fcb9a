"""The notebooks: committed clean (no outputs, a tagged `parameters` cell, paired with their jupytext .py),
and every one executes on params/tiny.yaml and writes what its phase promises."""

import json
import os
from pathlib import Path

import jupytext
import nbformat
import pandas as pd
import pytest

from critlib import experiments
from critlib.params import valid_keys
from critlib.run import PHASES

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOK_PARAMS = {"params_file", "output_dir", "write_dir"}


def _notebooks():
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_every_phase_has_a_notebook():
    assert {p.key for p in PHASES} <= {f.stem for f in _notebooks()}


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.stem)
def test_committed_without_outputs_and_with_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "a notebook without code"
    for c in code:
        assert c.outputs == [], f"{path.name}: a cell has outputs; clear them before committing"
        assert c.execution_count is None, f"{path.name}: a cell has an execution count; clear outputs"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
    names = {line.split("=")[0].strip() for line in tagged[0].source.splitlines()
             if "=" in line and not line.lstrip().startswith("#")}
    assert NOTEBOOK_PARAMS <= names and names <= NOTEBOOK_PARAMS | set(valid_keys())
    assert nb.cells.index(tagged[0]) < nb.cells.index(code[1]), "the parameters cell must come first"
    assert nb.metadata.kernelspec.name == "critlib"  # the kernel `make setup` installs (the .venv)
    assert "widgets" not in nb.metadata


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.stem)
def test_parameters_cell_declares_every_run_parameter(path):
    """papermill `-f params/X.yaml` / `-p key value` set declared variables only: no "Passed unknown parameter"."""
    from critlib.run.notebook import parameters_cell
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    names = {line.split("=")[0].strip() for line in cell.source.splitlines()
             if "=" in line and not line.lstrip().startswith("#")}
    missing = set(valid_keys()) - names
    assert not missing, (f"{path.name}: the parameters cell lacks {sorted(missing)}; paste "
                         f"critlib.run.notebook.parameters_cell() into it:\n{parameters_cell()}")


def plain_papermill_page(folder: Path) -> Path:
    """notebooks/01_sensitivity run the plain way (papermill -f params/tiny.yaml, then jupyter nbconvert --to
    html), as a researcher would outside `critlib run`; returns the HTML page. Fails on papermill warnings about
    unknown parameters."""
    import subprocess
    import sys
    from tests.conftest import REPO
    from critlib.report import interpreter_kernel
    out = folder / "01_plain.ipynb"
    # the notebooks' kernel "critlib" is this interpreter, whichever checkout `make kernel` last registered
    with interpreter_kernel("critlib"):
        run = subprocess.run([sys.executable, "-m", "papermill", str(NOTEBOOKS / "01_sensitivity.ipynb"), str(out),
                              "-f", str(Path(REPO) / "params" / "tiny.yaml"), "-p", "output_dir",
                              str(folder / "data"), "-p", "model", f"synthetic:{REPO}/params/tiny-model.json",
                              "--cwd", REPO, "--no-progress-bar"], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "unknown parameter" not in run.stderr, run.stderr
    conv = subprocess.run([sys.executable, "-m", "nbconvert", "--to", "html", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert conv.returncode == 0, conv.stderr[-3000:]
    return out.with_suffix(".html")


def test_plain_papermill_and_nbconvert_page_has_its_figures(tmp_path):
    from critlib.report import plotlyjs
    page = plain_papermill_page(tmp_path).read_text()
    nb = nbformat.read(tmp_path / "01_plain.ipynb", as_version=4)
    injected = next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert "seq_len = 32" in injected.source  # from params/tiny.yaml
    n = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "application/vnd.plotly.v1+json" in o.get("data", {}))
    assert n > 0 and page.count("Plotly.newPlot(") == n
    assert page.count(plotlyjs()[:300]) == 1  # plotly.js in the page once, from the notebook: offline
    assert json.loads((tmp_path / "data" / "manifest.json").read_text())["params"]["seq_len"] == 32


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.stem)
def test_paired_script_matches(path):
    script = path.with_suffix(".py")
    assert script.is_file(), f"{script.name} missing: run `jupytext --sync {path}`"
    a = jupytext.read(path)
    b = jupytext.read(script)
    assert [(c.cell_type, c.source) for c in a.cells] == [(c.cell_type, c.source) for c in b.cells], \
        f"{path.name} and {script.name} differ: run `jupytext --sync notebooks/*.ipynb`"


def test_applications_outputs(tiny_report):
    from critlib.applications import selectors
    from critlib.freeze import load_masks
    from critlib.integrity import load_fingerprint
    sels = set(selectors(["grad_x_weight", "grad_squared", "fisher", "magnitude", "wanda"]))
    for name in ("quantization", "pruning", "bitflip_single", "bitflip_ranked", "bitflip_break"):
        df = pd.read_parquet(tiny_report / f"{name}.parquet")
        assert len(df) and pd.read_csv(tiny_report / f"{name}.csv").shape == df.shape, name
    q = pd.read_parquet(tiny_report / "quantization.parquet")
    assert set(q["selector"]) - {"superweights"} == sels | {"none"}
    pr = pd.read_parquet(tiny_report / "pruning.parquet")
    assert set(pr["selector"]) == sels | {"none"} and set(pr["mode"]) == {"none", "per_layer", "global"}
    assert set(pd.read_parquet(tiny_report / "bitflip_single.parquet")["selector"]) == sels
    # the fingerprint and the freeze masks hold exactly the union of each metric's global top-K of Phase 1
    top = pd.read_parquet(tiny_report / "top_weights.parquet")
    top = top[top["scope"] == "global"]
    want = {(p, int(r), None if pd.isna(c) else int(c)) for p, r, c in zip(top["param"], top["row"], top["col"])}
    fp = load_fingerprint(tiny_report / "critical_fingerprint.json")
    assert {(c["param"], c["row"], c["col"]) for c in fp["critical"]} == want
    masks = load_masks(tiny_report / "freeze_masks.safetensors")
    assert sum(int(m.sum()) for m in masks.values()) == len(want)
    m6 = json.loads((tiny_report / "manifest_06_applications.json").read_text())
    assert m6["protection"]["n_critical"] == len(want) and m6["protection"]["n_changed"] == 1
    assert m6["heldout_windows"] == 2  # applications_heldout: 2


def test_executed_notebooks_ran_every_cell(tiny_report):
    for p in PHASES:
        nb = nbformat.read(tiny_report / f"{p.key}.ipynb", as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.execution_count is not None for c in code), p.key
        assert not [o for c in code for o in c.outputs if o.output_type == "error"], p.key
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1 and "write_dir" in injected[0].source


def test_phase_outputs(tiny_report):
    top = pd.read_parquet(tiny_report / "top_weights.parquet")
    assert set(top["metric"]) == {"grad_x_weight", "grad_squared", "fisher", "magnitude", "wanda"}
    assert pd.read_csv(tiny_report / "top_weights.csv").shape[0] == len(top)
    stab = pd.read_parquet(tiny_report / "stability.parquet")
    assert set(stab["comparison"]) == {"seed", "corpus"}
    assert (stab[stab["metric"] == "magnitude"]["jaccard"] == 1.0).all()
    pert = pd.read_parquet(tiny_report / "perturbation.parquet")
    assert list(pert.columns) == experiments.COLUMNS
    assert pd.read_csv(tiny_report / "perturbation.csv").shape == pert.shape
    assert set(pert["k"]) == {1, 10}
    m3 = json.loads((tiny_report / "manifest_03_perturbation.json").read_text())
    assert m3["heldout_windows"] == 2 and m3["baseline"]["n_tokens"] == 2 * 31  # perturb_heldout: 2
    methods = {(m if a is None or pd.isna(a) else f"{m}:{a}") for m, a in zip(pert["method"], pert["method_arg"])}
    assert methods == {"zero", "sign_flip", "scale:10", "noise:1", "mean", "bitflip:sign"}
    sw = json.loads((tiny_report / "superweights.json").read_text())
    assert "super_weights" in sw and "generation" in sw
    tok = pd.read_parquet(tiny_report / "token_summary.parquet")
    assert len(tok) == 49152 and tok["token_id"].tolist() == list(range(49152))
    for p in PHASES:
        assert (tiny_report / "headlines" / f"{p.key}.json").is_file()
    for key in ("02_cross_metric", "03_perturbation", "04_super_weights", "06_applications"):
        m = json.loads((tiny_report / f"manifest_{key}.json").read_text())
        assert m["phase1_from_cache"] is True, f"{key} rescored Phase 1 instead of using the run's cache"
        assert m["params"]["output_dir"] == str(tiny_report)


def test_a_notebook_in_another_checkout_warns_which_critlib_it_runs(tmp_path, recwarn):
    """The "critlib" kernel is the .venv of the checkout where `make setup` or `make kernel` last ran: a
    notebook of another checkout says so instead of silently running other code."""
    from critlib.run.notebook import check_checkout
    from tests.conftest import REPO
    check_checkout(Path(REPO))
    assert not recwarn.list
    (tmp_path / "critlib").mkdir()
    (tmp_path / "critlib" / "__init__.py").write_text("")
    with pytest.warns(UserWarning, match=r"run `make kernel` in .*") as got:
        check_checkout(tmp_path)
    assert str(tmp_path.resolve()) in str(got[0].message)
    check_checkout(tmp_path / "elsewhere")  # not a checkout: nothing to compare
    assert not recwarn.list
