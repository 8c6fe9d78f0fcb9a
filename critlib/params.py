"""Run parameters: one flat, typed record read from YAML, with strict validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import CritlibError

METRICS = ("grad_x_weight", "grad_squared", "fisher", "magnitude", "wanda")


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
    prepend_bos: bool = True
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    topk_per_layer: int = 100
    topk_global: int = 1000
    seed: int = 0
    dtype: str = "fp32"
    device: str = "auto"
    exact_stats: bool = True
    chunk_size: int = 1 << 22
    fisher_dtype: str = "fp32"
    output_dir: str = "outputs/default"

    def validate(self) -> "Params":
        for key in ("seq_len", "n_sequences", "batch_size", "chunk_size"):
            if int(getattr(self, key)) <= 0:
                raise CritlibError(f"{key}={getattr(self, key)} must be a positive integer")
        if self.n_heldout < 0:
            raise CritlibError(f"n_heldout={self.n_heldout} must be ≥ 0")
        if self.seq_len < 2:
            raise CritlibError(f"seq_len={self.seq_len} is too short: next-token loss needs at least 2 tokens")
        for key in ("topk_per_layer", "topk_global"):
            if int(getattr(self, key)) <= 0:
                raise CritlibError(f"{key}={getattr(self, key)} must be ≥ 1")
        if isinstance(self.metrics, str):
            self.metrics = [m.strip() for m in self.metrics.split(",") if m.strip()]
        if not self.metrics:
            raise CritlibError(f"metrics is empty; choose from: {', '.join(METRICS)}")
        for m in self.metrics:
            if m not in METRICS:
                raise CritlibError(f"unknown metric '{m}'; choose from: {', '.join(METRICS)}")
        if len(set(self.metrics)) != len(self.metrics):
            raise CritlibError(f"metrics lists a metric twice: {self.metrics}")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise CritlibError(f"unknown dtype '{self.dtype}'; choose fp32, bf16 or fp16")
        if self.fisher_dtype not in ("fp32", "bf16"):
            raise CritlibError(f"unknown fisher_dtype '{self.fisher_dtype}'; choose fp32 or bf16")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise CritlibError(f"unknown device '{self.device}'; choose auto, cpu, cuda or cuda:N")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    elif isinstance(default, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
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
