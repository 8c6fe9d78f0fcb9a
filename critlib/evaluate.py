"""Held-out evaluation: perplexity, next-token accuracy and KL divergence to reference predictions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8,
             reference: list[torch.Tensor] | None = None, keep_logprobs: bool = False,
             per_window: bool = False) -> dict:
    """Mean next-token NLL over all predicted tokens of `windows` -> ppl, accuracy; with `reference`
    (log-probs from an earlier call with keep_logprobs=True), the mean KL(reference ‖ model) per token.
    With `per_window`, also `windows`: float64 arrays of each window's summed `nll`, `correct`, `kl` and its
    `n_tokens`, and `position_nll` [window, position] (what critlib.effects bootstraps over)."""
    device = next(model.parameters()).device
    nll = correct = kl = 0.0
    n = 0
    kept = []
    rows = {"nll": [], "correct": [], "kl": [], "n_tokens": [], "position_nll": []}
    for i, batch in enumerate(windows.to(device).split(batch_size)):
        # every row but the last: log_softmax of the whole (contiguous) logits is the same per row, and faster
        logp = F.log_softmax(model(input_ids=batch).logits.float(), dim=-1)[:, :-1]
        target = batch[:, 1:]
        picked = -logp.gather(-1, target[..., None])
        hit = logp.argmax(-1) == target
        nll += float(picked.sum())
        correct += float(hit.sum())
        n += target.numel()
        if reference is not None:
            ref = reference[i].to(device)
            per_token = ref.exp().mul_(ref - logp).sum(-1).clamp_min_(0)  # KL ≥ 0; fp32 rounding is not
            kl += float(per_token.double().sum())
            if per_window:
                rows["kl"].append(per_token.double().sum(-1).cpu())
        if keep_logprobs:
            kept.append(logp.contiguous().cpu())
        if per_window:
            token_nll = picked[..., 0].double().cpu()
            rows["nll"].append(token_nll.sum(-1))
            rows["correct"].append(hit.double().sum(-1).cpu())
            rows["n_tokens"].append(torch.full((len(batch),), target.shape[1], dtype=torch.float64))
            rows["position_nll"].append(token_nll)
    out = {"ppl": (math.inf if nll / n > 709 else math.exp(nll / n)) if n else float("nan"), "nll": nll / n if n else float("nan"),
           "accuracy": correct / n if n else float("nan"), "n_tokens": n}
    if reference is not None:
        out["kl"] = kl / n
    if keep_logprobs:
        out["logprobs"] = kept
    if per_window:
        out["windows"] = {k: torch.cat(v).numpy() for k, v in rows.items() if v}
    return out
