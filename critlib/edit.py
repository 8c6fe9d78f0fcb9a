"""Edit weights in place and put back exactly the bits that were there.

Every change critlib makes to a model's weights goes through `edit_weights` (or `edited`, its context
manager): perturbations and bit flips, fake quantization and its kept outliers, pruning, and the values
`freeze_weights` writes back after each optimizer step. Per parameter, the region to edit is given as flat
row-major int64 indices, a bool mask, or None for the whole tensor. Only that region's original values are
saved (on the parameter's device, or where `save_on` says: the CPU for whole tensors), never a copy of the
model; `n_changed` counts the stored bit patterns that differ afterwards, so 0.0 → -0.0 counts as a change
and a NaN written over the same NaN does not.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import torch

from . import CritlibError

INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # element size -> same-width int


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """The stored bit patterns of `t` as signed integers of the same width (a view, not a copy)."""
    return t.view(INT_VIEW[t.element_size()])


def n_differ(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many elements of `a` and `b` (same dtype, broadcastable) hold different bit patterns."""
    return int((as_bits(a) != as_bits(b)).sum())


NewValues = Callable[[str, torch.Tensor, "torch.Tensor | None", torch.Tensor], "torch.Tensor | float"]
"""`new(name, param, index, old)`: the values to store at `index` (sorted, unique, on the parameter's
device; None = the whole tensor). `old` holds the values there now (1-D at `index`, or the parameter's data
itself for the whole tensor): read it, never write it. Return a tensor shaped and typed like `old`, or one
scalar (a Python number or 0-dim tensor) to fill the region with."""


class _Saved:
    """One region's original values: the whole tensor (index None) or the values at a flat index."""

    def __init__(self, name: str, param: torch.Tensor, index: torch.Tensor | None, values: torch.Tensor):
        self.name, self.param, self.index, self.values = name, param, index, values

    def put_back(self) -> None:
        data = self.param.data  # read now, not when saved: follows a parameter whose data was replaced
        if self.index is None:
            data.copy_(self.values)  # straight from where it was saved: no second copy
        else:
            data.view(-1).index_copy_(0, self.index.to(data.device), self.values.to(data.device))


class Edit:
    """What `edit_weights` did: weights in the edited regions (`n_selected`), how many of them now hold other
    bits (`n_changed`), and their saved originals. `restore()` writes the originals back, latest region
    first; calling it again writes the same values again (freezing does so after every optimizer step)."""

    def __init__(self):
        self.saved: list[_Saved] = []
        self.n_selected = 0
        self.n_changed = 0

    @property
    def originals(self) -> dict[str, torch.Tensor]:
        """Each edited parameter's saved values by name: the whole tensor, or the values at its index."""
        return {s.name: s.values for s in self.saved}

    @torch.no_grad()
    def restore(self) -> None:
        for s in reversed(self.saved):
            s.put_back()


def _index(name: str, p: torch.Tensor, where) -> torch.Tensor | None:
    """`where` as sorted unique flat int64 indices on p's device (None stays None: the whole tensor)."""
    if where is None:
        return None
    if not p.is_contiguous():
        raise CritlibError(f"parameter {name} is not contiguous in memory; call model.to(memory_format="
                           "torch.contiguous_format) or clone its data first")
    where = torch.as_tensor(where)
    if where.dtype == torch.bool:
        if where.numel() != p.numel():
            raise CritlibError(f"the mask for {name} has {where.numel()} entries, the parameter {p.numel()} "
                               "weights; build masks shaped like the parameter")
        return where.reshape(-1).to(p.device).nonzero().flatten()
    if where.numel() and (where.is_floating_point() or where.is_complex()):
        raise CritlibError(f"the indices for {name} are {where.dtype}; give flat int64 indices or a bool mask")
    idx = where.reshape(-1).to(device=p.device, dtype=torch.long)
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        idx = torch.unique(idx)  # sorted, each weight once: one write, one count and one saved value per weight
    if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= p.numel()):
        bad = int(idx[0]) if int(idx[0]) < 0 else int(idx[-1])
        raise CritlibError(f"flat index {bad} is out of range for {name} ({p.numel()} weights)")
    return idx


def _checked(name: str, values, old: torch.Tensor) -> torch.Tensor:
    if not isinstance(values, torch.Tensor):
        return torch.tensor(values, dtype=old.dtype, device=old.device)
    if values.dtype != old.dtype or (values.dim() and values.shape != old.shape):
        raise CritlibError(f"the new values for {name} are {values.dtype} {tuple(values.shape)}, expected "
                           f"{old.dtype} {tuple(old.shape)}: one value in the stored dtype per edited weight")
    return values.to(old.device)


@torch.no_grad()
def edit_weights(params: torch.nn.Module | Mapping[str, torch.Tensor], where: Mapping[str, object],
                 new: NewValues | None = None, save_on: str | torch.device | None = None) -> Edit:
    """For each `where[name]` (flat indices, a bool mask, or None = the whole tensor) of `params` (a model or
    name -> tensor): save the original values (on `save_on`, default the parameter's device), store
    `new(name, param, index, old)` there, count the bit patterns that changed. Nothing is restored unless
    something fails: then every region already edited is put back before the error propagates. With
    `new=None` nothing changes: the returned `Edit` is a snapshot to `restore()` later."""
    named = dict(params.named_parameters()) if isinstance(params, torch.nn.Module) else params
    regions = []
    for name, w in where.items():  # every region is checked before anything is written
        if name not in named:
            raise CritlibError(f"the edit names parameter '{name}', which is not among the "
                               f"{len(named)} given; names come from model.named_parameters()")
        idx = _index(name, named[name], w)
        if idx is None or idx.numel():
            regions.append((name, named[name], idx))
    edit = Edit()
    try:
        for name, p, idx in regions:
            if idx is None:  # the whole tensor: `old` is the weight itself, its copy goes to `save_on`
                old = p.data
                kept = old.to(old.device if save_on is None else save_on, copy=True)
            else:  # index_select copies: that copy is what is kept
                old = p.data.view(-1).index_select(0, idx)
                kept = old if save_on is None else old.to(save_on)
            edit.saved.append(_Saved(name, p, idx, kept))  # saved BEFORE the change
            edit.n_selected += old.numel()
            if new is None:
                continue
            values = _checked(name, new(name, p, idx, old), old)
            edit.n_changed += n_differ(old, values)
            if idx is None:
                p.data.copy_(values)
            elif values.dim():
                p.data.view(-1).index_copy_(0, idx, values)
            else:
                p.data.view(-1).index_fill_(0, idx, values)
    except BaseException:
        edit.restore()
        raise
    return edit


@contextmanager
def edited(params: torch.nn.Module | Mapping[str, torch.Tensor], where: Mapping[str, object],
           new: NewValues | None = None, save_on: str | torch.device | None = None) -> Iterator[Edit]:
    """`edit_weights` for the duration of the block; every edited bit is put back on exit, also on error."""
    edit = edit_weights(params, where, new, save_on)
    try:
        yield edit
    finally:
        edit.restore()
