"""Phase 1: score every weight by each metric, keep exact top-K candidates and full-model statistics.

Two passes over the same data: pass 1 ranks and histograms; pass 2 (same scores, recomputed) pins exact
percentiles and gathers every metric's score at the union of all global top-K sets for cross-metric
Spearman. Nothing ever holds all scores of a model.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
from dataclasses import dataclass, field, fields, replace

import numpy as np
import pandas as pd
import torch

from . import CritlibError
from .bins import step_for
from .distributed import Reducer, shard
from .distributed import active as dist_active
from .io import atomic_path
from .kernels import Backend, backend_named, multi, resolve_backend
from .kernels import score as kernel_score
from .layout import Part, component_at, is_token_matrix, layer_of, parts_of
from .metrics import checked
from .rank import BLOCK, TopK, merge, topk_chunked
from .scores import release_memory, saving_of, score_model, scored_parameters
from .stats import Stats, summarize_steps

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
    """Pass 1 of a tensor whose scores come in row blocks, folded in exactly as `Collector.emit1` folds the
    whole tensor: its top-K (and bottom-K) the merge of each block's exact top-K, and its statistics the same
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
        rows, counts, maxima = summarize_steps(flat, self.align, BLOCK)
        v, i = topk_chunked(flat, self.k, self.chunk_size, maxima)
        self.top.append((v.float().cpu(), i.cpu() + off))
        if self.keep_bottom:
            v, i = topk_chunked(-flat, self.k_bottom, self.chunk_size)
            self.bottom.append((v.float().cpu(), i.cpu() + off))
        self.rows.append(rows)
        self.counts = counts if self.counts is None else self.counts.add_(counts)

    def _close(self) -> None:
        self.keep_top(torch.cat([v for v, _ in self.top]), torch.cat([i for _, i in self.top]))
        if self.keep_bottom:
            self.keep_bottom(torch.cat([v for v, _ in self.bottom]), torch.cat([i for _, i in self.bottom]))
        self.merge_stats(torch.cat(self.rows), self.counts, self.n)
        self.top = self.bottom = self.rows = []


def check_k(model: torch.nn.Module, topk_per_layer: int, topk_global: int) -> None:
    """Refuse a global top-K beyond the model's size. A tensor with fewer than `topk_per_layer` weights is
    no error: its per-tensor top-K keeps all of them (critlib.rank clamps k to the tensor's size)."""
    params = scored_parameters(model)
    total = sum(p.numel() for _, p in params)
    if topk_global > total:
        raise CritlibError(f"topk_global={topk_global} exceeds the model's {total} weights; lower it")


@dataclass(frozen=True)
class AnalyzeConfig:
    """The settings of `analyze`, checked when made. `topk_global` and `topk_per_layer`: the candidates kept
    of each metric, over the model and per tensor; `bottomk`: how many lowest-scored weights to keep as well
    (0: none). `exact_stats`: a second pass pins exact percentiles (else they hold within their stated
    bound). `chunk_size`: most elements ranked or summarised at once. `kernel` (auto, triton, torch, off;
    see critlib.kernels.resolve_backend): lets pass 1 rank and summarise grad_x_weight and grad_squared from
    one read of each weight and gradient, and pass 2 score them a slice at a time. `check_memory`: refuse,
    before any gradient is made, a pass that would not fit in the memory available (critlib.memory.check_fits).
    `distributed` (None: whenever a torch.distributed group of several ranks runs): each rank scores its
    share of the windows and gradients are summed over ranks (critlib.distributed). `gather`: with several
    metrics, gather every metric's score at the union of their global top-K (cross-metric Spearman; a second
    pass even without exact_stats)."""
    metrics: tuple[str, ...]
    topk_global: int = 1000
    topk_per_layer: int = 100
    batch_size: int = 8
    exact_stats: bool = True
    chunk_size: int = 1 << 30
    fisher_dtype: torch.dtype = torch.float32
    bottomk: int = 0
    kernel: str = "auto"
    check_memory: bool = True
    distributed: bool | None = None
    gather: bool = True

    def __post_init__(self):
        object.__setattr__(self, "metrics", tuple(checked(self.metrics)))
        for key in ("topk_global", "topk_per_layer", "batch_size", "chunk_size", "bottomk"):
            value, least = getattr(self, key), 0 if key == "bottomk" else 1
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
                raise CritlibError(f"{key}={value!r} must be an integer ≥ {least}")
        if self.fisher_dtype not in (torch.float32, torch.bfloat16):
            raise CritlibError(f"fisher_dtype={self.fisher_dtype} must be torch.float32 or torch.bfloat16")
        backend_named(self.kernel)


