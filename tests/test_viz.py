"""The figures' structure: every figure function returns a drawable go.Figure."""

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from critlib import tables, viz
from critlib.sensitivity import analyze
from tests.conftest import tiny


@pytest.fixture(scope="module")
def sens():
    gen = torch.Generator().manual_seed(3)
    windows = torch.randint(0, 96, (4, 12), generator=gen)
    return analyze(tiny("tiny-qwen2"), windows, ["grad_x_weight", "magnitude", "wanda"], topk_global=40,
                   topk_per_layer=5, batch_size=2, progress=False)


def test_figures_are_figures(sens):
    hists = {m: sens.hist[m].numpy() for m in sens.metrics}
    cells = tables.cells_frame(sens)
    figs = [viz.score_histogram(hists), viz.score_ccdf(hists), viz.layer_component_heatmap(cells),
            viz.layer_component_heatmap(cells, "topk"), viz.per_layer(cells)]
    for f in figs:
        assert isinstance(f, go.Figure) and len(f.data) > 0
    heat = figs[2]
    assert [t.visible for t in heat.data] == [True] + [False] * (len(sens.metrics) - 1)
    assert len(heat.layout.updatemenus[0].buttons) == len(sens.metrics)


def test_heatmap_colours_are_log_with_a_worded_colourbar(sens):
    cells = tables.cells_frame(sens)
    for value in ("score_share", "topk"):
        fig = viz.layer_component_heatmap(cells, value)
        for t in fig.data:
            sub = cells[cells["metric"] == t.name]
            v = sub[value].to_numpy(dtype=float)
            z = np.array(t.z, dtype=float)
            drawn = np.sort(z[np.isfinite(z)])
            assert np.allclose(drawn, np.sort(np.log10(v[v > 0])))  # zero cells left empty
            assert t.zmax == pytest.approx(drawn.max()) and t.zmax - viz.HEATMAP_DECADES <= t.zmin < t.zmax
            bar = t.colorbar
            assert "log" in bar.title.text and value not in bar.title.text  # words, not the column's name
            assert len(bar.tickvals) == len(bar.ticktext) and all(float(x).is_integer() for x in bar.tickvals)
            if value == "score_share":
                assert all(s.endswith("%") for s in bar.ticktext)


def test_menus_keep_the_title(sens):
    """Every dropdown choice sets a whole title object with its text (a plain string would blank the title)."""
    from critlib.agreement import rank_pairs
    cells = tables.cells_frame(sens)
    rows = {"a": {(m, "embed"): np.arange(8.0) + i for i, m in enumerate(sens.metrics)},
            "b": {(m, "embed"): np.ones(8) for m in sens.metrics}}
    figs = [viz.layer_component_heatmap(cells), viz.layer_component_heatmap(cells, "topk"),
            viz.rank_scatter({"grad_x_weight vs magnitude": rank_pairs(sens, "grad_x_weight", "magnitude"),
                              "magnitude vs wanda": rank_pairs(sens, "magnitude", "wanda")}),
            viz.token_rows(rows, sens.metrics, ["embed"])]
    for fig in figs:
        assert fig.layout.title.text
        buttons = fig.layout.updatemenus[0].buttons
        assert len(buttons) >= 2
        for b in buttons:
            title = b.args[1]["title"]
            assert isinstance(title, dict) and title["text"] and b.label in title["text"]
            assert sum(b.args[0]["visible"]) == len(fig.data) // len(buttons)
        fig.to_json()


def test_dose_response_figure_has_one_panel_per_method():
    rows = []
    for method, arg in (("zero", None), ("scale", "10")):
        for sel, draws in (("top:m", 1), ("random", 3)):
            for k in (1, 10):
                rows.append(dict(selector=sel, metric="m" if sel == "top:m" else None, method=method, method_arg=arg,
                                 k=k, ppl_ratio_mean=1 + k, ppl_ratio_std=0.1 if draws > 1 else np.nan,
                                 n_changed_mean=k, n_draws=draws))
    fig = viz.dose_response(pd.DataFrame(rows))
    assert [a.text for a in fig.layout.annotations] == ["zero", "scale:10"]
    bands = [t for t in fig.data if t.fill == "toself"]
    assert len(bands) == 2  # random, once per panel


