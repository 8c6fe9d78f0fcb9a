"""The report's findings: each sentence from the run folder's files, stating only what its rule allows."""

import json

import pandas as pd

from critlib.summary import describe_model, findings, phase_answer


def test_the_default_model_is_named_by_what_it_is():
    info = {"source": "default", "kind": "gguf", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "dtype": "fp32",
            "n_params": 134515008}
    assert describe_model(info) == ("SmolLM2-135M-Instruct (GGUF Q4_1 SmolLM2-135M-Instruct.Q4_1.gguf, the "
                                    "embedded default; dequantized to fp32, 134.5M weights)")
    assert describe_model({"source": "meta-llama/Llama-3.1-8B", "kind": "hub", "dtype": "bf16",
                           "n_params": 8_030_261_248}) == "meta-llama/Llama-3.1-8B (bf16, 8.03B weights)"


def _write(out, ratio_lo, random_hi, confirmed):
    (out / "manifest.json").write_text(json.dumps({"model": {"source": "default", "kind": "gguf", "dtype": "fp32",
                                                             "file": "X.Q8_0.gguf", "n_params": 10},
                                                   "data": {"source": "default", "n_score": 8, "n_heldout": 8,
                                                            "seq_len": 128}}))
    (out / "sensitivity_stats.json").write_text(json.dumps({"metrics": {
        "grad_x_weight": {"global": {"top_share": {"0.1%": 0.25}}},
        "magnitude": {"global": {"top_share": {"0.1%": 0.01}}}}}))
    rows = [dict(selector=s, method="zero", k=k, ppl_ratio_mean=m, ppl_ratio_lo=lo, ppl_ratio_hi=hi,
                 window_set="2x128:abc") for s, k, m, lo, hi in
            [("top:grad_x_weight", 10, 3.0, ratio_lo, 4.0), ("top:grad_x_weight", 1, 9.0, 8.0, 10.0),
             ("random", 10, 1.0, 0.99, random_hi), ("magnitude", 10, 1.5, 1.4, 1.6)]]
    pd.DataFrame(rows).to_parquet(out / "perturbation_summary.parquet")
    (out / "superweights.json").write_text(json.dumps({"candidates": [
        {"param": "a", "row": 1, "col": 2, "confirmed": confirmed, "ppl_ratio_when_zeroed": 4.85,
         "ppl_ratio_when_zeroed_lo": 4.1, "ppl_ratio_when_zeroed_hi": 5.6},
        {"param": "b", "row": 3, "col": 4, "confirmed": False, "ppl_ratio_when_zeroed": 1.01}]}))
    pd.DataFrame([dict(metric="grad_x_weight", comparison="seed", jaccard=0.2),
                  dict(metric="magnitude", comparison="seed", jaccard=1.0)]).to_parquet(out / "stability.parquet")
    pd.DataFrame([dict(metric=m, tokens=t, jaccard=j) for m, t, j in
                  [("grad_x_weight", 256, 0.1), ("fisher", 256, 0.2), ("grad_x_weight", 2048, 0.3),
                   ("fisher", 2048, 0.4)]]).to_parquet(out / "stability_tokens.parquet")


def test_findings_follow_their_rules(tmp_path):
    _write(tmp_path, ratio_lo=2.0, random_hi=1.01, confirmed=True)
    text = findings(tmp_path)
    assert text[0].startswith("Model: X (GGUF Q8_0 X.Q8_0.gguf, the embedded default; dequantized to fp32")
    assert any("grad_x_weight 25%" in t and "magnitude" not in t for t in text)
    causal = next(t for t in text if t.startswith("Causal test"))
    assert "top 10 weights" in causal and "×3 [2, 4]" in causal and "wholly above the random" in causal
    assert "window set 2x128:abc" in causal and "magnitude (|w|) ×1.5 [1.4, 1.6]" in causal
    assert any(t.startswith("Confirmed super weights: 1 of 2") and "a[1,2] ×4.85 [4.1, 5.6]" in t for t in text)
    assert any("grad_x_weight 0.20" in t and "magnitude 1" not in t for t in text)
    assert any("0.15 at 256 tokens, 0.35 at 2,048 tokens (still rising" in t for t in text)


def test_overlapping_intervals_and_no_confirmed_weight_are_said_so(tmp_path):
    _write(tmp_path, ratio_lo=0.995, random_hi=1.01, confirmed=False)
    text = findings(tmp_path)
    assert "not distinguishable from random" in next(t for t in text if t.startswith("Causal test"))
    assert "none of 2 candidate(s) passed" in " ".join(text)


def test_missing_files_leave_their_sentences_out(tmp_path):
    assert findings(tmp_path) == []


def test_each_phase_page_has_its_answer(tmp_path):
    _write(tmp_path, ratio_lo=2.0, random_hi=1.01, confirmed=True)
    (tmp_path / "headlines").mkdir()
    (tmp_path / "headlines" / "06_applications.json").write_text(json.dumps(
        {"items": [{"label": "4-bit quantization: ppl ratio", "value": 1.2}, {"label": "b", "value": 2},
                   {"label": "c", "value": 3}]}))
    assert findings(tmp_path)[1] in phase_answer("01_sensitivity", tmp_path)
    assert phase_answer("03_perturbation", tmp_path).startswith("Causal test")
    assert phase_answer("04_super_weights", tmp_path).startswith("Confirmed super weights")
    assert phase_answer("02_cross_metric", tmp_path).startswith("Stability")
    assert phase_answer("06_applications", tmp_path) == "4-bit quantization: ppl ratio: 1.2. B: 2."