def _config(config: AnalyzeConfig | None, settings: dict) -> AnalyzeConfig:
    """`config` with `settings` (AnalyzeConfig fields) put over it; without a config, `settings` name metrics."""
    if config is not None and not isinstance(config, AnalyzeConfig):
        raise CritlibError(f"analyze's third argument is an AnalyzeConfig, not a {type(config).__name__}; "
                           "pass metrics by name: metrics=[...]")
    names = [f.name for f in fields(AnalyzeConfig)]
    unknown = [k for k in settings if k not in names]
    if unknown:
        raise CritlibError(f"analyze has no setting {', '.join(unknown)}; choose from: {', '.join(names)}")
    if config is None:
        if "metrics" not in settings:
            raise CritlibError("analyze needs metrics: pass metrics=[...], e.g. metrics=['grad_x_weight'], "
                               "or an AnalyzeConfig")
        return AnalyzeConfig(**settings)
    return replace(config, **settings)


class Collector:
    """What `analyze` keeps of one model while scores stream past: each metric's top-K (and bottom-K)
    candidates, statistics and (layer, component) cells, and, in pass 2, the scores gathered at the union
    of the metrics' global top-K. `emit`, `fused` and `rows` of each pass are what `score_model` calls."""

    def __init__(self, model: torch.nn.Module, config: AnalyzeConfig):
        self.config = config
        params = scored_parameters(model)
        self.order = [n for n, _ in params]
        self.shapes = {n: tuple(p.shape) for n, p in params}
        self.parts = {n: parts_of(n, self.shapes[n], getattr(model, "config", None)) for n in self.order}
        self.groups = {n: _groups(n, self.parts[n]) for n in self.order}
        metrics, chunk_size = config.metrics, config.chunk_size
        self.k = max(config.topk_global, config.topk_per_layer)
        self.topk = {m: TopK(self.k, chunk_size) for m in metrics}
        self.stats = {m: Stats(chunk_size) for m in metrics}
        self.bottom = {m: TopK(config.bottomk, chunk_size) for m in metrics} if config.bottomk > 0 else {}
        self.cells: dict[str, dict[tuple[int | None, str], list]] = {m: {} for m in metrics}
        device = next(model.parameters()).device
        self.backend = resolve_backend(config.kernel, device, fallback=Backend.OFF)
        self.step = step_for(device, chunk_size)
        self.batch = multi.Pass1(self.k, self.backend, self.stats, self.topk, self.unsplit, self._cell)
        self.unscored: dict[str, list[str]] = {}
        self.hist: dict[str, torch.Tensor] = {}
        self.idx: dict[str, torch.Tensor] = {}  # pass 2: the flat indices of each tensor to gather
        self.gathered: dict[str, dict[tuple[str, int], float]] = {m: {} for m in metrics}

    def unsplit(self, name: str) -> list[str] | None:
        return _unsplit(self.groups[name])

    def _cell(self, metric: str, name: str, n: int, total: torch.Tensor) -> None:
        _add_cell(self.cells[metric], layer_of(name), self.unsplit(name), n, total)

    def _merge(self, metric: str, name: str, rows: torch.Tensor, counts: torch.Tensor, n: int) -> None:
        """Fold the `summarize` rows and histogram of a tensor its groups take whole into them and its cell."""
        self._cell(metric, name, n, self.stats[metric].merge(self.unsplit(name), rows, counts))

    def pass1(self, model: torch.nn.Module, windows: torch.Tensor, reduce, progress: bool) -> None:
        """Rank and summarise every score; then settle the cells and histograms, and choose what pass 2 gathers."""
        c = self.config
        unscored = score_model(model, windows, list(c.metrics), self.emit1, c.batch_size, c.fisher_dtype, progress,
                               "pass 1/2", reduce=reduce, fused=self.fused1, rows=self.rows1)
        self.batch.finish()
        release_memory()
        self.unscored = {"wanda": unscored} if unscored else {}
        self.cells = {m: _settle_cells(cells) for m, cells in self.cells.items()}
        for m in c.metrics:
            if "global" in self.stats[m].groups:
                self.stats[m].groups["global"].settle()
                self.hist[m] = self.stats[m].groups["global"].hist_count.clone()
        union: dict[str, list[int]] = {}
        if len(c.metrics) > 1 and c.gather:
            for m in c.metrics:
                for name, flat, _ in self.topk[m].global_topk(c.topk_global, self.order):
                    union.setdefault(name, []).append(flat)
        self.idx = {n: torch.tensor(sorted(set(v))) for n, v in union.items()}

    def emit1(self, metric: str, name: str, s: torch.Tensor) -> None:
        """Rank and summarise one tensor's scores. A tensor whose groups take it whole is summarised in one
        call that also makes the top-K's block maxima (one read of the scores instead of two on a CPU)."""
        maxima = None
        if self.unsplit(name) is not None and s.numel():
            rows, counts, maxima = summarize_steps(s.detach().reshape(-1), self.step, BLOCK)
            self._merge(metric, name, rows, counts, s.numel())
        else:
            _feed(self.stats[metric], self.groups[name], s, self.cells[metric], layer_of(name))
        self.topk[metric].add(name, s, maxima)
        if self.bottom:
            self.bottom[metric].add(name, -s)

    def fused1(self, metric: str, name: str, w: torch.Tensor, g: torch.Tensor) -> bool:
        """Batch the tensor into multi-tensor passes (many tensors a launch); bottom-K and split tensors need
        their scores made."""
        if self.backend is Backend.OFF or self.bottom or self.unsplit(name) is None:
            return False
        self.batch.add(metric, name, w, g)
        return True

    def rows1(self, metric: str, name: str, shape: tuple) -> _Fold | None:
        """`emit1` of a tensor given in row blocks (memory_saving's row blocks)."""
        if self.unsplit(name) is None:
            return None

        def keep(t: TopK):
            return lambda v, i: t.add_candidates(name, *merge(v, i, t.k))
        bottom = keep(self.bottom[metric]) if self.bottom else None
        return _Fold(shape, self.step, self.config.chunk_size, keep(self.topk[metric]), self.k, bottom,
                     self.config.bottomk, functools.partial(self._merge, metric, name))

    def pass2(self, model: torch.nn.Module, windows: torch.Tensor, reduce, progress: bool) -> None:
        """The same scores again, when exact percentiles or cross-metric gathering need them."""
        c = self.config
        if not (c.exact_stats or self.idx):
            return
        if c.exact_stats:
            for s in self.stats.values():
                s.start_refine()
        score_model(model, windows, list(c.metrics), self.emit2, c.batch_size, c.fisher_dtype, progress, "pass 2/2",
                    reduce=reduce, fused=self.fused2, weights_checked=True, rows=self.rows2)  # pass 1 checked them

    def _gather(self, metric: str, name: str, flat: torch.Tensor, vals: torch.Tensor) -> None:
        self.gathered[metric].update({(name, int(f)): v for f, v in zip(flat.tolist(), vals.double().cpu().tolist())})

    def emit2(self, metric: str, name: str, s: torch.Tensor) -> None:
        if self.config.exact_stats:
            _feed(self.stats[metric], self.groups[name], s)
        if name in self.idx:
            self._gather(metric, name, self.idx[name], s.reshape(-1)[self.idx[name].to(s.device)])

    def fused2(self, metric: str, name: str, w: torch.Tensor, g: torch.Tensor) -> bool:
        """`emit2`, scoring a slice at a time: no score tensor of the whole."""
        names = self.unsplit(name)
        if self.backend is Backend.OFF or names is None:
            return False
        wf, gf, step = w.reshape(-1), g.reshape(-1), self.step
        for start in range(0, wf.numel(), step) if self.config.exact_stats else ():
            self.stats[metric].add(names, kernel_score(wf[start:start + step], gf[start:start + step], metric))
        if name in self.idx:
            i = self.idx[name].to(w.device)
            self._gather(metric, name, self.idx[name], kernel_score(wf[i], gf[i], metric))
        return True

    def rows2(self, metric: str, name: str, shape: tuple) -> _Sink | None:
        """`emit2` of a tensor given in row blocks."""
        names = self.unsplit(name)
        if names is None:
            return None
        ncols = math.prod(shape[1:])

        def add(row, s):
            if self.config.exact_stats:
                self.stats[metric].add(names, s)
            if name in self.idx:
                idx = self.idx[name]
                f = idx[(idx >= row * ncols) & (idx < row * ncols + s.numel())]
                self._gather(metric, name, f, s.reshape(-1)[(f - row * ncols).to(s.device)])
        return _Sink(self.step, add)

    def result(self) -> Sensitivity:
        c = self.config
        return Sensitivity(list(c.metrics), self.order, self.shapes, self.parts, self.topk,
                           {m: _nest(self.stats[m].summary()) for m in c.metrics}, c.topk_global, c.topk_per_layer,
                           gathered=self.gathered, bottom=self.bottom, unscored=self.unscored, hist=self.hist,
                           cells=self.cells)


def analyze(model: torch.nn.Module, windows: torch.Tensor, config: AnalyzeConfig | None = None, *,
            progress: bool = True, **settings) -> Sensitivity:
    """Score `windows` by each metric; keep exact top-K (and, with `bottomk`, bottom-K) candidates and
    statistics over every weight. The settings (see AnalyzeConfig) come as `config`, as keywords
    (`analyze(model, windows, metrics=["grad_x_weight"], topk_global=100)`), or both, the keywords put over
    the config. Distributed, every rank returns the result of scoring all of `windows`."""
    config = _config(config, settings)
    check_k(model, config.topk_per_layer, config.topk_global)
    distributed = dist_active() if config.distributed is None else config.distributed and dist_active()
    reduce = Reducer() if distributed else None
    if distributed:
        windows = shard(windows)
    if config.check_memory:
        from .memory import Plan, check_fits
        check_fits(model, list(config.metrics), windows.shape[0], windows.shape[1],
                   Plan(*saving_of(model), config.batch_size, config.fisher_dtype), config.exact_stats)
    collector = Collector(model, config)
    collector.pass1(model, windows, reduce, progress)
    collector.pass2(model, windows, reduce, progress)
    return collector.result()


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
