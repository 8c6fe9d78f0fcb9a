"""Data-parallel scoring over 2 CPU processes (gloo) gives the scores, top-K and statistics of 1 process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from critlib import CritlibError
from critlib.distributed import Reducer, shard, world
from critlib.scores import score_model
from critlib.sensitivity import analyze
from tests.conftest import tiny

METRICS = ["grad_x_weight", "grad_squared", "fisher", "magnitude", "wanda"]
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _windows() -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, 96, (5, 12), generator=gen)  # 5 windows: ranks get 2 and 3 (uneven on purpose)


def _run(model, windows, reduce=None):
    scores = {}

    def emit(metric, name, s):
        scores[(metric, name)] = s.detach().clone()

    score_model(model, windows, METRICS, emit, batch_size=2, progress=False, reduce=reduce)
    res = analyze(model, windows if reduce is None else _windows(), metrics=METRICS, topk_global=40, topk_per_layer=5,
                  batch_size=2, progress=False, distributed=reduce is not None)
    tops = {m: res.global_top(m) for m in METRICS}
    return scores, tops, res.stats


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        assert world() == (rank, 2)
        model = tiny("tiny-llama")
        scores, tops, stats = _run(model, shard(_windows()), Reducer())
        errors = []
        try:  # ranks reducing different tensors must fail loudly, on every rank
            Reducer().sum_(f"tensor-{rank}", torch.ones(3))
        except CritlibError as e:
            errors.append(str(e))
        try:
            shard(torch.zeros(1, 4, dtype=torch.long))
        except CritlibError as e:
            errors.append(str(e))
        torch.save({"scores": scores, "tops": tops, "stats": stats, "errors": errors}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-12, nan_ok=True), path
    else:
        assert a == b, path


def test_two_gloo_ranks_match_one_process(tmp_path):
    out = str(tmp_path / "rank")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    ref_scores, ref_tops, ref_stats = _run(tiny("tiny-llama"), _windows())
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert got["scores"].keys() == ref_scores.keys()
        for key, ref in ref_scores.items():
            torch.testing.assert_close(got["scores"][key], ref, rtol=1e-5, atol=1e-10, msg=str(key))
        for m in METRICS:
            assert [(n, f) for n, f, _ in got["tops"][m]] == [(n, f) for n, f, _ in ref_tops[m]], m
            assert [s for *_, s in got["tops"][m]] == pytest.approx([s for *_, s in ref_tops[m]], rel=1e-5)
        _close(ref_stats, got["stats"])
        assert len(got["errors"]) == 2 and "different tensor" in got["errors"][0] and "ranks" in got["errors"][1]


def test_cli_under_torchrun_matches_one_process(tmp_path):
    from critlib.params import load_params
    from critlib.run.commands import score
    sets = ["model=tiny-llama", "data=random", "seq_len=12", "n_sequences=4", "n_heldout=2", "batch_size=2",
            "topk_global=30", "topk_per_layer=5", "device=cpu", "perturb_ks=[1]"]
    ref = score(load_params(None, sets), tmp_path / "one", progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "critlib.cli", "score", "-q", "-o", str(tmp_path / "two")]
    for s in sets:
        cmd += ["--set", s]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("critlib: wrote") == 1  # only rank 0 reports and writes
    a = pd.read_csv(ref / "top_weights.csv")
    b = pd.read_csv(tmp_path / "two" / "top_weights.csv")
    pd.testing.assert_frame_equal(a.drop(columns="score"), b.drop(columns="score"))
    assert b["score"].tolist() == pytest.approx(a["score"].tolist(), rel=1e-5)
    sa = json.loads((ref / "sensitivity_stats.json").read_text())
    sb = json.loads((tmp_path / "two" / "sensitivity_stats.json").read_text())
    _close(sa["metrics"], sb["metrics"])
    man = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert man["distributed"] == {"world_size": 2, "backend": "gloo"}


def test_placement_keys_are_checked():
    from critlib.models import load_model, parse_max_memory
    from critlib.params import load_params
    assert parse_max_memory("0:70GiB, 1:60GiB,cpu:200GiB") == {0: "70GiB", 1: "60GiB", "cpu": "200GiB"}
    assert load_params(None, ["device_map=auto", "max_memory=0:1GiB"]).device_map == "auto"
    with pytest.raises(CritlibError, match="DEVICE:SIZE"):
        load_params(None, ["max_memory=70GiB"])
    with pytest.raises(CritlibError, match="unknown device_map"):
        load_params(None, ["device_map=everywhere"])
    if not torch.cuda.is_available():
        with pytest.raises(CritlibError, match="CUDA is not available"):
            load_model("tiny-llama", device_map="auto")


def test_session_refuses_one_gpu_for_all_ranks(monkeypatch):
    from critlib.distributed import session
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CritlibError, match="every rank on one GPU"):
        with session("cuda:0"):
            pass
