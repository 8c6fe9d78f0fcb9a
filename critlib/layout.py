"""Where a weight sits: its block index and component, by name rules that hold for Llama, Mistral, Qwen2,
Phi-3 and GPT-2 (fused projections are split into their parts by row or column range)."""

from __future__ import annotations

import re
from dataclasses import dataclass

COMPONENTS = ("embed", "attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down", "norm",
              "lm_head", "other")

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
_RULES = [  # (regex on the module path, component); first match wins
    (r"(embed_tokens|wte|wpe|embed_in|word_embeddings|embed_positions)$", "embed"),
    (r"lm_head$|embed_out$", "lm_head"),
    (r"(q_proj|query)$", "attn_q"),
    (r"(k_proj|key)$", "attn_k"),
    (r"(v_proj|value)$", "attn_v"),
    (r"(o_proj|out_proj|attn\.c_proj|self_attn\.dense|attention\.dense)$", "attn_o"),
    (r"gate_proj$|w1$", "mlp_gate"),
    (r"(up_proj|c_fc|fc1|w3)$", "mlp_up"),
    (r"(down_proj|mlp\.c_proj|fc2|w2)$", "mlp_down"),
    (r"(norm|ln_\d|ln_f|layernorm|layer_norm)$", "norm"),
]


@dataclass(frozen=True)
class Part:
    """A component's slice of a parameter: indices [start, stop) along `dim` (dim None: the whole tensor)."""
    component: str
    dim: int | None = None
    start: int = 0
    stop: int = 0


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _module_path(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def parts_of(name: str, shape: tuple[int, ...], config=None) -> list[Part]:
    """The components of parameter `name`; a fused projection gives one Part per piece."""
    mod = _module_path(name)
    if re.search(r"(qkv_proj|c_attn|query_key_value|Wqkv)$", mod):
        return _split_qkv(name, shape, config)
    if re.search(r"gate_up_proj$", mod):
        dim = 0
        half = shape[dim] // 2
        return [Part("mlp_gate", dim, 0, half), Part("mlp_up", dim, half, shape[dim])]
    for pattern, comp in _RULES:
        if re.search(pattern, mod):
            return [Part(comp)]
    return [Part("other")]


def _split_qkv(name: str, shape, config) -> list[Part]:
    # GPT-2's Conv1D keeps weights as [in, out] (split the columns); Linear as [out, in] (split the rows).
    gpt2 = name.endswith("c_attn.weight")
    dim = 1 if gpt2 else 0
    if len(shape) == 1:
        dim = 0
    total = shape[dim]
    n_heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    if n_heads and n_kv and total % (n_heads + 2 * n_kv) == 0:
        head = total // (n_heads + 2 * n_kv)
        q, kv = n_heads * head, n_kv * head
    else:
        q = kv = total // 3
    return [Part("attn_q", dim, 0, q), Part("attn_k", dim, q, q + kv), Part("attn_v", dim, q + kv, total)]


def component_at(parts: list[Part], row: int, col: int | None) -> str:
    """The component of element (row, col) of a parameter split into `parts`."""
    for p in parts:
        if p.dim is None:
            return p.component
        idx = row if p.dim == 0 else col
        if p.start <= idx < p.stop:
            return p.component
    return "other"


def is_token_matrix(name: str) -> bool:
    """True for the token embedding and lm_head matrices, whose rows are tokens."""
    mod = _module_path(name)
    return bool(re.search(r"(embed_tokens|wte|embed_in|word_embeddings|lm_head|embed_out)$", mod))
