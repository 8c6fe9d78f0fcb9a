"""Held-out evaluation against a float64 computation from the logits: perplexity, accuracy, KL, batch
size invariance, per-window sums."""

import math

import numpy as np
import pytest
import torch

from critlib.evaluate import evaluate
from tests.conftest import tiny


def _brute(model, windows, reference_model=None):
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=windows).logits[:, :-1].double(), -1)
        target = windows[:, 1:]
        nll = -logp.gather(-1, target[..., None])[..., 0]
        out = {"nll": float(nll.mean()), "accuracy": float((logp.argmax(-1) == target).double().mean())}
        if reference_model is not None:
            ref = torch.log_softmax(reference_model(input_ids=windows).logits[:, :-1].double(), -1)
            out["kl"] = float((ref.exp() * (ref - logp)).sum(-1).mean())
    return out


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_perplexity_and_accuracy_equal_float64(windows, batch_size):
    model = tiny("tiny-llama")
    got = evaluate(model, windows, batch_size)
    ref = _brute(model, windows)
    assert got["nll"] == pytest.approx(ref["nll"], rel=1e-6)
    assert got["ppl"] == pytest.approx(math.exp(ref["nll"]), rel=1e-6)
    assert got["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
    assert got["n_tokens"] == windows[:, 1:].numel()


def test_kl_to_a_reference_equals_float64(windows):
    a, b = tiny("tiny-llama", seed=0), tiny("tiny-llama", seed=1)
    base = evaluate(a, windows, 3, keep_logprobs=True)
    got = evaluate(b, windows, 3, reference=base["logprobs"])
    assert got["kl"] == pytest.approx(_brute(b, windows, a)["kl"], rel=1e-5)
    assert evaluate(a, windows, 3, reference=base["logprobs"])["kl"] == pytest.approx(0.0, abs=1e-6)


def test_per_window_rows_follow_the_windows(windows):
    model = tiny("tiny-llama")
    whole = evaluate(model, windows, 2, per_window=True)["windows"]
    for i in range(len(windows)):
        one = evaluate(model, windows[i:i + 1], 1, per_window=True)["windows"]
        assert one["nll"][0] == pytest.approx(whole["nll"][i], rel=1e-6)
    assert np.array_equal(whole["n_tokens"], np.full(len(windows), windows.shape[1] - 1.0))
