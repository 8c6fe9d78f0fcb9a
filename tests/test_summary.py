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
