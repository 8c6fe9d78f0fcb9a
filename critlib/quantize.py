"""Round-to-nearest per-group fake quantization of Linear weights, with a sparse set of weights kept in
original precision (by a score, by magnitude or at random), optional outlier clipping and super-weight
restoration (Yu et al. 2024, "The Super Weight in Large Language Models").

Groups run along the input dimension (the reduction dimension of the matmul: dim 1 of a Linear weight
[out, in], dim 0 of a GPT-2 Conv1D weight [in, out]); a row whose length is not a multiple of the group
size ends with one shorter group, quantized with its own scale. Arithmetic is float64 (row chunks bound the
memory), the result is cast back to the stored dtype.

Kept outliers use a PER-TENSOR budget: every quantized tensor keeps round(p/100 · numel) of its own weights,
the highest-scored ones (ties: lowest flat index). Per tensor keeps the count and the memory of each tensor
predictable and needs only each tensor's own top-n, never a model-wide ranking.

Memory accounting (`size_bytes`): b bits per weight + one fp16 scale per group (+ one byte zero point per
group when asymmetric); each kept outlier costs an fp16 value + an int32 flat index (6 bytes).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from . import CritlibError
from .edit import edited

OUTLIER_BYTES = 2 + 4  # fp16 value + int32 flat index
SCALE_BYTES = 2
ZERO_BYTES = 1


@dataclass(frozen=True)
class QuantConfig:
    """bits ∈ {2..8}; group_size along the input dimension; symmetric (absmax) or asymmetric (min/max);
    clip_z > 0 clips each group's range at z root-mean-squares (symmetric) or mean ± z·std (asymmetric)."""
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    clip_z: float = 0.0

    def check(self) -> "QuantConfig":
        if not 2 <= int(self.bits) <= 8:
            raise CritlibError(f"quantization bits={self.bits} must be between 2 and 8")
        if int(self.group_size) < 1:
            raise CritlibError(f"group_size={self.group_size} must be ≥ 1")
        if self.clip_z < 0:
            raise CritlibError(f"clip_z={self.clip_z} must be ≥ 0 (0 = no clipping)")
        return self


@dataclass(frozen=True)
class LinearWeight:
    """A Linear (or Conv1D) weight: its parameter name (as `scored_parameters` names it) and input dim."""
    name: str
    param: torch.nn.Parameter
    in_dim: int


def linear_weights(model: torch.nn.Module, include_head: bool = False,
                   pattern: str | None = None) -> list[LinearWeight]:
    """Every Linear/Conv1D weight once, in model order. The input embedding and the output head (and a
    matrix tied to them) are excluded unless `include_head`; `pattern` (regex, `re.search` on the name)
    narrows further."""
    from transformers.pytorch_utils import Conv1D
    names = {id(p): n for n, p in model.named_parameters()}
    skip = set()
    if not include_head:
        for get in ("get_input_embeddings", "get_output_embeddings"):
            mod = getattr(model, get, lambda: None)()
            if mod is not None and getattr(mod, "weight", None) is not None:
                skip.add(id(mod.weight))
    out, seen = [], set()
    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            in_dim = 1
        elif isinstance(mod, Conv1D):
            in_dim = 0
        else:
            continue
        w = mod.weight
        if id(w) in seen or id(w) in skip or id(w) not in names:
            continue
        if pattern is not None and not re.search(pattern, names[id(w)]):
            continue
        seen.add(id(w))
        out.append(LinearWeight(names[id(w)], w, in_dim))
    if not out:
        raise CritlibError("no Linear weights matched" + (f" pattern {pattern!r}" if pattern else "")
                           + "; loosen the pattern or set include_head")
    return out


def _quantize_groups(x: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """x float64 [..., g]: fake-quantize each last-dim group."""
    if cfg.symmetric:
        qmax = 2 ** (cfg.bits - 1) - 1
        amax = x.abs().amax(-1, keepdim=True)
        if cfg.clip_z > 0:
            amax = torch.minimum(amax, cfg.clip_z * x.square().mean(-1, keepdim=True).sqrt())
        scale = amax / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale
    levels = 2 ** cfg.bits - 1
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    if cfg.clip_z > 0:
        mean, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True, correction=0)
        lo, hi = torch.maximum(lo, mean - cfg.clip_z * std), torch.minimum(hi, mean + cfg.clip_z * std)
    scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, levels) - zero) * scale


