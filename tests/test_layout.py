"""Name rules give the right layer and component on every supported family."""

import pytest

from critlib.layout import COMPONENTS, component_at, is_token_matrix, layer_of, parts_of
from tests.conftest import tiny

EXPECTED = {
    "tiny-llama": {"model.embed_tokens.weight": "embed", "model.layers.1.self_attn.q_proj.weight": "attn_q",
                   "model.layers.1.self_attn.k_proj.weight": "attn_k", "model.layers.0.self_attn.v_proj.weight": "attn_v",
                   "model.layers.0.self_attn.o_proj.weight": "attn_o", "model.layers.0.mlp.gate_proj.weight": "mlp_gate",
                   "model.layers.0.mlp.up_proj.weight": "mlp_up", "model.layers.1.mlp.down_proj.weight": "mlp_down",
                   "model.layers.0.input_layernorm.weight": "norm", "model.norm.weight": "norm"},
    "tiny-mistral": {"lm_head.weight": "lm_head", "model.layers.0.post_attention_layernorm.weight": "norm",
                     "model.layers.1.mlp.down_proj.weight": "mlp_down"},
    "tiny-qwen2": {"model.layers.0.self_attn.q_proj.bias": "attn_q", "model.layers.0.self_attn.v_proj.bias": "attn_v"},
    "tiny-phi3": {"model.layers.0.mlp.down_proj.weight": "mlp_down", "model.layers.1.self_attn.o_proj.weight": "attn_o",
                  "lm_head.weight": "lm_head"},
    "tiny-gpt2": {"transformer.wte.weight": "embed", "transformer.wpe.weight": "embed",
                  "transformer.h.0.ln_1.weight": "norm", "transformer.h.1.ln_2.bias": "norm",
                  "transformer.h.0.attn.c_proj.weight": "attn_o", "transformer.h.0.mlp.c_fc.weight": "mlp_up",
                  "transformer.h.1.mlp.c_proj.weight": "mlp_down", "transformer.ln_f.weight": "norm"},
}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_components_and_layers(arch):
    model = tiny(arch)
    names = dict(model.named_parameters())
    for name, comp in EXPECTED[arch].items():
        assert name in names, name
        parts = parts_of(name, tuple(names[name].shape), model.config)
        assert [p.component for p in parts] == [comp], name
    for name, p in names.items():
        parts = parts_of(name, tuple(p.shape), model.config)
        assert all(x.component in COMPONENTS and x.component != "other" for x in parts), name
        layer = layer_of(name)
        assert (layer is not None) == (".layers." in name or ".h." in name), name


def test_fused_projections_split_by_rows_and_columns():
    phi = tiny("tiny-phi3")  # qkv_proj is [q + k + v, hidden]; gate_up_proj is [2 * inter, hidden]
    w = phi.model.layers[0].self_attn.qkv_proj.weight
    parts = parts_of("model.layers.0.self_attn.qkv_proj.weight", tuple(w.shape), phi.config)
    q = phi.config.num_attention_heads * (phi.config.hidden_size // phi.config.num_attention_heads)
    assert component_at(parts, 0, 5) == "attn_q" and component_at(parts, q - 1, 0) == "attn_q"
    assert component_at(parts, q, 0) == "attn_k" and component_at(parts, w.shape[0] - 1, 0) == "attn_v"
    gu = parts_of("model.layers.0.mlp.gate_up_proj.weight", (96, 32), phi.config)
    assert component_at(gu, 47, 0) == "mlp_gate" and component_at(gu, 48, 0) == "mlp_up"
    gpt = tiny("tiny-gpt2")  # Conv1D c_attn is [in, 3 * hidden]: split the columns
    parts = parts_of("transformer.h.0.attn.c_attn.weight", (32, 96), gpt.config)
    assert [component_at(parts, 3, c) for c in (0, 31, 32, 64, 95)] == ["attn_q", "attn_q", "attn_k", "attn_v", "attn_v"]
    bias = parts_of("transformer.h.0.attn.c_attn.bias", (96,), gpt.config)
    assert [component_at(bias, r, None) for r in (0, 40, 70)] == ["attn_q", "attn_k", "attn_v"]


def test_token_matrices():
    assert is_token_matrix("model.embed_tokens.weight") and is_token_matrix("lm_head.weight")
    assert is_token_matrix("transformer.wte.weight") and not is_token_matrix("transformer.wpe.weight")
    assert not is_token_matrix("model.layers.0.mlp.up_proj.weight")
