"""Bad input gives one CritlibError naming the problem and the fix, never a traceback or a silent result."""

import json

import pytest
import torch

from critlib import CritlibError
from critlib.cli import main
from critlib.data import read_texts
from critlib.params import METRICS, load_params
from critlib.scores import _check_finite, score_model
from critlib.sensitivity import analyze
from tests.conftest import REPO, tiny


@pytest.mark.parametrize("item,message", [
    ("seed=-1", "seed=-1: seed must be a non-negative integer"),
    ("seed=4294967296", "seed must be a non-negative integer ≤ 2**32 - 1"),
    ("stability_seeds=1,-2", "stability_seeds has -2: each seed must be a non-negative integer"),
    ("stability_tokens=[256, 0]", "stability_tokens=[256, 0] must be positive token counts"),
    ("stability_tokens=[a]", "must be a list of token counts"),
    ("n_random_draws=-1", "n_random_draws=-1 must be an integer ≥ 1"),
    ("perturb_ks=-1", "must be a non-empty list of integers ≥ 0"),
    ("bitflip_top_n=-1", "bitflip_top_n=-1 must be ≥ 0"),
    ("perturb_heldout=-1", "perturb_heldout=-1 must be ≥ 0"),
    ("quant_clip_z=.nan", "quant_clip_z must be ≥ 0"),
])
def test_negative_seed_and_counts_are_clear_errors(item, message):
    with pytest.raises(CritlibError) as e:
        load_params(None, [item])
    assert message in str(e.value)