CLOUD = ("Share chart", "plotly.com", "plot.ly", "chart-studio", "chart studio", "sendDataToCloud",
         '"showSendToCloud": true', "plotlyServerURL")


def assert_no_cloud_upload(html: str) -> None:
    """`html` (figures' divs, plotly.js itself excluded) offers no upload to Plotly's cloud: every figure's
    config turns the "Share chart" button and the plotly.com logo off, and no cloud address appears."""
    low = html.lower()
    for s in CLOUD:
        assert s.lower() not in low, f"{s!r} in the HTML"
    n = html.count("Plotly.newPlot(")
    assert html.count('"showSendToCloud": false') == n and html.count('"displaylogo": false') == n
    assert html.count('"modeBarButtonsToRemove": ["sendChartToCloud"]') == n


def test_figures_offer_no_cloud_upload():
    viz.setup()
    import plotly.io as pio
    from critlib.report import plotlyjs
    assert "sendChartToCloud" in plotlyjs(), "plotly.js renamed its cloud button: update viz.CONFIG"
    fig = go.Figure(go.Bar(y=[1, 2]))
    bundle = pio.renderers["critlib"].to_mimebundle(fig.to_dict())
    assert_no_cloud_upload(bundle["text/html"])
    config = bundle["application/vnd.plotly.v1+json"]["config"]  # what JupyterLab's renderer reads
    assert config["showSendToCloud"] is False and config["displaylogo"] is False
    assert "sendChartToCloud" in config["modeBarButtonsToRemove"]
    assert pio.renderers["notebook"].config["showSendToCloud"] is False  # fig.show(renderer=...) too


def test_renderer_bundle_has_plotly_mimetype_and_html_without_plotlyjs():
    viz.setup()
    import plotly.io as pio
    bundle = pio.renderers["critlib"].to_mimebundle(go.Figure(go.Bar(y=[1, 2])).to_dict())
    assert "application/vnd.plotly.v1+json" in bundle
    html = bundle["text/html"]
    assert "Plotly.newPlot" in html and "<script src" not in html and len(html) < 20000


# ---------------------------------------------------------------- phase 6

@pytest.fixture(scope="module")
def applications():
    from critlib.applications import ApplicationsConfig, run_applications
    from critlib.params import load_params
    from critlib.run.context import config_from, prepare
    sets = ["model=tiny-llama", "data=random", "seq_len=12", "n_sequences=2", "n_heldout=2", "device=cpu",
            "metrics=[grad_x_weight, magnitude]", "quant_bits=[3, 4]", "quant_group_size=16",
            "quant_keep_percents=[0, 1, 5]", "prune_sparsities=[0.3, 0.6]", "bitflip_top_n=1",
            "bitflip_bits=[sign, 30]", "bitflip_cap=8", "bitflip_draws=2"]
    ctx = prepare(load_params(None, sets))
    return run_applications(ctx.model, ctx.windows, config_from(ApplicationsConfig, ctx.params), progress=False)


def _trace(fig, name, col=1):
    axis = "x" if col == 1 else f"x{col}"
    found = [t for t in fig.data if t.name == name and (t.xaxis or "x") == axis]
    assert len(found) == 1, (name, col)
    return found[0]


def test_quantization_curves_plot_every_measured_point(applications):
    q = applications["quantization"]
    fig = viz.quantization_curves(q)
    assert [a.text.split("-")[0] for a in fig.layout.annotations] == ["3", "4"]
    for col, bits in enumerate((3, 4), 1):
        sub = q[q["bits"] == bits]
        ref = _trace(fig, "no outliers kept", col)
        none = sub[sub["selector"] == "none"]["ppl"].iloc[0]
        assert list(ref.y) == pytest.approx([none, none]) and ref.line.dash == "dash"
        for sel in ("grad_x_weight", "magnitude", "random"):
            d = sub[(sub["selector"] == sel) & (sub["keep_percent"] > 0)].sort_values("keep_percent")
            t = _trace(fig, sel, col)
            assert list(t.x) == [1.0, 5.0] and list(t.y) == pytest.approx(list(d["ppl"]))
            assert (t.line.dash == "dot") == (sel != "grad_x_weight")
            assert t.showlegend == (col == 1)
    fig.to_json()


