"""`critlib run`: execute the phase notebooks with papermill, render each to a self-contained HTML page, and
write `index.html` with the run's headline numbers.

Everything is produced in a staging folder beside the output folder and moved into place only when every
notebook succeeded, so a failing cell leaves the previous report as it was; the partial run is kept in
`<outdir>.failed/`. Notebooks run in a kernel of this very interpreter. The HTML works offline and loads no
script from a network: plotly.js is written once per run folder, as `plotly.min.js` beside the pages, which
load it by a relative path (six pages would otherwise carry six 4.8 MB copies). A page copied away from its
folder says so at its top instead of showing blank figures; `run_report(..., self_contained=True)` or
`to_html(...)` without `plotlyjs_src` make pages that carry plotly.js themselves.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import yaml

from . import CritlibError, __version__
from .io import atomic_path, write_json
from .params import Params, load_params
from .progress import Estimate, Follower, duration, previous_times
from .run import PHASES, Phase, select
from .run.context import check_output_dir, move_into, new_staging
from .run.headlines import read_headlines
from .summary import findings, key_figures, model_name

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL_NAME = "critlib-interpreter"
# ipykernel_launcher with the kernel's own stderr closed: its log lines (e.g. a traceback when an interrupted run
# closes the sockets under it) would land in the user's terminal; cells' output reaches the notebook as messages
KERNEL_MAIN = ("import os, sys; os.dup2(os.open(os.devnull, os.O_WRONLY), 2); sys.path[:1] = [] if sys.path[:1] == "
               "[''] else sys.path[:1]; from ipykernel import kernelapp; kernelapp.launch_new_instance()")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

TEMPLATE = r"""{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block extra_css -%}
<style>
details.critlib-code > summary { cursor: pointer; color: #777; font-size: 12px; margin: 2px 0 2px 70px; }
details.critlib-code[open] > summary { margin-bottom: 4px; }
.critlib-nav { font: 14px sans-serif; margin: 8px 0 16px 70px; }
/* a table wider than the page scrolls sideways inside its output, with a scrollbar that stays visible */
.jp-OutputArea-output.jp-RenderedHTMLCommon { overflow-x: auto; max-width: 100%; }
.jp-OutputArea-output.jp-RenderedHTMLCommon::-webkit-scrollbar { height: 10px; }
.jp-OutputArea-output.jp-RenderedHTMLCommon::-webkit-scrollbar-thumb { background: #bbb; border-radius: 5px; }
</style>
<script type="text/javascript">window.PlotlyConfig = {MathJaxConfig: 'local'};</script>
{%- if resources.critlib_plotlyjs_src %}
<script type="text/javascript" charset="utf-8" src="{{ resources.critlib_plotlyjs_src }}"></script>
{%- else %}
<script type="text/javascript">{{ resources.critlib_plotlyjs }}</script>
{%- endif %}
{%- endblock extra_css -%}
{%- block body_header -%}
{{ super() }}
<div class="critlib-nav"><a href="index.html">&larr; report index</a></div>
{%- if resources.critlib_plotlyjs_src %}
<div id="critlib-no-plotly" class="critlib-nav" style="display: none; color: #b00; font-weight: bold;">
The figures of this page need <code>{{ resources.critlib_plotlyjs_src }}</code> from its run folder: open the page
inside that folder (plotly.js is written there once for all pages).</div>
<script>window.addEventListener("DOMContentLoaded", function () {
  if (typeof Plotly === "undefined") document.getElementById("critlib-no-plotly").style.display = "block";
});</script>
{%- endif %}
{%- endblock body_header -%}
{% block input_group -%}
<details class="critlib-code"><summary>code</summary>
{{ super() }}
</details>
{%- endblock input_group %}
"""


def notebook_path(p: Phase, notebooks: Path | None = None) -> Path:
    return (notebooks or NOTEBOOKS) / f"{p.key}.ipynb"


@contextmanager
def interpreter_kernel(name: str = KERNEL_NAME):
    """A kernelspec `name` that runs this interpreter (found first through JUPYTER_PATH), so notebooks import
    the critlib of this environment whatever other kernels the user has installed."""
    with tempfile.TemporaryDirectory(prefix="critlib-kernel-") as d:
        kdir = Path(d) / "kernels" / name
        kdir.mkdir(parents=True)
        (kdir / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-c", KERNEL_MAIN, "-f", "{connection_file}", "--log-level=ERROR"],
            "display_name": "critlib (this interpreter)", "language": "python"}))
        old = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = d + (os.pathsep + old if old else "")
        try:
            yield name
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old


def plotlyjs() -> str:
    from plotly.offline import get_plotlyjs
    return get_plotlyjs()



PLOTLYJS_FILE = "plotly.min.js"


def write_plotlyjs(folder: str | Path) -> Path:
    """plotly.js (the version of the installed plotly) as `plotly.min.js` in `folder`, for the pages there."""
    with atomic_path(Path(folder) / PLOTLYJS_FILE) as tmp:
        tmp.write_text(plotlyjs(), encoding="utf-8")
    return Path(folder) / PLOTLYJS_FILE


def to_html(notebook: str | Path, html_path: str | Path, title: str | None = None,
            plotlyjs_src: str | None = None) -> Path:
    """Render an executed notebook to one offline HTML page: code folded, widget views dropped (they need a
    live kernel). plotly.js is embedded in the page (it works alone), or with `plotlyjs_src` (a relative path
    such as "plotly.min.js", see `write_plotlyjs`) loaded from beside the page; never from a network."""
    if plotlyjs_src is not None and ("//" in plotlyjs_src or ":" in plotlyjs_src or not plotlyjs_src.endswith(".js")):
        raise CritlibError(f"plotlyjs_src={plotlyjs_src!r}: give a relative path to a .js file beside the page, or "
                           "None to embed plotly.js; a report loads no script from a network")
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter
    nb = nbformat.read(str(notebook), as_version=4)
    nb.metadata.pop("widgets", None)
    if title:
        nb.metadata["title"] = title
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            if _loads_plotlyjs(out):  # the page loads plotly.js itself
                continue
            data = out.get("data")
            if data and WIDGET_VIEW in data:
                del data[WIDGET_VIEW]
                if set(data) <= {"text/plain"}:
                    continue
            kept.append(out)
        cell.outputs = kept
    exporter = HTMLExporter(template_name="lab", extra_loaders=[jinja2.DictLoader({"critlib.html.j2": TEMPLATE})],
                            template_file="critlib.html.j2")
    resources = ({"critlib_plotlyjs": plotlyjs()} if plotlyjs_src is None
                 else {"critlib_plotlyjs_src": plotlyjs_src})
    body, _ = exporter.from_notebook_node(nb, resources=resources)
    with atomic_path(html_path) as tmp:
        tmp.write_text(body, encoding="utf-8")
    return Path(html_path)


def _loads_plotlyjs(output) -> bool:
    """Whether a notebook output is the one `viz.setup` displays to load plotly.js."""
    from .viz import PLOTLYJS_OUTPUT
    meta = output.get("metadata") or {}
    return all(meta.get(k) == v for k, v in PLOTLYJS_OUTPUT.items())


def share_plotlyjs(notebook: str | Path, src: str = PLOTLYJS_FILE) -> None:
    """Make an executed notebook load plotly.js from `src` beside it instead of carrying its own copy (4.8 MB):
    `jupyter nbconvert --to html` of it, in its run folder, still draws its figures offline."""
    import nbformat
    nb = nbformat.read(str(notebook), as_version=4)
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if _loads_plotlyjs(o)]
    for out in outs:
        out["data"] = {"text/html": f'<script type="text/javascript" charset="utf-8" src="{src}"></script>'}
    if outs:
        with atomic_path(notebook) as tmp:
            nbformat.write(nb, str(tmp))


def _error_line(err) -> str:
    """One line from a papermill execution error: the exception type and the first line of its message."""
    ename = getattr(err, "ename", type(err).__name__)
    evalue = str(getattr(err, "evalue", err)).strip().splitlines()
    cell = getattr(err, "exec_count", None)
    where = f" in cell [{cell}]" if cell is not None else ""
    return f"{ename}{where}: {evalue[0] if evalue else ''}"


def execute(notebook: Path, output: Path, parameters: dict, kernel: str, cwd: str | Path,
            progress: bool = False) -> None:
    """Run a notebook with papermill. The kernel talks over IPC sockets in a private folder where the OS has
    them (no TCP port, so no ipykernel warning about unencrypted TCP); `progress`: papermill's per-cell bar."""
    import papermill
    from traitlets.config import Config
    config = Config()
    with tempfile.TemporaryDirectory(prefix="critlib-ipc-") as d:
        if os.name == "posix":
            config.KernelManager.transport = "ipc"
            config.KernelManager.ip = os.path.join(d, "kernel")
        papermill.execute_notebook(str(notebook), str(output), parameters=parameters, kernel_name=kernel,
                                   progress_bar=progress, cwd=str(cwd), log_output=False, config=config)


def run_report(params_file: str | Path | None = None, overrides: list[str] | dict | None = None,
               outdir: str | Path | None = None, phases: str | list | None = None, progress: bool = True,
               notebooks: str | Path | None = None, self_contained: bool = False) -> Path:
    """Execute the chosen phases' notebooks (all by default) and write the report into `outdir` (default:
    the params' output_dir): `<phase>.ipynb`, `<phase>.html`, the phases' data files, `run.json`, and
    `index.html`, with plotly.js once as `plotly.min.js` (or, `self_contained`, inside every page). With
    `progress`, stderr follows the run: each phase, its time, the time left and its loops' counts
    (critlib.progress). Raises CritlibError with the failing cell's error; the previous report stays intact."""
    params = load_params(params_file, overrides)
    outdir = check_output_dir(outdir or params.output_dir)
    nb_dir = Path(notebooks).resolve() if notebooks else NOTEBOOKS
    chosen = select(phases)
    for p in chosen:
        if not notebook_path(p, nb_dir).is_file():
            raise CritlibError(f"notebook {notebook_path(p, nb_dir)} is missing; critlib run needs the notebooks/ "
                               "folder of a critlib checkout")
    staging = new_staging(outdir)  # its phases find the run's cache: `--phases 3` reuses Phase 1
    failed = outdir.parent / f"{outdir.name}.failed"
    try:
        params.output_dir = str(outdir)
        resolved = staging / "params.yaml"
        with atomic_path(resolved) as tmp:
            tmp.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
        src = None if self_contained else write_plotlyjs(staging).name
        record = {"critlib_version": __version__, "params_file": str(params_file) if params_file else None,
                  "overrides": overrides if isinstance(overrides, dict) else list(overrides or []),
                  "started": _now(), "phases": {}}
        previous = _read_json(outdir / "run.json") or {}
        estimate = Estimate([p.key for p in chosen], previous_times(previous, _same_params(outdir, resolved)),
                            (params.n_sequences + params.n_heldout) * params.seq_len)
        if progress:
            print(f"critlib: {len(chosen)} phase{'s' if len(chosen) > 1 else ''} to run, "
                  f"{estimate.line().replace(' left', ' in all', 1)}", file=sys.stderr, flush=True)
        began = time.perf_counter()
        with interpreter_kernel() as kernel:
            for i, p in enumerate(chosen, 1):
                nb_out = staging / f"{p.key}.ipynb"
                start = time.perf_counter()
                name = f"phase {i}/{len(chosen)}: {p.title}"
                if len(chosen) < len(PHASES):
                    name += f" (phase {p.number})"
                if progress:
                    last = previous.get("phases", {}).get(p.key, {}).get("seconds")
                    print(f"critlib: {name}" + (f" (last run: {duration(last)})" if last else ""),
                          file=sys.stderr, flush=True)
                try:
                    with Follower(f"critlib: {name}") if progress else nullcontext():
                        execute(notebook_path(p, nb_dir), nb_out, {"params_file": str(resolved),
                                                                  "write_dir": str(staging)},
                                kernel, Path.cwd())
                except Exception as e:
                    if type(e).__name__ != "PapermillExecutionError":
                        raise
                    _fail(staging, failed, p, nb_out)
                    raise CritlibError(f"notebook {p.key} failed: {_error_line(e)} — partial notebook: "
                                       f"{failed / nb_out.name}; the previous report in {outdir} was left as it "
                                       "was") from None
                if src:
                    share_plotlyjs(nb_out, src)
                to_html(nb_out, staging / f"{p.key}.html", f"{p.number}. {p.title}", src)
                took = time.perf_counter() - start
                record["phases"][p.key] = {"seconds": round(took, 2), "finished": _now()}
                estimate.finished(p.key, took)
                if progress:
                    rest = estimate.line()
                    print(f"critlib: {name}: done in {duration(took)} (total {duration(time.perf_counter() - began)})"
                          + (f"; {rest}" if rest else ""), file=sys.stderr, flush=True)
        record["finished"] = _now()
        for key, info in previous.get("phases", {}).items():
            if key not in record["phases"] and (outdir / f"{key}.html").is_file():
                record["phases"][key] = dict(info, from_earlier_run=True)
        write_json(staging / "run.json", record)
        headlines = read_headlines(outdir)
        headlines.update(read_headlines(staging))
        write_index(staging / "index.html", params, record, headlines, findings(staging, outdir),
                    model_name(staging, outdir), key_figures(staging, outdir), src)
        move_into(staging, outdir)
    except BaseException:
        if staging.exists():
            _fail(staging, failed, None, None)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return outdir


def _fail(staging: Path, failed: Path, p: Phase | None, nb_out: Path | None) -> None:
    """Keep the partial run as `<outdir>.failed/` (replacing an older one), with the failed notebook's HTML."""
    if nb_out is not None and nb_out.is_file():
        try:
            shared = (nb_out.parent / PLOTLYJS_FILE).is_file()
            to_html(nb_out, nb_out.with_suffix(".html"), f"{p.number}. {p.title} (FAILED)",
                    PLOTLYJS_FILE if shared else None)
        except Exception:  # the notebook itself is what matters
            pass
    shutil.rmtree(failed, ignore_errors=True)
    os.replace(staging, failed)


def _same_params(outdir: Path, resolved: Path) -> bool:
    """Whether the run in `outdir` had the parameters of `resolved` (its output folder aside)."""
    try:
        a, b = (yaml.safe_load(f.read_text()) for f in (outdir / "params.yaml", resolved))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(a, dict) and isinstance(b, dict) and \
        {k: v for k, v in a.items() if k != "output_dir"} == {k: v for k, v in b.items() if k != "output_dir"}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return "—" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_index(path: Path, params: Params, record: dict, headlines: dict[str, list[dict]],
                found: list[str] | None = None, model: str | None = None, figures: list | None = None,
                plotlyjs_src: str | None = None) -> None:
    """The report's front page: the findings in words and the key figures (critlib.summary), then the run's
    identity, and per phase its pages and headline numbers. Figures load plotly.js from `plotlyjs_src` beside
    the page (as the phase pages do), or carry it when None."""
    e = html.escape
    found_html = "".join(f"<li>{_inline_code(e(s))}</li>" for s in found or [])
    figures_html = "".join(_figure_html(key, caption, fig) for key, caption, fig in figures or [])
    rows = []
    for p in PHASES:
        info = record["phases"].get(p.key)
        if info is None:
            status = "not run"
            links = ""
        else:
            status = f"{info['seconds']:.0f} s" + (" (earlier run)" if info.get("from_earlier_run") else "")
            links = f'<a href="{p.key}.html">report</a> · <a href="{p.key}.ipynb">notebook</a>'
        items = "".join(f"<li>{e(i['label'])}: <b>{e(_fmt(i['value']))}</b></li>" for i in headlines.get(p.key, [])
                        ) if info is not None else ""
        rows.append(f"<tr><td>{p.number}</td><td><b>{e(p.title)}</b><br><span class=s>{e(p.summary)}</span></td>"
                    f"<td>{links}</td><td>{e(status)}</td><td><ul>{items}</ul></td></tr>")
    ident = [("model", model or params.model), ("data", params.data), ("metrics", ", ".join(params.metrics)),
             ("scoring / held-out windows", f"{params.n_sequences} / {params.n_heldout} × {params.seq_len} tokens"),
             ("seed", params.seed), ("params file", record.get("params_file") or "(built-in defaults)"),
             ("overrides", ", ".join(map(str, record.get("overrides") or [])) or "none"),
             ("started / finished", f"{record.get('started')} / {record.get('finished')}"),
             ("notebook time", f"{sum(i['seconds'] for i in record['phases'].values() if not i.get('from_earlier_run')):.0f} s"),
             ("critlib", record.get("critlib_version"))]
    ident_html = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in ident)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>critlib report — {e(model or params.model)}</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; width: 100%; margin-bottom: 1.5em; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 6px 8px; vertical-align: top; text-align: left; }}