def _write_figure_files(out):
    """What Phases 1, 3 and 4 write for the index's key figures (a broken point, NaN, included)."""
    pd.DataFrame([dict(metric=m, layer=layer, component=c, n_weights=10, score_sum=s, score_share=s / 6, topk=1,
                       topk_share=0.1, k=10, params="p") for m in ("grad_x_weight", "wanda")
                  for layer, c, s in ((0, "attn_q", 1.0), (1, "mlp_down", 5.0))]).astype({"layer": "Int64"}) \
        .to_parquet(out / "layer_component.parquet")
    rows = [dict(selector=s, method="zero", method_arg=None, k=k, ppl_ratio_mean=m, ppl_ratio_lo=m * 0.9,
                 ppl_ratio_hi=m * 1.1, n_draws=2 if s == "random" else 1, interval="windows", window_set="w")
            for s in ("top:grad_x_weight", "random", "magnitude", "bottom:wanda") for k, m in ((1, 1.5), (10, 3.0))]
    rows[1]["ppl_ratio_mean"] = float("inf")  # zeroing the top 10 broke the model
    rows.append(dict(rows[0], method="sign_flip"))  # another method: not in the causal figure
    pd.DataFrame(rows).to_parquet(out / "perturbation_summary.parquet")
    cand = dict(param="model.layers.1.mlp.down_proj.weight", layer=1, row=3, col=4, confirmed=True,
                verdict="confirmed", ppl_ratio_when_zeroed=4.85, ppl_ratio_when_zeroed_lo=4.1,
                ppl_ratio_when_zeroed_hi=5.6, random_n=8, random_ppl_ratio_mean=1.0, random_ppl_ratio_lo=0.99,
                random_ppl_ratio_hi=1.01)
    (out / "superweights.json").write_text(json.dumps({"candidates": [cand], "rule": {"effect_size": 1.05}}))


def test_key_figures_only_where_their_phase_ran(tmp_path):
    from critlib.summary import key_figures
    assert key_figures(tmp_path) == []
    _write_figure_files(tmp_path)
    figs = key_figures(tmp_path)
    assert [k for k, _, _ in figs] == ["01_sensitivity", "03_perturbation", "04_super_weights"]
    causal = figs[1][2]
    names = [t.name for t in causal.data]
    assert names == ["top:grad_x_weight", "random", "magnitude control (top-|w|)"]  # zeroing only, no bottom-K
    top = causal.data[0]
    assert list(top.text) == ["", "broken"] and list(top.error_y.array)[1] == 0  # broken: drawn, no interval
    assert abs(top.error_y.arrayminus[0] - 0.15) < 1e-9
    (tmp_path / "layer_component.parquet").unlink()
    (tmp_path / "superweights.json").write_text(json.dumps({"candidates": [], "rule": {"effect_size": 1.05}}))
    assert [k for k, _, _ in key_figures(tmp_path)] == ["03_perturbation"]


def test_the_index_draws_its_key_figures_offline(tmp_path):
    """The index carries the key figures with the run folder's plotly.min.js (or plotly.js inside when
    self-contained), no network script, no cloud button; without figures, no script at all."""
    from critlib.params import load_params
    from critlib.report import plotlyjs, write_index
    from critlib.summary import key_figures
    from tests.test_report import SCRIPT_SRC
    from tests.test_viz import assert_no_cloud_upload
    _write_figure_files(tmp_path)
    record = {"phases": {}, "started": "s", "finished": "f"}
    params = load_params(None)
    write_index(tmp_path / "index.html", params, record, {}, ["A finding."], "m", key_figures(tmp_path),
                "plotly.min.js")
    page = (tmp_path / "index.html").read_text()
    assert page.index("<h2>Findings</h2>") < page.index("<h2>Key figures</h2>") < page.index("<h2>Run</h2>")
    assert page.count("Plotly.newPlot(") == 3 and SCRIPT_SRC.findall(page) == ["plotly.min.js"]
    for key in ("01_sensitivity", "03_perturbation", "04_super_weights"):
        assert f'id="key-{key}"' in page and f'href="{key}.html"' in page
    assert 'id="critlib-no-plotly"' in page and plotlyjs()[:300] not in page
    assert_no_cloud_upload(page)
    write_index(tmp_path / "alone.html", params, record, {}, ["A finding."], "m", key_figures(tmp_path), None)
    alone = (tmp_path / "alone.html").read_text()
    assert plotlyjs()[:300] in alone and not SCRIPT_SRC.findall(alone)
    write_index(tmp_path / "bare.html", params, record, {}, ["A finding."], "m", [], "plotly.min.js")
    bare = (tmp_path / "bare.html").read_text()
    assert "<script" not in bare and "Key figures" not in bare


def test_confirmed_super_weights_strongest_first(tmp_path):
    cands = [{"param": "p", "row": i, "col": 0, "confirmed": True, "ppl_ratio_when_zeroed": r}
             for i, r in enumerate([1.2, 1.1, 1.3, 6.4])]
    (tmp_path / "superweights.json").write_text(json.dumps({"candidates": cands}))
    text = next(t for t in findings(tmp_path) if t.startswith("Confirmed"))
    assert "p[3,0] ×6.4; p[2,0] ×1.3; p[0,0] ×1.2; and 1 more on the Phase 4 page." in text
