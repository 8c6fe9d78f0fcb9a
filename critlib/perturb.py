"""Phase 3 engine: change chosen weights in place, measure, and put back exactly the bits that were there.

A `Selection` names weights by (parameter name, flat row-major index) — the coordinates Phase 1 ranks in.
A method (`Zero`, `SignFlip`, `Scale`, `Noise`, `TensorMean`, `BitFlip`) maps the stored values of the
selected weights to new stored values. `perturbed` applies a method through `critlib.edit` and restores the
saved originals on exit, error or not; only the touched values are saved, never a copy of the model.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from . import CritlibError
from .edit import as_bits, edit_weights, edited
from .rank import TopK
from .scores import scored_parameters


# --------------------------------------------------------------------------------------------- selections

def _index(values: Iterable[int] | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.long).reshape(-1).cpu()
    return torch.unique(t, sorted=True)


@dataclass(frozen=True, eq=False)
class Selection:
    """Weights to perturb: parameter name -> sorted unique int64 flat indices (on the CPU)."""
    coords: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        clean = {}
        for name, idx in self.coords.items():
            idx = _index(idx)
            if idx.numel():
                clean[name] = idx
        object.__setattr__(self, "coords", clean)

    @classmethod
    def from_list(cls, pairs: Iterable[tuple]) -> "Selection":
        """From (param, flat[, ...]) tuples, e.g. `Sensitivity.global_top` output; duplicates merge."""
        grouped: dict[str, list[int]] = {}
        for pair in pairs:
            grouped.setdefault(pair[0], []).append(int(pair[1]))
        return cls({n: torch.tensor(v, dtype=torch.long) for n, v in grouped.items()})

    def __len__(self) -> int:
        return sum(int(i.numel()) for i in self.coords.values())

    def union(self, other: "Selection") -> "Selection":
        names = list(self.coords) + [n for n in other.coords if n not in self.coords]
        empty = torch.empty(0, dtype=torch.long)
        return Selection({n: torch.cat([self.coords.get(n, empty), other.coords.get(n, empty)]) for n in names})

    def to_list(self) -> list[tuple[str, int]]:
        return [(n, int(f)) for n, idx in self.coords.items() for f in idx.tolist()]

    def __eq__(self, other) -> bool:
        return isinstance(other, Selection) and sorted(self.to_list()) == sorted(other.to_list())

    __hash__ = None  # mutable tensors inside; compare with ==

    def __contains__(self, item: tuple[str, int]) -> bool:
        idx = self.coords.get(item[0])
        return idx is not None and bool((idx == int(item[1])).any())


# ------------------------------------------------------------------------------------------------- bits

_FLOAT_BITS = {  # dtype -> (total bits, exponent bits, mantissa bits)
    torch.float64: (64, 11, 52), torch.float32: (32, 8, 23), torch.float16: (16, 5, 10),
    torch.bfloat16: (16, 8, 7),
}
for _f8, _bits8 in (("float8_e4m3fn", (8, 4, 3)), ("float8_e5m2", (8, 5, 2))):
    if hasattr(torch, _f8):
        _FLOAT_BITS[getattr(torch, _f8)] = _bits8


def _layout(dtype: torch.dtype) -> tuple[int, int, int]:
    if dtype not in _FLOAT_BITS:
        raise CritlibError(f"bit flips are defined for float16, bfloat16, float32, float64 and float8 "
                           f"weights, not {dtype}; load the model in one of those dtypes")
    return _FLOAT_BITS[dtype]


def sign_bit(dtype: torch.dtype) -> int:
    return _layout(dtype)[0] - 1


def exponent_bits(dtype: torch.dtype) -> list[int]:
    """Bit positions of the exponent, lowest first (bit 0 = least significant mantissa bit)."""
    total, exp, man = _layout(dtype)
    return list(range(man, man + exp))


def mantissa_bits(dtype: torch.dtype) -> list[int]:
    return list(range(_layout(dtype)[2]))


# ---------------------------------------------------------------------------------------------- methods

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Zero:
    name = "zero"
    arg = None

    def apply(self, values: torch.Tensor, param: torch.Tensor, pname: str) -> torch.Tensor:
        return torch.zeros_like(values)


@dataclass(frozen=True)
class SignFlip:
    name = "sign_flip"
    arg = None

    def apply(self, values, param, pname):
        return -values


@dataclass(frozen=True)
class Scale:
    """w -> factor·w, computed in fp32 (fp64 for fp64 weights) and rounded to the stored dtype."""
    factor: float
    name = "scale"

    @property
    def arg(self):
        return self.factor

    def apply(self, values, param, pname):
        return (values.to(_compute_dtype(values.dtype)) * self.factor).to(values.dtype)


@dataclass(frozen=True)
class Noise:
    """w -> w + rel_std·|w|·z, z ~ N(0, 1) drawn on the CPU from (seed, parameter name): the same change on
    every device, and the same for a weight whatever else is selected in other tensors."""
    rel_std: float
    seed: int = 0
    name = "noise"

    @property
    def arg(self):
        return self.rel_std

    def apply(self, values, param, pname):
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + zlib.crc32(pname.encode()))
        z = torch.randn(values.shape, generator=gen, dtype=torch.float32).to(values.device)
        w = values.to(_compute_dtype(values.dtype))
        return (w + self.rel_std * w.abs() * z.to(w.dtype)).to(values.dtype)


@dataclass(frozen=True)
class TensorMean:
    """w -> the mean of the whole (unperturbed) tensor, summed in fp64 chunk by chunk."""
    name = "mean"
    arg = None

    def apply(self, values, param, pname):
        flat = param.detach().reshape(-1)
        total = sum(float(c.sum(dtype=torch.float64)) for c in flat.split(1 << 24))
        return torch.full_like(values, total / flat.numel())


@dataclass(frozen=True)
class BitFlip:
    """Flip one bit of each stored value: a position (0 = lowest mantissa bit; 15 (bf16/fp16) or 31 (fp32)
    = sign) or a name resolved per tensor dtype: "sign", "exponent" (highest exponent bit), "mantissa"
    (highest mantissa bit)."""
    bit: int | str
    name = "bitflip"

    @property
    def arg(self):
        return self.bit

    def position(self, dtype: torch.dtype) -> int:
        total, exp, man = _layout(dtype)
        pos = {"sign": total - 1, "exponent": man + exp - 1, "mantissa": man - 1}.get(self.bit, self.bit)
        if isinstance(pos, str) or not 0 <= int(pos) < total:
            raise CritlibError(f"bit {self.bit!r} does not exist in {dtype} ({total} bits); use 0..{total - 1}, "
                               "'sign', 'exponent' or 'mantissa'")
        return int(pos)

    def apply(self, values, param, pname):
        total = _layout(values.dtype)[0]
        mask = 1 << self.position(values.dtype)
        if mask >= 1 << (total - 1):
            mask -= 1 << total  # the sign bit as a signed integer of that width
        return torch.bitwise_xor(as_bits(values), mask).view(values.dtype)


METHODS = {"zero": Zero, "sign_flip": SignFlip, "scale": Scale, "noise": Noise, "mean": TensorMean,
           "bitflip": BitFlip}
Method = Zero | SignFlip | Scale | Noise | TensorMean | BitFlip


def parse_method(spec: str) -> Method:
    """`name[:arg]`: zero, sign_flip, scale:F, noise:REL_STD[:SEED], mean, bitflip:{sign,exponent,mantissa,N}."""
    if not isinstance(spec, str) or not spec.strip():
        raise CritlibError(f"perturbation method {spec!r} is empty; use one of {', '.join(METHODS)} "
                           "(e.g. zero, scale:10, noise:1.0, bitflip:exponent)")
    name, *args = [s.strip() for s in spec.strip().split(":")]
    usage = {"zero": "zero", "sign_flip": "sign_flip", "scale": "scale:FACTOR", "noise": "noise:REL_STD[:SEED]",
             "mean": "mean", "bitflip": "bitflip:sign|exponent|mantissa|N"}
    if name not in METHODS:
        raise CritlibError(f"unknown perturbation method '{name}' in {spec!r}; choose from: "
                           f"{', '.join(usage.values())}")
    n_args = {"zero": (0, 0), "sign_flip": (0, 0), "mean": (0, 0), "scale": (1, 1), "noise": (1, 2),
              "bitflip": (1, 1)}[name]
    if not n_args[0] <= len(args) <= n_args[1]:
        raise CritlibError(f"perturbation method {spec!r} has the wrong number of arguments; write {usage[name]}")
    try:
        if name == "scale":
            return Scale(float(args[0]))
        if name == "noise":
            rel = float(args[0])
            if rel < 0:
                raise ValueError
            return Noise(rel, int(args[1]) if len(args) > 1 else 0)
        if name == "bitflip":
            if args[0] in ("sign", "exponent", "mantissa"):
                return BitFlip(args[0])
            bit = int(args[0])
            if not 0 <= bit < 64:
                raise ValueError
            return BitFlip(bit)
    except ValueError:
        raise CritlibError(f"cannot read the argument of perturbation method {spec!r}; write {usage[name]}") from None
    return METHODS[name]()


def method_label(method: Method) -> str:
    """The `name[:arg]` string that `parse_method` reads back."""
    if isinstance(method, Noise) and method.seed:
        return f"noise:{method.rel_std:g}:{method.seed}"
    arg = method.arg
    return method.name if arg is None else f"{method.name}:{arg:g}" if isinstance(arg, float) else \
        f"{method.name}:{arg}"


# -------------------------------------------------------------------------------------------- applying

@dataclass(frozen=True)
class Applied:
    """What a perturbation did: weights selected, and how many of them now hold other bits."""
    n_selected: int
    n_changed: int


def _named_params(model: torch.nn.Module, selection: Selection) -> dict[str, torch.Tensor]:
    """The model's parameters by name (tied ones once), having checked that the selection names only those."""
    params = dict(scored_parameters(model))
    aliases = {}
    from .models import tied_groups
    for first, names in tied_groups(model).items():
        aliases.update({n: first for n in names[1:]})
    for name in selection.coords:
        if name not in params:
            hint = f"; it is tied to {aliases[name]}: use that name" if name in aliases else \
                "; names come from model.named_parameters()"
            raise CritlibError(f"the selection names parameter '{name}', which the model does not have{hint}")
    return params


