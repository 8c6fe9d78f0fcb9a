"""Evaluation data: text or token ids, cut into non-overlapping windows, split into scoring and held-out sets."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import CritlibError

CORPORA = Path(__file__).parent / "corpora"


@dataclass
class Windows:
    """Token windows `[n, seq_len]` (int64) for scoring and for held-out evaluation; never overlapping."""
    score: torch.Tensor
    heldout: torch.Tensor
    source: str
    sha256: str  # of all token ids of the source, int64 little-endian
    bos: dict | None = None  # the BOS put first in every window ({"token", "id"}), None when none was

    def describe(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "n_score": int(self.score.shape[0]),
                "n_heldout": int(self.heldout.shape[0]), "seq_len": int(self.score.shape[1]),
                "prepended_bos": self.bos}


def builtin_corpora() -> list[str]:
    return sorted(p.stem for p in CORPORA.glob("*.txt"))


def read_texts(source: str, text_field: str = "text") -> list[str]:
    """Texts from a built-in corpus name, a .txt file or a .jsonl file (one object per line)."""
    if source in builtin_corpora():
        return [(CORPORA / f"{source}.txt").read_text(encoding="utf-8")]
    path = Path(source)
    if not path.is_file():
        raise CritlibError(f"data '{source}' is neither a built-in corpus ({', '.join(builtin_corpora())}) "
                           "nor an existing .txt, .jsonl or .npy file; check the path")
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(_utf8_text(path).split("\n"), 1):  # not splitlines: JSON may hold U+2028
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CritlibError(f"{path} line {i} is not valid JSON ({e.msg}); fix or remove it") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise CritlibError(f"{path} line {i} has no string field '{text_field}'; set text_field to "
                                   "the field that holds the text")
            texts.append(obj[text_field])
        return texts
    return [_utf8_text(path)]


def _utf8_text(path: Path) -> str:
    """The file's text with newlines as `read_text` gives them (\\r\\n and \\r become \\n); a file that is
    not UTF-8 is an error naming the line of the first bad byte."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise CritlibError(f"{path} is not UTF-8 text (line {line} has byte 0x{data[e.start]:02x}); save it as "
                           "UTF-8, or give a .npy of token ids") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def tokenize(texts: list[str], tokenizer) -> np.ndarray:
    """All texts tokenized once (no special tokens) and concatenated, separated by EOS when there is one."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for i, text in enumerate(texts):
        if i and eos is not None:
            ids.append(eos)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return np.asarray(ids, dtype=np.int64)


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own encoding (add_special_tokens=True) puts its BOS first: Llama's does,
    SmolLM2's and GPT-2's do not."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    probe = "The cat sat."
    own = tokenizer(probe, add_special_tokens=True)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    return own[:1] == [bos] and plain[:1] != [bos]


def bos_to_prepend(tokenizer, prepend_bos: bool | str = "auto") -> int | None:
    """The BOS id each window starts with: `auto` as the tokenizer's own encoding does, true its BOS when it
    has one, false none."""
    if prepend_bos == "auto":
        return tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    if not isinstance(prepend_bos, bool):
        raise CritlibError(f"prepend_bos={prepend_bos!r}; use auto, true or false")
    return getattr(tokenizer, "bos_token_id", None) if prepend_bos else None


def windows_from_ids(ids: np.ndarray, seq_len: int, bos: int | None) -> np.ndarray:
    """Non-overlapping windows of `seq_len` tokens; with `bos`, each window is BOS + seq_len-1 text tokens."""
    body = seq_len - 1 if bos is not None else seq_len
    n = len(ids) // body
    out = ids[: n * body].reshape(n, body)
    if bos is not None:
        out = np.concatenate([np.full((n, 1), bos, dtype=np.int64), out], axis=1)
    return out


def _text_windows(source: str, tokenizer, seq_len: int, prepend_bos: bool | str, text_field: str):
    """(token ids, every window cut from them in order, the BOS id each window starts with or None)."""
    ids = tokenize(read_texts(source, text_field), tokenizer)
    bos = bos_to_prepend(tokenizer, prepend_bos)
    return ids, windows_from_ids(ids, seq_len, bos), bos


def window_pool(source: str, tokenizer, seq_len: int, prepend_bos: bool | str = "auto", text_field: str = "text",
                vocab_size: int | None = None, n_random: int = 0, seed: int = 0) -> torch.Tensor:
    """Every window `load_windows` can cut from `source`, in order, for studies that split the data
    themselves (`random`: `n_random` windows drawn with `seed`)."""
    if source == "random":
        return load_windows(source, tokenizer, seq_len, n_random, 0, prepend_bos, seed, text_field, vocab_size).score
    if source.endswith(".npy"):
        n = np.load(source, mmap_mode="r", allow_pickle=False).shape[0] if Path(source).is_file() else 1
        return load_windows(source, tokenizer, seq_len, n, 0, prepend_bos, 0, text_field, vocab_size).score
    if tokenizer is None:
        return load_windows(source, tokenizer, seq_len, 1, 0, prepend_bos, 0, text_field, vocab_size).score  # raises
    _, arr, _ = _text_windows(source, tokenizer, seq_len, prepend_bos, text_field)
    _check_vocab(arr, vocab_size)
    return torch.from_numpy(np.ascontiguousarray(arr))


def disjoint_windows(pool: torch.Tensor, n: int, seed: int, taken: set[bytes]) -> tuple[torch.Tensor, int]:
    """`n` windows of `pool` in the order a seeded shuffle gives (the order `load_windows` takes for that
    seed), skipping any window in `taken` (windows as bytes) while the pool has others; returns them and how
    many repeat a taken window because the pool ran out. Adds them to `taken`."""
    order = np.random.default_rng(seed).permutation(len(pool))
    fresh = [i for i in order if pool[i].numpy().tobytes() not in taken]
    pick = fresh[:n]
    if len(pick) < n:  # too little data: fill with taken windows, and say how many
        chosen = set(pick)
        pick += [i for i in order if i not in chosen][: n - len(pick)]
    out = pool[torch.as_tensor(pick, dtype=torch.long)]
    shared = sum(w.numpy().tobytes() in taken for w in out)
    taken.update(w.numpy().tobytes() for w in out)
    return out, shared


def _check_vocab(arr: np.ndarray, vocab_size: int | None) -> None:
    if vocab_size is not None and arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise CritlibError(f"token ids must lie in [0, {vocab_size}) for this model, found {arr.min()}..{arr.max()}")


def load_windows(source: str, tokenizer, seq_len: int, n_score: int, n_heldout: int,
                 prepend_bos: bool | str = "auto", seed: int = 0, text_field: str = "text",
                 vocab_size: int | None = None) -> Windows:
    """Windows for scoring and held-out evaluation.

    A `.npy` of shape [n, seq_len] is used exactly as given (rows in order: the first n_score score, the
    next n_heldout are held out). Text is cut into windows; with seed 0 the windows are taken in order,
    any other seed shuffles which windows score and which are held out (never the same window in both).
    `prepend_bos` (text only): `auto` starts each window with BOS when the tokenizer's own encoding adds
    one, true always (when it has one), false never. `random` draws uniform token ids (seeded) for
    benchmarks on synthetic models.
    """
    bos = None  # .npy and random windows are used as they are
    if source == "random":
        if vocab_size is None:
            raise CritlibError("data: random needs the model's vocabulary size")
        gen = torch.Generator().manual_seed(seed)
        arr = torch.randint(0, vocab_size, (n_score + n_heldout, seq_len), generator=gen).numpy()
    elif source.endswith(".npy"):
        path = Path(source)
        if not path.is_file():
            raise CritlibError(f"token file {path} does not exist; check the path")
        arr = np.load(path, allow_pickle=False)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise CritlibError(f"{path} must be an integer array [n_sequences, seq_len], got {arr.dtype} {arr.shape}")
        if arr.shape[1] != seq_len:
            raise CritlibError(f"{path} has windows of {arr.shape[1]} tokens but seq_len={seq_len}; set seq_len: {arr.shape[1]}")
        if arr.shape[0] < n_score + n_heldout:
            raise CritlibError(f"{path} has {arr.shape[0]} windows, fewer than n_sequences + n_heldout = "
                               f"{n_score + n_heldout}; lower them or give more windows")
        arr = arr.astype(np.int64)[: n_score + n_heldout]
    else:
        if tokenizer is None:
            raise CritlibError("this model has no tokenizer, so text data cannot be used; give token ids as a "
                               ".npy file, data: random, or set tokenizer: to a tokenizer directory or 'default'")
        ids, arr, bos = _text_windows(source, tokenizer, seq_len, prepend_bos, text_field)
        need = n_score + n_heldout
        if len(arr) < need:
            raise CritlibError(f"data '{source}' gives {len(ids)} tokens = {len(arr)} windows of {seq_len}, but "
                               f"n_sequences + n_heldout = {need} are needed; give more text or lower seq_len, "
                               "n_sequences or n_heldout")
        if seed:
            order = np.random.default_rng(seed).permutation(len(arr))
            arr = arr[order]
        arr = arr[:need]
    _check_vocab(arr, vocab_size)
    sha = hashlib.sha256(np.ascontiguousarray(arr, dtype="<i8").tobytes()).hexdigest()
    t = torch.from_numpy(np.ascontiguousarray(arr))
    described = None if bos is None else {"token": tokenizer.convert_ids_to_tokens(int(bos)), "id": int(bos)}
    return Windows(t[:n_score], t[n_score:n_score + n_heldout], source, sha, described)
