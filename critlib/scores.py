"""Per-weight sensitivity scores, computed one tensor at a time and handed to a callback, never all at once.

- grad_x_weight = |g ⊙ w| and grad_squared = g², g the gradient of the mean next-token loss over ALL
  scoring tokens (each micro-batch's loss is a sum divided by the total token count, so g does not depend
  on the batch size);
- fisher = Σᵢ gᵢ², gᵢ the gradient of sequence i's mean token loss (empirical Fisher diagonal);
- magnitude = |w|;
- wanda = |w| · ‖x‖₂ of the weight's input channel over all scoring tokens: Linear and Conv1D weights use
  their input features, embeddings their one-hot input (‖x_t‖ = √count(t)), a tied lm_head/embedding its
  lm_head input, norm scales their normalised input (|w_j|·‖x̂_j‖ = ‖y_j − b_j‖), biases the constant 1.

A gradient score is emitted from `register_post_accumulate_grad_hook` on the last micro-batch, the moment
that tensor's gradient is final, and the gradient is freed right after.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import CritlibError
from .metrics import GRADIENT

GRAD_METRICS = GRADIENT
Emit = Callable[[str, str, torch.Tensor], None]  # (metric, param name, fp32 scores shaped like the param)
# (metric, param name, weight, final gradient) -> True when it consumed them without the scores being made
FusedEmit = Callable[[str, str, torch.Tensor, torch.Tensor], bool]


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


@contextmanager
def memory_saving(model: torch.nn.Module, checkpointing: bool = False, sparse_embedding: bool = False):
    """Lower the peak memory of a gradient pass, restoring the model on exit.

    `checkpointing`: keep only each decoder layer's input and replay the layer in backward (activation
    memory of one layer instead of all); the replay does not count twice for wanda's input norms. On a
    CPU it also maps allocations of 3 MiB or more apart from the heap (`_mmap_threshold`).
    `sparse_embedding`: the input embedding's gradient holds only the rows of tokens seen (for a tied
    lm_head/embedding it is added into the lm_head's dense gradient instead of a second dense matrix)."""
    saved: list = []
    try:
        if checkpointing and next(model.parameters()).device.type == "cpu":
            _mmap_threshold(3 << 20)
            saved.append((None, "mmap_threshold", 32 << 20))
        if checkpointing:
            try:
                from transformers.modeling_layers import GradientCheckpointingLayer
            except ImportError:
                GradientCheckpointingLayer = ()
            layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
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
        yield model
    finally:
        for obj, attr, value in reversed(saved):
            if attr == "mmap_threshold":
                _mmap_threshold(value)
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

    def score(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """wanda scores of parameter `p`, or None when no rule covers it."""
        if id(p) not in self.kind:
            return None
        kind, mname = self.kind[id(p)]
        w = p.detach().float().abs()
        if kind == "bias":
            return w * float(self.n_tokens) ** 0.5
        norm = self.sq[mname].sqrt().to(w.device)
        if kind == "linear":
            return w * norm[None, :]
        if kind == "conv1d":
            return w * norm[:, None]
        if kind == "embedding":
            return w * norm[:, None]
        return norm.clone()  # scale: |w_j|·‖x̂_j‖ = ‖y_j − b_j‖


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
    """In slices (a whole-tensor mask of an embedding gradient would be a large temporary), one wait."""
    flat = g.reshape(-1)
    if flat.numel() and not torch.stack([torch.isfinite(c).all() for c in flat.split(1 << 24)]).all():
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
                weights_checked: bool = False) -> list[str]:
    """Compute `metrics` for every parameter of `model` on `windows` [n, seq_len], calling `emit` once per
    (metric, parameter). Returns the names of parameters that wanda could not score (no input rule).
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
            emit("magnitude", name, p.detach().float().abs())
    grad_metrics = [m for m in GRAD_METRICS if m in metrics]
    norms = InputNorms(model) if "wanda" in metrics else None
    with hooks([]) as handles:
        if norms is not None:
            norms.attach(model, handles)
        if grad_metrics:
            _gradient_pass(model, params, windows, grad_metrics, emit, batch_size, fisher_dtype, progress, desc,
                           reduce, fused)
        elif norms is not None:
            with torch.no_grad():
                for batch in tqdm(windows.split(batch_size), desc=f"{desc} (activations)", disable=not progress):
                    model(input_ids=batch)
    if norms is not None:
        norms.n_tokens = windows.numel()
        if reduce is not None:
            norms.n_tokens = reduce.total(norms.n_tokens)
            for mname in sorted(norms.sq):
                norms.sq[mname] = reduce.sum_(f"wanda:{mname}", norms.sq[mname])
        for name, p in params:
            s = norms.score(p)
            if s is None:
                unscored.append(name)
            else:
                emit("wanda", name, s)
    return unscored


def _gradient_pass(model, params, windows, grad_metrics, emit, batch_size, fisher_dtype, progress, desc,
                   reduce=None, fused=None):
    fisher = "fisher" in grad_metrics
    need_g = [m for m in grad_metrics if m != "fisher"]
    n_total = windows.shape[0] * (windows.shape[1] - 1)
    if reduce is not None:
        n_total = reduce.total(n_total)
    per_seq = float(windows.shape[1] - 1)
    batches = windows.split(1 if fisher else batch_size)
    state = {"last": False, "emitted": set()}
    acc: dict[str, torch.Tensor] = {}

    def pre(name, p):
        def hook(g):  # NaN/inf in any sequence's gradient carries into the sum, which is checked once
            if g.is_sparse:
                g = g.to_dense()
            if name not in acc:
                acc[name] = torch.zeros(g.shape, dtype=fisher_dtype, device=g.device)
            # (this sequence's own mean-loss gradient)² = (g · n_total / per_seq)², one fused op in fp32
            acc[name].addcmul_(g, g, value=(n_total / per_seq) ** 2)
        return hook

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
                if reduce is not None:  # NaN/inf survive the sum, so every rank raises alike
                    g = reduce.sum_(name, g)
                _check_finite(name, g)
                w = p.detach()
                if "grad_squared" in need_g and not (fused and fused("grad_squared", name, w, g)):
                    emit("grad_squared", name, g.float().square())
                if "grad_x_weight" in need_g and not (fused and fused("grad_x_weight", name, w, g)):
                    s = g.float() if g.dtype != torch.float32 else g
                    emit("grad_x_weight", name, s.mul_(w.float()).abs_())
            if fisher:
                f = acc.pop(name)
                f = (reduce.sum_(f"fisher:{name}", f) if reduce is not None else f).float()
                _check_finite(name, f)
                emit("fisher", name, f)
            state["emitted"].add(name)
            p.grad = None
        return hook

    was_training = model.training
    model.eval()
    try:
        with hooks([]) as handles:
            for name, p in params:
                p.requires_grad_(True)
                p.grad = None
                if fisher:
                    handles.append(p.register_hook(pre(name, p)))
                handles.append(p.register_post_accumulate_grad_hook(post(name)))
            with torch.enable_grad():
                for i, batch in enumerate(tqdm(batches, desc=desc, disable=not progress)):
                    state["last"] = i == len(batches) - 1
                    loss = token_loss_sum(model, batch) / n_total
                    if not torch.isfinite(loss):
                        raise CritlibError("the loss is NaN or inf; use dtype fp32, check the weights for NaN/inf, "
                                           "or try other data")
                    loss.backward()
        for name, p in params:  # a parameter the loss does not reach has a zero gradient
            if name not in state["emitted"]:
                zero = torch.zeros_like(p, dtype=torch.float32)
                for m in grad_metrics:
                    emit(m, name, zero)
    finally:
        for _, p in params:
            p.grad = None
        model.train(was_training)
