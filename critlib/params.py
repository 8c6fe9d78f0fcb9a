"""Run parameters: one flat, typed record read from YAML, with strict validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import CritlibError
from .metrics import ALL, checked

METRICS = ALL
DTYPES = ("fp32", "bf16", "fp16")
# torch's and transformers' names of the same dtypes (also with a "torch." prefix), normalised on validation
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
SEED_MAX = 2**32 - 1  # numpy's legacy seeding (used by datasets and transformers) takes no larger seed


@dataclass
class Params:
    model: str = "default"
    tokenizer: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    data: str = "default"
    text_field: str = "text"
    seq_len: int = 128
    n_sequences: int = 8
    n_heldout: int = 8
    batch_size: int = 8
    prepend_bos: bool | str = "auto"  # auto: BOS first only where the tokenizer's own encoding adds it
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    topk_per_layer: int = 100  # a tensor with fewer weights keeps all of them (e.g. a norm of a tiny model)
    topk_global: int = 1000
    seed: int = 0
    dtype: str = "fp32"  # fp32, bf16, fp16; also float32, bfloat16, float16 or torch.float32 (normalised)
    device: str = "auto"
    exact_stats: bool = True
    chunk_size: int = 1 << 30  # most elements ranked or summarised at once (CPU: at most 2**18, GPU: 2**26)
    fisher_dtype: str = "fp32"
    kernel: str = "auto"  # fused one-read scoring of gradient metrics: auto (Triton on CUDA), triton, torch, off
    # scale: memory of the gradient pass (critlib.scores.memory_saving: true, false, or auto = on where measured
    # to cost under 10% time, see critlib.scores.resolve_memory_saving) and placement over devices (accelerate)
    gradient_checkpointing: bool | str = "auto"
    sparse_embedding_grad: bool | str = "auto"
    device_map: str | None = None  # auto, balanced, balanced_low_0 or sequential: split layers over the GPUs
    max_memory: str | None = None  # with device_map, per device, e.g. "0:70GiB,1:70GiB"
    output_dir: str = "outputs/default"
    # applications (critlib quantize / prune / bitflip; critlib.applications)
    quant_bits: list[int] = field(default_factory=lambda: [4])
    quant_group_size: int = 128
    quant_symmetric: bool = True
    quant_keep_percents: list[float] = field(default_factory=lambda: [0.0, 0.1, 1.0])
    quant_clip_z: float = 0.0
    quant_include_head: bool = False
    prune_sparsities: list[float] = field(default_factory=lambda: [0.5])
    prune_modes: list[str] = field(default_factory=lambda: ["per_layer", "global"])
    prune_protect_k: int = 0
    bitflip_top_n: int = 2
    bitflip_bits: list[str] = field(default_factory=lambda: ["sign", "exponent_top", "exponent_low"])
    bitflip_eval_windows: int = 2
    bitflip_break_factor: float = 10.0
    bitflip_cap: int = 256
    bitflip_draws: int = 3
    # Phase 3 dose-response (critlib.experiments): k values, methods as name[:arg], random-control draws
    perturb_ks: list[int] = field(default_factory=lambda: [1, 10, 100, 1000])
    perturb_methods: list[str] = field(default_factory=lambda: ["zero", "sign_flip", "scale:10", "noise:1.0", "mean",
                                                                "bitflip:exponent"])
    n_random_draws: int = 3
    # Phase 2 stability (critlib.agreement): other window seeds and a second corpus ("" = skip) to compare with
    stability_seeds: list[int] = field(default_factory=lambda: [1, 2])  # with the run's seed: 3 for the claims
    stability_data: str = "alt"
    # Phase 2 (critlib.datasize): top-K agreement of two disjoint token sets as they grow ([] = skip); sizes the
    # data cannot hold twice are left out and named
    stability_tokens: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    # Phase 3 report: held-out windows the dose-response evaluates on (0 = all n_heldout), for time budgets;
    # a value above n_heldout is lowered to n_heldout (all of them), so it never stops the other phases
    perturb_heldout: int = 0
    # Phase 6 report: held-out windows quantization and pruning evaluate on (0 = all n_heldout), for time budgets;
    # likewise lowered to n_heldout
    applications_heldout: int = 0
    # Phase 5 token explorer: tokens pre-rendered in the static HTML (top tokens by row score)
    token_explorer_top: int = 30
    # Phase 4 super weights (critlib.superweights): candidates are spikes of the down projections' outputs
    # on sw_prompts prompts; a candidate is confirmed when zeroing it alone multiplies held-out perplexity (on
    # Phase 3's windows, the first perturb_heldout) by ≥ sw_effect_size and its 95% interval clears the
    # control of sw_random_draws random weights of the same tensor
    sw_spike_ratio: float = 10.0  # spike: max |output| ≥ this × the median block's ...
    sw_min_activation: float = 50.0  # ... and ≥ this (Yu et al.'s code flags |activation| > 50); 0 = off
    sw_effect_size: float = 1.05  # perplexity ratio a confirmed super weight must reach when zeroed alone
    sw_prompts: int = 8  # detection prompts: the first n of critlib.superweights.PROMPTS (1 to 8)
    sw_random_draws: int = 8  # draws of the random-weight control (≥ 2: its interval is over draws)

    def validate(self) -> "Params":
        for key in ("seq_len", "n_sequences", "batch_size", "chunk_size"):
            if int(getattr(self, key)) <= 0:
                raise CritlibError(f"{key}={getattr(self, key)} must be a positive integer")
        if self.n_heldout < 0:
            raise CritlibError(f"n_heldout={self.n_heldout} must be ≥ 0")
        _check_seed("seed", self.seed)
        self.prepend_bos = _bos_mode(self.prepend_bos)
        if self.seq_len < 2:
            raise CritlibError(f"seq_len={self.seq_len} is too short: next-token loss needs at least 2 tokens")
        for key in ("topk_per_layer", "topk_global"):
            if int(getattr(self, key)) <= 0:
                raise CritlibError(f"{key}={getattr(self, key)} must be ≥ 1")
        self.metrics = checked(self.metrics)
        self.dtype = _dtype_name("dtype", self.dtype, DTYPES)
        for key in ("gradient_checkpointing", "sparse_embedding_grad"):
            setattr(self, key, _auto_bool(key, getattr(self, key)))
        self.fisher_dtype = _dtype_name("fisher_dtype", self.fisher_dtype, ("fp32", "bf16"))
        if self.kernel not in ("auto", "triton", "torch", "off"):
            raise CritlibError(f"unknown kernel '{self.kernel}'; choose auto, triton, torch or off")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise CritlibError(f"unknown device '{self.device}'; choose auto, cpu, cuda or cuda:N")
        if self.device_map not in (None, "auto", "balanced", "balanced_low_0", "sequential"):
            raise CritlibError(f"unknown device_map '{self.device_map}'; choose auto, balanced, balanced_low_0 or "
                               "sequential (or leave it unset for one device)")
        if self.max_memory is not None:
            from .models import parse_max_memory
            parse_max_memory(self.max_memory)
        self._validate_applications()
        self._validate_perturbation()
        self._validate_report()
        self._validate_super_weights()
        return self

    def _validate_super_weights(self) -> None:
        from .superweights import SuperWeightConfig
        for key, kind in (("sw_spike_ratio", float), ("sw_min_activation", float), ("sw_effect_size", float),
                          ("sw_prompts", int), ("sw_random_draws", int)):
            value = getattr(self, key)
            try:
                if isinstance(value, bool) or (kind is int and int(value) != value):
                    raise ValueError
                setattr(self, key, kind(value))
            except (TypeError, ValueError):
                raise CritlibError(f"{key}={value!r} must be {'an integer' if kind is int else 'a number'}") from None
        SuperWeightConfig(self.sw_spike_ratio, self.sw_min_activation, self.sw_effect_size, self.sw_prompts,
                          self.sw_random_draws)  # raises with what to change

    def _validate_report(self) -> None:
        try:
            seeds = [int(v) for v in self.stability_seeds]
        except (TypeError, ValueError):
            raise CritlibError(f"stability_seeds={self.stability_seeds!r} must be a list of integers, e.g. [1, 2]") from None
        for s in seeds:
            _check_seed("stability_seeds", s)
        self.stability_seeds = list(dict.fromkeys(seeds))  # Phase 2 skips the run's own seed
        self.stability_data = self.stability_data or ""
        try:
            tokens = [int(v) for v in self.stability_tokens or []]
        except (TypeError, ValueError):
            raise CritlibError(f"stability_tokens={self.stability_tokens!r} must be a list of token counts, e.g. "
                               "[256, 1024]") from None
        if any(t < 1 for t in tokens):
            raise CritlibError(f"stability_tokens={tokens} must be positive token counts ([] skips the study)")
        self.stability_tokens = sorted(set(tokens))
        for key in ("perturb_heldout", "applications_heldout"):  # a phase's own key never stops another phase
            if int(getattr(self, key)) < 0:
                raise CritlibError(f"{key}={getattr(self, key)} must be ≥ 0 (0 = all held-out windows)")
            setattr(self, key, min(int(getattr(self, key)), self.n_heldout))
        if int(self.token_explorer_top) < 1:
            raise CritlibError(f"token_explorer_top={self.token_explorer_top} must be ≥ 1")

    def _validate_perturbation(self) -> None:
        from .perturb import parse_method
        try:
            ks = [int(k) for k in self.perturb_ks]
            if any(str(k) != str(v).strip() for k, v in zip(ks, self.perturb_ks)):
                raise ValueError
        except (TypeError, ValueError):
            raise CritlibError(f"perturb_ks={self.perturb_ks!r} must be a list of integers, e.g. [1, 10, 100]") from None
        if not ks or any(k < 0 for k in ks):
            raise CritlibError(f"perturb_ks={ks} must be a non-empty list of integers ≥ 0")
        self.perturb_ks = ks
        if not self.perturb_methods:
            raise CritlibError("perturb_methods is empty; e.g. [zero, sign_flip, scale:10, noise:1.0, mean, "
                               "bitflip:exponent]")
        for m in self.perturb_methods:
            parse_method(m)
        if isinstance(self.n_random_draws, bool) or int(self.n_random_draws) < 1:
            raise CritlibError(f"n_random_draws={self.n_random_draws} must be an integer ≥ 1")

    def _validate_applications(self) -> None:
        def numbers(key, kind, lo, hi):
            vals = getattr(self, key)
            try:
                vals = [kind(v) for v in vals]
            except (TypeError, ValueError):
                raise CritlibError(f"{key}={vals!r} must be a list of numbers") from None
            if not vals:
                raise CritlibError(f"{key} is empty; give at least one value")
            bad = [v for v in vals if not lo <= v <= hi]
            if bad:
                raise CritlibError(f"{key} has {bad}; each value must lie in [{lo}, {hi}]")
            setattr(self, key, vals)
        numbers("quant_bits", int, 2, 8)
        numbers("quant_keep_percents", float, 0.0, 100.0)
        numbers("prune_sparsities", float, 0.0, 0.99)
        for key in ("quant_group_size", "bitflip_eval_windows", "bitflip_cap", "bitflip_draws"):
            if int(getattr(self, key)) < 1:
                raise CritlibError(f"{key}={getattr(self, key)} must be ≥ 1")
        for key in ("prune_protect_k", "bitflip_top_n"):
            if int(getattr(self, key)) < 0:
                raise CritlibError(f"{key}={getattr(self, key)} must be ≥ 0")
        for key in ("quant_clip_z", "bitflip_break_factor"):
            setattr(self, key, float(getattr(self, key)))
        if not (self.quant_clip_z >= 0 and self.bitflip_break_factor > 1):  # NaN fails too
            raise CritlibError("quant_clip_z must be ≥ 0 (0 = off) and bitflip_break_factor > 1")
        bad = [m for m in self.prune_modes if m not in ("per_layer", "global")]
        if bad or not self.prune_modes:
            raise CritlibError(f"prune_modes={self.prune_modes}; choose from per_layer, global")
        self.bitflip_bits = [str(b) for b in self.bitflip_bits]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_seed(key: str, seed) -> None:
    """A seed numpy, torch and Python's random all accept; `key` names where it was given."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        where = f"{key}={seed!r}: seed" if key == "seed" else f"{key} has {seed!r}: each seed"
        raise CritlibError(f"{where} must be a non-negative integer ≤ 2**32 - 1 (4294967295), e.g. 0")