def fake_quantize(w: torch.Tensor, cfg: QuantConfig, in_dim: int = 1, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """`w` (2-D) quantized and dequantized group-wise along `in_dim`, returned in w's dtype and device."""
    cfg.check()
    if w.ndim != 2:
        raise CritlibError(f"fake_quantize needs a 2-D weight, got shape {tuple(w.shape)}")
    m = w.t() if in_dim == 0 else w
    rows, cols = m.shape
    g = int(cfg.group_size)
    full = cols // g * g
    out = torch.empty(m.shape, dtype=w.dtype, device=w.device)
    step = max(1, chunk_elems // max(cols, 1))
    for r in range(0, rows, step):
        x = m[r:r + step].double()
        n = x.shape[0]
        if full:
            q = _quantize_groups(x[:, :full].reshape(n, full // g, g), cfg)
            out[r:r + n, :full] = q.reshape(n, full).to(w.dtype)
        if full < cols:
            out[r:r + n, full:] = _quantize_groups(x[:, full:], cfg).to(w.dtype)
    return out.t() if in_dim == 0 else out


def size_bytes(shape: tuple[int, int], cfg: QuantConfig, in_dim: int = 1) -> float:
    """Bytes of the quantized tensor: packed codes + one fp16 scale (+ a zero point) per group."""
    rows, cols = (shape[1], shape[0]) if in_dim == 0 else shape
    groups = rows * -(-cols // cfg.group_size)
    return rows * cols * cfg.bits / 8 + groups * (SCALE_BYTES + (0 if cfg.symmetric else ZERO_BYTES))


def flat_index(shape: tuple[int, ...], row: int, col: int) -> int:
    if not (0 <= row < shape[0] and 0 <= col < shape[1]):
        raise CritlibError(f"coordinate ({row}, {col}) lies outside a weight of shape {tuple(shape)}")
    return row * shape[1] + col


@dataclass
class Quantized:
    """What `quantized` did: tensors quantized, their size before (fp16) and after, how many weights changed
    bits, how many were kept; `originals` holds the saved CPU copies (for `kept_originals`)."""
    names: list[str]
    n_weights: int
    quant_bytes: float
    fp16_bytes: int
    n_changed: int = 0
    n_kept: int = 0
    originals: dict = field(default_factory=dict, repr=False)


@contextmanager
def quantized(model: torch.nn.Module, cfg: QuantConfig, weights: list[LinearWeight] | None = None,
              keep: dict[str, torch.Tensor] | None = None, restore: list[tuple[str, int, int]] | None = None):
    """Quantize every weight of `weights` (default: `linear_weights(model)`) in place, keep the flat indices of
    `keep[name]` and the (param, row, col) of `restore` (e.g. super weights) at their original values; restore
    every tensor bit-identically on exit. Originals are held on the CPU while inside (one copy of the
    quantized tensors, not of the model)."""
    weights = weights if weights is not None else linear_weights(model)
    by_name = {lw.name: lw for lw in weights}
    keep = dict(keep or {})
    for name, row, col in restore or []:
        if name not in by_name:
            raise CritlibError(f"super weight {name}[{row}, {col}] is not among the quantized Linear weights")
        idx = torch.tensor([flat_index(tuple(by_name[name].param.shape), row, col)])
        keep[name] = torch.cat([keep[name].reshape(-1).cpu(), idx]).unique() if name in keep else idx
    info = Quantized([lw.name for lw in weights], sum(lw.param.numel() for lw in weights),
                     sum(size_bytes(tuple(lw.param.shape), cfg, lw.in_dim) for lw in weights),
                     2 * sum(lw.param.numel() for lw in weights),
                     n_kept=sum(int(keep[n].numel()) for n in by_name if n in keep))

    def quantize(name, param, index, w):  # index is None: w is the whole weight, as stored
        q = fake_quantize(w, cfg, by_name[name].in_dim)
        if name in keep:
            idx = keep[name].reshape(-1).to(w.device)
            q.put_(idx, w.take(idx))  # flat row-major indices, also into a transposed (Conv1D) result
        return q

    params = {lw.name: lw.param for lw in weights}
    with edited(params, dict.fromkeys(params), quantize, save_on="cpu") as edit:
        info.n_changed, info.originals = edit.n_changed, edit.originals
        yield info


@contextmanager
def kept_originals(weights: list[LinearWeight], info: Quantized, keep: dict[str, torch.Tensor]):
    """Inside a `quantized` block: put the original values back at `keep[name]` flat indices, and the quantized
    values again on exit (so one quantization serves many keep sets)."""
    def original(name, param, index, quant):
        return info.originals[name].reshape(-1)[index.cpu()].to(quant.device)

    params = {lw.name: lw.param for lw in weights if lw.name in keep}
    with edited(params, {name: keep[name] for name in params}, original):
        yield


def keep_sets(scores: dict[str, torch.Tensor], n: dict[str, int]) -> dict[str, torch.Tensor]:
    """Per tensor, the flat indices of its n[name] highest scores (ties: lowest index), best first."""
    from .rank import topk_chunked
    return {name: topk_chunked(s, n[name])[1].cpu() for name, s in scores.items()}


def budget(weights: list[LinearWeight], percent: float) -> dict[str, int]:
    """The per-tensor outlier budget round(percent/100 · numel)."""
    return {lw.name: int(round(percent / 100 * lw.param.numel())) for lw in weights}