th {{ width: 220px; color: #555; font-weight: normal; }}
.s {{ color: #666; font-size: 13px; }} ul {{ margin: 0; padding-left: 1.1em; }}
table.phases th, table.phases td {{ width: auto; }} table.phases td:nth-child(2) {{ width: 30%; }}
table.phases td:nth-child(5) {{ width: 45%; }}
ul.findings li {{ margin-bottom: 0.4em; }} ul.findings {{ padding-left: 1.3em; }}
figure.key {{ margin: 0 0 1.5em 0; }} figure.key figcaption {{ color: #444; font-size: 14px; margin-bottom: 4px; }}
</style>{_plotlyjs_head(plotlyjs_src) if figures_html else ''}</head><body>
<h1>critlib report</h1>
{f'<h2>Findings</h2><ul class="findings">{found_html}</ul>' if found_html else ''}
{f'<h2>Key figures</h2>{_no_plotly_note(plotlyjs_src)}{figures_html}' if figures_html else ''}
<h2>Run</h2>
<table>{ident_html}</table>
<h2>Phases</h2>
<table class="phases"><tr><th>#</th><th>phase</th><th>pages</th><th>time</th><th>headline numbers</th></tr>
{''.join(rows)}
</table>
<p class=s>Files: <code>params.yaml</code> (the resolved parameters), <code>run.json</code>, each phase's tables
(<code>.parquet</code> + <code>.csv</code>), JSON and <code>manifest_*.json</code>. Pages work offline, with
<code>plotly.min.js</code> beside them.</p>
</body></html>
"""
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")


def _plotlyjs_head(src: str | None) -> str:
    """plotly.js for the index's figures: from `src` beside the page (saying so if it is missing), or inline."""
    head = '\n<script type="text/javascript">window.PlotlyConfig = {MathJaxConfig: "local"};</script>\n'
    if src is None:
        return head + f'<script type="text/javascript">{plotlyjs()}</script>'
    return head + (f'<script type="text/javascript" charset="utf-8" src="{html.escape(src)}"></script>\n'
                   '<script>window.addEventListener("DOMContentLoaded", function () { if (typeof Plotly === '
                   '"undefined") document.getElementById("critlib-no-plotly").style.display = "block"; });</script>')


def _no_plotly_note(src: str | None) -> str:
    if src is None:
        return ""
    return (f'<p id="critlib-no-plotly" style="display: none; color: #b00; font-weight: bold;">The figures need '
            f'<code>{html.escape(src)}</code> from the run folder: open this page inside that folder.</p>')


def _figure_html(key: str, caption: str, fig) -> str:
    """One key figure with its caption and a link to its phase's page; offline, no cloud button (viz.CONFIG)."""
    import plotly.io as pio
    from .viz import CONFIG
    div = pio.to_html(fig, include_plotlyjs=False, include_mathjax=False, full_html=False, default_width="100%",
                      config=CONFIG)
    return (f'<figure class="key" id="key-{key}"><figcaption>{html.escape(caption)} '
            f'<a href="{key}.html">More on its page</a>.</figcaption>{div}</figure>')


def _inline_code(text: str) -> str:
    """`x` in an escaped sentence -> <code>x</code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def notebook_page(notebook: str | Path, output: str | Path | None = None) -> Path:
    """`critlib html NOTEBOOK`: one executed notebook as one self-contained offline page (plotly.js inside),
    the way `critlib run` renders its pages; checks its input and output before rendering."""
    from .run.context import check_output_dir
    notebook = Path(notebook)
    if not notebook.is_file() or notebook.suffix != ".ipynb":
        raise CritlibError(f"{notebook} is not a notebook file; give an executed .ipynb (e.g. papermill's output)")
    output = Path(output) if output else notebook.with_suffix(".html")
    if output.is_dir():
        raise CritlibError(f"-o {output} is a folder; name the .html page to write")
    check_output_dir(output.parent)
    try:
        return to_html(notebook, output, notebook.stem)
    except (ValueError, KeyError) as e:  # nbformat: not JSON, or not a notebook
        raise CritlibError(f"{notebook} is not a readable notebook ({type(e).__name__}: {e})") from None
