"""The figures' structure: every figure function returns a drawable go.Figure."""

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from critlib import tables, viz


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


def test_setup_shows_tables_whole():
    keys = ("display.max_rows", "display.min_rows", "display.max_columns", "display.float_format")
    old = {k: pd.get_option(k) for k in keys}
    try:
        viz.setup()
        long = pd.DataFrame({"selector": [f"s{i}" for i in range(72)], "k": range(72)})  # 12 selectors x 6 methods
        wide = pd.DataFrame([np.arange(30)], columns=[f"rank_metric_{i}" for i in range(30)])
        assert long._repr_html_().count("<tr") == 72 + 1 and "..." not in long._repr_html_()
        assert all(f"rank_metric_{i}<" in wide._repr_html_() for i in range(30))
        assert ">5.3697e-07<" in pd.DataFrame({"x": [5.369673e-07]})._repr_html_()
    finally:
        for k, v in old.items():
            pd.set_option(k, v)


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


def test_pruning_curves_dash_protected_runs_and_mark_broken_points():
    rows = [dict(mode="none", sparsity=0.0, selector="none", kind="reference", protected="", ppl=10.0,
                 ppl_ratio=1.0, kl=0.0)]
    for prot, ppl in (("", 20.0), ("top5:m", float("inf"))):
        rows.append(dict(mode="global", sparsity=0.5, selector="m", kind="metric", protected=prot, ppl=ppl,
                         ppl_ratio=ppl / 10, kl=0.1))
    fig = viz.pruning_curves(pd.DataFrame(rows))
    plain, prot = _trace(fig, "m"), _trace(fig, "m (top5:m protected)")
    assert list(plain.y) == [10.0, 20.0] and plain.line.dash is None
    assert prot.y[0] == 10.0 and prot.y[1] >= 100.0 and prot.line.dash == "dash"  # drawn at the top
    assert list(prot.text) == ["", "broken"] and list(prot.marker.symbol) == ["circle", "x"]
    assert "inf (the model broke)" in prot.customdata[1][2]
    assert "1 point(s)" in fig.layout.annotations[-1].text and "broken" in fig.layout.annotations[-1].text


def _summary(selectors, methods=(("zero", None),), ks=(1, 10, 100), value=lambda s, k: 1.0 + k):
    rows = []
    for method, arg in methods:
        for sel, draws in selectors:
            for k in ks:
                rows.append(dict(selector=sel, metric=sel.split(":")[-1] if ":" in sel else None, method=method,
                                 method_arg=arg, k=k, ppl_ratio_mean=value(sel, k),
                                 ppl_ratio_std=0.1 if draws > 1 else np.nan, kl_mean=value(sel, k) / 100,
                                 kl_std=0.05 if draws > 1 else np.nan, n_changed_mean=k, n_draws=draws))
    return pd.DataFrame(rows)


def test_dose_response_marks_broken_points_at_the_top():
    df = _summary([("top:m", 1), ("random", 3)],
                  value=lambda s, k: float("inf") if (s, k) == ("top:m", 100) else float("nan") if k == 1000 else k)
    fig = viz.dose_response(df)
    line = _trace(fig, "top:m")
    assert list(line.y[:2]) == [1, 10] and line.y[2] > 10 * 10 and list(line.text) == ["", "", "broken"]
    assert line.marker.symbol[2] == "x"
    assert "1 point(s)" in fig.layout.annotations[-1].text


def test_dose_response_bands_stay_above_zero_on_log_axes():
    # kl: mean 0.01 ± 0.05 at every k: mean − std < 0
    fig = viz.dose_response(_summary([("random", 3)], value=lambda s, k: 1.0), "kl")
    band = next(t for t in fig.data if t.fill == "toself")
    assert min(band.y) > 0 and min(band.y) == pytest.approx(0.01 * 0.01 / 0.06)
    lin = viz.dose_response(_summary([("random", 3)], value=lambda s, k: 1.0), "kl", log_y=False)
    assert min(next(t for t in lin.data if t.fill == "toself").y) == pytest.approx(0.01 - 0.05)


def test_dose_response_bands_are_the_95_intervals_where_the_table_has_them():
    df = _summary([("top:m", 1), ("random", 3)], value=lambda s, k: 2.0)
    df["ppl_ratio_lo"], df["ppl_ratio_hi"] = np.where(df["selector"] == "random", -1.0, 1.5), 3.0
    fig = viz.dose_response(df)
    bands = [t for t in fig.data if t.fill == "toself"]
    assert len(bands) == 2  # the one-draw selector's interval too (a bootstrap over windows)
    top, rnd = bands
    assert list(top.y) == [3.0] * 3 + [1.5] * 3
    assert list(rnd.y) == [3.0] * 3 + [pytest.approx(2.0 * 2.0 / 3.0)] * 3  # lo ≤ 0 on a log axis: mirrored
    assert "[1.5, 3]" in _trace(fig, "top:m").customdata[0][0]


def test_selectors_have_distinct_fixed_colours_and_controls_stand_apart():
    metrics = ["grad_x_weight", "grad_squared", "fisher", "magnitude", "wanda"]
    sels = [f"top:{m}" for m in metrics] + [f"bottom:{m}" for m in metrics] + ["random", "magnitude"]
    cmap = viz.colors(sels)
    assert len({cmap[s] for s in sels if s != "magnitude"}) == 11  # all but the magnitude control differ
    assert cmap["random"] == viz.RANDOM_COLOR and cmap["top:grad_x_weight"] != cmap["random"]
    assert viz.colors(metrics)["fisher"] == cmap["top:fisher"] == viz.colors(["fisher"])["fisher"]  # every page
    df = _summary([(s, 3 if s == "random" else 1) for s in sels], value=lambda s, k: k * (2.0 if s == "magnitude" else 1))
    fig = viz.dose_response(df)
    dash = {t.name: t.line.dash for t in fig.data if t.showlegend}
    assert dash["random"] == "dot" and dash["magnitude control (exact top-|w|)"] == "dot"
    assert dash["top:fisher"] is None and dash["bottom:fisher"] == "dash"
    assert len(dash) == 12


