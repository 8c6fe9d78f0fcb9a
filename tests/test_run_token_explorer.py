"""Phase 5 in a run: `token_summary` holds one row per token, each role's (embedding / lm_head row) sum equal
to a float64 sum of that row's scores and its rank a full sort of those sums, with its manifest and headline."""

import json

import numpy as np

from critlib.run import token_explorer


def test_token_summary_sums_and_ranks_the_rows(tmp_path, run_ctx):
    ts = token_explorer.run(run_ctx, tmp_path, progress=False)
    table = ts.summary().sort_values("token_id")
    params = dict(run_ctx.model.named_parameters())
    vocab = run_ctx.model.get_input_embeddings().num_embeddings
    assert ts.vocab_size == vocab == len(table) and (tmp_path / "token_summary.csv").is_file()
    for role, name in ts.roles.items():
        sums = params[name].detach().double().abs().sum(1).numpy()  # magnitude = |w|, row by row
        np.testing.assert_allclose(table[f"sum:magnitude:{role}"].to_numpy(np.float64), sums, rtol=1e-6)
        order = np.lexsort((np.arange(vocab), -table[f"sum:magnitude:{role}"].to_numpy()))  # sum desc, then id
        ranks = np.empty(vocab, dtype=np.int64)
        ranks[order] = np.arange(1, vocab + 1)
        assert (table[f"rank:magnitude:{role}"].to_numpy() == ranks).all()
    manifest = json.loads((tmp_path / "manifest_05_token_explorer.json").read_text())
    assert manifest["roles"] == ts.roles
    heads = json.loads((tmp_path / "headlines" / "05_token_explorer.json").read_text())["items"]
    assert heads[0]["value"] == vocab
