import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from critlib.models import load_model

ARCHS = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-phi3", "tiny-gpt2"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(name: str = "tiny-llama", seed: int = 0, dtype: str = "fp32"):
    """A tiny random model from a preset config (no download)."""
    return load_model(name, dtype=dtype, device="cpu", seed=seed).model


@pytest.fixture(scope="module")
def tiny_llama():
    return tiny("tiny-llama")


@pytest.fixture
def windows():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 96, (4, 12), generator=gen)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_report_params() -> dict:
    """Overrides that make params/tiny.yaml quicker still, with absolute paths (tests may run from anywhere)."""
    return {"model": f"synthetic:{REPO}/params/tiny-model.json", "perturb_ks": [1, 10]}


@pytest.fixture(scope="session")
def tiny_report(tmp_path_factory):
    """Every phase's notebook executed once on params/tiny.yaml by `critlib run` (shared by the report,
    notebook and browser tests). Kernels use one thread: tiny tensors gain nothing from more."""
    from critlib.report import run_report
    out = tmp_path_factory.mktemp("report") / "tiny"
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        run_report(os.path.join(REPO, "params", "tiny.yaml"), tiny_report_params(), out, progress=False)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return out


@pytest.fixture(scope="module")
def sens():
    """Phase 1 of a tiny Qwen2 (grad_x_weight, magnitude, wanda; top-40), shared by the tables and figures tests."""
    from critlib.sensitivity import analyze
    gen = torch.Generator().manual_seed(3)
    windows = torch.randint(0, 96, (4, 12), generator=gen)
    return analyze(tiny("tiny-qwen2"), windows, metrics=["grad_x_weight", "magnitude", "wanda"], topk_global=40,
                   topk_per_layer=5, batch_size=2, progress=False)


# A quick run of every phase on tiny-llama and random tokens (tests/test_run*.py).
RUN_SETS = ["model=tiny-llama", "data=random", "seq_len=12", "n_sequences=2", "n_heldout=2", "batch_size=2",
            "device=cpu", "metrics=[grad_x_weight, magnitude]", "topk_per_layer=5", "topk_global=20",
            "perturb_ks=[1]", "quant_group_size=16", "quant_keep_percents=[0, 1]", "prune_sparsities=[0.5]",
            "bitflip_top_n=1", "bitflip_bits=[sign]", "bitflip_cap=4", "bitflip_draws=1", "stability_data=random"]


def run_cli(*argv, sets=RUN_SETS):
    """`critlib ARGV -q` with RUN_SETS as --set options; the exit code."""
    from critlib.cli import main
    return main(list(argv) + ["-q"] + [x for s in sets for x in ("--set", s)])


def folder_files(folder):
    """{relative path: bytes} of every file under `folder`."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def run_ctx():
    from critlib.params import load_params
    from critlib.run.context import prepare
    return prepare(load_params(None, RUN_SETS))
