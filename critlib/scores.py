"""Per-weight sensitivity scores, computed one tensor at a time and handed to a callback, never all at once.

- grad_x_weight = |g ⊙ w| and grad_squared = g², g the gradient of the mean next-token loss over ALL
  scoring tokens (each micro-batch's loss is a sum divided by the total token count, so g does not depend
  on the batch size);
- fisher = (1/N) Σᵢ gᵢ², gᵢ the gradient of sequence i's mean token loss over the N scoring sequences (the
  empirical Fisher diagonal, a mean so that runs of different sizes compare; sequences are scored one at a
  time, so batch_size cannot change it);
- magnitude = |w|;
- wanda = |w| · √(Σ x² / N) of the weight's input channel, Σ over all scoring tokens and N the number of
  scoring sequences (locuslab/wanda's `scaler_row`, a running mean over samples): Linear and Conv1D weights use
  their input features, embeddings their one-hot input (‖x_t‖ = √count(t)), a tied lm_head/embedding its
  lm_head input, norm scales their normalised input (|w_j|·‖x̂_j‖ = ‖y_j − b_j‖), biases the constant 1.

A gradient score is emitted from `register_post_accumulate_grad_hook` on the last micro-batch, the moment
that tensor's gradient is final, and the gradient is freed right after. Under
`memory_saving(sparse_embedding=True)` the input embedding and lm_head matrices get no gradient from
autograd at all: theirs is made one row block at a time once every use has handed in what it is made from
(`_Blocked`; a tied matrix at the end of the backward), equal bit for bit to autograd's where the BLAS sums
a row slice of a GEMM as it sums the whole (MKL does).
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager, nullcontext
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from . import CritlibError
from .metrics import GRADIENT
from .progress import Bar

GRAD_METRICS = GRADIENT
Emit = Callable[[str, str, torch.Tensor], None]  # (metric, param name, fp32 scores shaped like the param)
# (metric, param name, weight, final gradient) -> True when it consumed them without the scores being made
FusedEmit = Callable[[str, str, torch.Tensor, torch.Tensor], bool]


class RowSink(Protocol):
    """Takes one tensor's scores a row block at a time, in order (see `score_model`'s `rows`)."""
    align: int  # every block but the last holds a multiple of this many elements

    def add(self, row: int, scores: torch.Tensor) -> None:  # fp32 scores of rows [row, row + len(scores))
        ...

    def close(self) -> None:  # the last block was added
        ...


# (metric, param name, shape) -> a sink taking that tensor's scores in row blocks, or None: emit it whole
Rows = Callable[[str, str, tuple], RowSink | None]


def scored_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Every parameter once: a tied matrix appears under its first name only."""
    return list(model.named_parameters())


def token_loss_sum(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of the next-token cross-entropy, in fp32."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")


_recomputing = [0]  # > 0 while activation checkpointing replays a layer's forward during backward


@contextmanager
def _replaying():
    _recomputing[0] += 1
    try:
        yield
    finally:
        _recomputing[0] -= 1


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(lambda *a: forward(*a, **kwargs), *args, use_reentrant=False,
                          context_fn=lambda: (nullcontext(), _replaying()))
    return run


def resolve_memory_saving(model: torch.nn.Module, checkpointing: bool | str = "auto",
                          sparse_embedding: bool | str = "auto") -> tuple[bool, bool]:
    """The memory-saving choices for `model`, each True, False or "auto". `auto` turns on what was measured
    to cost under 10% of the run's time (BENCHMARKS.md, "Memory of a default critlib score"):
    `sparse_embedding` everywhere (the row-blocked embedding/lm_head gradient does the same arithmetic:
    −6% and −17% on a CPU); `checkpointing` wherever the model has checkpointable decoder layers (the replay
    of the layers: +6% on a CPU, 2% of a GPU pass). Both together: −12% (Llama-3.2-1B shape) and +3% (the
    default model, all five metrics) against neither on a CPU; not yet measured on a GPU."""
    if checkpointing == "auto":
        checkpointing = bool(_checkpoint_layers(model))
    if sparse_embedding == "auto":
        sparse_embedding = True
    return bool(checkpointing), bool(sparse_embedding)


