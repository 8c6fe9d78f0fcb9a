"""Held-out evaluation: perplexity, next-token accuracy and KL divergence to reference predictions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8,
             reference: list[torch.Tensor] | None = None, keep_logprobs: bool = False) -> dict:
    """Mean next-token NLL over all predicted tokens of `windows` -> ppl, accuracy; with `reference`
    (log-probs from an earlier call with keep_logprobs=True), the mean KL(reference ‖ model) per token."""
    device = next(model.parameters()).device
    nll = correct = kl = 0.0
    n = 0
    kept = []
    for i, batch in enumerate(windows.to(device).split(batch_size)):
        logits = model(input_ids=batch).logits[:, :-1].float()
        logp = F.log_softmax(logits, dim=-1)
        target = batch[:, 1:]
        nll += float(-logp.gather(-1, target[..., None]).sum())
        correct += float((logp.argmax(-1) == target).sum())
        n += target.numel()
        if reference is not None:
            ref = reference[i].to(device)
            per_token = (ref.exp() * (ref - logp)).sum(-1).clamp_min_(0)  # KL ≥ 0; fp32 rounding is not
            kl += float(per_token.double().sum())
        if keep_logprobs:
            kept.append(logp.cpu())
    out = {"ppl": (math.inf if nll / n > 709 else math.exp(nll / n)) if n else float("nan"), "nll": nll / n if n else float("nan"),
           "accuracy": correct / n if n else float("nan"), "n_tokens": n}
    if reference is not None:
        out["kl"] = kl / n
    if keep_logprobs:
        out["logprobs"] = kept
    return out
