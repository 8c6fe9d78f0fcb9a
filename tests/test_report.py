"""`critlib run`: the report folder, offline HTML with plotly.js embedded exactly once, headline numbers
that match the files, phase selection, and a failing cell that leaves the previous report intact."""

import hashlib
import html
import json
import os
import re
import shutil
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from critlib import CritlibError, cli
from critlib.report import interpreter_kernel, plotlyjs
from critlib.run import PHASES, select
from critlib.run.headlines import read_headlines
from tests.conftest import REPO, tiny_report_params
from tests.test_viz import assert_no_cloud_upload

TINY = os.path.join(REPO, "params", "tiny.yaml")


def _digest(folder: Path) -> dict:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def _figures_in(nb_path: Path) -> int:
    nb = nbformat.read(nb_path, as_version=4)
    return sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if "application/vnd.plotly.v1+json" in o.get("data", {}))


def test_select_phases():
    assert [p.number for p in select("3,1")] == [1, 3]
    assert [p.key for p in select(["02_cross_metric"])] == ["02_cross_metric"]
    assert select(None) == list(PHASES)
    with pytest.raises(CritlibError, match="unknown phase '9'"):
        select("1,9")


def test_interpreter_kernel_runs_this_python():
    old = os.environ.get("JUPYTER_PATH")
    with interpreter_kernel() as name:
        from jupyter_client.kernelspec import KernelSpecManager
        spec = KernelSpecManager().get_kernel_spec(name)
        assert spec.argv[0] == sys.executable
    assert os.environ.get("JUPYTER_PATH") == old


def test_report_folder(tiny_report):
    for p in PHASES:
        for ext in (".ipynb", ".html"):
            assert (tiny_report / f"{p.key}{ext}").is_file()
    assert not list(tiny_report.parent.glob(".tiny.staging-*")), "staging folder left behind"
    run = json.loads((tiny_report / "run.json").read_text())
    assert set(run["phases"]) == {p.key for p in PHASES}
    index = (tiny_report / "index.html").read_text()
    for p in PHASES:
        assert f'href="{p.key}.html"' in index and f'href="{p.key}.ipynb"' in index
    from critlib.summary import findings
    assert index.index("<h2>Findings</h2>") < index.index("<h2>Run</h2>")
    for sentence in findings(tiny_report):  # every finding, in order, in the index
        assert html.escape(sentence).split("`")[0] in index


SCRIPT_SRC = re.compile(r"<script[^>]*\bsrc=[\"']?([^\"' >]+)")


def test_html_is_offline_with_one_shared_plotlyjs(tiny_report):
    """plotly.js once per run folder (plotly.min.js), loaded by every page from beside it; no script from a
    network address, no copy of plotly.js inside a page or a stored notebook."""
    bundle = plotlyjs()
    assert (tiny_report / "plotly.min.js").read_text() == bundle
    for p in PHASES:
        page = (tiny_report / f"{p.key}.html").read_text()
        assert bundle[:300] not in page, f"{p.key}: plotly.js inside the page"
        assert SCRIPT_SRC.findall(page) == ["plotly.min.js"], f"{p.key}: another script source"
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", page), f"{p.key}: a network address"
        assert "cdn.jsdelivr.net/npm/@jupyter-widgets" not in page and "require.min.js" not in page
        assert page.count("Plotly.newPlot(") == _figures_in(tiny_report / f"{p.key}.ipynb") > 0
        assert bundle[:300] not in (tiny_report / f"{p.key}.ipynb").read_text()
    index = (tiny_report / "index.html").read_text()  # its key figures load the same plotly.min.js
    from critlib.summary import key_figures
    assert SCRIPT_SRC.findall(index) == ["plotly.min.js"] and bundle[:300] not in index
    assert index.count("Plotly.newPlot(") == len(key_figures(tiny_report)) >= 2
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", index)


