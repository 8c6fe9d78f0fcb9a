"""Token explorer data: the scores of the embedding and lm_head rows of every token, per dimension, and each
token's rank among all tokens by its row's total score.

Row totals are exact float64 sums of the fp32 scores; the per-dimension values are kept as bfloat16
(3 significant digits, fp32's range) so a 50k-token vocabulary costs ~60 MB per metric and role.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from . import CritlibError
from .layout import is_token_matrix, parts_of
from .scores import score_model
from .sensitivity import token_text


def token_matrices(model: torch.nn.Module) -> dict[str, str]:
    """Role -> parameter name of the matrices whose rows are tokens: "embedding", "lm_head", or
    "embedding=lm_head" for a tied matrix (listed once)."""
    emb = model.get_input_embeddings().weight
    head = getattr(model.get_output_embeddings(), "weight", None)
    roles = {}
    for name, p in model.named_parameters():
        if p.ndim != 2 or p.shape[0] != emb.shape[0] or not is_token_matrix(name):
            continue
        if p is emb and head is emb:
            roles["embedding=lm_head"] = name
        else:
            comp = parts_of(name, tuple(p.shape))[0].component
            roles["lm_head" if comp == "lm_head" else "embedding"] = name
    if not roles:
        raise CritlibError("this model has no token embedding or lm_head matrix with one row per token")
    return roles


@dataclass
class TokenScores:
    """Scores of every token's rows: `rows[(metric, role)]` [vocab, dim] bf16, `sums[(metric, role)]` [vocab]
    float64, `weights[role]` the matrix itself (fp32)."""
    metrics: list[str]
    roles: dict[str, str]
    rows: dict[tuple[str, str], torch.Tensor]
    sums: dict[tuple[str, str], torch.Tensor]
    weights: dict[str, torch.Tensor]
    tokenizer: object | None = None
    _ranks: dict = field(default_factory=dict, repr=False)

    @property
    def vocab_size(self) -> int:
        return int(next(iter(self.sums.values())).numel())

    def text(self, token_id: int) -> str:
        return token_text(self.tokenizer, token_id) if self.tokenizer is not None else f"#{token_id}"

    def find(self, query) -> int:
        """A token id from an id (int or digits) or a text that is exactly one token."""
        q = str(query)
        if q.strip().lstrip("-").isdigit():
            tid = int(q)
        elif self.tokenizer is None:
            raise CritlibError(f"'{q}' is not a token id and this model has no tokenizer; give an id")
        else:
            vocab = self.tokenizer.get_vocab()
            if q in vocab:
                tid = vocab[q]
            else:
                ids = self.tokenizer(q, add_special_tokens=False)["input_ids"]
                if len(ids) != 1:
                    pieces = ", ".join(self.text(i) for i in ids)
                    raise CritlibError(f"'{q}' is {len(ids)} tokens ({pieces}), not one; give one of them")
                tid = ids[0]
        if not 0 <= tid < self.vocab_size:
            raise CritlibError(f"token id {tid} is outside the vocabulary [0, {self.vocab_size})")
        return tid

    def ranks(self, metric: str, role: str) -> np.ndarray:
        """Rank of every token by its row total (1 = highest; equal totals share the best rank)."""
        key = (metric, role)
        if key not in self._ranks:
            s = self.sums[key].numpy()
            order = np.sort(s)
            self._ranks[key] = len(s) - np.searchsorted(order, s, side="right") + 1
        return self._ranks[key]

    def row(self, metric: str, role: str, token_id: int) -> np.ndarray:
        return self.rows[(metric, role)][token_id].float().numpy()

    def top_dims(self, metric: str, role: str, token_id: int, n: int = 10) -> pd.DataFrame:
        row = self.row(metric, role, token_id)
        idx = np.argsort(-row, kind="stable")[:n]
        w = self.weights[role][token_id].numpy()
        return pd.DataFrame({"rank": np.arange(1, len(idx) + 1), "dimension": idx, "score": row[idx],
                             "share_of_row": row[idx] / row.sum() if row.sum() > 0 else np.nan,
                             "weight": w[idx]})

    def token_card(self, token_id: int, n_dims: int = 5) -> pd.DataFrame:
        """One row per (metric, role): row total, rank among tokens, and the top dimensions."""
        rows = []
        for m in self.metrics:
            for role in self.roles:
                top = self.top_dims(m, role, token_id, n_dims)
                rows.append({"metric": m, "role": role, "row_sum": float(self.sums[(m, role)][token_id]),
                             "rank": int(self.ranks(m, role)[token_id]), "of": self.vocab_size,
                             "top_dimensions": ", ".join(f"{d} ({s:.3g})" for d, s in zip(top["dimension"], top["score"]))})
        return pd.DataFrame(rows)

    def summary(self, token_ids=None) -> pd.DataFrame:
        """Per token: id, text, and for each metric and role the row total and rank."""
        ids = np.arange(self.vocab_size) if token_ids is None else np.asarray(list(token_ids), dtype=np.int64)
        out = {"token_id": ids, "token": [self.text(int(i)) for i in ids]}
        for m in self.metrics:
            for role in self.roles:
                out[f"sum:{m}:{role}"] = self.sums[(m, role)].numpy()[ids]
                out[f"rank:{m}:{role}"] = self.ranks(m, role)[ids]
        return pd.DataFrame(out)

    def top_tokens(self, metric: str, role: str, n: int) -> list[int]:
        """The n tokens with the highest row totals (ties: lower id first)."""
        s = self.sums[(metric, role)].numpy()
        return [int(i) for i in np.lexsort((np.arange(len(s)), -s))[:n]]


def token_scores(model: torch.nn.Module, windows: torch.Tensor, metrics: list[str], batch_size: int = 8,
                 fisher_dtype: torch.dtype = torch.float32, progress: bool = True, tokenizer=None) -> TokenScores:
    """Score `windows` once and keep the token matrices' scores (all other tensors are dropped at once)."""
    roles = token_matrices(model)
    by_name = {v: k for k, v in roles.items()}
    rows, sums = {}, {}

    def emit(metric, name, s):
        if name in by_name:
            role = by_name[name]
            rows[(metric, role)] = s.detach().to("cpu", torch.bfloat16)
            sums[(metric, role)] = s.detach().double().sum(dim=1).cpu()

    score_model(model, windows, metrics, emit, batch_size, fisher_dtype, progress, "token rows")
    params = dict(model.named_parameters())
    weights = {role: params[name].detach().float().cpu() for role, name in roles.items()}
    kept = [m for m in metrics if all((m, r) in rows for r in roles)]
    return TokenScores(kept, roles, rows, sums, weights, tokenizer)