def _bos_mode(value) -> bool | str:
    """prepend_bos as True, False or "auto" (from YAML booleans or the strings true, false, auto)."""
    mode = value if isinstance(value, bool) else {"true": True, "false": False, "auto": "auto"}.get(
        str(value).strip().lower())
    if mode is None:
        raise CritlibError(f"prepend_bos must be true or false, or auto (BOS only where the tokenizer's own "
                           f"encoding adds one), got {value!r}")
    return mode


def _auto_bool(key: str, value) -> bool | str:
    """True, False or "auto", from YAML booleans or the strings true, false, auto."""
    mode = value if isinstance(value, bool) else {"true": True, "false": False, "auto": "auto"}.get(
        str(value).strip().lower())
    if mode is None:
        raise CritlibError(f"{key} must be true, false or auto (on where it costs under 10% time), got {value!r}")
    return mode


def _dtype_name(key: str, value, choices: tuple[str, ...]) -> str:
    """The canonical name (fp32, bf16, fp16) of a dtype given as it or as torch/transformers name it."""
    name = str(value).strip().lower().removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name not in choices:
        raise CritlibError(f"unknown {key} '{value}'; choose {', '.join(choices)} (or torch's names, e.g. "
                           f"{', '.join(a for a, c in DTYPE_ALIASES.items() if c in choices and a != 'float')})")
    return name