def _figure_notebook(path: Path) -> Path:
    """A notebook with one figure output as the critlib renderer makes it (no kernel needed)."""
    import plotly.graph_objects as go
    import plotly.io as pio

    from critlib import viz
    viz.setup()
    bundle = pio.renderers["critlib"].to_mimebundle(go.Figure(go.Bar(y=[1, 3])).to_dict())
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("fig", outputs=[
        nbformat.v4.new_output("display_data", data=bundle)])])
    nbformat.write(nb, path)
    return path


def test_to_html_embeds_or_loads_plotlyjs_from_beside_the_page(tmp_path):
    from critlib.report import to_html
    nb = _figure_notebook(tmp_path / "f.ipynb")
    alone = to_html(nb, tmp_path / "alone.html").read_text()
    assert alone.count(plotlyjs()[:300]) == 1 and not SCRIPT_SRC.findall(alone)
    assert "critlib-no-plotly" not in alone
    shared = to_html(nb, tmp_path / "shared.html", plotlyjs_src="plotly.min.js").read_text()
    assert plotlyjs()[:300] not in shared and SCRIPT_SRC.findall(shared) == ["plotly.min.js"]
    assert 'id="critlib-no-plotly"' in shared  # a page copied away from plotly.min.js says so
    for bad in ("https://cdn.plot.ly/plotly.min.js", "//cdn/plotly.js", "file:/tmp/plotly.min.js"):
        with pytest.raises(CritlibError, match="no script from a network"):
            to_html(nb, tmp_path / "bad.html", plotlyjs_src=bad)


def test_no_page_offers_a_cloud_upload(tiny_report):
    bundle = plotlyjs()
    for p in PHASES:
        page = (tiny_report / f"{p.key}.html").read_text().replace(bundle, "")
        assert_no_cloud_upload(page)
        nb = nbformat.read(tiny_report / f"{p.key}.ipynb", as_version=4)
        for c in nb.cells:
            for o in c.get("outputs", []):
                fig = o.get("data", {}).get("application/vnd.plotly.v1+json")
                if fig:
                    assert fig["config"]["showSendToCloud"] is False and fig["config"]["displaylogo"] is False
    assert_no_cloud_upload((tiny_report / "index.html").read_text())