def test_magnitude_drawn_once_when_control_and_metric_agree():
    df = _summary([("top:magnitude", 1), ("magnitude", 1), ("top:wanda", 1)])
    names = [t.name for t in viz.dose_response(df).data]
    assert names == ["top:magnitude = magnitude control", "top:wanda"]


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
    low, high = fig.layout.yaxis.range  # log10 units: a ratio of 1 and the broken bars both inside
    assert 10 ** low < min(1.0, finite.min()) and 10 ** high > max(t.y[i] for t in fig.data for i in range(len(t.y)))
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
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.range[0] < 0  # a bar of 1 flip is visible
    bars, median, points = fig.data
    assert list(bars.x) == ["m", "magnitude", "all selectors"] and list(bars.y) == [2, 6, 1]
    assert list(bars.text) == ["2", "> 6", "1"] and list(bars.marker.pattern.shape) == ["", "/", ""]
    cmap = viz.colors(["m", "magnitude"])
    assert list(bars.marker.color)[:2] == [cmap["m"], cmap["magnitude"]]  # the selectors' colours of every page
    assert list(median.y) == [np.median([3, 40, np.inf])] and list(median.text) == ["40"]
    assert list(points.y) == [3, 40, 64]
    df.loc[df["order"] == "random_bits", "n_flips"] = pd.NA
    median = viz.flips_to_break_bars(df).data[1]
    assert list(median.y) == [64] and list(median.text) == ["> 64"]


def _candidate(layer, ratio, lo, hi, confirmed, control=None):
    r = dict(layer=layer, row=1, col=2, param=f"model.layers.{layer}.mlp.down_proj.weight", confirmed=confirmed,
             verdict="confirmed" if confirmed else "below the effect size", ppl_ratio_when_zeroed=ratio,
             ppl_ratio_when_zeroed_lo=lo, ppl_ratio_when_zeroed_hi=hi, random_n=0, random_ppl_ratio_hi=None)
    if control:
        r.update(random_n=8, random_ppl_ratio_mean=control[0], random_ppl_ratio_lo=control[1],
                 random_ppl_ratio_hi=control[2])
    return r


def test_super_weight_candidates_draw_every_interval_and_only_drawn_controls():
    cands = [_candidate(11, 6.4, 5.2, 7.9, True, (1.0, 0.99, 1.01)), _candidate(28, 1.003, 0.99, 1.02, False)]
    fig = viz.super_weight_candidates(cands, 1.05)
    bars, ctl = fig.data
    assert list(bars.y) == [6.4, 1.003] and bars.marker.color[0] != bars.marker.color[1]
    assert list(bars.error_y.array) == pytest.approx([7.9 - 6.4, 1.02 - 1.003])
    assert list(bars.error_y.arrayminus) == pytest.approx([6.4 - 5.2, 1.003 - 0.99])
    assert list(ctl.x) == ["L11 [1,2]"] and list(ctl.error_y.array) == pytest.approx([0.01])
    assert fig.layout.shapes[0].y0 == 1.05 and fig.layout.yaxis.type == "log"


def test_spike_ratios_one_line_per_prompt_and_the_threshold():
    prof = [dict(layer=i, spike_ratio=r, out_max=r * 2, in_channel=1, out_channel=2, position=0)
            for i, r in enumerate([1.0, 30.0, 0.8])]
    det = {"prompts": [{"text": "a"}, {"text": ""}], "profiles": [prof, prof], "spike_ratio": 10.0}
    fig = viz.spike_ratios(det)
    assert [t.name for t in fig.data] == ["a", "prompt 1 (ids)"] and list(fig.data[0].y) == [1.0, 30.0, 0.8]
    assert fig.layout.shapes[0].y0 == 10.0


def test_position_damage_one_line_per_group_controls_dotted():
    pos = pd.DataFrame([dict(selector=s, k=k, start=a, stop=b, nll_increase=v)
                        for s, k, v in [("top:wanda", 10, 0.5), ("random", 10, 0.0)]
                        for a, b in [(0, 8), (8, 16)]])
    fig = viz.position_damage(pos, ["selector", "k"], "t", controls=("random",))
    assert [t.name for t in fig.data] == ["top:wanda, K=10", "random, K=10"]
    assert list(fig.data[0].x) == ["0–7", "8–15"] and fig.data[1].line.dash == "dot" and fig.data[0].line.dash is None


def test_stability_by_tokens_one_line_per_metric_on_a_log_axis():
    table = pd.DataFrame([{"metric": m, "tokens": t, "windows": t // 128, "k": 1000, "overlap": o, "jaccard": o / 1000}
                          for m in ("grad_x_weight", "fisher") for t, o in ((256, 100), (1024, 300))])
    fig = viz.stability_by_tokens(table)
    assert [t.name for t in fig.data] == ["grad_x_weight", "fisher"]
    assert list(fig.data[0].x) == [256, 1024] and fig.layout.xaxis.type == "log"
    assert fig.data[0].line.color == viz.METRIC_COLORS["grad_x_weight"] and "Top-1000" in fig.layout.title.text
