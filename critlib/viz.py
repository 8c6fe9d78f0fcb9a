"""Plotly figures of every phase: each function turns the frames of `critlib.tables` (or a phase's tables)
into a `go.Figure`. `setup()` makes figures display as the Plotly mimetype (live JupyterLab) plus an HTML
div without plotly.js, and in a notebook loads plotly.js once (an output of its own), so a notebook run by
plain papermill and converted by plain `jupyter nbconvert --to html` draws its figures offline too
(the report replaces that output by one shared plotly.min.js per run folder).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from .layout import COMPONENTS
from .tables import ccdf, log_histogram

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
# One colour per metric on every page: the metric's curves in Phase 1, its top-K ("top:m") in Phase 3, its
# selector in Phase 6; its bottom-K ("bottom:m") is a lighter shade. Other metrics take EXTRA_COLORS in the
# order they come (the params' order, the same on every page). The random control is black.
METRIC_COLORS = {"grad_x_weight": "#1f77b4", "grad_squared": "#ff7f0e", "fisher": "#2ca02c", "magnitude": "#9467bd",
                 "wanda": "#d62728"}
EXTRA_COLORS = ("#8c564b", "#e377c2", "#17becf", "#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39",
                "#7b4173", "#3182bd", "#e6550d", "#31a354")
RANDOM_COLOR = "#222222"

# Every figure's Plotly config. Reports hold unpublished research: no "Share chart" button (plotly.js uploads
# the chart to Plotly Cloud, at plotlyServerURL), no logo linking to plotly.com.
CONFIG = {"displaylogo": False, "showSendToCloud": False, "plotlyServerURL": "",
          "modeBarButtonsToRemove": ["sendChartToCloud"], "responsive": True}


# ---------------------------------------------------------------- display

class _Renderer(pio.base_renderers.MimetypeRenderer):
    """Plotly mimetype for JupyterLab + an HTML div (no plotly.js, no CDN) for nbconvert."""

    def __init__(self, config: dict | None = None):
        self.config = dict(config or CONFIG)

    def to_mimebundle(self, fig_dict):
        bundle = pio.base_renderers.PlotlyRenderer(config=self.config).to_mimebundle(fig_dict)
        bundle["text/html"] = pio.to_html(fig_dict, include_plotlyjs=False, include_mathjax=False,
                                          full_html=False, default_width="100%", validate=False,
                                          config=self.config)
        return bundle


TABLE_ROWS = 2000  # a DataFrame up to this long is shown whole (pandas cuts longer ones to `display.min_rows`)


def setup() -> None:
    """Make `fig.show()` / a figure as a cell's value render with the critlib renderer; Plotly's own renderers
    (`fig.show(renderer="browser")`, ...) get the same config. Tables are shown whole: every column, and up to
    TABLE_ROWS rows (pandas' default cuts a table of more than 60 rows to 10), floats to 5 significant digits
    (narrow columns: `5.3697e-07`, not `5.369673e-07` over two lines)."""
    pd.set_option("display.max_rows", TABLE_ROWS)
    pd.set_option("display.min_rows", 100)
    pd.set_option("display.max_columns", None)
    pd.set_option("display.float_format", "{:.5g}".format)
    _load_plotlyjs()
    for name in pio.renderers:
        r = pio.renderers[name]
        if isinstance(getattr(r, "config", None), dict):
            r.config.update(CONFIG)
    pio.renderers["critlib"] = _Renderer()
    pio.renderers.default = "critlib"


PLOTLYJS_OUTPUT = {"critlib": "plotlyjs"}  # the metadata of the output that loads plotly.js


def _load_plotlyjs() -> None:
    """In a notebook kernel, display plotly.js once as HTML (no network: the installed plotly's copy), for
    the figures' HTML divs wherever no Plotly renderer runs: nbconvert pages, a Lab without plotly's
    extension. Outside a kernel, nothing."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    if getattr(get_ipython(), "kernel", None) is None:
        return
    from IPython.display import display
    from plotly.offline import get_plotlyjs
    html = ('<script type="text/javascript">window.PlotlyConfig = {MathJaxConfig: "local"};</script>\n'
            f'<script type="text/javascript">{get_plotlyjs()}</script>')
    display({"text/html": html}, raw=True, metadata=dict(PLOTLYJS_OUTPUT))


def _title(text: str) -> dict:
    return dict(text=text)


def _menu_button(label: str, visible: list[bool], title: str) -> dict:
    """A dropdown choice showing the `visible` traces under `title`. The title goes in as a whole title object:
    plotly.js drops a plain-string title in an update, and the figure's title would vanish."""
    return dict(label=label, method="update", args=[{"visible": visible}, {"title": _title(title)}])


def _base_metric(name: str) -> str:
    return name.split(":", 1)[1] if name.startswith(("top:", "bottom:")) else name


def _lighter(color: str, amount: float = 0.45) -> str:
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return "#" + "".join(f"{round(v + (255 - v) * amount):02x}" for v in (r, g, b))


def colors(names) -> dict[str, str]:
    """A fixed colour per metric or selector name (see METRIC_COLORS): `m`, `top:m` share m's colour,
    `bottom:m` a lighter one, `random` is black; names without a fixed colour take EXTRA_COLORS in order."""
    names = list(names)
    extra = iter(EXTRA_COLORS * (1 + len(names) // len(EXTRA_COLORS)))
    base: dict[str, str] = dict(METRIC_COLORS)
    out = {}
    for n in names:
        m = _base_metric(n)
        if n.startswith("random"):
            out[n] = RANDOM_COLOR
            continue
        if m not in base:
            base[m] = next(extra)
        out[n] = _lighter(base[m]) if n.startswith("bottom:") else base[m]
    return out


# ---------------------------------------------------------------- phase 1

def _log_axis_note(extra: dict) -> str:
    parts = [f"{extra['zero_or_subnormal']:,} zero/subnormal"] if extra["zero_or_subnormal"] else []
    if extra["nonfinite"]:
        parts.append(f"{extra['nonfinite']:,} inf/NaN")
    return ("not on the log axis: " + ", ".join(parts)) if parts else ""


def score_histogram(hists: dict[str, np.ndarray], per_octave: int = 4) -> go.Figure:
    """Log-binned histogram of all scores of each metric (counts per octave, log-log)."""
    fig = go.Figure()
    cmap = colors(hists)
    notes = []
    for m, counts in hists.items():
        df, extra = log_histogram(counts, per_octave)
        x = np.sqrt(df["lo"] * df["hi"])
        fig.add_trace(go.Scatter(
            x=x, y=df["per_octave"], mode="lines+markers", name=m, line=dict(shape="hvh", color=cmap[m]),
            customdata=np.stack([df["lo"], df["hi"], df["count"], df["fraction"]], axis=1),
            hovertemplate=(f"<b>{m}</b><br>score in [%{{customdata[0]:.3g}}, %{{customdata[1]:.3g}})<br>"
                           "weights: %{customdata[2]:,}<br>fraction: %{customdata[3]:.3g}<extra></extra>")))
        note = _log_axis_note(extra)
        if note:
            notes.append(f"{m}: {note}")
    fig.update_xaxes(type="log", title="score")
    fig.update_yaxes(type="log", title="weights per octave of score")
    fig.update_layout(title="Distribution of the scores of ALL weights (log bins)", height=480,
                      hovermode="closest")
    if notes:
        fig.add_annotation(text="; ".join(notes), xref="paper", yref="paper", x=0, y=-0.22,
                           showarrow=False, font=dict(size=11), align="left")
    return fig


def score_ccdf(hists: dict[str, np.ndarray]) -> go.Figure:
    """Log-log complementary CDF P(score ≥ x) of all scores of each metric."""
    fig = go.Figure()
    cmap = colors(hists)
    for m, counts in hists.items():
        df = ccdf(counts)
        fig.add_trace(go.Scatter(
            x=df["x"], y=df["p"], mode="lines", name=m, line=dict(shape="hv", color=cmap[m]),
            customdata=df["n_at_or_above"],
            hovertemplate=f"<b>{m}</b><br>score ≥ %{{x:.3g}}: %{{customdata:,}} weights (%{{y:.3g}})<extra></extra>"))
    fig.update_xaxes(type="log", title="score x")
    fig.update_yaxes(type="log", title="P(score ≥ x)", exponentformat="power")
    fig.update_layout(title="Heavy tail: complementary CDF over ALL weights", height=480)
    return fig


def _layer_label(layer) -> str:
    return "outside blocks" if layer is None or pd.isna(layer) else str(int(layer))


HEATMAP_DECADES = 5  # the log colour scale spans at most this many powers of ten below the largest cell


def _log_colorbar(lo: float, hi: float, title: str, percent: bool) -> dict:
    """A colourbar for log10 values in [lo, hi], ticked at powers of ten and labelled in the values' units."""
    ticks = list(range(math.floor(lo), math.ceil(hi) + 1)) or [0]
    text = [(f"{10.0 ** t * 100:.{max(0, -t - 2)}f}%" if percent else f"{10.0 ** t:,.{max(0, -t)}f}") for t in ticks]
    return dict(title=dict(text=title, side="right"), tickvals=ticks, ticktext=text)


def layer_component_heatmap(cells: pd.DataFrame, value: str = "score_share") -> go.Figure:
    """Layer × component heatmap of `value` ("score_share" or "topk") with a dropdown per metric; hover
    names the parameters of the cell and its numbers.

    Colours are on a log scale (at most HEATMAP_DECADES powers of ten below the largest cell, lower cells
    take the lowest colour): on a linear scale the embedding cell alone would use up the range and every block
    would look the same. Empty cells hold no score (or no top-K weight)."""
    metrics = list(dict.fromkeys(cells["metric"]))
    comps = [c for c in COMPONENTS if c in set(cells["component"])]
    layers = sorted({int(v) for v in cells["layer"].dropna()})
    ylabels = [str(v) for v in layers] + (["outside blocks"] if cells["layer"].isna().any() else [])
    label = {"score_share": "share of the metric's total score", "topk": "weights in the global top-K"}[value]
    bar_title = {"score_share": "share of the<br>metric's score<br>(log scale)",
                 "topk": "weights in<br>the top-K<br>(log scale)"}[value]
    fig = go.Figure()
    for i, m in enumerate(metrics):
        sub = cells[cells["metric"] == m]
        z = np.full((len(ylabels), len(comps)), np.nan)
        text = np.full(z.shape, "no weights here", dtype=object)
        for row in sub.itertuples():
            y, x = ylabels.index(_layer_label(row.layer)), comps.index(row.component)
            v = float(getattr(row, value))
            z[y, x] = math.log10(v) if v > 0 else np.nan
            text[y, x] = (f"{row.params}<br>weights: {row.n_weights:,}<br>score sum: {row.score_sum:.4g}"
                          f"<br>share of score: {row.score_share:.3%}<br>in top-{row.k}: {row.topk}")
        finite = z[np.isfinite(z)]
        hi = float(finite.max()) if finite.size else 0.0
        lo = max(float(finite.min()), hi - HEATMAP_DECADES) if finite.size else -1.0
        lo = min(lo, hi - 1)  # at least one decade, so a single value still has a colour bar
        fig.add_trace(go.Heatmap(z=z, x=comps, y=ylabels, text=text, visible=i == 0, colorscale="Viridis",
                                 zmin=lo, zmax=hi, colorbar=_log_colorbar(lo, hi, bar_title, value == "score_share"),
                                 name=m, hoverongaps=True,
                                 hovertemplate=f"<b>{m}</b> layer %{{y}}, %{{x}}<br>%{{text}}<extra></extra>"))
    buttons = [_menu_button(m, [j == i for j in range(len(metrics))], f"{label} — {m}")
               for i, m in enumerate(metrics)]
    fig.update_layout(title=_title(f"{label} — {metrics[0]}"), height=max(420, 18 * len(ylabels) + 160),
                      updatemenus=[dict(buttons=buttons, x=1.0, xanchor="right", y=1.12, yanchor="top")])
    fig.update_yaxes(title="layer", autorange="reversed", type="category")
    fig.update_xaxes(title="component")
    return fig


def per_layer(cells: pd.DataFrame) -> go.Figure:
    """Per layer, every metric: share of the total score (top) and share of the global top-K (bottom)."""
    by = cells.assign(layer_label=cells["layer"].map(_layer_label)).groupby(
        ["metric", "layer_label"], sort=False)[["score_share", "topk_share"]].sum().reset_index()
    layers = sorted({int(v) for v in cells["layer"].dropna()})
    order = [str(v) for v in layers] + (["outside blocks"] if cells["layer"].isna().any() else [])
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("share of the metric's total score", "share of the metric's global top-K"))
    cmap = colors(dict.fromkeys(cells["metric"]))
    for m in cmap:
        sub = by[by["metric"] == m].set_index("layer_label").reindex(order)
        for r, col in ((1, "score_share"), (2, "topk_share")):
            fig.add_trace(go.Scatter(x=order, y=sub[col], name=m, legendgroup=m, showlegend=r == 1,
                                     mode="lines+markers", line=dict(color=cmap[m]),
                                     hovertemplate=f"<b>{m}</b> layer %{{x}}: %{{y:.3%}}<extra></extra>"),
                          row=r, col=1)
    fig.update_xaxes(type="category", title="layer", row=2, col=1)
    fig.update_yaxes(tickformat=".0%")
    fig.update_layout(title="Per-layer comparison of the metrics", height=620)
    return fig


# ---------------------------------------------------------------- phase 2

def agreement_heatmaps(cross: pd.DataFrame, metrics: list[str]) -> go.Figure:
    """Metric × metric matrices of top-K overlap (fraction of K), Jaccard and Spearman (diagonal 1)."""
    quantities = [("overlap_fraction", "overlap / K"), ("jaccard", "Jaccard"), ("spearman", "Spearman (union)")]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[q[1] for q in quantities], horizontal_spacing=0.12)
    for j, (col, title) in enumerate(quantities, 1):
        z = np.eye(len(metrics))
        for r in cross.itertuples():
            a, b = metrics.index(r.metric_a), metrics.index(r.metric_b)
            v = getattr(r, col)
            z[a, b] = z[b, a] = np.nan if v is None or pd.isna(v) else v
        fig.add_trace(go.Heatmap(z=z, x=metrics, y=metrics, zmin=-1 if col == "spearman" else 0, zmax=1,
                                 colorscale="RdBu" if col == "spearman" else "Viridis", showscale=j == 3,
                                 text=np.vectorize(lambda v: "" if np.isnan(v) else f"{v:.2f}")(z),
                                 texttemplate="%{text}", hovertemplate=f"%{{y}} vs %{{x}}<br>{title}: %{{z:.3f}}<extra></extra>"),
                      row=1, col=j)
        fig.update_yaxes(autorange="reversed", row=1, col=j)
    k = int(cross["k"].iloc[0]) if len(cross) else 0
    fig.update_layout(title=f"Agreement between metrics on the global top-{k}", height=430)
    return fig


def rank_scatter(pairs: dict[str, pd.DataFrame]) -> go.Figure:
    """Rank under metric A vs rank under metric B over the union of their top-K (dropdown per pair)."""
    fig = go.Figure()
    names = list(pairs)
    groups = (("both", "#1f77b4"), ("only A", "#d62728"), ("only B", "#2ca02c"))
    for i, name in enumerate(names):
        df = pairs[name]
        member = np.where(df["in_top_a"] & df["in_top_b"], "both", np.where(df["in_top_a"], "only A", "only B"))
        for g, color in groups:
            sub = df[member == g]
            fig.add_trace(go.Scattergl(
                x=sub["rank_a"], y=sub["rank_b"], mode="markers", marker=dict(size=4, color=color, opacity=0.6),
                name=f"top-K of {g}", visible=i == 0, legendgroup=g,
                customdata=np.stack([sub["param"], sub["flat"], sub["score_a"], sub["score_b"]], axis=1),
                hovertemplate="%{customdata[0]}[%{customdata[1]}]<br>rank A %{x}, rank B %{y}"
                              "<br>score A %{customdata[2]:.3g}, score B %{customdata[3]:.3g}<extra></extra>"))
    n = len(groups)
    buttons = [_menu_button(name, [j // n == i for j in range(len(names) * n)],
                            f"Rank vs rank on the union of the top-K: {name}") for i, name in enumerate(names)]
    fig.update_layout(title=_title(f"Rank vs rank on the union of the top-K: {names[0] if names else ''}"),
                      height=520,
                      updatemenus=[dict(buttons=buttons, x=1.0, xanchor="right", y=1.15, yanchor="top")])
    fig.update_xaxes(type="log", title="rank under metric A (1 = highest)")
    fig.update_yaxes(type="log", title="rank under metric B")
    return fig


def stability_bars(stability: pd.DataFrame) -> go.Figure:
    """Jaccard of each metric's top-K between the base run and each other run (other seed / corpus)."""
    fig = go.Figure()
    for i, (run, sub) in enumerate(stability.groupby("run_b", sort=False)):
        fig.add_trace(go.Bar(x=sub["metric"], y=sub["jaccard"], name=f"vs {run}", marker_color=PALETTE[i % 10],
                             customdata=np.stack([sub["overlap"], sub["k"]], axis=1),
                             hovertemplate="%{x}: Jaccard %{y:.3f} (overlap %{customdata[0]} of %{customdata[1]})"
                                           "<extra>" + str(run) + "</extra>"))
    base = stability["run_a"].iloc[0] if len(stability) else ""
    fig.update_layout(barmode="group", title=f"Stability of each metric's top-K: {base} vs other data windows",
                      yaxis=dict(title="Jaccard", range=[0, 1.05]), height=420)
    return fig


def stability_by_tokens(table: pd.DataFrame) -> go.Figure:
    """Jaccard of each metric's top-K between two disjoint token sets against the tokens in each set (log
    axis), one line per metric: how much data makes a ranking stable."""
    fig = go.Figure()
    col = colors(list(table["metric"].unique()))
    for metric, sub in table.groupby("metric", sort=False):
        fig.add_trace(go.Scatter(x=sub["tokens"], y=sub["jaccard"], mode="lines+markers", name=metric,
                                 line=dict(color=col[metric]), customdata=np.stack([sub["overlap"], sub["k"]], axis=1),
                                 hovertemplate="%{x} tokens: Jaccard %{y:.3f} (overlap %{customdata[0]} of "
                                               "%{customdata[1]})<extra>" + str(metric) + "</extra>"))
    k = int(table["k"].iloc[0]) if len(table) else 0
    fig.update_layout(title=_title(f"Top-{k} agreement between two disjoint token sets, as they grow"), height=420,
                      xaxis=dict(title="scoring tokens in each set", type="log", tickvals=sorted(table["tokens"].unique())),
                      yaxis=dict(title="Jaccard", range=[0, 1.05]))
    return fig


def cross_vs_baseline(table: pd.DataFrame) -> go.Figure:
    """Each metric pair's Jaccard next to its seed-to-seed baseline (the lower of the two metrics' mean
    Jaccard between seeds)."""
    x = table["metric_a"] + " vs " + table["metric_b"]
    fig = go.Figure([
        go.Bar(x=x, y=table["jaccard"], name="between the two metrics", marker_color=PALETTE[0]),
        go.Scatter(x=x, y=table["seed_baseline"], mode="markers", name="seed-to-seed baseline (lower of the two)",
                   marker=dict(symbol="line-ew", size=28, line=dict(width=3, color=PALETTE[1]))),
    ])
    fig.update_layout(title="Cross-metric agreement against the seed-to-seed baseline", height=440,
                      yaxis=dict(title="Jaccard of the top-K", range=[0, 1.05]), xaxis=dict(tickangle=-30))
    return fig


# ---------------------------------------------------------------- phase 3

def _magnitude_labels(summary: pd.DataFrame) -> tuple[dict[str, str], set[str]]:
    """Legend names of the selectors, and those not drawn. `magnitude` (the control: exact global top-|w|) and
    `top:magnitude` (Phase 1's magnitude top-K) pick the same weights but for ties: when every measured value
    agrees they are drawn once, as "top:magnitude = magnitude control"; otherwise both, named apart."""
    names = {s: s for s in dict.fromkeys(summary["selector"])}
    if not {"magnitude", "top:magnitude"} <= set(names):
        if "magnitude" in names:
            names["magnitude"] = "magnitude control (top-|w|)"
        return names, set()
    cols = [c for c in summary.columns if c.endswith("_mean")]
    key = ["method", "method_arg", "k"]

    def values(sel):
        d = summary[summary["selector"] == sel].assign(method_arg=lambda t: t["method_arg"].fillna(""))
        return d.set_index(key)[cols].sort_index()

    a, b = values("top:magnitude"), values("magnitude")
    if a.index.equals(b.index) and np.allclose(a.to_numpy(float), b.to_numpy(float), rtol=1e-9, equal_nan=True):
        names["top:magnitude"] = "top:magnitude = magnitude control"
        return names, {"magnitude"}
    names["magnitude"] = "magnitude control (exact top-|w|)"
    return names, set()


def _dash(selector: str) -> str | None:
    """Controls dotted, bottom-K dashed, the metrics' selections solid."""
    if selector in BASELINE_SELECTORS or selector.startswith("random"):
        return "dot"
    return "dash" if selector.startswith("bottom:") else None


def _log_low(lo, mean, hi):
    """A lower edge a log axis can draw: `lo`, or where lo ≤ 0 the mean divided by the factor the upper edge
    lies above it (mean² / hi)."""
    lo, mean, hi = (np.asarray(a, dtype=float) for a in (lo, mean, hi))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(lo > 0, lo, mean * mean / hi)


def dose_response(summary: pd.DataFrame, value: str = "ppl_ratio", log_y: bool = True) -> go.Figure:
    """Dose-response over K of `value` (ppl_ratio, accuracy or kl), one panel per perturbation method, one
    line per selector (fixed colours, `colors`; controls dotted, bottom-K dashed). The band is the 95% interval
    (`<value>_lo`/`_hi`: ppl_ratio and kl) of every selector; a value without intervals (accuracy) shows mean ±
    std over draws for selectors with several. On a log axis a lower edge ≤ 0 mirrors the upper edge (`_log_low`),
    so the band does not fill down to the axis. Points whose value is NaN/inf (the model broke) are drawn as ×
    at the top of the axis, labelled "broken"."""
    methods = list(dict.fromkeys(zip(summary["method"], summary["method_arg"].fillna(""))))
    titles = [f"{m}{':' + a if a else ''}" for m, a in methods]
    cols = min(3, len(methods)) or 1
    rows = math.ceil(len(methods) / cols) or 1
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.07,
                        vertical_spacing=0.12)
    log = log_y and value in ("ppl_ratio", "kl")
    selectors = list(dict.fromkeys(summary["selector"]))
    cmap = colors(selectors)
    names, hidden = _magnitude_labels(summary)
    drawn = summary[(summary["k"] > 0) & ~summary["selector"].isin(hidden)]
    ci = f"{value}_lo" in drawn and f"{value}_hi" in drawn
    top = drawn[f"{value}_hi"] if ci else drawn[f"{value}_mean"] + drawn[f"{value}_std"].fillna(0)
    level = _ceiling(list(top) + list(drawn[f"{value}_mean"]), log)
    n_broken = 0
    for i, (m, a) in enumerate(methods):
        r, c = i // cols + 1, i % cols + 1
        sub = drawn[(drawn["method"] == m) & (drawn["method_arg"].fillna("") == a)]
        for s in selectors:
            d = sub[sub["selector"] == s].sort_values("k")
            if d.empty:
                continue
            mean = d[f"{value}_mean"].astype(float)
            if ci:
                lo, hi = d[f"{value}_lo"].astype(float), d[f"{value}_hi"].astype(float)
                shown = [f"{v:.4g} [{a:.4g}, {b:.4g}]" for v, a, b in zip(mean, lo, hi)]
            else:
                std = d[f"{value}_std"].astype(float).fillna(0)
                lo, hi = mean - std, mean + std
                shown = [f"{v:.4g} ± {e:.2g}" for v, e in zip(mean, std)]
            ok = np.isfinite(mean) & np.isfinite(lo) & np.isfinite(hi)
            if (ci or (d["n_draws"] > 1).any()) and ok.any():
                k, low = d["k"][ok], _log_low(lo[ok], mean[ok], hi[ok]) if log else lo[ok]
                fig.add_trace(go.Scatter(x=list(k) + list(k)[::-1], y=list(hi[ok]) + list(low)[::-1], fill="toself",
                                         fillcolor=cmap[s], opacity=0.2, line=dict(width=0), hoverinfo="skip",
                                         showlegend=False, legendgroup=s), row=r, col=c)
            y, broken = _at_level(mean, level)
            n_broken += sum(broken)
            shown = ["NaN/inf: the model broke" if b else t for t, b in zip(shown, broken)]
            fig.add_trace(go.Scatter(
                x=d["k"], y=y, mode="lines+markers+text", name=names[s], legendgroup=s, showlegend=i == 0,
                line=dict(color=cmap[s], dash=_dash(s)), **_broken_marks(broken),
                customdata=np.stack([np.array(shown, dtype=object), d["n_draws"], d["n_changed_mean"]], axis=1),
                hovertemplate=(f"<b>{names[s]}</b> K=%{{x}}<br>{value}{' (95% interval)' if ci else ''}: %{{customdata[0]}}"
                               "<br>draws: %{customdata[1]}, weights changed: %{customdata[2]:.0f}<extra></extra>")),
                row=r, col=c)
    fig.update_xaxes(type="log", title="K (weights perturbed)")
    if log:
        fig.update_yaxes(type="log")
    fig.update_layout(title=f"Dose-response: {value} vs K", height=330 * rows + 120)
    _note_broken(fig, n_broken, value)
    return fig


def causal_test(frame: pd.DataFrame) -> go.Figure:
    """Phase 3's causal test at a glance (`tables.causal_frame`): held-out perplexity ratio against K when each
    metric's top-K is perturbed, beside the random and magnitude controls (dotted), with 95% intervals as error
    bars, on log axes. An interval reaching 0 or below is drawn down to the mean over the upper factor. Points
    whose ratio is NaN/inf (the model broke) are drawn as × at the top, labelled "broken"."""
    names, hidden = _magnitude_labels(frame)
    d = frame[~frame["selector"].isin(hidden)]
    cmap = colors(names)
    level = _ceiling(list(d["ppl_ratio_hi"]) + list(d["ppl_ratio_mean"]))
    fig = go.Figure()
    n_broken = 0
    for s in dict.fromkeys(d["selector"]):
        g = d[d["selector"] == s].sort_values("k")
        y, broken = _at_level(g["ppl_ratio_mean"], level)
        n_broken += sum(broken)
        up, down, shown = [], [], []
        for v, lo, hi, b in zip(y, _finite(g["ppl_ratio_lo"]), _finite(g["ppl_ratio_hi"]), broken):
            ok = not b and lo is not None and hi is not None
            lo = float(_log_low(lo, v, hi)) if ok else lo
            up.append(hi - v if ok else 0)
            down.append(v - lo if ok else 0)
            shown.append("NaN/inf: the model broke" if b else f"{v:.4g}" + (f" [{lo:.4g}, {hi:.4g}]" if ok else ""))
        fig.add_trace(go.Scatter(
            x=g["k"], y=y, mode="lines+markers+text", name=names[s], line=dict(color=cmap[s], dash=_dash(s)),
            error_y=dict(type="data", symmetric=False, array=up, arrayminus=down, thickness=1.2, width=4),
            customdata=np.stack([np.array(shown, dtype=object), g["n_draws"], g["interval"].fillna("")], axis=1),
            hovertemplate=(f"<b>{names[s]}</b> K=%{{x}}<br>ppl ratio %{{customdata[0]}} (95%, over "
                           "%{customdata[2]}; draws: %{customdata[1]})<extra></extra>"), **_broken_marks(broken)))
    method = f"{frame['method'].iloc[0]}" if len(frame) else ""
    fig.update_xaxes(type="log", title="K (weights perturbed)")
    fig.update_yaxes(type="log", title="held-out perplexity ratio (95% interval)")
    fig.update_layout(title=f"Causal test ({method}): each metric's top-K against the random and magnitude controls",
                      height=460)
    _note_broken(fig, n_broken, "the perplexity ratio")
    return fig


# ---------------------------------------------------------------- phase 4

def super_weight_candidates(candidates: list[dict], effect_size: float) -> go.Figure:
    """Each candidate's perplexity ratio when zeroed alone with its 95% interval (confirmed ones in red), the
    same-tensor random control's mean and t-interval where it was drawn, and the effect-size line."""
    labels = [f"L{r['layer']} [{r['row']},{r['col']}]" for r in candidates]
    ratio = [r["ppl_ratio_when_zeroed"] for r in candidates]
    ctl = [(x, r) for x, r in zip(labels, candidates) if r.get("random_n") and r.get("random_ppl_ratio_hi") is not None]
    fig = go.Figure([
        go.Bar(x=labels, y=ratio, marker_color=[PALETTE[1] if r["confirmed"] else PALETTE[7] for r in candidates],
               name="candidate zeroed (red: confirmed)",
               error_y=dict(type="data", symmetric=False,
                            array=[r["ppl_ratio_when_zeroed_hi"] - v for r, v in zip(candidates, ratio)],
                            arrayminus=[v - r["ppl_ratio_when_zeroed_lo"] for r, v in zip(candidates, ratio)]),
               customdata=[[r["verdict"], r["param"]] for r in candidates],
               hovertemplate="%{customdata[1]}<br>ppl ratio %{y:.4g}: %{customdata[0]}<extra></extra>"),
        go.Scatter(x=[x for x, _ in ctl], y=[r["random_ppl_ratio_mean"] for _, r in ctl], mode="markers",
                   name="random weight of the same tensor (drawn past the effect size)",
                   marker=dict(color=PALETTE[0], symbol="line-ew", size=26, line=dict(width=3)),
                   error_y=dict(type="data", symmetric=False,
                                array=[r["random_ppl_ratio_hi"] - r["random_ppl_ratio_mean"] for _, r in ctl],
                                arrayminus=[r["random_ppl_ratio_mean"] - r["random_ppl_ratio_lo"] for _, r in ctl])),
    ])
    fig.add_hline(y=effect_size, line_dash="dash", annotation_text="sw_effect_size")
    fig.update_yaxes(type="log", title="held-out perplexity ratio (95% interval)")
    fig.update_layout(title="Zeroing one candidate: confirmed vs candidates, against the random control", height=460)
    return fig


def spike_ratios(detection: dict) -> go.Figure:
    """Each block's spike ratio (largest |down-projection output| over the other blocks' median) on every
    detection prompt, with the `sw_spike_ratio` threshold."""
    fig = go.Figure()
    for i, prof in enumerate(detection["profiles"]):
        label = detection["prompts"][i]["text"] or f"prompt {i} (ids)"
        fig.add_trace(go.Scatter(
            x=[str(b["layer"]) for b in prof], y=[b["spike_ratio"] for b in prof], mode="lines+markers",
            name=label[:40], customdata=[[b["out_max"], b["in_channel"], b["out_channel"], b["position"]] for b in prof],
            hovertemplate="layer %{x}: ratio %{y:.3g}, max |out| %{customdata[0]:.4g}<br>in ch %{customdata[1]} → "
                          "out ch %{customdata[2]} at token %{customdata[3]}<extra></extra>"))
    fig.add_hline(y=detection["spike_ratio"], line_dash="dash", annotation_text="sw_spike_ratio")
    fig.update_yaxes(type="log", title="max |down_proj output| / median of the other blocks")
    fig.update_xaxes(title="layer", type="category")
    fig.update_layout(title="Spike ratio per block on each detection prompt", height=440)
    return fig


def position_damage(positions: pd.DataFrame, by: list[str], title: str, controls: tuple[str, ...] = ()) -> go.Figure:
    """Mean NLL increase per token (nats) by token-position bucket, one line per group of `by` (dotted for
    the `controls` selectors): where in the context an intervention's damage lands."""
    fig = go.Figure()
    for key, d in positions.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        name = ", ".join(f"{c}={v}" if c == "k" else str(v) for c, v in zip(by, key))
        fig.add_trace(go.Scatter(x=[f"{a}–{b - 1}" for a, b in zip(d["start"], d["stop"])], y=d["nll_increase"],
                                 mode="lines+markers", name=name.replace("k=", "K="),
                                 line=dict(dash="dot" if key[0] in controls else None)))
    fig.update_layout(title=title, height=460, xaxis=dict(title="token positions (predicted token)", type="category"),
                      yaxis=dict(title="mean NLL increase per token (nats)"))
    return fig


def activation_profile(profile: list[dict]) -> go.Figure:
    """Each block's largest |down-projection output| on the detection prompt."""
    x = [str(p["layer"]) for p in profile]
    fig = go.Figure(go.Bar(x=x, y=[p["out_max"] for p in profile], marker_color=PALETTE[0],
                           customdata=[[p["in_channel"], p["out_channel"], p["position"], p.get("spike_ratio")]
                                       for p in profile],
                           hovertemplate="layer %{x}: max |out| %{y:.4g}<br>in ch %{customdata[0]} → out ch "
                                         "%{customdata[1]} at token %{customdata[2]}<br>spike ratio %{customdata[3]:.3g}"
                                         "<extra></extra>"))
    fig.update_yaxes(type="log", title="max |down_proj output|")
    fig.update_xaxes(title="layer", type="category")
    fig.update_layout(title="Down-projection output maxima per block (super activations stand out)", height=400)
    return fig


# ---------------------------------------------------------------- phase 5

def token_rows(tokens: dict, metrics: list[str], roles: list[str]) -> go.Figure:
    """Per-dimension scores of token rows with a dropdown over tokens; one panel per (metric, role).

    `tokens`: {label: {(metric, role): 1-D array over dimensions}}.
    """
    panels = [(m, r) for m in metrics for r in roles]
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.03,
                        subplot_titles=[f"{m} — {r} row" for m, r in panels])
    labels = list(tokens)
    for i, label in enumerate(labels):
        for j, key in enumerate(panels):
            y = np.asarray(tokens[label][key], dtype=np.float32)
            fig.add_trace(go.Bar(y=y, visible=i == 0, marker_color=PALETTE[j % len(PALETTE)], showlegend=False,
                                 hovertemplate=f"{key[0]} {key[1]} dim %{{x}}: %{{y:.4g}}<extra></extra>"),
                          row=j + 1, col=1)
    n = len(panels)
    buttons = [_menu_button(label, [t // n == i for t in range(len(labels) * n)],
                            f"Scores per dimension — token {label}") for i, label in enumerate(labels)]
    fig.update_layout(title=_title(f"Scores per dimension — token {labels[0] if labels else ''}"),
                      height=170 * len(panels) + 150, bargap=0,
                      updatemenus=[dict(buttons=buttons, x=1.0, xanchor="right", y=1.0, yanchor="bottom",
                                        pad=dict(b=40))])
    fig.update_xaxes(title="dimension", row=len(panels), col=1)
    return fig


def token_ranks(summary: pd.DataFrame, metric: str, role: str, n: int = 40) -> go.Figure:
    """Row score of the top-`n` tokens by `metric` ({role} row sum), with their text."""
    col = f"{metric}:{role}"
    top = summary.nsmallest(n, f"rank:{col}")
    fig = go.Figure(go.Bar(x=[f"{t} ({i})" for t, i in zip(top["token"], top["token_id"])], y=top[f"sum:{col}"],
                           marker_color=PALETTE[0], hovertemplate="%{x}: %{y:.4g}<extra></extra>"))
    fig.update_layout(title=f"Top {n} tokens by the sum of their {role} row's {metric} scores", height=420,
                      xaxis=dict(tickangle=-60), yaxis=dict(title="row sum", type="log"))
    return fig


# ---------------------------------------------------------------- phase 6

BASELINE_SELECTORS = ("magnitude", "random")


def _finite(values) -> list:
    """Values as floats with NaN/inf as None (plotly leaves a gap), for log axes and JSON."""
    out = []
    for v in values:
        v = float(v) if v is not None and not pd.isna(v) else float("nan")
        out.append(v if math.isfinite(v) else None)
    return out


def _line(selector: str) -> dict:
    return dict(dash="dot") if selector in BASELINE_SELECTORS else {}


def _ceiling(values, log: bool = True) -> float:
    """A height above every finite value, where points that broke the model (NaN/inf) are drawn: on a log axis
    the next power of ten above the largest value, times ten; on a linear one 15 % of the range above it."""
    finite = [v for v in _finite(values) if v is not None and (v > 0 or not log)]
    if log:
        return 10.0 ** (math.ceil(math.log10(max(finite + [1.0]))) + 1)
    lo, hi = min(finite, default=0.0), max(finite, default=1.0)
    return hi + 0.15 * ((hi - lo) or abs(hi) or 1.0)


def _at_level(values, level: float) -> tuple[list, list[bool]]:
    """(y, broken): the values with NaN/inf replaced by `level`, and which ones were."""
    y = _finite(values)
    broken = [v is None for v in y]
    return [level if b else v for v, b in zip(y, broken)], broken


def _shown(v, digits: int = 4) -> str:
    """A value for hover text: the number, or that the model broke."""
    v = float(v) if v is not None and not pd.isna(v) else float("nan")
    return f"{v:.{digits}g}" if math.isfinite(v) else f"{v} (the model broke)"


def _broken_marks(broken: list[bool]) -> dict:
    """Marker and text settings of a lines+markers+text trace: × and "broken" at the points that broke."""
    return dict(marker=dict(symbol=["x" if b else "circle" for b in broken],
                            size=[11 if b else 6 for b in broken]),
                text=["broken" if b else "" for b in broken], textposition="top center",
                textfont=dict(size=10, color="#444"))


def _note_broken(fig: go.Figure, n: int, value: str) -> None:
    if n:
        fig.add_annotation(text=f"× broken: {n} point(s) where {value} was NaN/inf (the model broke), drawn at the top",
                           xref="paper", yref="paper", x=0, y=0, yshift=-62, xanchor="left", yanchor="top",
                           showarrow=False, font=dict(size=11))
        fig.update_layout(margin=dict(b=100))


def _reference_label(selector: str, clip_z: float) -> str:
    base = "no outliers kept" if selector == "none" else "super weights kept"
    return base + (f", clipped at z={clip_z:g}" if clip_z else "")


def quantization_curves(df: pd.DataFrame, value: str = "ppl") -> go.Figure:
    """Held-out `value` (ppl, ppl_ratio or kl) against the share of each tensor's weights kept in original
    precision, one line per selector (the magnitude and random baselines dotted), one panel per bit width.
    Horizontal dashed lines: quantization with no outliers kept (the reference every selector starts from) and
    the super-weight-aware points (super weights kept, clipping), when present. Points whose value is NaN/inf
    (the model broke) are drawn as × at the top, labelled "broken"."""
    configs = list(dict.fromkeys(zip(df["bits"], df["group_size"], df["symmetric"])))
    titles = [f"{b}-bit, groups of {g}, {'symmetric' if s else 'asymmetric'}" for b, g, s in configs]
    fig = make_subplots(rows=1, cols=max(1, len(configs)), subplot_titles=titles, horizontal_spacing=0.08)
    kept = df[df["keep_percent"] > 0]
    xs = sorted(set(kept["keep_percent"])) or [1.0]
    span = [xs[0] / 1.5, xs[-1] * 1.5]
    selectors = list(dict.fromkeys(kept["selector"]))
    cmap = colors(selectors)
    refs = list(dict.fromkeys(zip(df.loc[df["keep_percent"] == 0, "selector"], df.loc[df["keep_percent"] == 0, "clip_z"])))
    ref_colors = {r: c for r, c in zip(refs, ("#222222", "#7f7f7f", "#bcbd22", "#e377c2"))}
    hover = ("%{customdata[0]}<br>kept: %{x:g}% of each tensor (%{customdata[1]:,} weights)<br>" + value
             + ": %{customdata[5]}<br>ppl ratio: %{customdata[2]:.4g}, KL: %{customdata[3]:.3g}<br>bits per weight: "
             "%{customdata[4]:.3f}<extra></extra>")
    level = _ceiling(df[value], log=False)
    n_broken = 0
    for j, (bits, g, sym) in enumerate(configs, 1):
        sub = df[(df["bits"] == bits) & (df["group_size"] == g) & (df["symmetric"] == sym)]
        for (sel, z), color in ref_colors.items():
            r = sub[(sub["keep_percent"] == 0) & (sub["selector"] == sel) & (sub["clip_z"] == z)]
            if r.empty:
                continue
            r = r.iloc[0]
            label = _reference_label(sel, z)
            y, broken = _at_level([r[value]] * 2, level)
            n_broken += broken[0]
            fig.add_trace(go.Scatter(
                x=span, y=y, mode="lines+text" if broken[0] else "lines", name=label, legendgroup=label,
                showlegend=j == 1, line=dict(color=color, dash="dash"),
                text=["broken", ""] if broken[0] else None, textposition="top right",
                customdata=[[label, int(r["n_kept"]), r["ppl_ratio"], r["kl"], r["bits_per_weight"],
                             _shown(r[value], 5)]] * 2,
                hovertemplate=hover.replace("kept: %{x:g}% of each tensor (%{customdata[1]:,} weights)",
                                            "weights kept: %{customdata[1]:,}")), row=1, col=j)
        for sel in selectors:
            d = sub[(sub["selector"] == sel) & (sub["keep_percent"] > 0)].sort_values("keep_percent")
            if d.empty:
                continue
            y, broken = _at_level(d[value], level)
            n_broken += sum(broken)
            fig.add_trace(go.Scatter(
                x=d["keep_percent"], y=y, mode="lines+markers+text", name=sel, legendgroup=sel,
                showlegend=j == 1, line=dict(color=cmap[sel], **_line(sel)), **_broken_marks(broken),
                customdata=np.stack([np.full(len(d), sel, dtype=object), d["n_kept"], d["ppl_ratio"], d["kl"],
                                     d["bits_per_weight"], [_shown(v, 5) for v in d[value]]], axis=1),
                hovertemplate=hover), row=1, col=j)
    fig.update_xaxes(type="log", title="weights kept in original precision (% of each tensor)")
    fig.update_yaxes(title={"ppl": "held-out perplexity", "ppl_ratio": "perplexity ratio"}.get(value, value),
                     row=1, col=1)
    fig.update_layout(title=f"Quantization with kept outliers: {value} per selector", height=460)
    _note_broken(fig, n_broken, value)
    return fig


def pruning_curves(df: pd.DataFrame, value: str = "ppl", log_y: bool = True) -> go.Figure:
    """Held-out `value` against sparsity, one panel per mode (per_layer, global), one line per selector (the
    magnitude and random baselines dotted; with a protected set, dashed); every line starts at the unpruned
    model (sparsity 0). Points whose value is NaN/inf (the model broke) are drawn as × at the top, labelled
    "broken"."""
    ref = df[df["kind"] == "reference"]
    y0 = float(ref[value].iloc[0]) if len(ref) else None
    runs = df[df["kind"] != "reference"]
    modes = list(dict.fromkeys(runs["mode"]))
    fig = make_subplots(rows=1, cols=max(1, len(modes)), subplot_titles=[m.replace("_", " ") for m in modes],
                        horizontal_spacing=0.08)
    lines = list(dict.fromkeys(zip(runs["selector"], runs["protected"].fillna(""))))
    cmap = colors(dict.fromkeys(s for s, _ in lines))
    log = log_y and value in ("ppl", "ppl_ratio", "kl")
    level = _ceiling(df[value], log)
    n_broken = 0
    for j, mode in enumerate(modes, 1):
        sub = runs[runs["mode"] == mode]
        for sel, prot in lines:
            d = sub[(sub["selector"] == sel) & (sub["protected"].fillna("") == prot)].sort_values("sparsity")
            if d.empty:
                continue
            name = sel + (f" ({prot} protected)" if prot else "")
            x = ([0.0] if y0 is not None else []) + list(d["sparsity"])
            values = ([y0] if y0 is not None else []) + list(d[value])
            y, broken = _at_level(values, level)
            n_broken += sum(broken)
            line = dict(dash="dash") if prot else _line(sel)
            extra = np.stack([np.r_[[1.0], d["ppl_ratio"]] if y0 is not None else d["ppl_ratio"],
                              np.r_[[0.0], d["kl"]] if y0 is not None else d["kl"],
                              [_shown(v, 5) for v in values]], axis=1)
            fig.add_trace(go.Scatter(
                x=x, y=y, mode="lines+markers+text", name=name, legendgroup=name, showlegend=j == 1,
                line=dict(color=cmap[sel], **line), customdata=extra, **_broken_marks(broken),
                hovertemplate=(f"<b>{name}</b> {mode}<br>sparsity %{{x:.0%}}<br>{value}: %{{customdata[2]}}"
                               "<br>ppl ratio: %{customdata[0]:.4g}, KL: %{customdata[1]:.3g}<extra></extra>")),
                row=1, col=j)
    fig.update_xaxes(title="sparsity (share of Linear weights zeroed)", tickformat=".0%")
    if log:
        fig.update_yaxes(type="log")
    fig.update_yaxes(title={"ppl": "held-out perplexity", "ppl_ratio": "perplexity ratio"}.get(value, value),
                     row=1, col=1)
    fig.update_layout(title=f"Pruning the lowest-scored weights: {value} vs sparsity", height=460)
    _note_broken(fig, n_broken, value)
    return fig


def bitflip_damage(single: pd.DataFrame) -> go.Figure:
    """Perplexity ratio after flipping one bit of each selector's top-N weights, one bar per bit position.
    Flips that made the perplexity NaN/inf are drawn hatched at the top of the axis and labelled 'broken'."""
    t = single.copy()
    t["label"] = t["selector"] + " #" + t["rank"].astype(str)
    ceil = _ceiling(t["ppl_ratio"])
    fig = go.Figure()
    bits = sorted(set(zip(t["bit"], t["bit_kind"])), reverse=True)
    for i, (bit, kind) in enumerate(bits):
        d = t[t["bit"] == bit]
        y = _finite(d["ppl_ratio"])
        broken = [v is None for v in y]
        at = [f"[{r}, {c}]" if not pd.isna(c) else f"[{r}]" for r, c in zip(d["row"], d["col"])]
        fig.add_trace(go.Bar(
            x=d["label"], y=[ceil if b else v for v, b in zip(y, broken)], name=f"bit {bit} ({kind})",
            marker=dict(color=PALETTE[i % len(PALETTE)], pattern=dict(shape=["x" if b else "" for b in broken])),
            text=["broken" if b else "" for b in broken], textposition="inside",
            customdata=np.stack([d["param"] + np.array(at, dtype=object), d["value_before"].astype(float),
                                 d["value_after"].astype(float), d["ppl"].astype(float), d["kl"].astype(float)], axis=1),
            hovertemplate=(f"<b>%{{x}}</b> bit {bit} ({kind})<br>%{{customdata[0]}}<br>"
                           "value %{customdata[1]:.4g} → %{customdata[2]:.4g}<br>ppl %{customdata[3]:.5g} "
                           "(ratio %{y:.4g}), KL %{customdata[4]:.3g}<extra></extra>")))
    low = min([v for v in _finite(t["ppl_ratio"]) if v is not None and v > 0] + [1.0])
    fig.update_yaxes(type="log", title="held-out perplexity ratio (flipped / intact)",  # a ratio of 1 stays visible
                     range=[math.log10(low / 2), math.log10(ceil) + 0.05])
    fig.update_xaxes(title="selector #rank (its rank-th weight)", tickangle=-40)
    fig.update_layout(barmode="group", title="One flipped bit: damage per weight and bit position", height=480)
    return fig


def flips_to_break_bars(breaks: pd.DataFrame) -> go.Figure:
    """Flips it takes to break the model (ppl ≥ factor × base): each selector's single flips applied in damage
    order, against random weights at random bit positions (bar: median over draws, points: each draw).
    A run still unbroken after all its flips is drawn at that count, hatched and labelled '> n'. The log axis
    starts at 0.5, so a bar of one flip is as visible as the others."""
    fig = go.Figure()
    damage = breaks[breaks["order"] == "damage"]
    rnd = breaks[breaks["order"] != "damage"]
    cmap = colors(s for s in damage["selector"] if s != "all")  # each selector's colour on every page
    cmap["all"] = "#555555"

    def height(r):
        return (int(r["n_flips"]), str(int(r["n_flips"]))) if not pd.isna(r["n_flips"]) else \
            (int(r["n_available"]), f"> {int(r['n_available'])}")

    if len(damage):
        hs = [height(r) for _, r in damage.iterrows()]
        labels = ["all selectors" if s == "all" else s for s in damage["selector"]]
        fig.add_trace(go.Bar(
            x=labels, y=[h[0] for h in hs], text=[h[1] for h in hs], textposition="outside",
            name="top weights' flips, most damaging first",
            marker=dict(color=[cmap[s] for s in damage["selector"]],
                        pattern=dict(shape=["/" if t.startswith(">") else "" for _, t in hs])),
            customdata=np.stack([damage["n_available"], damage["ppl_at"].astype(float),
                                 damage["ppl_before"].astype(float)], axis=1),
            hovertemplate=("<b>%{x}</b>: %{text} flips (of %{customdata[0]} available)<br>ppl %{customdata[2]:.5g}"
                           " → %{customdata[1]:.5g}<extra></extra>")))
    if len(rnd):
        hs = [height(r) for _, r in rnd.iterrows()]
        unbroken = [t.startswith(">") for _, t in hs]
        n = np.array([np.inf if u else h for (h, _), u in zip(hs, unbroken)], dtype=float)
        med = float(np.median(n))
        cap = int(rnd["n_available"].max())
        label = "random weights, random bits"
        fig.add_trace(go.Bar(x=[label], y=[min(med, cap)], name=f"median of {len(rnd)} random draws",
                             text=[f"> {cap}" if not math.isfinite(med) else f"{med:g}"], textposition="outside",
                             marker=dict(color=_lighter(RANDOM_COLOR, 0.55),
                                         pattern=dict(shape=["/" if not math.isfinite(med) else ""])),
                             hovertemplate=f"median over draws: %{{text}} flips<extra>{label}</extra>"))
        fig.add_trace(go.Scatter(x=[label] * len(rnd), y=[h for h, _ in hs], mode="markers", name="each random draw",
                                 marker=dict(color="#222222", size=8, symbol=["triangle-up" if u else "circle"
                                                                               for u in unbroken]),
                                 customdata=np.stack([rnd["draw"], [t for _, t in hs]], axis=1),
                                 hovertemplate="draw %{customdata[0]}: %{customdata[1]} flips<extra></extra>"))
    factor = breaks["factor"].iloc[0] if len(breaks) else float("nan")
    heights = [float(v) for t in fig.data for v in t.y if v is not None and math.isfinite(float(v))]
    top = max(heights + [1.0])
    fig.update_yaxes(type="log", title="bit flips until ppl ≥ factor × base",
                     range=[math.log10(0.5), math.log10(top) + 0.3])  # log10 units; room for the labels
    fig.update_layout(title=f"Flips to break the model (ppl ≥ {factor:g}× base): critical weights vs random",
                      height=460, showlegend=True)
    return fig