def test_tables_are_whole_and_scroll_sideways(tiny_report):
    """No table in the pages is cut by pandas (a `...` row or column); Phase 3's "At the largest K" holds
    every selector and method; a wide table scrolls inside its output."""
    for p in PHASES:
        nb = nbformat.read(tiny_report / f"{p.key}.ipynb", as_version=4)
        tables = [o["data"]["text/html"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
                  if 'class="dataframe"' in o.get("data", {}).get("text/html", "")]
        for t in tables:
            assert "<td>...</td>" not in t and "<th>...</th>" not in t, f"{p.key}: a table cut by pandas"
        page = (tiny_report / f"{p.key}.html").read_text()
        assert ".jp-OutputArea-output.jp-RenderedHTMLCommon { overflow-x: auto;" in page
    summ = pd.read_parquet(tiny_report / "perturbation_summary.parquet")
    n = int((summ["k"] == summ["k"].max()).sum())
    nb = nbformat.read(tiny_report / "03_perturbation.ipynb", as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and "At the largest K" in c.source)
    cell = next(c for c in nb.cells[at:] if c.cell_type == "code")
    largest = [o["data"]["text/html"] for o in cell.outputs if "text/html" in o.get("data", {})]
    assert len(largest) == 1 and n > 10 and largest[0].count("<tr") == n + 1


def test_headlines_match_the_files(tiny_report):
    h = {k: {i["label"]: i["value"] for i in v} for k, v in read_headlines(tiny_report).items()}
    stats = json.loads((tiny_report / "sensitivity_stats.json").read_text())
    assert h["01_sensitivity"]["held-out perplexity"] == pytest.approx(stats["heldout"]["ppl"], rel=1e-4)
    g = stats["metrics"]["magnitude"]["global"]
    assert h["01_sensitivity"]["magnitude: max / mean"] == pytest.approx(g["max_over_mean"])
    cross = pd.read_csv(tiny_report / "cross_metric.csv")
    k = int(cross["k"].iloc[0])
    assert h["02_cross_metric"][f"mean Jaccard between metrics (top-{k})"] == pytest.approx(cross["jaccard"].mean(), abs=1e-4)
    summ = pd.read_parquet(tiny_report / "perturbation_summary.parquet")
    at = summ[(summ["method"] == "zero") & (summ["k"] == summ["k"].max()) & (summ["selector"] == "random")]
    ratio = h["03_perturbation"][f"ppl ratio, zero top-{summ['k'].max()} of random"]  # "1.000 [lo, hi] (...)"
    assert float(str(ratio).split()[0]) == pytest.approx(at["ppl_ratio_mean"].iloc[0], rel=1e-3)
    sw = json.loads((tiny_report / "superweights.json").read_text())
    assert h["04_super_weights"]["confirmed super weights"] == f"{len(sw['super_weights'])} of {sw['n_candidates']} candidates"
    h6 = h["06_applications"]
    q = pd.read_parquet(tiny_report / "quantization.parquet")
    q = q[q["bits"] == q["bits"].min()]
    none = q[(q["selector"] == "none") & (q["keep_percent"] == 0)]["ppl_ratio"].iloc[0]
    assert h6[f"{q['bits'].min()}-bit quantization, no outliers kept: ppl ratio"] == pytest.approx(none, abs=1e-4)
    pr = pd.read_parquet(tiny_report / "pruning.parquet")
    for mode in ("per_layer", "global"):
        at = pr[(pr["mode"] == mode) & (pr["sparsity"] == pr["sparsity"].max())]
        best = at[at["kind"] == "metric"].sort_values("ppl_ratio").iloc[0]
        what = f"{pr['sparsity'].max():.0%} pruned ({mode})"
        assert h6[f"{what}, best metric ({best['selector']}): ppl ratio"] == pytest.approx(best["ppl_ratio"], abs=1e-4)
        for sel in ("magnitude", "random"):
            v = at[at["selector"] == sel]["ppl_ratio"].iloc[0]
            assert h6[f"{what}, {sel}: ppl ratio"] == pytest.approx(v, abs=1e-4)
    b = pd.read_parquet(tiny_report / "bitflip_break.parquet")
    rnd = b[b["order"] == "random_bits"]["n_flips"].astype("float64").fillna(float("inf"))
    label = f"flips to break, random weights and bits (median of {len(rnd)} draws)"
    assert h6[label] == (float(np.median(rnd)) if np.isfinite(np.median(rnd)) else f"> {int(b['n_available'].max())}")
    index = (tiny_report / "index.html").read_text()
    assert "held-out perplexity" in index and "confirmed super weights" in index


def test_failing_cell_exits_nonzero_and_keeps_the_previous_report(tiny_report, capsys):
    before = _digest(tiny_report)
    rc = cli.main(["run", "-p", TINY, "-o", str(tiny_report), "--phases", "1", "-q",
                   "--set", f"model=synthetic:{REPO}/params/tiny-model.json", "--set", "data=/nonexistent/corpus.txt"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("critlib: error: notebook 01_sensitivity failed: CritlibError")
    assert "/nonexistent/corpus.txt" in err[0]
    failed = tiny_report.parent / "tiny.failed"
    assert str(failed / "01_sensitivity.ipynb") in err[0] and (failed / "01_sensitivity.ipynb").is_file()
    assert _digest(tiny_report) == before, "the previous report was changed"
    shutil.rmtree(failed)


def test_rerun_one_phase_keeps_the_others(tiny_report, tmp_path, capfd):
    from critlib.run import cache
    out = tmp_path / "again"
    shutil.copytree(tiny_report, out)
    shutil.copytree(cache.home(tiny_report), cache.home(out))  # the run's cache lives beside its folder
    before = _digest(out)
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        from critlib.report import run_report
        run_report(TINY, tiny_report_params(), out, phases="2,5", progress=True)
    finally:
        os.environ.pop("OMP_NUM_THREADS") if old is None else os.environ.__setitem__("OMP_NUM_THREADS", old)
    # the terminal (the kernel's stderr too): the estimate from the last run's times (same parameters), each
    # phase with its time and the last run's, the time left after each but the last; between them, at most one
    # line per 30 s from the phase's loops; nothing else
    err = capfd.readouterr().err.strip().splitlines()
    took, source = r"\d+ (?:s|min \d\d s|h \d\d min)", r"\(estimate from the last run's phase times\)"
    two = r"critlib: phase 1/2: Cross-metric agreement \(phase 2\)"
    five = r"critlib: phase 2/2: Token explorer \(phase 5\)"
    assert re.fullmatch(rf"critlib: 2 phases to run, ~\d+ (?:s|min) in all {source}", err[0]), err
    loops = [e for e in err if re.fullmatch(rf"(?:{two}|{five}): .+ \d+(?:/\d+)? \({took}\)", e)]
    main = [e for e in err if e not in loops]
    assert len(main) == 5, err
    assert re.fullmatch(rf"{two} \(last run: {took}\)", main[1])
    assert re.fullmatch(rf"{two}: done in {took} \(total {took}\); ~\d+ (?:s|min) left {source}", main[2])
    assert re.fullmatch(rf"{five} \(last run: {took}\)", main[3])
    assert re.fullmatch(rf"{five}: done in {took} \(total {took}\)", main[4])
    after = _digest(out)
    assert after["01_sensitivity.html"] == before["01_sensitivity.html"]
    assert after["02_cross_metric.html"] != before["02_cross_metric.html"]
    assert json.loads((out / "manifest_02_cross_metric.json").read_text())["phase1_from_cache"] is True
    run = json.loads((out / "run.json").read_text())
    assert run["phases"]["01_sensitivity"].get("from_earlier_run") is True
    assert "from_earlier_run" not in run["phases"]["02_cross_metric"]
    assert "(earlier run)" in (out / "index.html").read_text()


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_interrupt_cleans_up_with_one_line(tmp_path, how):
    """A run killed with SIGTERM, or interrupted as a terminal's Ctrl-C does (SIGINT to the whole foreground
    process group), exits 130 with one line, leaves no hidden staging folder, keeps the partial run in
    `<outdir>.failed/` and the previous report untouched."""
    import signal
    import subprocess
    import time
    out = tmp_path / "rep"
    out.mkdir()
    (out / "index.html").write_text("previous")
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "  # as in a terminal
            "from critlib.cli import main; sys.exit(main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", code, "run", "-p", TINY, "-o", str(out), "-q",
           "--set", f"model={tiny_report_params()['model']}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".rep.staging-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "critlib: interrupted; earlier results were left as they were"
    assert "Traceback" not in err, err
    assert not list(tmp_path.glob(".rep.staging-*"))
    assert (tmp_path / "rep.failed").is_dir()
    assert (out / "index.html").read_text() == "previous"


def test_html_verb_renders_one_notebook_offline(tmp_path, capsys):
    nb = _figure_notebook(tmp_path / "f.ipynb")
    assert cli.main(["html", str(nb)]) == 0
    page = (tmp_path / "f.html").read_text()
    assert plotlyjs()[:300] in page and not SCRIPT_SRC.findall(page)
    assert cli.main(["html", str(nb), "-o", str(tmp_path / "sub" / "g.html")]) == 0
    assert (tmp_path / "sub" / "g.html").is_file()
    capsys.readouterr()
    (tmp_path / "bad.ipynb").write_text("{not json")
    for argv in (["html", str(tmp_path / "missing.ipynb")], ["html", str(tmp_path / "bad.ipynb")],
                 ["html", str(nb), "-o", str(tmp_path)]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("critlib: error: "), err
