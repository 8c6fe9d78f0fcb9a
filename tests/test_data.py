"""Windows: deterministic, BOS-prefixed, non-overlapping between scoring and held-out sets."""

import json

import numpy as np
import pytest

from critlib import CritlibError
from critlib.data import builtin_corpora, load_windows, read_texts, windows_from_ids
from critlib.models import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("default")


def test_windows_from_ids_cut_without_overlap():
    ids = np.arange(100)
    w = windows_from_ids(ids, 10, bos=7)
    assert w.shape == (11, 10) and (w[:, 0] == 7).all()
    assert np.array_equal(w[:, 1:].reshape(-1), ids[:99])
    assert windows_from_ids(ids, 10, None).shape == (10, 10)


def test_builtin_corpora_and_split(tok):
    assert {"default", "alt"} <= set(builtin_corpora())
    assert len(read_texts("default")[0].split()) > 3000
    a = load_windows("default", tok, 64, 6, 4, seed=0)
    b = load_windows("default", tok, 64, 6, 4, seed=0)
    assert a.sha256 == b.sha256 and (a.score == b.score).all()
    assert (a.score[:, 0] == tok.bos_token_id).all()
    rows = {tuple(r) for r in a.score.tolist()}
    assert not rows & {tuple(r) for r in a.heldout.tolist()}
    c = load_windows("default", tok, 64, 6, 4, seed=5)
    assert c.sha256 != a.sha256
    assert not {tuple(r) for r in c.score.tolist()} & {tuple(r) for r in c.heldout.tolist()}
    assert load_windows("default", tok, 64, 6, 4, prepend_bos=False).score[0, 0] != tok.bos_token_id


def test_jsonl_and_npy(tmp_path, tok):
    lines = [json.dumps({"body": "word " * 200}), "", json.dumps({"body": "other " * 200})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    w = load_windows(str(tmp_path / "d.jsonl"), tok, 32, 4, 2, text_field="body")
    assert w.score.shape == (4, 32)
    with pytest.raises(CritlibError, match="no string field 'text'"):
        load_windows(str(tmp_path / "d.jsonl"), tok, 32, 4, 2)
    ids = np.arange(60).reshape(6, 10)
    np.save(tmp_path / "ids.npy", ids)
    w = load_windows(str(tmp_path / "ids.npy"), None, 10, 4, 2, vocab_size=100)
    assert w.score.tolist() == ids[:4].tolist() and w.heldout.tolist() == ids[4:].tolist()
    with pytest.raises(CritlibError, match="token ids must lie in"):
        load_windows(str(tmp_path / "ids.npy"), None, 10, 4, 2, vocab_size=50)
    with pytest.raises(CritlibError, match="fewer than n_sequences"):
        load_windows(str(tmp_path / "ids.npy"), None, 10, 5, 2)
    with pytest.raises(CritlibError, match="no tokenizer"):
        load_windows("default", None, 10, 5, 2)
