"""The report's HTML in headless Chromium: every Plotly figure actually draws (offline, from the file), offers
no cloud upload, keeps its title when a menu choice is applied; the plain papermill + nbconvert page draws too."""

import html
import json
import os
import re
import shutil
import struct
import subprocess

import nbformat
import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("chromium is not installed; `make test` installs it with `make browser` (Debian package chromium)")
    pytest.skip("chromium is not installed (run `make browser` as root)")


def _run(args, tmp_path, name):
    cmd = [_chromium(), *FLAGS, f"--user-data-dir={tmp_path / ('profile-' + name)}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("phase", ["01_sensitivity", "03_perturbation", "05_token_explorer", "06_applications"])
def test_plotly_figures_draw(tiny_report, tmp_path, phase):
    page = tiny_report / f"{phase}.html"
    nb = nbformat.read(tiny_report / f"{phase}.ipynb", as_version=4)
    n_figures = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
                    if "application/vnd.plotly.v1+json" in o.get("data", {}))
    dom = _run(["--virtual-time-budget=15000", "--dump-dom", page.as_uri()], tmp_path, "dom").stdout
    figures = dom.split('class="plot-container plotly"')[1:]
    assert len(figures) == n_figures > 0, "not every figure was built"
    for fig in figures:
        assert fig.count('class="main-svg"') >= 2
        assert 'class="trace' in fig or 'class="hm"' in fig or "<image" in fig, "a figure without drawn data"
        assert "modebar" in fig, "no toolbar drawn"
        assert "Share chart" not in fig and "plotlyjsicon" not in fig and "plotly.com" not in fig

    shot = tmp_path / f"{phase}.png"
    _run(["--virtual-time-budget=15000", "--window-size=1280,2400", f"--screenshot={shot}", page.as_uri()],
         tmp_path, "shot")
    head = shot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (1280, 2400)


def _n_figures(nb_path) -> int:
    nb = nbformat.read(nb_path, as_version=4)
    return sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if "application/vnd.plotly.v1+json" in o.get("data", {}))


def _probe(page, script: str, tmp_path, name: str) -> str:
    """The value `script` stores in `document.body.dataset.probe`, read from the dumped DOM."""
    dest = tmp_path / f"probe-{name}.html"
    dest.write_text(page.read_text().replace("</body>", f"<script>{script}</script></body>"))
    dom = _run(["--virtual-time-budget=20000", "--dump-dom", dest.as_uri()], tmp_path, name).stdout
    m = re.search(r'data-probe="([^"]*)"', dom)
    assert m, "the probe did not run"
    return html.unescape(m.group(1))


MENU_PROBE = """window.addEventListener("load", () => setTimeout(async () => {
  const out = [];
  for (const gd of document.querySelectorAll(".js-plotly-plot")) {
    const menus = gd.layout.updatemenus || [];
    if (!menus.length) continue;
    const b = menus[0].buttons[menus[0].buttons.length - 1];
    await Plotly.update(gd, b.args[0], b.args[1]);  // what choosing the menu's last entry does
    const t = gd.querySelector(".gtitle");
    out.push([t ? t.textContent : "", b.label]);
  }
  document.body.dataset.probe = JSON.stringify(out);
}, 500));"""


@pytest.mark.parametrize("phase", ["01_sensitivity", "05_token_explorer"])
def test_a_menu_choice_keeps_the_title(tiny_report, tmp_path, phase):
    shutil.copy(tiny_report / "plotly.min.js", tmp_path / "plotly.min.js")
    shutil.copy(tiny_report / f"{phase}.html", tmp_path / f"{phase}.html")
    titles = json.loads(_probe(tmp_path / f"{phase}.html", MENU_PROBE, tmp_path, "menu"))
    assert titles, "no figure with a menu"
    for shown, label in titles:
        assert shown and label in shown, (shown, label)


def test_a_page_without_its_plotlyjs_says_so(tiny_report, tmp_path):
    alone = tmp_path / "01_sensitivity.html"
    shutil.copy(tiny_report / "01_sensitivity.html", alone)  # without plotly.min.js beside it
    probe = 'window.addEventListener("load", () => { document.body.dataset.probe = ' \
            'getComputedStyle(document.getElementById("critlib-no-plotly")).display; });'
    assert _probe(alone, probe, tmp_path, "alone") == "block"


def test_plain_papermill_nbconvert_page_draws(tmp_path):
    from tests.test_notebooks import plain_papermill_page
    page = plain_papermill_page(tmp_path)
    n = _n_figures(page.with_suffix(".ipynb"))
    dom = _run(["--virtual-time-budget=15000", "--dump-dom", page.as_uri()], tmp_path, "plain").stdout
    figures = dom.split('class="plot-container plotly"')[1:]
    assert len(figures) == n > 0, "the plain nbconvert page does not draw its figures"
    for fig in figures:
        assert 'class="trace' in fig or 'class="hm"' in fig, "a figure without drawn data"


def test_index_opens_with_the_findings_naming_the_model(tiny_report, tmp_path):
    """The findings first, then the key figures, drawn from the run folder's plotly.min.js."""
    index = tiny_report / "index.html"
    dom = _run(["--virtual-time-budget=15000", "--dump-dom", index.as_uri()], tmp_path, "index").stdout
    findings = dom.split("<h2>Findings</h2>")
    assert len(findings) == 2 and findings[0].count("<h2>") == 0, "the findings are not the first section"
    first = re.search(r'<ul class="findings">(.*?)</ul>', findings[1], re.S).group(1)
    assert "Model: a randomly initialised LlamaForCausalLM" in html.unescape(first)
    assert "Causal test" in first and "Concentration" in first
    key = findings[1].split("<h2>Key figures</h2>")
    assert len(key) == 2 and key[0].count("<h2>") == 0, "no key figures right after the findings"
    figures = key[1].split("<h2>Run</h2>")[0].split('class="plot-container plotly"')[1:]
    assert len(figures) == index.read_text().count("Plotly.newPlot(") >= 2, "not every key figure was built"
    assert 'id="key-03_perturbation"' in key[1] and 'id="key-01_sensitivity"' in key[1]
    for fig in figures:
        assert fig.count('class="main-svg"') >= 2
        assert 'class="trace' in fig or 'class="hm"' in fig or "<image" in fig, "a key figure without drawn data"
        assert "Share chart" not in fig and "plotlyjsicon" not in fig and "plotly.com" not in fig
    assert 'id="critlib-no-plotly" style="display: none;' in dom
