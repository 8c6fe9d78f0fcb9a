"""Windows: deterministic, BOS-prefixed as the tokenizer itself does (or as asked), non-overlapping between
scoring and held-out sets."""

import json

import numpy as np
import pytest
import torch

from critlib import CritlibError
from critlib.data import (builtin_corpora, disjoint_windows, load_windows, read_texts, tokenizer_adds_bos, window_pool,
                          windows_from_ids)
from critlib.models import load_tokenizer
from tests.conftest import REPO


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
    assert not (a.score[:, 0] == tok.bos_token_id).any() and a.bos is None  # SmolLM2 adds no BOS itself
    rows = {tuple(r) for r in a.score.tolist()}
    assert not rows & {tuple(r) for r in a.heldout.tolist()}
    c = load_windows("default", tok, 64, 6, 4, seed=5)
    assert c.sha256 != a.sha256
    assert not {tuple(r) for r in c.score.tolist()} & {tuple(r) for r in c.heldout.tolist()}
    assert load_windows("default", tok, 64, 6, 4, prepend_bos=False).score[0, 0] != tok.bos_token_id


def bos_adding_tokenizer():
    """A word-level tokenizer whose own encoding puts <s> first, as Llama's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = read_texts("default")[0].split()[:400]
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


def test_prepend_bos_auto_follows_the_tokenizer(tok):
    # SmolLM2's tokenizer (the default) adds no BOS: auto prepends none, true still prepends <|im_start|>
    assert tok("some text")["input_ids"][:1] != [tok.bos_token_id] and not tokenizer_adds_bos(tok)
    auto = load_windows("default", tok, 64, 6, 4)
    forced = load_windows("default", tok, 64, 6, 4, prepend_bos=True)
    assert auto.bos is None and auto.describe()["prepended_bos"] is None
    assert (forced.score[:, 0] == tok.bos_token_id).all()
    assert forced.describe()["prepended_bos"] == {"token": "<|im_start|>", "id": tok.bos_token_id}
    assert auto.sha256 != forced.sha256
    # a tokenizer that adds <s> itself: auto prepends it, false does not
    own = bos_adding_tokenizer()
    assert own("the cat")["input_ids"][0] == 1 and tokenizer_adds_bos(own)
    w = load_windows("default", own, 16, 3, 2)
    assert (w.score[:, 0] == 1).all() and (w.heldout[:, 0] == 1).all() and w.bos == {"token": "<s>", "id": 1}
    assert (w.score[:, 1:] != 1).all()
    off = load_windows("default", own, 16, 3, 2, prepend_bos=False)
    assert off.bos is None and off.score[0, 0] != 1
    with pytest.raises(CritlibError, match="prepend_bos"):
        load_windows("default", own, 16, 3, 2, prepend_bos="sometimes")


def test_prepend_bos_param_values():
    from critlib.params import Params, load_params
    assert Params().validate().prepend_bos == "auto" and load_params(f"{REPO}/params/tiny.yaml").prepend_bos == "auto"
    assert [load_params(None, [f"prepend_bos={v}"]).prepend_bos for v in ("true", "false", "auto", "True")] == \
        [True, False, "auto", True]
    with pytest.raises(CritlibError, match="prepend_bos must be true or false, or auto"):
        load_params(None, ["prepend_bos=maybe"])


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


def test_window_pool_is_every_window_load_windows_can_cut(tok, tmp_path):
    pool = window_pool("alt", tok, 64)
    with pytest.raises(CritlibError, match="windows of 64"):
        load_windows("alt", tok, 64, len(pool) + 1, 0)
    assert torch.equal(pool, load_windows("alt", tok, 64, len(pool), 0).score)
    arr = np.arange(5 * 4).reshape(5, 4)
    np.save(tmp_path / "ids.npy", arr)
    assert window_pool(str(tmp_path / "ids.npy"), None, 4).tolist() == arr.tolist()
    assert window_pool("random", None, 4, vocab_size=10, n_random=3, seed=2).shape == (3, 4)
    with pytest.raises(CritlibError, match="does not exist"):
        window_pool(str(tmp_path / "missing.npy"), None, 4)


def test_disjoint_windows_skip_taken_ones_while_the_pool_has_others():
    pool = torch.arange(10 * 3).reshape(10, 3)
    first, shared = disjoint_windows(pool, 4, seed=7, taken=set())
    order = np.random.default_rng(7).permutation(10)
    assert shared == 0 and torch.equal(first, pool[torch.as_tensor(order[:4])])  # load_windows' order for seed 7
    taken = {w.numpy().tobytes() for w in first}
    second, shared = disjoint_windows(pool, 4, seed=7, taken=taken)
    assert shared == 0 and not {w.numpy().tobytes() for w in second} & {w.numpy().tobytes() for w in first}
    third, shared = disjoint_windows(pool, 4, seed=1, taken=taken)  # 2 fresh windows left: 2 repeat
    assert shared == 2 and len({w.numpy().tobytes() for w in third}) == 4 and len(taken) == 10