def _new_values(method: Method):
    return lambda name, param, index, old: method.apply(old, param, name)


@contextmanager
def perturbed(model: torch.nn.Module, selection: Selection, method: Method) -> Iterator[Applied]:
    """Apply `method` to the selected weights for the duration of the block; restore them bit for bit on
    exit, also on error. Yields `Applied(n_selected, n_changed)`."""
    with edited(_named_params(model, selection), selection.coords, _new_values(method)) as edit:
        yield Applied(edit.n_selected, edit.n_changed)


def perturb(model: torch.nn.Module, selection: Selection, method: Method) -> int:
    """Apply `method` for good (nothing restored unless it fails); returns how many values changed bitwise."""
    return edit_weights(_named_params(model, selection), selection.coords, _new_values(method)).n_changed


# ------------------------------------------------------------------------------------------- selectors

def _check_k(k: int) -> int:
    if isinstance(k, bool) or int(k) != k or k < 0:
        raise CritlibError(f"k={k!r} must be an integer ≥ 0")
    return int(k)


def select_top(sens, metric: str, k: int) -> Selection:
    """The k highest-scored weights of `metric` in Phase 1's exact global ranking."""
    k = _check_k(k)
    if metric not in sens.topk:
        raise CritlibError(f"metric '{metric}' was not scored; scored: {', '.join(sens.topk)}")
    if k == 0:
        return Selection()
    if k > sens.topk[metric].k:
        raise CritlibError(f"top-{k} of {metric} is not exact: Phase 1 kept {sens.topk[metric].k} candidates "
                           f"per tensor; rerun with topk_global ≥ {k}")
    return Selection.from_list(sens.global_top(metric, k))


