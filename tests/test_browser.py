"""The report's HTML in headless Chromium: every Plotly figure actually draws (offline, from the file)."""

import os
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

    shot = tmp_path / f"{phase}.png"
    _run(["--virtual-time-budget=15000", "--window-size=1280,2400", f"--screenshot={shot}", page.as_uri()],
         tmp_path, "shot")
    head = shot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (1280, 2400)
