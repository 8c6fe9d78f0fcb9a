"""`critlib score` end to end on tiny models: outputs, determinism, bad input, atomic writes."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from critlib.cli import main
from critlib.sensitivity import COLUMNS
from tests.conftest import tiny

TINY = ["--set", "model=tiny-llama", "--set", "tokenizer=default", "--set", "seq_len=16", "--set", "n_sequences=3",
        "--set", "n_heldout=2", "--set", "batch_size=2", "--set", "topk_per_layer=5", "--set", "topk_global=40",
        "-q"]


def run(tmp_path, *extra, name="out"):
    return main(["score", "-o", str(tmp_path / name), *TINY, *extra])


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("score")
    assert main(["score", "-o", str(tmp / "a"), *TINY]) == 0
    return tmp / "a"


def test_outputs(outdir):
    df = pd.read_parquet(outdir / "top_weights.parquet")
    assert list(df.columns) == COLUMNS
    assert list(pd.read_csv(outdir / "top_weights.csv").columns) == COLUMNS
    metrics = ["grad_x_weight", "grad_squared", "fisher", "magnitude", "wanda"]
    assert sorted(df.metric.unique()) == sorted(metrics)
    for m in metrics:
        g = df[(df.metric == m) & (df.scope == "global")]
        assert g["rank"].tolist() == list(range(1, 41))
        assert (np.diff(g.score.to_numpy()) <= 0).all()  # sorted, descending
        pl = df[(df.metric == m) & (df.scope == "per_layer")]
        assert pl.groupby("param")["rank"].apply(list).map(lambda r: r == [1, 2, 3, 4, 5]).all()
    emb = df[df.param == "model.embed_tokens.weight"]
    assert emb.token_id.notna().all() and (emb.token_id == emb.row).all() and emb.token.notna().all()
    assert df[df.param != "model.embed_tokens.weight"].token_id.isna().all()
    man = json.loads((outdir / "manifest.json").read_text())
    for key in ("critlib_version", "git_commit", "model", "data", "seed", "metrics", "versions", "timings_s", "memory",
                "device_name"):
        assert key in man
    assert len(man["data"]["sha256"]) == 64 and man["model"]["n_params"] == sum(
        p.numel() for p in tiny("tiny-llama").parameters()) - 96 * 32 + 49152 * 32
    stats = json.loads((outdir / "sensitivity_stats.json").read_text())
    assert stats["metrics"]["fisher"]["global"]["count"] == man["model"]["n_params"]
    assert len(stats["cross_metric"]) == 10


def test_weight_column_is_the_weight(outdir):
    df = pd.read_parquet(outdir / "top_weights.parquet")
    mag = df[(df.metric == "magnitude")]
    assert np.allclose(mag.score, mag.weight.abs())


def test_identical_runs_write_identical_files(outdir, tmp_path):
    assert run(tmp_path, name="b") == 0
    for f in ("top_weights.csv", "top_weights.parquet", "sensitivity_stats.json"):
        assert (outdir / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_token_ids_data_without_tokenizer(tmp_path):
    ids = np.random.default_rng(0).integers(0, 96, size=(5, 10))
    np.save(tmp_path / "ids.npy", ids)
    rc = main(["score", "-o", str(tmp_path / "o"), "--set", "model=tiny-gpt2", "--set", f"data={tmp_path / 'ids.npy'}",
               "--set", "seq_len=10", "--set", "n_sequences=3", "--set", "n_heldout=2", "--set", "topk_per_layer=3",
               "--set", "topk_global=5", "--set", "metrics=magnitude,grad_x_weight", "-q"])
    assert rc == 0
    df = pd.read_csv(tmp_path / "o" / "top_weights.csv")
    wte = df[df.param == "transformer.wte.weight"]
    assert wte.token_id.notna().all() and wte.token.isna().all()


BAD = [
    (["--set", "bogus=1"], "unknown parameter(s) bogus; valid keys:"),
    (["--set", "topk_global=0"], "topk_global=0 must be ≥ 1"),
    (["--set", "topk_global=100000000"], "exceeds the model's"),
    (["--set", "metrics=gradx"], "unknown metric 'gradx'; choose from:"),
    (["--set", "model=does/not-exist"], "model 'does/not-exist' not found"),
    (["--set", "device=cuda"], "CUDA is not available"),
    (["--set", "seq_len=4096"], "seq_len=4096 is longer than the 256 positions"),
    (["--set", "seq_len=200", "--set", "n_sequences=400"], "windows of 200"),
    (["--set", "data=/nonexistent.txt"], "neither a built-in corpus"),
    (["--set", "seq_len=x"], "seq_len must be an integer"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_input_one_clear_line(tmp_path, capsys, extra, message):
    if "cuda" in " ".join(extra) and torch.cuda.is_available():
        pytest.skip("CUDA is present")
    assert run(tmp_path, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("critlib: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_bad_yaml_and_bad_gguf(tmp_path, capsys):
    (tmp_path / "p.yaml").write_text("model: [unclosed\n")
    assert main(["score", "-p", str(tmp_path / "p.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file at all")
    assert run(tmp_path, "--set", f"model={tmp_path / 'broken.gguf'}") == 2
    assert "is not a GGUF file" in capsys.readouterr().err


def test_short_text(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("Too short.")
    assert run(tmp_path, "--set", f"data={tmp_path / 'short.txt'}") == 2
    assert "windows of 16" in capsys.readouterr().err


def test_failed_run_keeps_previous_results(tmp_path, capsys):
    assert run(tmp_path) == 0
    before = _files(tmp_path / "out")
    model = tiny("tiny-llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nanmodel")
    rc = main(["score", "-o", str(tmp_path / "out"), "--set", f"model={tmp_path / 'nanmodel'}", "--set", "data=random",
               "--set", "seq_len=8", "--set", "n_sequences=2", "--set", "n_heldout=1", "--set", "topk_per_layer=2",
               "--set", "topk_global=3", "-q"])
    assert rc == 2
    assert "NaN or inf" in capsys.readouterr().err
    assert _files(tmp_path / "out") == before  # nothing half-written, nothing lost
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name] == []  # no temporary files left


def _files(folder):
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_interrupted_write_leaves_old_file(tmp_path):
    from critlib.io import write_json
    write_json(tmp_path / "x.json", {"a": 1})
    with pytest.raises(RuntimeError):
        from critlib import io
        with io.atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