def _checkpoint_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@contextmanager
def memory_saving(model: torch.nn.Module, checkpointing: bool | str = False, sparse_embedding: bool | str = False):
    """Lower the peak memory of a gradient pass, restoring the model on exit. Each choice is True, False or
    "auto" (`resolve_memory_saving`; the params `gradient_checkpointing` and `sparse_embedding_grad` default
    to auto).

    `checkpointing`: keep only each decoder layer's input and replay the layer in backward (activation
    memory of one layer instead of all); the replay does not count twice for wanda's input norms. On a
    CPU it also maps allocations of 3 MiB or more apart from the heap (`_mmap_threshold`).
    `sparse_embedding`: no [vocab, hidden] gradient of the input embedding or of a bias-free lm_head is
    ever made: their uses hand in what the gradient is made from (the token ids seen and their output
    gradients; the lm_head's input and output gradient) and `score_model` makes it one row block at a time
    after the backward, each block summed as autograd sums the whole (`_Blocked`), scored and handed to
    the caller's row sinks (`score_model(rows=...)`; without them the gradient is assembled whole after the
    backward). Where that cannot be done (data-parallel ranks, layers split over devices, other module
    types) the input embedding's gradient holds only the rows of tokens seen (`nn.Embedding(sparse=True)`;
    for a tied lm_head/embedding it is added into the lm_head's dense gradient instead of a second dense
    matrix)."""
    checkpointing, sparse_embedding = resolve_memory_saving(model, checkpointing, sparse_embedding)
    saved: list = []
    try:
        if checkpointing and next(model.parameters()).device.type == "cpu":
            _mmap_threshold(3 << 20)
            saved.append((None, "mmap_threshold", 32 << 20))
        if checkpointing:
            layers = _checkpoint_layers(model)
            if not layers:
                raise CritlibError(f"{type(model).__name__} has no checkpointable decoder layers; set "
                                   "gradient_checkpointing: false")
            for m in layers:
                saved.append((m, "forward", m.__dict__.get("forward")))
                m.forward = _checkpointed(m.forward)
            config = getattr(model, "config", None)
            if config is not None and getattr(config, "use_cache", False):  # a cache would grow on replay
                saved.append((config, "use_cache", True))
                config.use_cache = False
        if sparse_embedding:
            emb = model.get_input_embeddings()
            if isinstance(emb, torch.nn.Embedding):
                saved.append((emb, "sparse", emb.sparse))
                emb.sparse = True
        saved.append((model, "saving", _SAVING.get(model)))
        _SAVING[model] = (checkpointing, sparse_embedding)
        yield model
    finally:
        for obj, attr, value in reversed(saved):
            if attr == "mmap_threshold":
                _mmap_threshold(value)
            elif attr == "saving":
                if value is None:
                    _SAVING.pop(obj, None)
                else:
                    _SAVING[obj] = value
            elif attr == "forward" and value is None:
                del obj.forward
            else:
                setattr(obj, attr, value)


@contextmanager
def hooks(handles: list):
    """Hold hook handles and remove every one of them on exit, error or not."""
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


