"""The token explorer's data: every token's embedding/lm_head row scores against the full score tensors,
ranks and top tokens against brute force, tied and untied matrices."""

import numpy as np
import pytest
import torch

from critlib import CritlibError
from critlib.scores import score_model
from critlib.tokens import token_matrices, token_scores
from tests.conftest import tiny


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
def test_roles_name_each_token_matrix_once(arch):
    model = tiny(arch)
    roles = token_matrices(model)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert set(roles) == ({"embedding=lm_head"} if tied else {"embedding", "lm_head"})
    params = dict(model.named_parameters())
    assert all(params[n].shape[0] == model.get_input_embeddings().num_embeddings for n in roles.values())


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2"])
def test_row_sums_ranks_and_top_tokens_equal_brute_force(arch, windows):
    model = tiny(arch)
    metrics = ["grad_x_weight", "magnitude"]
    ts = token_scores(model, windows, metrics, batch_size=2, progress=False)
    full = {}
    score_model(model, windows, metrics, lambda m, n, s: full.__setitem__((m, n), s.detach().double()),
                batch_size=2, progress=False)
    for m in metrics:
        for role, name in ts.roles.items():
            s = full[(m, name)]
            assert torch.equal(ts.sums[(m, role)], s.sum(dim=1))
            assert torch.equal(ts.rows[(m, role)], s.float().to(torch.bfloat16))
            sums = s.sum(dim=1).numpy()
            brute = np.array([1 + int((sums > v).sum()) for v in sums])
            assert np.array_equal(ts.ranks(m, role), brute)
            order = sorted(range(len(sums)), key=lambda i: (-sums[i], i))
            assert ts.top_tokens(m, role, 7) == order[:7]
            t = order[0]
            card = ts.token_card(t, 3)
            assert card[(card.metric == m) & (card.role == role)]["rank"].iloc[0] == 1
    summary = ts.summary([0, 5])
    assert list(summary.token_id) == [0, 5] and summary.shape[1] == 2 + 2 * len(metrics) * len(ts.roles)


def test_find_takes_ids_and_refuses_what_is_not_one_token(windows):
    ts = token_scores(tiny("tiny-llama"), windows, ["magnitude"], progress=False)
    assert ts.find(3) == 3 and ts.find("12") == 12
    with pytest.raises(CritlibError, match="outside the vocabulary"):
        ts.find(ts.vocab_size)
    with pytest.raises(CritlibError, match="no tokenizer"):
        ts.find("hello")