def valid_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(Params)]


def _coerce(key: str, value):
    """Give a value from YAML or `--set` the type of the field's default."""
    default = getattr(Params(), key)
    if isinstance(value, str) and not isinstance(default, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise CritlibError(f"cannot read the value of {key}: {value!r} ({e})") from None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise CritlibError(f"{key} must be true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise CritlibError(f"{key} must be an integer, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CritlibError(f"{key} must be a number, got {value!r}")
        value = float(value)
    elif isinstance(default, list):
        if value is None:  # `--set metrics=` or `metrics:` with no value: an empty list, which validation names
            value = []
        elif isinstance(value, str):
            value = [yaml.safe_load(v.strip()) for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise CritlibError(f"{key} must be a list, got {value!r}")
    elif value is not None and not isinstance(value, str):
        value = str(value)
    return value


def make_params(values: dict) -> Params:
    keys = valid_keys()
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise CritlibError(f"unknown parameter(s) {', '.join(unknown)}; valid keys: {', '.join(keys)}")
    return Params(**{k: _coerce(k, v) for k, v in values.items()}).validate()


def load_params(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Params:
    """Read a params YAML (or none: defaults), then apply `key=value` overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise CritlibError(f"params file {path} does not exist; pass an existing YAML file, e.g. params/default.yaml")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else "syntax error"
            raise CritlibError(f"params file {path} is not valid YAML ({first}); fix the syntax") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise CritlibError(f"params file {path} must hold a mapping of key: value, not {type(loaded).__name__}")
        values.update(loaded)
    if isinstance(overrides, dict):
        values.update(overrides)
    else:
        for item in overrides or []:
            if "=" not in item:
                raise CritlibError(f"--set expects key=value, got {item!r}")
            k, v = item.split("=", 1)
            values[k.strip()] = v
    return make_params(values)