def test_negative_seed_on_the_command_line_is_one_line(tmp_path, capsys):
    assert main(["score", "-o", str(tmp_path / "out"), "--set", "seed=-1", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("critlib: error: seed=-1: seed must be a non-negative"), err


def test_empty_metrics_names_the_choices():
    with pytest.raises(CritlibError) as e:
        load_params(None, ["metrics="])
    assert "name at least one metric" in str(e.value) and all(m in str(e.value) for m in METRICS)
    with pytest.raises(CritlibError, match="quant_bits is empty; give at least one value"):
        load_params(None, ["quant_bits="])


@pytest.mark.parametrize("given,canonical", [("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16"),
                                             ("torch.float32", "fp32"), ("torch.bfloat16", "bf16"), ("half", "fp16"),
                                             ("fp32", "fp32"), ("BF16", "bf16")])
def test_dtype_accepts_torch_names(given, canonical):
    assert load_params(None, [f"dtype={given}"]).dtype == canonical
    if canonical != "fp16":
        assert load_params(None, [f"fisher_dtype={given}"]).fisher_dtype == canonical


def test_unknown_dtype_lists_both_spellings():
    with pytest.raises(CritlibError, match=r"unknown dtype 'fp8'; choose fp32, bf16, fp16 \(or torch's names, e.g. "
                                           r"float32, bfloat16, float16"):
        load_params(None, ["dtype=fp8"])
    with pytest.raises(CritlibError, match="unknown fisher_dtype 'float16'; choose fp32, bf16"):
        load_params(None, ["fisher_dtype=float16"])


def test_phase_heldout_keys_above_n_heldout_mean_all_heldout_windows():
    """Phase 3 and 6 keys never stop another phase: above n_heldout they are lowered to it (all windows)."""
    p = load_params(f"{REPO}/params/tiny.yaml", ["n_heldout=1"])
    assert p.perturb_heldout == 1 and p.applications_heldout == 1
    p = load_params(None, ["n_heldout=3", "perturb_heldout=2", "applications_heldout=0"])
    assert p.perturb_heldout == 2 and p.applications_heldout == 0


def test_topk_per_layer_larger_than_a_tensor_keeps_all_of_it(tiny_llama, windows):
    model = tiny_llama
    res = analyze(model, windows, metrics=["magnitude", "grad_x_weight"], topk_global=50, topk_per_layer=100,
                  exact_stats=False, progress=False)
    for name, p in model.named_parameters():
        for m in res.metrics:
            vals, idx = res.topk[m].per_tensor(name, res.topk_per_layer)
            assert len(idx) == min(100, p.numel()), (m, name)
    norm = "model.layers.0.input_layernorm.weight"
    assert sorted(res.topk["magnitude"].per_tensor(norm, 100)[1].tolist()) == list(range(dict(
        model.named_parameters())[norm].numel()))


def test_score_on_a_tiny_preset_with_default_topk_and_phase_keys(tmp_path, capsys):
    """`critlib score` runs on params/tiny.yaml with topk_per_layer 100 (above its norms' size) and
    perturb_heldout/applications_heldout 2 above n_heldout 1."""
    rc = main(["score", "-p", f"{REPO}/params/tiny.yaml", "-o", str(tmp_path / "out"), "--set",
               f"model=synthetic:{REPO}/params/tiny-model.json", "--set", "n_heldout=1", "--set", "topk_per_layer=100",
               "--set", "metrics=magnitude", "-q"])
    assert rc == 0, capsys.readouterr().err


def test_non_utf8_jsonl_and_txt_name_the_line(tmp_path):
    good = json.dumps({"text": "fine"}).encode()
    (tmp_path / "d.jsonl").write_bytes(good + b"\n" + good + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(CritlibError, match=r"d.jsonl is not UTF-8 text \(line 3 has byte 0xe9\); save it as UTF-8"):
        read_texts(str(tmp_path / "d.jsonl"))
    (tmp_path / "d.txt").write_bytes(b"one\ntwo \xff\n")
    with pytest.raises(CritlibError, match=r"d.txt is not UTF-8 text \(line 2 has byte 0xff\)"):
        read_texts(str(tmp_path / "d.txt"))


def test_bad_jsonl_lines_are_named(tmp_path):
    ok = json.dumps({"text": "fine"})
    (tmp_path / "a.jsonl").write_text(f"{ok}\n\n{{not json\n")
    with pytest.raises(CritlibError, match=r"a.jsonl line 3 is not valid JSON .*; fix or remove it"):
        read_texts(str(tmp_path / "a.jsonl"))
    (tmp_path / "b.jsonl").write_text(f"{ok}\n{json.dumps({'body': 'x'})}\n")
    with pytest.raises(CritlibError, match=r"b.jsonl line 2 has no string field 'text'; set text_field"):
        read_texts(str(tmp_path / "b.jsonl"))


def test_jsonl_newlines_as_read_text_gives_them(tmp_path):
    """\\r\\n ends a line (as before); U+2028 inside a JSON string does not."""
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "a\\r\\nb"}\r\n{"text": "x\xe2\x80\xa8y"}\r\n')
    assert read_texts(str(tmp_path / "c.jsonl")) == ["a\r\nb", "x\u2028y"]
    (tmp_path / "c.txt").write_bytes(b"a\r\nb\rc\n")
    assert read_texts(str(tmp_path / "c.txt")) == ["a\nb\nc\n"]


def _broken(value: float):
    model = tiny("tiny-llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = value
        model.model.layers[1].mlp.up_proj.weight[4, 1] = value
    return model


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("kernel", ["off", "auto", "torch"])
@pytest.mark.parametrize("metric", ["magnitude", "grad_x_weight"])
def test_nonfinite_weight_is_an_error(windows, metric, kernel, value):
    with pytest.raises(CritlibError, match=r"model.layers.1.mlp.up_proj.weight has 2 NaN or inf weight\(s\) of \d+; "
                                           r".*check that the checkpoint is intact"):
        analyze(_broken(value), windows, metrics=[metric], topk_global=10, topk_per_layer=5, progress=False,
                kernel=kernel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_gradient_check_finds_one_nonfinite_value_and_passes_sums_that_overflow(dtype):
    g = torch.full((3, 1 << 23), torch.finfo(dtype).max / 2, dtype=dtype)
    if dtype == torch.float32:  # the quick path's sums overflow, so the exact count decides
        assert not torch.isfinite(g.reshape(-1)[: 1 << 24].sum())
    _check_finite("w", g)
    for value in (float("nan"), float("inf"), -float("inf")):
        bad = g.clone()
        bad[2, -1] = value
        with pytest.raises(CritlibError, match="the gradient of w has NaN or inf values"):
            _check_finite("w", bad)


@pytest.mark.parametrize("metric", METRICS)
def test_nonfinite_weight_is_an_error_for_every_metric(windows, metric):
    with pytest.raises(CritlibError, match="model.layers.1.mlp.up_proj.weight has 2 NaN or inf"):
        score_model(_broken(float("nan")), windows, [metric], lambda *a: None, progress=False)
