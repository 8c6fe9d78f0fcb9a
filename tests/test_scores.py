"""Each metric equals a float64 brute-force computation on tiny models of every supported family."""

import copy

import pytest
import torch
import torch.nn.functional as F

from critlib.scores import score_model, scored_parameters
from tests.conftest import ARCHS, tiny


def collect(model, windows, metrics, **kw):
    out = {m: {} for m in metrics}

    def emit(metric, name, s):
        assert name not in out[metric], f"{metric} emitted twice for {name}"
        out[metric][name] = s.detach().clone()

    score_model(model, windows, metrics, emit, progress=False, **kw)
    return out


def ref_grads(model, windows, per_sequence=False):
    """float64 gradients of the mean token loss over all windows (or of each window's own mean loss)."""
    m64 = copy.deepcopy(model).double()
    params = dict(m64.named_parameters())

    def loss_of(ids):
        logits = m64(input_ids=ids).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    if not per_sequence:
        g = torch.autograd.grad(loss_of(windows), list(params.values()))
        return {n: gi for n, gi in zip(params, g)}, params
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(windows.shape[0]):
        g = torch.autograd.grad(loss_of(windows[i:i + 1]), list(params.values()))
        for n, gi in zip(params, g):
            fisher[n] += gi ** 2
    return fisher, params


def assert_close(got, ref, name):
    ref = ref.float()
    scale = ref.abs().max().clamp_min(1e-30)
    err = (got - ref).abs().max() / scale
    assert err < 2e-4, f"{name}: max error {err:.2e} relative to the largest score"


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_metrics_match_float64(arch, windows):
    model = tiny(arch)
    got = collect(model, windows, ["grad_x_weight", "grad_squared", "fisher"], batch_size=3)
    g, params = ref_grads(model, windows)
    fisher, _ = ref_grads(model, windows, per_sequence=True)
    assert set(got["grad_x_weight"]) == set(params)
    for n, p in params.items():
        assert_close(got["grad_x_weight"][n], (g[n] * p).abs(), n)
        assert_close(got["grad_squared"][n], g[n] ** 2, n)
        assert_close(got["fisher"][n], fisher[n], n)


def test_gradient_does_not_depend_on_batch_size(windows):
    model = tiny("tiny-llama")
    a = collect(model, windows, ["grad_x_weight"], batch_size=1)["grad_x_weight"]
    b = collect(model, windows, ["grad_x_weight"], batch_size=4)["grad_x_weight"]
    for n in a:
        assert_close(a[n], b[n].double(), n)


def test_magnitude_is_abs_weight():
    model = tiny("tiny-qwen2")
    got = collect(model, torch.zeros(1, 4, dtype=torch.long), ["magnitude"])["magnitude"]
    for n, p in scored_parameters(model):
        assert torch.equal(got[n], p.detach().abs())


def _inputs64(model, windows):
    """Every module's input and output in a float64 copy, concatenated over all tokens."""
    m64 = copy.deepcopy(model).double()
    seen = {}
    hs = [mod.register_forward_hook(lambda mod, a, o, name=name: seen.setdefault(name, []).append((a[0], o)))
          for name, mod in m64.named_modules() if not list(mod.children())]
    with torch.no_grad():
        m64(input_ids=windows)
    for h in hs:
        h.remove()
    return m64, seen


@pytest.mark.parametrize("arch", ARCHS)
def test_wanda_matches_float64(arch, windows):
    from transformers.pytorch_utils import Conv1D
    model = tiny(arch)
    got = collect(model, windows, ["wanda"], batch_size=3)["wanda"]
    m64, seen = _inputs64(model, windows)
    n_tok = windows.numel()
    ref = {}
    mods = dict(m64.named_modules())
    for mname, mod in mods.items():
        if mname not in seen:
            continue
        x = torch.cat([a.reshape(-1, a.shape[-1]) if a.is_floating_point() else a.reshape(-1)
                       for a, _ in seen[mname]])
        if isinstance(mod, torch.nn.Embedding):
            # position ids are broadcast over the batch: each one serves n_tok / len(x) tokens
            counts = torch.bincount(x, minlength=mod.num_embeddings).double() * (n_tok / x.numel())
            ref[id(mod.weight)] = mod.weight.abs() * counts.sqrt()[:, None]
        elif isinstance(mod, torch.nn.Linear):
            ref[id(mod.weight)] = mod.weight.abs() * x.norm(dim=0)[None, :]
        elif isinstance(mod, Conv1D):
            ref[id(mod.weight)] = mod.weight.abs() * x.norm(dim=0)[:, None]
        elif isinstance(mod, torch.nn.LayerNorm):
            xhat = F.layer_norm(x, mod.normalized_shape, eps=mod.eps)
            ref[id(mod.weight)] = mod.weight.abs() * xhat.norm(dim=0)
        elif "RMSNorm" in type(mod).__name__:
            eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6))
            xhat = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            ref[id(mod.weight)] = mod.weight.abs() * xhat.norm(dim=0)
        else:
            continue
        if isinstance(getattr(mod, "bias", None), torch.nn.Parameter):
            ref[id(mod.bias)] = mod.bias.abs() * n_tok ** 0.5
    # a tied lm_head/embedding matrix is scored through its lm_head (Linear) use
    params64 = dict(m64.named_parameters())
    for name in got:
        assert id(params64[name]) in ref, f"no reference for {name}"
        assert_close(got[name], ref[id(params64[name])], name)
    assert set(got) == set(params64)


def test_tied_matrix_scored_once():
    model = tiny("tiny-llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    got = collect(model, torch.randint(0, 96, (2, 8)), ["grad_x_weight", "magnitude", "wanda"])
    for m, d in got.items():
        assert "lm_head.weight" not in d
        assert sum(s.numel() for s in d.values()) == sum(p.numel() for p in model.parameters())


def test_tied_gradient_includes_both_uses(windows):
    """The tied matrix's gradient sums its embedding and lm_head contributions."""
    model = tiny("tiny-gpt2")
    got = collect(model, windows, ["grad_squared"])["grad_squared"]
    g, _ = ref_grads(model, windows)
    assert_close(got["transformer.wte.weight"], g["transformer.wte.weight"] ** 2, "wte")


def test_weights_and_grads_left_clean(windows):
    model = tiny("tiny-llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    collect(model, windows, ["grad_x_weight", "fisher", "wanda"])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None
    assert not any(m._forward_hooks for m in model.modules())


def test_bf16_model_scores_in_fp32(windows):
    model = tiny("tiny-llama", dtype="bf16")
    got = collect(model, windows, ["grad_x_weight", "fisher"], fisher_dtype=torch.bfloat16)
    for d in got.values():
        for s in d.values():
            assert s.dtype == torch.float32 and torch.isfinite(s).all()


def test_unused_parameter_gets_zero_scores(windows):
    model = tiny("tiny-llama")
    model.register_parameter("unused", torch.nn.Parameter(torch.ones(3)))
    got = collect(model, windows, ["grad_x_weight", "fisher"])
    assert torch.equal(got["grad_x_weight"]["unused"], torch.zeros(3))
    assert torch.equal(got["fisher"]["unused"], torch.zeros(3))
