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
