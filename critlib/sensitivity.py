"""Phase 1: score every weight by each metric, keep exact top-K candidates and full-model statistics.

Two passes over the same data: pass 1 ranks and histograms; pass 2 (same scores, recomputed) pins exact
percentiles and gathers every metric's score at the union of all global top-K sets for cross-metric
Spearman. Nothing ever holds all scores of a model.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from . import CritlibError
from .bins import step_for
from .distributed import Reducer, shard
from .distributed import active as dist_active
from .io import atomic_path
from .kernels import Backend, multi, resolve_backend
from .kernels import score as kernel_score
from .layout import Part, component_at, is_token_matrix, layer_of, parts_of
from .rank import TopK, merge, topk_chunked
from .scores import release_memory, saving_of, score_model, scored_parameters
from .stats import Stats, summarize

COLUMNS = ["metric", "scope", "rank", "param", "layer", "component", "row", "col", "score", "weight",
           "token_id", "token"]


@dataclass
class Sensitivity:
    """What Phase 1 found: per-metric top-K candidates, statistics and cross-metric agreement."""
    metrics: list[str]
    order: list[str]  # parameter names in model order (the tie-break)
    shapes: dict[str, tuple[int, ...]]
    parts: dict[str, list[Part]]
    topk: dict[str, TopK]
    stats: dict[str, dict]
    topk_global: int
    topk_per_layer: int
    gathered: dict[str, dict[tuple[str, int], float]] = field(default_factory=dict)
    bottom: dict[str, TopK] = field(default_factory=dict)  # candidates of the LOWEST scores, negated
    unscored: dict[str, list[str]] = field(default_factory=dict)
    # over ALL weights, per metric: the count in each float32 high-16-bit bin (bins.N_BINS bins)
    hist: dict[str, torch.Tensor] = field(default_factory=dict)
    # per metric: (layer, component) -> [count, float64 sum] of the scores of that cell
    cells: dict[str, dict[tuple[int | None, str], list]] = field(default_factory=dict)

    def global_top(self, metric: str, k: int | None = None) -> list[tuple[str, int, float]]:
        return self.topk[metric].global_topk(k or self.topk_global, self.order)

    def save(self, path, extra: dict | None = None) -> None:
        """Write as plain tensors, lists and dicts (no pickled classes): `load` reads it with weights_only."""
        def tk(t: TopK) -> dict:
            return {"k": t.k, "chunk_size": t.chunk_size, "candidates": t.candidates}
        state = {"metrics": self.metrics, "order": self.order, "shapes": self.shapes,
                 "parts": {n: [(p.component, p.dim, p.start, p.stop) for p in ps] for n, ps in self.parts.items()},
                 "topk": {m: tk(t) for m, t in self.topk.items()}, "bottom": {m: tk(t) for m, t in self.bottom.items()},
                 "stats": self.stats, "topk_global": self.topk_global, "topk_per_layer": self.topk_per_layer,
                 "gathered": self.gathered, "unscored": self.unscored, "hist": self.hist, "cells": self.cells,
                 "extra": extra or {}}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    @classmethod
    def load(cls, path) -> tuple["Sensitivity", dict]:
        """Read what `save` wrote (safely: torch.load with weights_only=True); returns (result, extra)."""
        st = torch.load(path, weights_only=True)

        def tk(d: dict) -> TopK:
            t = TopK(d["k"], d["chunk_size"])
            t.candidates = d["candidates"]
            return t
        res = cls(st["metrics"], st["order"], {n: tuple(s) for n, s in st["shapes"].items()},
                  {n: [Part(*p) for p in ps] for n, ps in st["parts"].items()},
                  {m: tk(d) for m, d in st["topk"].items()}, st["stats"], st["topk_global"], st["topk_per_layer"],
                  st["gathered"], {m: tk(d) for m, d in st["bottom"].items()}, st["unscored"], st["hist"], st["cells"])
        return res, st["extra"]

    def global_bottom(self, metric: str, k: int) -> list[tuple[str, int, float]]:
        """The k lowest-scored weights (ties: lowest (param, index) first); needs `analyze(bottomk=...)`."""
        if metric not in self.bottom or k > self.bottom[metric].k:
            raise CritlibError(f"bottom-{k} of {metric} was not kept; run analyze with bottomk ≥ {k}")
        return [(n, f, -s) for n, f, s in self.bottom[metric].global_topk(k, self.order)]

    def coords(self, name: str, flat: int) -> tuple[int, int | None]:
        shape = self.shapes[name]
        if len(shape) < 2:
            return flat, None
        ncol = int(np.prod(shape[1:]))
        return flat // ncol, flat % ncol


def _groups(name: str, parts: list[Part]) -> list[tuple[list[str], Part | None]]:
    layer = layer_of(name)
    base = ["global", f"layer:{'none' if layer is None else layer}"]
    if len(parts) == 1 and parts[0].dim is None:
        return [(base + [f"component:{parts[0].component}"], None)]
    return [(base, None)] + [([f"component:{p.component}"], p) for p in parts]


def _unsplit(tensor_groups: list) -> list[str] | None:
    """The groups of a tensor that is not split into parts (see `_groups`), else None."""
    return tensor_groups[0][0] if len(tensor_groups) == 1 and tensor_groups[0][1] is None else None


def _feed(stats: Stats, groups, scores: torch.Tensor, cells: dict | None = None, layer: int | None = None) -> None:
    """Feed each group its scores; in pass 1 also add the (count, float64 sum) of each (layer, component)
    cell to `cells`, from the sums the statistics compute anyway."""
    for names, part in groups:
        x = scores if part is None else scores.narrow(part.dim, part.start, part.stop - part.start)
        total = stats.add(names, x)
        if cells is not None and total is not None:
            _add_cell(cells, layer, names, x.numel(), total)


def _add_cell(cells: dict, layer: int | None, names: list[str], n: int, total: torch.Tensor) -> None:
    comp = next((g[10:] for g in names if g.startswith("component:")), None)
    if comp is not None:
        cell = cells.setdefault((layer, comp), [0, []])
        cell[0] += n
        cell[1].append(total)


def _settle_cells(cells: dict) -> dict:
    return {key: [n, float(torch.stack(sums).sum()) if sums else 0.0] for key, (n, sums) in cells.items()}


class _Sink:
    """A row sink (critlib.scores.RowSink) calling `add(row, scores)` for each block."""

    def __init__(self, align: int, add, close=None):
        self.align, self.add, self.close = align, add, close or (lambda: None)


class _Fold(_Sink):
    """Pass 1 of a tensor whose scores come in row blocks, folded in exactly as `emit1` folds the whole
    tensor: its top-K (and bottom-K) the merge of each block's exact top-K, and its statistics the same
    `summarize` rows of the same chunks (blocks hold whole chunks), merged once, with the same cell total."""

    def __init__(self, shape, step: int, chunk_size: int, keep_top, k: int, keep_bottom, k_bottom: int,
                 merge_stats):
        super().__init__(step, self._add, self._close)
        self.ncols, self.n, self.chunk_size = math.prod(shape[1:]), math.prod(shape), chunk_size
        self.keep_top, self.k, self.keep_bottom, self.k_bottom = keep_top, k, keep_bottom, k_bottom
        self.merge_stats = merge_stats
        self.top, self.bottom, self.rows, self.counts = [], [], [], None

    def _add(self, row: int, s: torch.Tensor) -> None:
        flat, off = s.detach().reshape(-1), row * self.ncols
        v, i = topk_chunked(flat, self.k, self.chunk_size)
        self.top.append((v.float().cpu(), i.cpu() + off))
        if self.keep_bottom:
            v, i = topk_chunked(-flat, self.k_bottom, self.chunk_size)
            self.bottom.append((v.float().cpu(), i.cpu() + off))
        for start in range(0, flat.numel(), self.align):
            r, c = summarize(flat[start:start + self.align].float().contiguous())
            self.rows.append(r)
            self.counts = c if self.counts is None else self.counts.add_(c)

    def _close(self) -> None:
        self.keep_top(torch.cat([v for v, _ in self.top]), torch.cat([i for _, i in self.top]))
        if self.keep_bottom:
            self.keep_bottom(torch.cat([v for v, _ in self.bottom]), torch.cat([i for _, i in self.bottom]))
        self.merge_stats(torch.stack(self.rows), self.counts, self.n)
        self.top = self.bottom = self.rows = []


def check_k(model: torch.nn.Module, topk_per_layer: int, topk_global: int) -> None:
    """Refuse a global top-K beyond the model's size. A tensor with fewer than `topk_per_layer` weights is
    no error: its per-tensor top-K keeps all of them (critlib.rank clamps k to the tensor's size)."""
    params = scored_parameters(model)
    total = sum(p.numel() for _, p in params)
    if topk_global > total:
        raise CritlibError(f"topk_global={topk_global} exceeds the model's {total} weights; lower it")


def analyze(model: torch.nn.Module, windows: torch.Tensor, metrics: list[str], topk_global: int = 1000,
            topk_per_layer: int = 100, batch_size: int = 8, exact_stats: bool = True,
            chunk_size: int = 1 << 30, fisher_dtype: torch.dtype = torch.float32,
            progress: bool = True, bottomk: int = 0, distributed: bool | None = None,
            kernel: str = "auto", check_memory: bool = True) -> Sensitivity:
    """Score `windows` by each metric; keep exact top-K (and, with `bottomk`, bottom-K) candidates and
    statistics over every weight. With `distributed` (default: whenever a torch.distributed group of several
    ranks runs) each rank scores its share of `windows` and gradients are summed over ranks, so every rank
    returns the result of scoring all of `windows` (see critlib.distributed). `kernel` (auto, triton, torch,
    off; see critlib.kernels.resolve_backend) lets pass 1 rank and summarise grad_x_weight and grad_squared from one
    read of each weight and gradient, and pass 2 score them a slice at a time: no whole score tensor.
    `check_memory`: refuse, before any gradient is made, a pass that would not fit in the memory available
    (critlib.memory.check_fits, for the `memory_saving` choices the model is under)."""
    check_k(model, topk_per_layer, topk_global)
    distributed = dist_active() if distributed is None else distributed and dist_active()
    reduce = Reducer() if distributed else None
    if distributed:
        windows = shard(windows)
    if check_memory:
        from .memory import Plan, check_fits
        check_fits(model, metrics, windows.shape[0], windows.shape[1],
                   Plan(*saving_of(model), batch_size, fisher_dtype), exact_stats)
    params = scored_parameters(model)
    config = getattr(model, "config", None)
    order = [n for n, _ in params]
    shapes = {n: tuple(p.shape) for n, p in params}
    parts = {n: parts_of(n, shapes[n], config) for n in order}
    groups = {n: _groups(n, parts[n]) for n in order}
    k_cand = max(topk_global, topk_per_layer)
    topk = {m: TopK(k_cand, chunk_size) for m in metrics}
    stats = {m: Stats(chunk_size) for m in metrics}
    bottom = {m: TopK(bottomk, chunk_size) for m in metrics} if bottomk > 0 else {}

    cells: dict[str, dict[tuple[int | None, str], list]] = {m: {} for m in metrics}

    def emit1(metric, name, s):
        topk[metric].add(name, s)
        if bottom:
            bottom[metric].add(name, -s)
        _feed(stats[metric], groups[name], s, cells[metric], layer_of(name))

    backend = resolve_backend(kernel, next(model.parameters()).device, fallback=Backend.OFF)

    batch = multi.Pass1(k_cand, backend, stats, topk, lambda name: _unsplit(groups[name]),  # many tensors a launch
                        lambda m, name, n, total: _add_cell(cells[m], layer_of(name), _unsplit(groups[name]), n, total))

    def fused1(metric, name, w, g):
        if backend is Backend.OFF or bottom or _unsplit(groups[name]) is None:  # bottom-K, split tensors: scores
            return False
        batch.add(metric, name, w, g)
        return True

    step = step_for(next(model.parameters()).device, chunk_size)

    def rows1(metric, name, shape):  # emit1 of a tensor given in row blocks (memory_saving's row blocks)
        names = _unsplit(groups[name])
        if names is None:
            return None

        def keep(t: TopK):
            return lambda v, i: t.add_candidates(name, *merge(v, i, t.k))

        def merge_stats(rows, counts, n):
            _add_cell(cells[metric], layer_of(name), names, n, stats[metric].merge(names, rows, counts))
        return _Fold(shape, step, chunk_size, keep(topk[metric]), k_cand,
                     keep(bottom[metric]) if bottom else None, bottomk, merge_stats)

    unscored = score_model(model, windows, metrics, emit1, batch_size, fisher_dtype, progress, "pass 1/2",
                           reduce=reduce, fused=fused1, rows=rows1)
    batch.finish()
    release_memory()
    result = Sensitivity(metrics, order, shapes, parts, topk, {}, topk_global, topk_per_layer,
                         bottom=bottom, unscored={"wanda": unscored} if unscored else {},
                         cells={m: _settle_cells(c) for m, c in cells.items()})
    for m in metrics:
        if "global" in stats[m].groups:
            stats[m].groups["global"].settle()
            result.hist[m] = stats[m].groups["global"].hist_count.clone()
    union: dict[str, list[int]] = {}
    if len(metrics) > 1:
        for m in metrics:
            for name, flat, _ in result.global_top(m):
                union.setdefault(name, []).append(flat)
    gathered: dict[str, dict[tuple[str, int], float]] = {m: {} for m in metrics}
    if exact_stats or union:
        for s in stats.values():
            if exact_stats:
                s.start_refine()
        idx = {n: torch.tensor(sorted(set(v))) for n, v in union.items()}

        def emit2(metric, name, s):
            if exact_stats:
                _feed(stats[metric], groups[name], s)
            if name in idx:
                vals = s.reshape(-1)[idx[name].to(s.device)].double().cpu().tolist()
                gathered[metric].update({(name, int(f)): v for f, v in zip(idx[name].tolist(), vals)})

        def fused2(metric, name, w, g):  # the same, scoring a slice at a time: no score tensor of the whole
            names = _unsplit(groups[name])
            if backend is Backend.OFF or names is None:
                return False
            wf, gf = w.reshape(-1), g.reshape(-1)
            step = step_for(w.device, chunk_size)
            for start in range(0, wf.numel(), step) if exact_stats else ():
                stats[metric].add(names, kernel_score(wf[start:start + step], gf[start:start + step], metric))
            if name in idx:
                i = idx[name].to(w.device)
                vals = kernel_score(wf[i], gf[i], metric).double().cpu().tolist()
                gathered[metric].update({(name, int(f)): v for f, v in zip(idx[name].tolist(), vals)})
            return True

        def rows2(metric, name, shape):  # emit2 of a tensor given in row blocks
            names = _unsplit(groups[name])
            if names is None:
                return None
            ncols = math.prod(shape[1:])

            def add(row, s):
                if exact_stats:
                    stats[metric].add(names, s)
                if name in idx:
                    f = idx[name][(idx[name] >= row * ncols) & (idx[name] < row * ncols + s.numel())]
                    vals = s.reshape(-1)[(f - row * ncols).to(s.device)].double().cpu().tolist()
                    gathered[metric].update({(name, int(i)): v for i, v in zip(f.tolist(), vals)})
            return _Sink(step, add)

        score_model(model, windows, metrics, emit2, batch_size, fisher_dtype, progress, "pass 2/2",
                    reduce=reduce, fused=fused2, weights_checked=True, rows=rows2)  # pass 1 checked them
    result.gathered = gathered
    result.stats = {m: _nest(stats[m].summary()) for m in metrics}
    return result


def _nest(flat: dict) -> dict:
    out = {"global": flat.get("global", {}), "per_layer": {}, "per_component": {}}
    layer_keys = sorted((k for k in flat if k.startswith("layer:")),
                        key=lambda k: (k == "layer:none", int(k[6:]) if k[6:].isdigit() else 0))
    for k in layer_keys:
        out["per_layer"][k[6:]] = flat[k]
    for k in sorted(k for k in flat if k.startswith("component:")):
        out["per_component"][k[10:]] = flat[k]
    return out


def cross_metric(result: Sensitivity, k: int | None = None) -> list[dict]:
    """Overlap, Jaccard and Spearman (on the union, from gathered scores) of every pair of metrics' top-K."""
    k = k or result.topk_global
    rows = []
    tops = {m: [(n, f) for n, f, _ in result.global_top(m, k)] for m in result.metrics}
    for a, b in itertools.combinations(result.metrics, 2):
        sa, sb = set(tops[a]), set(tops[b])
        union = sorted(sa | sb, key=lambda c: (result.order.index(c[0]), c[1]))
        row = {"metric_a": a, "metric_b": b, "k": k, "overlap": len(sa & sb),
               "jaccard": len(sa & sb) / len(sa | sb), "n_union": len(union), "spearman": None}
        if union and all(c in result.gathered.get(a, {}) and c in result.gathered.get(b, {}) for c in union):
            xa = pd.Series([result.gathered[a][c] for c in union]).rank()
            xb = pd.Series([result.gathered[b][c] for c in union]).rank()
            row["spearman"] = float(np.corrcoef(xa, xb)[0, 1]) if xa.std() > 0 and xb.std() > 0 else None
        rows.append(row)
    return rows


def token_text(tokenizer, token_id: int) -> str:
    """A token's decoded text, quoted and escaped so spaces, newlines and special tokens are visible."""
    text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return repr(text)


def top_weights_table(result: Sensitivity, model: torch.nn.Module, tokenizer=None) -> pd.DataFrame:
    """The `top_weights` table: each metric's global top-K and each tensor's top-K, one row per weight."""
    params = dict(scored_parameters(model))
    rows = []

    def add(metric, scope, rank, name, flat, score):
        row, col = result.coords(name, flat)
        weight = float(params[name].detach().reshape(-1)[flat])
        token_id = token = None
        if is_token_matrix(name) and len(result.shapes[name]) == 2:
            token_id = row
            token = token_text(tokenizer, row) if tokenizer is not None else None
        rows.append((metric, scope, rank, name, layer_of(name), component_at(result.parts[name], row, col),
                     row, col, score, weight, token_id, token))

    for m in result.metrics:
        for r, (name, flat, score) in enumerate(result.global_top(m), 1):
            add(m, "global", r, name, flat, score)
        for name in result.order:
            if name not in result.topk[m].candidates:
                continue
            vals, idx = result.topk[m].per_tensor(name, result.topk_per_layer)
            for r, (score, flat) in enumerate(zip(vals.tolist(), idx.tolist()), 1):
                add(m, "per_layer", r, name, flat, score)
    df = pd.DataFrame(rows, columns=COLUMNS)
    for c in ("layer", "row", "col", "token_id"):
        df[c] = df[c].astype("Int64")
    df["rank"] = df["rank"].astype("int64")
    df["score"] = df["score"].astype("float64")
    df["weight"] = df["weight"].astype("float64")
    df["token"] = df["token"].astype("string")
    return df


def global_topk(model: torch.nn.Module, windows: torch.Tensor | None, metrics: list[str], k: int,
                batch_size: int = 8, fisher_dtype: torch.dtype = torch.float32, chunk_size: int = 1 << 30,
                progress: bool = False, desc: str = "top-K") -> dict[str, list[tuple[str, int, float]]]:
    """Each metric's exact global top-k (param, flat, score) in one scoring pass, without statistics: what
    `analyze` ranks, for callers that need only the ranking. Magnitude needs no `windows`."""
    need_data = [m for m in metrics if m != "magnitude"]
    if need_data and (windows is None or not len(windows)):
        raise CritlibError(f"metrics {', '.join(need_data)} need scoring windows; pass data or use magnitude")
    tops = {m: TopK(k, chunk_size) for m in metrics}
    score_model(model, windows if windows is not None else torch.zeros(1, 2, dtype=torch.long), metrics,
                lambda m, name, s: tops[m].add(name, s), batch_size, fisher_dtype, progress, desc)
    order = [n for n, _ in scored_parameters(model)]
    return {m: tops[m].global_topk(k, order) for m in metrics}