class InputNorms:
    """Running Σx² per input channel (fp32) of every module a wanda score needs, plus the token count."""

    def __init__(self, model: torch.nn.Module):
        from transformers.pytorch_utils import Conv1D
        self.sq: dict[str, torch.Tensor] = {}
        self.n_tokens = 0
        self.n_sequences = 0  # wanda's norms are per sequence: Σx² / n_sequences, as locuslab/wanda's add_batch
        self.batch_tokens = 0
        self.kind: dict[int, tuple[str, str]] = {}  # id(param) -> (kind, module name)
        self.modules: list[tuple[str, torch.nn.Module, str]] = []
        for mname, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                kind = "linear"
            elif isinstance(mod, Conv1D):
                kind = "conv1d"
            elif isinstance(mod, torch.nn.Embedding):
                kind = "embedding"
            elif isinstance(getattr(mod, "weight", None), torch.nn.Parameter) and mod.weight.ndim == 1 \
                    and not list(mod.children()):
                kind = "scale"
            else:
                continue
            self.modules.append((mname, mod, kind))
            w = mod.weight
            if id(w) not in self.kind or kind in ("linear", "conv1d"):
                self.kind[id(w)] = (kind, mname)
            b = getattr(mod, "bias", None)
            if isinstance(b, torch.nn.Parameter):
                self.kind[id(b)] = ("bias", mname)

    def attach(self, model: torch.nn.Module, handles: list) -> None:
        def count_tokens(mod, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.batch_tokens = ids.numel()
        handles.append(model.register_forward_pre_hook(count_tokens, with_kwargs=True))
        for mname, mod, kind in self.modules:
            handles.append(mod.register_forward_hook(self._hook(mname, kind), with_kwargs=True))

    def _hook(self, mname: str, kind: str):
        def hook(mod, args, kwargs, out):
            if _recomputing[0]:
                return
            first = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            with torch.no_grad():
                if kind == "embedding":
                    ids = first.reshape(-1)
                    # ids broadcast over the batch (position ids of shape [1, T]) serve several tokens each
                    uses = self.batch_tokens // ids.numel() if self.batch_tokens % ids.numel() == 0 else 1
                    add = torch.bincount(ids, minlength=mod.num_embeddings).float() * uses
                elif kind == "scale":
                    y = out.float()
                    b = getattr(mod, "bias", None)
                    if b is not None:
                        y = y - b.float()
                    add = y.pow(2).reshape(-1, y.shape[-1]).sum(0)
                else:
                    x = first.float()
                    add = x.pow(2).reshape(-1, x.shape[-1]).sum(0)
                if mname in self.sq:
                    self.sq[mname] += add
                else:
                    self.sq[mname] = add
        return hook

    def covers(self, p: torch.nn.Parameter) -> bool:
        return id(p) in self.kind

    def score(self, p: torch.nn.Parameter, r0: int | None = None, r1: int | None = None) -> torch.Tensor | None:
        """wanda scores of parameter `p` (of its rows [r0, r1) when r0 is given), or None when no rule
        covers it."""
        if id(p) not in self.kind:
            return None
        kind, mname = self.kind[id(p)]
        w = _rows_of(p.detach(), r0, r1).float().abs()
        n = max(self.n_sequences, 1)
        if kind == "bias":
            return w * (self.n_tokens / n) ** 0.5
        norm = (self.sq[mname] / n).sqrt().to(w.device)
        if kind == "linear":
            return w * norm[None, :]
        if kind == "conv1d":
            return w * norm[r0:r1, None]
        if kind == "embedding":
            return w * norm[r0:r1, None]
        return norm[r0:r1].clone()  # scale: |w_j|·‖x̂_j‖ = ‖y_j − b_j‖


def _glibc(call: str, *args: int) -> None:
    """Call a glibc malloc tuning function; a no-op where there is no glibc or no such function."""
    import ctypes
    try:
        getattr(ctypes.CDLL("libc.so.6"), call)(*args)
    except (OSError, AttributeError):
        pass


def _mmap_threshold(nbytes: int) -> None:
    """glibc: CPU allocations of `nbytes` or more get their own mapping, handed back to the system when
    freed. At 3 MiB the heap no longer keeps what replayed layers and pass-2 buffers freed, so the resident
    size stops creeping up (1B shape, fp32, two passes: 1.78× → 1.66× the weights; 1 MiB gives 1.59× but
    runs 15–25% slower, each 2 MiB float64 step of critlib.stats then being mapped afresh). 32 MiB is where
    glibc's own adaptive threshold ends up. Process-wide."""
    _glibc("mallopt", -3, nbytes)  # M_MMAP_THRESHOLD


def release_memory() -> None:
    """Give freed CPU heap memory back to the system (glibc keeps it otherwise, and the next pass then
    starts from a higher resident size)."""
    import gc
    gc.collect()
    _glibc("malloc_trim", 0)


def _check_finite(name: str, g: torch.Tensor) -> None:
    """From the sums of its slices (`_nonfinite`): an `isfinite` mask costs 2.8 ns per value on an Intel Xeon,
    a sum 0.16 ns."""
    if _nonfinite(g):
        raise CritlibError(f"the gradient of {name} has NaN or inf values; use dtype fp32, check the weights "
                           "for NaN/inf, or try other data")


def _nonfinite(t: torch.Tensor) -> int:
    """How many values of `t` are NaN or inf. First one wait on the sums of its slices (any NaN or inf makes
    a sum so; no mask is made, and a sum is the fastest read: 2× aminmax on a CPU); only a tensor whose sum
    is not finite (a NaN/inf, or an overflow of the sum) is counted, slice by slice."""
    flat = t.detach().reshape(-1)
    if not flat.numel() or not flat.is_floating_point():
        return 0
    slices = flat.split(1 << 24)
    acc = torch.float32 if flat.element_size() < 4 else None  # fp16 sums overflow at 65504
    if bool(torch.isfinite(torch.stack([c.sum(dtype=acc) for c in slices])).all()):
        return 0
    return int(sum(int((~torch.isfinite(c)).sum()) for c in slices))


def check_weights(params: list[tuple[str, torch.Tensor]]) -> None:
    """Refuse NaN/inf weights: magnitude would rank them as the most critical, the other metrics' scores
    would be NaN, and every statistic null."""
    bad = [(name, p, n) for name, p in params if (n := _nonfinite(p))]
    if bad:
        name, p, n = bad[0]
        more = f" (and {len(bad) - 1} more parameter(s))" if len(bad) > 1 else ""
        raise CritlibError(f"{name} has {n} NaN or inf weight(s) of {p.numel()}{more}; no score can rank them: "
                           "check that the checkpoint is intact, and load it in the dtype it was saved in (or fp32)")


def score_model(model: torch.nn.Module, windows: torch.Tensor, metrics: list[str], emit: Emit,
                batch_size: int = 8, fisher_dtype: torch.dtype = torch.float32, progress: bool = True,
                desc: str = "scoring", reduce=None, fused: FusedEmit | None = None,
                weights_checked: bool = False, rows: Rows | None = None) -> list[str]:
    """Compute `metrics` for every parameter of `model` on `windows` [n, seq_len], calling `emit` once per
    (metric, parameter). Returns the names of parameters that wanda could not score (no input rule).
    `rows`, when given, is asked for a sink for the scores of the large matrices (row-blocked gradients
    under `memory_saving(sparse_embedding=True)`; magnitude and wanda of a matrix of ≥ 2·ROW_BLOCK
    elements): a sink takes them a row block at a time instead of `emit` taking the whole tensor; a sink of
    None means `emit` as usual. The scores are the same either way.
    `reduce` (a `critlib.distributed.Reducer`) sums gradients, Fisher sums, input norms and token counts
    over data-parallel ranks before any score is made. `fused` is offered grad_x_weight and grad_squared
    first, as weight and gradient (a fused kernel reads them once instead of a score tensor being made).
    The weights are checked for NaN/inf first (one read of each), unless `weights_checked` says a caller
    scoring the same weights again already did."""
    params = scored_parameters(model)
    if not weights_checked:
        check_weights(params)
    device = params[0][1].device
    windows = windows.to(device)
    unscored: list[str] = []
    if "magnitude" in metrics:
        for name, p in params:
            _emit_rows(emit, rows, "magnitude", name, p,
                       lambda r0, r1, p=p: _rows_of(p.detach(), r0, r1).float().abs())
    grad_metrics = [m for m in GRAD_METRICS if m in metrics]
    norms = InputNorms(model) if "wanda" in metrics else None
    with hooks([]) as handles:
        if norms is not None:
            norms.attach(model, handles)
        if grad_metrics:
            _gradient_pass(model, params, windows, grad_metrics, emit, batch_size, fisher_dtype, progress, desc,
                           reduce, fused, rows)
        elif norms is not None:
            with torch.no_grad():
                for batch in Bar(windows.split(batch_size), desc=f"{desc} (activations)", disable=not progress):
                    model(input_ids=batch)
    if norms is not None:
        norms.n_tokens = windows.numel()
        norms.n_sequences = windows.shape[0]
        if reduce is not None:
            norms.n_tokens = reduce.total(norms.n_tokens)
            norms.n_sequences = reduce.total(norms.n_sequences)
            for mname in sorted(norms.sq):
                norms.sq[mname] = reduce.sum_(f"wanda:{mname}", norms.sq[mname])
        for name, p in params:
            if not norms.covers(p):
                unscored.append(name)
            else:
                _emit_rows(emit, rows, "wanda", name, p, lambda r0, r1, p=p: norms.score(p, r0, r1))
    return unscored


def _rows_of(t: torch.Tensor, r0: int | None, r1: int | None) -> torch.Tensor:
    return t if r0 is None else t[r0:r1]


def _emit_rows(emit: Emit, rows: Rows | None, metric: str, name: str, p: torch.Tensor, scores) -> None:
    """Hand the scores `scores(r0, r1)` of p's rows to a row sink in blocks (a matrix of ≥ 2·ROW_BLOCK
    elements, when `rows` gives one), else all of them to `emit`."""
    sink = rows(metric, name, tuple(p.shape)) if rows is not None and p.ndim >= 2 and \
        p.numel() >= 2 * ROW_BLOCK else None
    if sink is None:
        emit(metric, name, scores(None, None))
        return
    step = row_step(p.shape, sink.align)
    for r0 in range(0, p.shape[0], step):
        sink.add(r0, scores(r0, min(p.shape[0], r0 + step)))
    sink.close()


def _gradient_pass(model, params, windows, grad_metrics, emit, batch_size, fisher_dtype, progress, desc,
                   reduce=None, fused=None, rows=None):
    fisher = "fisher" in grad_metrics
    need_g = [m for m in grad_metrics if m != "fisher"]
    n_total = windows.shape[0] * (windows.shape[1] - 1)
    if reduce is not None:
        n_total = reduce.total(n_total)
    per_seq = float(windows.shape[1] - 1)
    # (this sequence's own mean-loss gradient)² / n_sequences = (g · N)² / N with N = n_total / per_seq the
    # number of sequences (over every rank): one fused op in fp32
    c2 = n_total / per_seq
    batches = windows.split(1 if fisher else batch_size)
    state = {"last": False, "emitted": set()}
    acc: dict[str, torch.Tensor] = {}

    def pre(name, p):
        def hook(g):  # NaN/inf in any sequence's gradient carries into the sum, which is checked once
            if g.is_sparse:
                g = g.to_dense()
            if name not in acc:
                acc[name] = torch.zeros(g.shape, dtype=fisher_dtype, device=g.device)
            acc[name].addcmul_(g, g, value=c2)
        return hook

    def scores_of(name, p, g):  # the final gradient g of p, whole -> its gradient scores
        if reduce is not None:  # NaN/inf survive the sum, so every rank raises alike
            g = reduce.sum_(name, g)
        _check_finite(name, g)
        w = p.detach()
        if "grad_squared" in need_g and not (fused and fused("grad_squared", name, w, g)):
            emit("grad_squared", name, g.float().square())
        if "grad_x_weight" in need_g and not (fused and fused("grad_x_weight", name, w, g)):
            s = g.float() if g.dtype != torch.float32 else g
            emit("grad_x_weight", name, s.mul_(w.float()).abs_())

    def fisher_of(name):
        f = acc.pop(name)
        f = (reduce.sum_(f"fisher:{name}", f) if reduce is not None else f).float()
        _check_finite(name, f)
        emit("fisher", name, f)

    def post(name):
        def hook(p):
            if not state["last"]:
                if not need_g:
                    p.grad = None
                return
            g = p.grad
            if g.is_sparse:
                g = g.to_dense()
            if need_g:
                scores_of(name, p, g)
            if fisher:
                fisher_of(name)
            state["emitted"].add(name)
            p.grad = None
        return hook

    def complete(b: _Blocked) -> None:
        """Every use of a row-blocked matrix in this micro-batch has handed in its part: add its gradient to
        the Fisher sum, to the earlier micro-batches' sum, or (last micro-batch) score it, a row block at a
        time. Each block is summed exactly as autograd sums the whole (see `_Blocked`)."""
        name, p, last = b.name, b.p, state["last"]
        parts, b.parts = b.parts, []
        sinks = None
        if last and need_g and rows is not None:
            sinks = {m: rows(m, name, tuple(p.shape)) for m in need_g}
            if any(s is None for s in sinks.values()):
                sinks = None
        step = row_step(p.shape, math.lcm(*(s.align for s in sinks.values())) if sinks else 1)
        # the sum of the earlier micro-batches' gradients (autograd's p.grad: the first one's g, then += g);
        # without sinks the final gradient is assembled in it after the backward, never during it
        target, first = b.dense, b.dense is None
        if need_g and first and not (last and sinks):
            target = torch.empty(p.shape, dtype=p.dtype, device=p.device)
        for r0 in range(0, p.shape[0], step):
            r1 = min(p.shape[0], r0 + step)
            g = b.block(parts, r0, r1)
            if fisher:
                if name not in acc:
                    acc[name] = torch.zeros(p.shape, dtype=fisher_dtype, device=p.device)
                acc[name][r0:r1].addcmul_(g, g, value=c2)
            if not need_g:
                continue
            if target is not None:
                g = target[r0:r1].copy_(g) if first else target[r0:r1].add_(g)
            if sinks:
                _check_finite(name, g)
                w = p.detach()[r0:r1]
                if "grad_squared" in sinks:
                    sinks["grad_squared"].add(r0, g.float().square())
                if "grad_x_weight" in sinks:
                    s = g.float() if g.dtype != torch.float32 else g
                    sinks["grad_x_weight"].add(r0, s.mul_(w.float()).abs_())
        b.dense = None if last else target
        if not last:
            return
        if sinks:
            for m in need_g:
                sinks[m].close()
        elif need_g:
            scores_of(name, p, target)
        del target
        if fisher:
            fisher_of(name)
        state["emitted"].add(name)

    blocked = _row_blocked(model, params, complete) if reduce is None and saving_of(model)[1] else {}
    was_training = model.training
    model.eval()
    try:
        with hooks([]) as handles, _blocked_forwards(blocked):
            for name, p in params:
                p.requires_grad_(True)
                p.grad = None
                if id(p) in blocked:
                    continue
                if fisher:
                    handles.append(p.register_hook(pre(name, p)))
                handles.append(p.register_post_accumulate_grad_hook(post(name)))
            with torch.enable_grad():
                for i, batch in enumerate(Bar(batches, desc=desc, disable=not progress)):
                    state["last"] = i == len(batches) - 1
                    loss = token_loss_sum(model, batch) / n_total
                    if not torch.isfinite(loss):
                        raise CritlibError("the loss is NaN or inf; use dtype fp32, check the weights for NaN/inf, "
                                           "or try other data")
                    loss.backward()
                    for b in blocked.values():
                        b.check()
        for name, p in params:  # a parameter the loss does not reach has a zero gradient
            if name not in state["emitted"]:
                zero = torch.zeros_like(p, dtype=torch.float32)
                for m in grad_metrics:
                    emit(m, name, zero)
    finally:
        for _, p in params:
            p.grad = None
        model.train(was_training)


# ---------------------------------------------------------------- row-blocked embedding and lm_head matrices

ROW_BLOCK = 1 << 22  # elements of one row block of a row-blocked gradient or score tensor (16 MiB in fp32)
# models inside `memory_saving`: (checkpointing, sparse_embedding) as resolved; with sparse_embedding their
# embedding and lm_head gradients go in row blocks
_SAVING: weakref.WeakKeyDictionary[torch.nn.Module, tuple[bool, bool]] = weakref.WeakKeyDictionary()


def saving_of(model: torch.nn.Module) -> tuple[bool, bool]:
    """(checkpointing, sparse_embedding) of the `memory_saving` block `model` is in ((False, False) outside)."""
    return _SAVING.get(model, (False, False))


def row_step(shape, align: int = 1, target: int | None = None) -> int:
    """Rows per block of a tensor of `shape`: about `target` (default ROW_BLOCK) elements, and a multiple of
    `align` elements (a sink's statistics step, so its chunks fall where they fall in the whole tensor)."""
    ncols = math.prod(shape[1:]) or 1
    unit = align // math.gcd(align, ncols)  # the fewest rows holding a multiple of `align` elements
    return max(unit, (target or ROW_BLOCK) // ncols // unit * unit)


class _Blocked:
    """A matrix used only as an input embedding and/or a bias-free lm_head, whose gradient autograd never
    makes: each use hands in what its gradient is made from (the lm_head: its input x [N, hidden] and output
    gradient G [N, vocab]; the embedding: the summed gradient of each distinct token id it looked up), and
    once every use of the micro-batch has, `complete` makes the gradient one row block at a time.

    Summed as autograd sums the whole: the lm_head's rows [r0, r1) are G[:, r0:r1]ᵀ·x (autograd: Gᵀ·x, the
    same BLAS call on a slice), the embedding's rows come from the same kernel (`embedding_dense_backward`)
    over the same ids in the same order, renumbered to the distinct ids (each row sums its tokens in the
    order they occur, whatever the numbering), and the uses add in the order their backward ran, as
    autograd's input buffer adds them. Whether a GEMM sums a slice's rows in the order it sums the whole's
    is the BLAS's choice: MKL does (tests/test_scores.py checks it and then asks for bit-equality)."""

    def __init__(self, name: str, p: torch.nn.Parameter, complete):
        self.name, self.p, self.complete = name, p, complete
        self.modules: list[torch.nn.Module] = []
        self.pending = 0  # uses of this micro-batch whose backward has not run yet
        self.parts: list[tuple] = []
        self.dense: torch.Tensor | None = None  # the earlier micro-batches' sum (several micro-batches only)

    def used(self) -> None:
        if not _recomputing[0]:
            self.pending += 1

    def deliver(self, part: tuple) -> None:
        self.parts.append(part)
        self.pending -= 1
        if self.pending == 0:
            self.complete(self)

    def block(self, parts: list[tuple], r0: int, r1: int) -> torch.Tensor:
        g = None
        for part in parts:
            if part[0] == "head":
                _, x, go = part
                c = go[:, r0:r1].t().mm(x)
            else:
                _, uniq, sums = part
                c = torch.zeros((r1 - r0,) + tuple(self.p.shape[1:]), dtype=sums.dtype, device=sums.device)
                lo, hi = torch.searchsorted(uniq, torch.tensor([r0, r1], device=uniq.device)).tolist()
                if hi > lo:
                    c[uniq[lo:hi] - r0] = sums[lo:hi]
            g = c if g is None else g.add_(c)
        return g

    def check(self) -> None:
        """After each backward: every use handed in its part, and nothing else made a gradient."""
        if self.pending or self.parts or self.p.grad is not None:
            raise CritlibError(f"{self.name} is used outside its embedding/lm_head modules, so its gradient "
                               "cannot be made in row blocks; set sparse_embedding_grad: false")


class _HeadFn(torch.autograd.Function):
    """F.linear(x, weight) whose backward returns x's gradient as autograd would (G·W) and hands (x, G) to
    the `_Blocked` matrix instead of making the weight's [vocab, hidden] gradient."""

    @staticmethod
    def forward(ctx, x, weight, blocked):
        ctx.blocked = blocked
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        go = grad.reshape(-1, grad.shape[-1])
        grad_x = go.mm(weight).reshape(x.shape) if ctx.needs_input_grad[0] else None
        ctx.blocked.deliver(("head", x.reshape(-1, x.shape[-1]), go))
        return grad_x, None, None


class _EmbedFn(torch.autograd.Function):
    """F.embedding whose backward hands the per-token sums of its output gradient to the `_Blocked`
    matrix instead of making the weight's dense gradient."""

    @staticmethod
    def forward(ctx, ids, weight, emb, blocked):
        ctx.blocked, ctx.padding_idx, ctx.scale = blocked, emb.padding_idx, emb.scale_grad_by_freq
        ctx.save_for_backward(ids)
        return F.embedding(ids, weight, emb.padding_idx, None, emb.norm_type, emb.scale_grad_by_freq, False)

    @staticmethod
    def backward(ctx, grad):
        ids, = ctx.saved_tensors
        uniq, inverse = torch.unique(ids.reshape(-1), sorted=True, return_inverse=True)
        pad = -1
        if ctx.padding_idx is not None:
            at = (uniq == ctx.padding_idx).nonzero().flatten().tolist()
            pad = at[0] if at else -1
        sums = torch.ops.aten.embedding_dense_backward(grad, inverse.reshape(ids.shape), uniq.numel(), pad,
                                                       ctx.scale)
        ctx.blocked.deliver(("embedding", uniq, sums))
        return None, None, None, None


def _row_blocked(model: torch.nn.Module, params, complete) -> dict[int, _Blocked]:
    """The input embedding and lm_head matrices whose gradient can be made in row blocks (id -> _Blocked):
    an nn.Embedding without max_norm and a bias-free nn.Linear lm_head, neither with a forward of its own
    already patched (accelerate's placement hooks), all parameters on one device. A tied matrix needs both."""
    if len({p.device for _, p in params}) != 1:
        return {}
    names = {id(p): n for n, p in params}
    emb = model.get_input_embeddings()
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    ok_emb = isinstance(emb, torch.nn.Embedding) and emb.max_norm is None and "forward" not in emb.__dict__
    ok_head = isinstance(head, torch.nn.Linear) and head.bias is None and "forward" not in head.__dict__
    if isinstance(head, torch.nn.Module) and isinstance(emb, torch.nn.Module) \
            and getattr(head, "weight", None) is getattr(emb, "weight", None) and not (ok_emb and ok_head):
        return {}
    out: dict[int, _Blocked] = {}
    for mod, ok in ((head, ok_head), (emb, ok_emb)):
        if ok and id(mod.weight) in names:
            out.setdefault(id(mod.weight), _Blocked(names[id(mod.weight)], mod.weight, complete)).modules.append(mod)
    return out


@contextmanager
def _blocked_forwards(blocked: dict[int, _Blocked]):
    """Route the row-blocked matrices' modules through `_HeadFn` / `_EmbedFn` (module hooks still run)."""
    patched = []
    try:
        for b in blocked.values():
            for mod in b.modules:
                if isinstance(mod, torch.nn.Embedding):
                    def fwd(ids, mod=mod, b=b):
                        b.used()
                        return _EmbedFn.apply(ids, mod.weight, mod, b)
                else:
                    def fwd(x, mod=mod, b=b):
                        b.used()
                        return _HeadFn.apply(x, mod.weight, b)
                mod.forward = fwd
                patched.append(mod)
        yield blocked
    finally:
        for mod in patched:
            del mod.forward
