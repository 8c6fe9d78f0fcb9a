"""Freeze masks: keep chosen (critical) weights bit-identical while the rest of the model is fine-tuned.

Masks are one bool tensor per parameter name (True = frozen), stored sparsely as safetensors (indices). `freeze_weights`
zeroes the masked gradient entries with a gradient hook, and — because optimizers still move weights whose
gradient is 0 (AdamW's decoupled weight decay; momentum left over from earlier steps) — it also writes the
saved values back after every `optimizer.step()` through an optimizer step post-hook. Without an optimizer
only the gradient hook acts, which is enough for plain SGD without weight decay or momentum.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import CritlibError
from .edit import edit_weights
from .io import atomic_path
from .scores import scored_parameters


def masks_from_coords(model: torch.nn.Module, coords: list[tuple]) -> dict[str, torch.Tensor]:
    """Bool masks (CPU) shaped like each parameter named in `coords` ((param, flat[, ...]) tuples)."""
    params = dict(scored_parameters(model))
    masks: dict[str, torch.Tensor] = {}
    for item in coords:
        name, flat = item[0], int(item[1])
        if name not in params:
            raise CritlibError(f"parameter '{name}' is not in the model; names come from model.named_parameters()")
        p = params[name]
        if not 0 <= flat < p.numel():
            raise CritlibError(f"flat index {flat} is out of range for {name} ({p.numel()} weights)")
        if name not in masks:
            masks[name] = torch.zeros(p.shape, dtype=torch.bool)
        masks[name].view(-1)[flat] = True
    return masks


FORMAT = "critlib-freeze-masks-sparse"


def save_masks(masks: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write masks as a safetensors file, atomically and sparsely: per parameter name the int64 flat indices
    of its frozen weights, with every mask's shape in the metadata (a few KB for thousands of weights, where
    dense bool masks of a 135M-weight model take 100 MB)."""
    import json

    from safetensors.torch import save_file
    for name, m in masks.items():
        if m.dtype != torch.bool:
            raise CritlibError(f"mask of {name} is {m.dtype}; masks must be bool tensors")
    indices = {n: m.reshape(-1).nonzero().reshape(-1).to(torch.int64).cpu().contiguous() for n, m in masks.items()}
    shapes = json.dumps({n: list(m.shape) for n, m in masks.items()})
    with atomic_path(path) as tmp:
        save_file(indices, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()}
                  | {"format": FORMAT, "shapes": shapes})


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Bool masks from `save_masks`'s sparse file (or an older dense one)."""
    import json

    from safetensors import SafetensorError, safe_open
    path = Path(path)
    if not path.is_file():
        raise CritlibError(f"mask file {path} does not exist; check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            stored = {n: f.get_tensor(n) for n in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CritlibError(f"mask file {path} is not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:  # dense bool masks, as written before
        bad = [n for n, m in stored.items() if m.dtype != torch.bool]
        if bad:
            raise CritlibError(f"mask file {path} holds non-bool tensors ({', '.join(bad)}); it is not a freeze mask")
        return stored
    shapes = json.loads(meta["shapes"])
    masks = {}
    for name, idx in stored.items():
        m = torch.zeros(shapes[name], dtype=torch.bool)
        m.view(-1)[idx] = True
        masks[name] = m
    return masks


class FrozenWeights:
    """Handle of `freeze_weights`: `.remove()` (or leaving the `with` block) takes every hook away."""

    def __init__(self, model: torch.nn.Module, masks: dict[str, torch.Tensor], optimizer=None):
        named = dict(model.named_parameters(remove_duplicate=False))
        self.handles = []
        seen = set()
        for name, m in masks.items():
            if name not in named:
                raise CritlibError(f"mask names parameter '{name}', which the model does not have")
            p = named[name]
            if tuple(m.shape) != tuple(p.shape) or m.dtype != torch.bool:
                raise CritlibError(f"mask of {name} is {m.dtype} {tuple(m.shape)}; the parameter is {tuple(p.shape)} "
                                   "and masks must be bool")
            if id(p) in seen:
                raise CritlibError(f"two masks name the same (tied) parameter as {name}; merge them into one")
            seen.add(id(p))
        self.frozen = edit_weights(named, masks)  # a snapshot: nothing changes until `restore` writes it back
        for name, m in masks.items():
            if bool(m.any()):
                p = named[name]
                self.handles.append(p.register_hook(lambda g, mask=m.to(p.device): g.masked_fill(mask, 0)))
        if optimizer is not None:
            self.handles.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self.restore()))

    def restore(self) -> None:
        """Write the frozen values back (bit-identical)."""
        self.frozen.restore()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def freeze_weights(model: torch.nn.Module, masks: dict[str, torch.Tensor], optimizer=None) -> FrozenWeights:
    """Keep the masked weights unchanged during training: gradient hooks zero their gradient entries and,
    given the `optimizer`, a step post-hook restores their values after every step (covers weight decay
    and momentum). Use as a context manager or call `.remove()`."""
    return FrozenWeights(model, masks, optimizer)
