"""Will a scoring pass fit? An estimate of the memory a gradient pass needs beyond what is resident once the
model is loaded, from the parameter bytes, the model's shape and the chosen path (`memory_saving`), checked
against the memory available before any gradient is computed.

The estimate adds what is alive at the busiest moment of a pass (all in bytes):

- saved activations: per decoder layer and token about 12·hidden + 6·intermediate elements (Llama-like
  blocks; plus 2·heads·seq_len with eager attention); with activation checkpointing only each layer's input
  and one replayed layer;
- the logits and the loss: the logits in the model's dtype and three fp32 copies (the fp32 logits, the
  log-softmax kept for backward, its gradient), per token of a micro-batch and per vocabulary entry;
- gradients: a tied embedding/lm_head matrix's dense gradient lives through the whole backward and meets a
  second dense matrix at its end (the embedding's own gradient, or the out-of-place sum with a sparse one):
  two [vocab, hidden] matrices; an untied lm_head's gradient one, at the start of the backward. A matrix
  whose gradient is made in row blocks (`memory_saving(sparse_embedding=True)`) needs the lm_head's output
  gradient instead ([tokens, vocab]). Every other tensor: its gradient and fp32 scores, one tensor at a
  time; with several micro-batches every gradient is kept between them;
- Fisher sums: one accumulator of every parameter in `fisher_dtype`;
- the statistics' second pass: per metric, group and wanted bin (about ten) a 2¹⁶-entry int64 histogram.

Measured against it (BENCHMARKS.md, "Memory of a default critlib score"): the Llama-3.2-1B shape, fp32,
2×128 tokens, grad_x_weight.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import CritlibError

GIB = 1 << 30
SLACK = 1.15  # allocator rounding, heap fragmentation and the small temporaries not listed


@dataclass(frozen=True)
class Plan:
    """The choices of a gradient pass that decide its memory (each a Params key of the same meaning)."""
    gradient_checkpointing: bool
    sparse_embedding_grad: bool
    batch_size: int
    fisher_dtype: torch.dtype = torch.float32


def _shape(model: torch.nn.Module) -> dict:
    """Layers, hidden size, MLP size, heads and vocabulary from the config (GPT-2's names too)."""
    c = getattr(model, "config", None)
    c = getattr(c, "get_text_config", lambda: c)() if c is not None else None

    def get(*names, default=None):
        for n in names:
            v = getattr(c, n, None)
            if isinstance(v, int) and v > 0:
                return v
        return default
    emb = model.get_input_embeddings()
    vocab, hidden = tuple(emb.weight.shape[:2]) if getattr(emb, "weight", None) is not None and \
        emb.weight.ndim == 2 else (get("vocab_size", default=0), get("hidden_size", "n_embd", default=0))
    hidden = get("hidden_size", "n_embd", "d_model", default=hidden)
    return {"layers": get("num_hidden_layers", "n_layer", "num_layers", default=1), "hidden": hidden,
            "intermediate": get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
            "heads": get("num_attention_heads", "n_head", default=1), "vocab": vocab,
            "eager": getattr(c, "_attn_implementation", "eager") == "eager"}


def estimate(model: torch.nn.Module, metrics: list[str], n_sequences: int, seq_len: int, plan: Plan,
             exact_stats: bool = True) -> dict[str, int]:
    """Bytes a scoring pass of `model` needs beyond what is resident now, by part (see the module doc)."""
    from .metrics import GRADIENT
    from .scores import _row_blocked, scored_parameters
    params = scored_parameters(model)
    sh = _shape(model)
    b = params[0][1].element_size()
    grad = [m for m in GRADIENT if m in metrics]
    fisher = "fisher" in metrics
    need_g = [m for m in grad if m != "fisher"]
    per_batch = 1 if fisher else max(1, min(plan.batch_size, n_sequences))
    n_batches = math.ceil(n_sequences / per_batch)
    tokens = per_batch * seq_len
    out: dict[str, int] = {}
    if grad:
        layer = (12 * sh["hidden"] + 6 * sh["intermediate"]) * b + (2 * sh["heads"] * seq_len * b if sh["eager"] else 0)
        if plan.gradient_checkpointing:
            out["activations"] = sh["layers"] * tokens * sh["hidden"] * b + tokens * layer
        else:
            out["activations"] = sh["layers"] * tokens * layer
        out["logits"] = tokens * sh["vocab"] * (b + 3 * 4)
        blocked = _row_blocked(model, params, None) if plan.sparse_embedding_grad else {}
        emb, head = model.get_input_embeddings(), _output_embeddings(model)
        big = {id(m.weight): m.weight for m in (emb, head) if isinstance(getattr(m, "weight", None), torch.Tensor)}
        tied = head is not None and getattr(head, "weight", None) is getattr(emb, "weight", None)
        held = 0
        for key, w in big.items():
            if key in blocked:
                held += tokens * sh["vocab"] * b if isinstance(head, torch.nn.Linear) and head.weight is w else 0
            elif tied:
                held += 2 * w.numel() * b
            elif head is not None and getattr(head, "weight", None) is w:
                held += w.numel() * b
        out["embedding/lm_head gradient"] = held
        others = [p.numel() for _, p in params if id(p) not in big] or [0]
        out["gradient + scores of one tensor"] = max(others) * (b + 4 + (4 if b < 4 else 0))
        if need_g and n_batches > 1:
            out["gradients kept between micro-batches"] = sum(p.numel() for _, p in params) * b
        if fisher:
            out["fisher sums"] = sum(p.numel() for _, p in params) * torch.empty((), dtype=plan.fisher_dtype).element_size()
    if exact_stats:
        groups = sh["layers"] + 12
        out["statistics (pass 2)"] = len(metrics) * groups * 10 * (1 << 16) * 8  # about 10 wanted bins a group
    largest = max(p.numel() for _, p in params)
    if "magnitude" in metrics or "wanda" in metrics:  # a whole score tensor (rows of a large matrix stream)
        from .scores import ROW_BLOCK
        out["magnitude/wanda scores"] = min(largest, 2 * ROW_BLOCK) * 4 * 2
    return out


def _output_embeddings(model: torch.nn.Module):
    try:
        return model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def need(parts: dict[str, int]) -> int:
    return int(sum(parts.values()) * SLACK)


def available(device: torch.device) -> int | None:
    """Bytes this process can still take: free GPU memory (plus what torch's allocator holds unused), or
    the kernel's MemAvailable capped by a cgroup limit; None where it cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    avail = None
    try:
        with open("/proc/meminfo") as f:
            avail = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except OSError:
        return None
    try:  # a cgroup (v2) limit, as in a container
        cg = Path("/sys/fs/cgroup")
        limit = (cg / "memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int((cg / "memory.current").read_text())
            avail = left if avail is None else min(avail, left)
    except (OSError, ValueError):
        pass
    return avail


def _alternatives(plan: Plan, metrics: list[str], n_sequences: int) -> list[Plan]:
    """Plans to try, least change first: each memory option, both, then bf16 Fisher sums or smaller
    micro-batches with both."""
    both = replace(plan, gradient_checkpointing=True, sparse_embedding_grad=True)
    out = [replace(plan, gradient_checkpointing=True), replace(plan, sparse_embedding_grad=True), both]
    if "fisher" in metrics:
        out.append(replace(both, fisher_dtype=torch.bfloat16))
    else:
        bs = min(plan.batch_size, n_sequences)
        while bs > 1:
            bs //= 2
            out.append(replace(both, batch_size=bs))
    return [p for p in dict.fromkeys(out) if p != plan]


def _setting(plan: Plan, alt: Plan) -> str:
    """The Params settings that turn `plan` into `alt`."""
    out = [f"{k}: true" for k in ("gradient_checkpointing", "sparse_embedding_grad")
           if getattr(alt, k) and not getattr(plan, k)]
    if alt.fisher_dtype != plan.fisher_dtype:
        out.append("fisher_dtype: bf16")
    if alt.batch_size != plan.batch_size:
        out.append(f"batch_size: {alt.batch_size}")
    return " and ".join(out)


def check_fits(model: torch.nn.Module, metrics: list[str], n_sequences: int, seq_len: int, plan: Plan,
               exact_stats: bool = True, device: torch.device | None = None, loaded: bool = True) -> None:
    """Raise CritlibError (one line) when the scoring pass would not fit in the memory available, naming
    the setting that makes it fit. `loaded=False` checks before loading: `model` built on the meta device
    (shapes and dtype only, e.g. under `torch.device("meta")`), `device` where it will be loaded, and its
    weights count too. Skipped (no error) where the available memory cannot be read, for a model spread
    over several devices, and with CRITLIB_MEMORY_CHECK=0 in the environment."""
    if os.environ.get("CRITLIB_MEMORY_CHECK", "1") == "0":
        return
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or (device is None and not loaded):
        return
    device = device or next(iter(devices))
    avail = available(device)
    if avail is None:
        return
    weights = 0 if loaded else sum(p.numel() * p.element_size() for p in model.parameters())

    def total(p: Plan) -> int:
        return weights + need(estimate(model, metrics, n_sequences, seq_len, p, exact_stats))
    needed = total(plan)
    if needed <= avail:
        return
    where = "free GPU memory" if device.type == "cuda" else "available RAM"
    what = "scoring would need about" if loaded else "loading the model and scoring would need about"
    head = (f"{what} {needed / GIB:.1f} GiB {'beyond the loaded model' if loaded else 'in all'}, but "
            f"{avail / GIB:.1f} GiB of {where} is left")
    for alt in _alternatives(plan, metrics, n_sequences):
        if (alt_need := total(alt)) <= avail:
            raise CritlibError(f"{head}; set {_setting(plan, alt)} (about {alt_need / GIB:.1f} GiB), or free memory "
                               "(CRITLIB_MEMORY_CHECK=0 skips this check)")
    raise CritlibError(f"{head}, and no memory setting brings it under that; load the model in bf16 "
                       "(dtype: bf16), score fewer metrics, or use a machine with more memory "
                       "(CRITLIB_MEMORY_CHECK=0 skips this check)")