def test_pruning_curves_start_at_the_unpruned_model(applications):
    p = applications["pruning"]
    fig = viz.pruning_curves(p)
    base = p[p["kind"] == "reference"]["ppl"].iloc[0]
    assert [a.text for a in fig.layout.annotations] == ["per layer", "global"]
    for col, mode in enumerate(("per_layer", "global"), 1):
        for sel in ("grad_x_weight", "magnitude", "random"):
            d = p[(p["mode"] == mode) & (p["selector"] == sel)].sort_values("sparsity")
            t = _trace(fig, sel, col)
            assert list(t.x) == [0.0, 0.3, 0.6]
            assert list(t.y) == pytest.approx([base] + list(d["ppl"]))
    assert fig.layout.yaxis.type == "log"


def test_pruning_curves_dash_protected_runs_and_skip_nonfinite():
    rows = [dict(mode="none", sparsity=0.0, selector="none", kind="reference", protected="", ppl=10.0,
                 ppl_ratio=1.0, kl=0.0)]
    for prot, ppl in (("", 20.0), ("top5:m", float("inf"))):
        rows.append(dict(mode="global", sparsity=0.5, selector="m", kind="metric", protected=prot, ppl=ppl,
                         ppl_ratio=ppl / 10, kl=0.1))
    fig = viz.pruning_curves(pd.DataFrame(rows))
    plain, prot = _trace(fig, "m"), _trace(fig, "m (top5:m protected)")
    assert list(plain.y) == [10.0, 20.0] and plain.line.dash is None
    assert list(prot.y) == [10.0, None] and prot.line.dash == "dash"
    assert "1 point(s) with NaN/inf" in fig.layout.annotations[-1].text


def test_bitflip_damage_draws_every_flip_and_marks_broken_ones(applications):
    single = applications["bitflip_single"].copy()
    single.loc[single.index[0], ["ppl", "ppl_ratio"]] = [float("nan"), float("inf")]
    fig = viz.bitflip_damage(single)
    assert sum(len(t.y) for t in fig.data) == len(single)
    finite = single["ppl_ratio"][np.isfinite(single["ppl_ratio"])]
    for t in fig.data:
        bit = int(t.name.split()[1])
        d = single[single["bit"] == bit]
        assert list(t.x) == [f"{s} #{r}" for s, r in zip(d["selector"], d["rank"])]
        for y, r, shape, text in zip(t.y, d["ppl_ratio"], t.marker.pattern.shape, t.text):
            if np.isfinite(r):
                assert y == pytest.approx(r) and shape == "" and text == ""
            else:
                assert y > finite.max() and shape == "x" and text == "broken"
    fig.to_json()


def test_flips_to_break_bars_median_of_draws_and_unbroken_runs():
    base = dict(base_ppl=5.0, factor=10.0, eval_windows=2, target_ppl=50.0, ppl_at=60.0, ppl_before=40.0,
                ppl_at_cap=None, n_evals=3)
    rows = [dict(selector="m", kind="metric", order="damage", draw=0, n_available=6, n_flips=2, **base),
            dict(selector="magnitude", kind="baseline", order="damage", draw=0, n_available=6, n_flips=None, **base),
            dict(selector="all", kind="combined", order="damage", draw=0, n_available=12, n_flips=1, **base)]
    draws = [3, 40, None]
    rows += [dict(selector="random", kind="baseline", order="random_bits", draw=d, n_available=64, n_flips=n, **base)
             for d, n in enumerate(draws)]
    df = pd.DataFrame(rows)
    df["n_flips"] = df["n_flips"].astype("Int64")
    fig = viz.flips_to_break_bars(df)
    bars, median, points = fig.data
    assert list(bars.x) == ["m", "magnitude", "all selectors"] and list(bars.y) == [2, 6, 1]
    assert list(bars.text) == ["2", "> 6", "1"] and list(bars.marker.pattern.shape) == ["", "/", ""]
    assert list(median.y) == [np.median([3, 40, np.inf])] and list(median.text) == ["40"]
    assert list(points.y) == [3, 40, 64]
    df.loc[df["order"] == "random_bits", "n_flips"] = pd.NA
    median = viz.flips_to_break_bars(df).data[1]
    assert list(median.y) == [64] and list(median.text) == ["> 64"]