def select_bottom(sens, metric: str, k: int) -> Selection:
    """The k lowest-scored weights of `metric` (needs `analyze(..., bottomk ≥ k)`)."""
    k = _check_k(k)
    return Selection.from_list(sens.global_bottom(metric, k)) if k else Selection()


def _param_list(model, params: list[str] | None) -> list[tuple[str, torch.Tensor]]:
    all_params = scored_parameters(model)
    if params is None:
        return all_params
    named = dict(all_params)
    missing = [n for n in params if n not in named]
    if missing:
        raise CritlibError(f"unknown parameter(s) {', '.join(missing)}; names come from model.named_parameters()")
    return [(n, named[n]) for n in params]


def select_random(model: torch.nn.Module, k: int, seed: int, params: list[str] | None = None,
                  _chunk: int = 1 << 16) -> Selection:
    """k distinct weights drawn uniformly from all weights of `params` (default: every parameter).

    Global positions are drawn in chunks (of sizes that do not depend on k) from a CPU generator seeded
    with `seed` and the first k distinct ones kept, so the same seed gives the same weights on every
    device, and the k-set is a prefix of the (k+1)-set (nested doses). Memory is O(k), whatever the
    model size (never an index of every weight)."""
    k = _check_k(k)
    plist = _param_list(model, params)
    sizes = torch.tensor([p.numel() for _, p in plist], dtype=torch.long)
    total = int(sizes.sum())
    if k > total:
        raise CritlibError(f"cannot draw {k} distinct weights from {total}; lower k")
    if k == 0:
        return Selection()
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    drawn = torch.empty(0, dtype=torch.long)
    while True:
        size = max(_chunk, drawn.numel())  # the same chunk sequence for every k: nested doses
        drawn = torch.cat([drawn, torch.randint(0, total, (size,), generator=gen, dtype=torch.long)])
        values, order = torch.sort(drawn, stable=True)
        starts = torch.ones_like(values, dtype=torch.bool)
        starts[1:] = values[1:] != values[:-1]
        uniq, first = values[starts], order[starts]  # each value with the position of its first draw
        if uniq.numel() >= k:
            break
        if drawn.numel() > 64 * max(k, _chunk):
            drawn = uniq[torch.randperm(uniq.numel(), generator=gen)]  # keep memory bounded; still uniform
    pos = uniq[torch.argsort(first)[:k]]
    ends = torch.cumsum(sizes, 0)
    which = torch.searchsorted(ends, pos, right=True)
    starts = ends - sizes
    flat = pos - starts[which]
    return Selection({plist[j][0]: flat[which == j] for j in torch.unique(which).tolist()})


def magnitude_ranking(model: torch.nn.Module, k: int, largest: bool = True, params: list[str] | None = None,
                      chunk_size: int = 1 << 30) -> list[tuple[str, int, float]]:
    """The exact global top-k (or bottom-k) of |w| over `params` (default: every parameter) as
    (param, flat, |w|), in rank order; ties go to the earlier parameter, then the lower flat index."""
    k = _check_k(k)
    if k == 0:
        return []
    plist = _param_list(model, params)
    top = TopK(k, chunk_size)
    with torch.no_grad():
        for name, p in plist:
            a = p.detach().float().abs()
            top.add(name, a if largest else a.neg_())
    return [(n, f, abs(s)) for n, f, s in top.global_topk(k, [n for n, _ in plist])]


def select_magnitude(model: torch.nn.Module, k: int, largest: bool = True, params: list[str] | None = None,
                     chunk_size: int = 1 << 30) -> Selection:
    """The k weights of largest (or smallest) |w|, exactly; see `magnitude_ranking`."""
    return Selection.from_list(magnitude_ranking(model, k, largest, params, chunk_size))
