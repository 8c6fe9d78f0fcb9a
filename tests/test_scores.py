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
            fisher[n] += gi ** 2 / windows.shape[0]  # the mean over sequences
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
    n_seq = windows.shape[0]  # norms are √(Σx² / n_sequences), as locuslab/wanda's scaler_row
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
            ref[id(mod.weight)] = mod.weight.abs() * (counts / n_seq).sqrt()[:, None]
        elif isinstance(mod, torch.nn.Linear):
            ref[id(mod.weight)] = mod.weight.abs() * x.norm(dim=0)[None, :] / n_seq ** 0.5
        elif isinstance(mod, Conv1D):
            ref[id(mod.weight)] = mod.weight.abs() * x.norm(dim=0)[:, None] / n_seq ** 0.5
        elif isinstance(mod, torch.nn.LayerNorm):
            xhat = F.layer_norm(x, mod.normalized_shape, eps=mod.eps)
            ref[id(mod.weight)] = mod.weight.abs() * xhat.norm(dim=0) / n_seq ** 0.5
        elif "RMSNorm" in type(mod).__name__:
            eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6))
            xhat = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            ref[id(mod.weight)] = mod.weight.abs() * xhat.norm(dim=0) / n_seq ** 0.5
        else:
            continue
        if isinstance(getattr(mod, "bias", None), torch.nn.Parameter):
            ref[id(mod.bias)] = mod.bias.abs() * (n_tok / n_seq) ** 0.5
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


# row-blocked embedding/lm_head gradients (memory_saving(sparse_embedding=True)): the plain path's scores

ALL_METRICS = ["grad_x_weight", "grad_squared", "fisher", "magnitude", "wanda"]


def blas_sums_slices_as_the_whole() -> bool:
    """Whether this BLAS sums each row of a GEMM on a row slice (Gᵀ[r0:r1]·x) in the order it sums that row
    of the whole product. The row-blocked lm_head gradient relies on nothing else to be bit-equal to the
    plain path; MKL does (every shape tried), another BLAS may block a small GEMM differently."""
    gen = torch.Generator().manual_seed(0)
    for n, v, h in ((10, 96, 32), (40, 96, 32), (254, 1000, 37)):
        go, x = torch.randn(n, v, generator=gen), torch.randn(n, h, generator=gen)
        whole = go.t().mm(x)
        if not all(torch.equal(go[:, r:r + 7].t().mm(x), whole[r:r + 7]) for r in range(0, v, 7)):
            return False
    return True


def assert_same(got, ref, what):
    """Bit-equal where the BLAS sums a slice as the whole (the only order that can differ), else to 1e-6
    of the largest score: a GEMM's summation order is all that differs."""
    if blas_sums_slices_as_the_whole():
        assert torch.equal(got, ref), what
    else:
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()), msg=what)


@pytest.fixture
def small_blocks(monkeypatch):
    """Row blocks of a few rows, so that tiny matrices (96 × 32) are made and scored in many blocks."""
    import critlib.scores as scores
    monkeypatch.setattr(scores, "ROW_BLOCK", 100)
    seen = []
    block = scores._Blocked.block

    def spy(self, parts, r0, r1):
        seen.append((self.name, tuple(p[0] for p in parts)))
        return block(self, parts, r0, r1)
    monkeypatch.setattr(scores._Blocked, "block", spy)
    return seen


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-mistral", "tiny-phi3"])
@pytest.mark.parametrize("batch_size", [4, 3])
def test_row_blocked_gradients_equal_the_plain_path(arch, batch_size, windows, small_blocks):
    """Every metric's scores of every parameter are those of the plain path, for tied (llama, qwen2, gpt2)
    and untied (mistral, phi3) lm_heads, in one micro-batch and in several (and one per sequence for
    fisher), with and without activation checkpointing."""
    from critlib.scores import memory_saving
    model = tiny(arch)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    ref = collect(model, windows, ALL_METRICS, batch_size=batch_size)
    for checkpointing in (False, True):
        small_blocks.clear()
        with memory_saving(model, checkpointing=checkpointing, sparse_embedding=True):
            got = collect(model, windows, ALL_METRICS, batch_size=batch_size)
        names = {n for n, p in model.named_parameters() if p is emb or p is head}
        assert {n for n, _ in small_blocks} == names  # the embedding and lm_head went through row blocks
        assert {parts for _, parts in small_blocks} == (
            {("head", "embedding")} if emb is head else {("head",), ("embedding",)})
        for m in ALL_METRICS:
            assert got[m].keys() == ref[m].keys()
            for name in ref[m]:
                assert_same(got[m][name], ref[m][name], (checkpointing, m, name))
    assert not model.get_input_embeddings().sparse and "forward" not in model.get_output_embeddings().__dict__


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-mistral"])
def test_analyze_with_row_sinks_equals_the_plain_path(arch, windows, small_blocks):
    """Scores handed over a row block at a time (critlib.sensitivity's sinks: gradients of the embedding and
    lm_head, magnitude and wanda of every large matrix) give the plain path's top-K, bottom-K, statistics,
    histograms, layer/component sums and gathered scores, all bit for bit: blocks hold whole statistics
    chunks, each block's top-K is exact, and the chunks' partial sums are merged once, as for a whole tensor."""
    import critlib.scores as scores
    from critlib.scores import memory_saving
    from critlib.sensitivity import analyze
    scores.ROW_BLOCK = 600  # (put back by small_blocks' monkeypatch) blocks of 16 rows: 2 chunks of 256
    model = tiny(arch)
    kw = {"topk_global": 30, "topk_per_layer": 5, "progress": False, "chunk_size": 256, "bottomk": 7, "batch_size": 2}
    ref = analyze(model, windows, metrics=ALL_METRICS, **kw)
    with memory_saving(model, sparse_embedding=True):
        got = analyze(model, windows, metrics=ALL_METRICS, **kw)
    assert small_blocks
    exact = blas_sums_slices_as_the_whole()
    for m in ALL_METRICS:
        for name in ref.order:
            for a, b in ((got.topk[m], ref.topk[m]), (got.bottom[m], ref.bottom[m])):
                for x, y in zip(a.candidates[name], b.candidates[name]):
                    assert torch.equal(x, y) if exact else torch.allclose(x.double(), y.double(), rtol=1e-6), (m, name)
        assert torch.equal(got.hist[m], ref.hist[m]) or not exact, m
    if exact:
        assert got.stats == ref.stats and got.cells == ref.cells and got.gathered == ref.gathered


def test_row_blocks_never_make_a_matrix_the_size_of_the_embedding(windows, monkeypatch):
    """With row sinks, no tensor of the embedding matrix's size is made during a scoring pass (other than
    the weight itself): not its gradient, not its scores. (Fisher sums are left out: they are whole by
    definition.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    import critlib.scores as scores
    from critlib.scores import memory_saving
    from critlib.sensitivity import analyze
    monkeypatch.setattr(scores, "ROW_BLOCK", 100)
    model = tiny("tiny-llama")
    shape = tuple(model.get_input_embeddings().weight.shape)  # (96, 32): no other tensor has it or (32, 96)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    made = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and tuple(t.shape) in (shape, shape[::-1]) and \
                        t.untyped_storage().data_ptr() not in weights:
                    made.append((str(func), tuple(t.shape)))
            return out

    metrics = ["grad_x_weight", "grad_squared", "magnitude", "wanda"]
    kw = {"topk_global": 30, "topk_per_layer": 5, "progress": False, "chunk_size": 64, "batch_size": 4}
    with Watch():
        analyze(model, windows, metrics=metrics, **kw)
    assert made  # the plain path does make them: the watch sees what it should
    made.clear()
    with memory_saving(model, sparse_embedding=True), Watch():
        analyze(model, windows, metrics=metrics, **kw)
    assert made == []


def test_memory_saving_auto_and_restore():
    """`auto` turns both on for a model with checkpointable decoder layers; everything is put back."""
    from critlib.scores import memory_saving, resolve_memory_saving, saving_of
    model = tiny("tiny-llama")
    assert resolve_memory_saving(model, "auto", "auto") == (True, True)
    assert resolve_memory_saving(model, False, "auto") == (False, True)
    assert resolve_memory_saving(torch.nn.Sequential(torch.nn.Linear(2, 2)), "auto", "auto") == (False, True)
    with memory_saving(model, "auto", "auto"):
        assert saving_of(model) == (True, True) and model.get_input_embeddings().sparse
        with memory_saving(model, False, False):
            assert saving_of(model) == (False, False)
        assert saving_of(model) == (True, True)
    assert saving_of(model) == (False, False) and not model.get_input_embeddings().sparse


def test_a_row_blocked_matrix_used_elsewhere_is_refused(windows):
    """A model that also uses its embedding matrix outside the embedding/lm_head modules gets a clear error
    rather than a gradient missing that use."""
    from critlib import CritlibError
    from critlib.scores import memory_saving
    model = tiny("tiny-mistral")
    head = model.get_output_embeddings()
    norm = model.model.norm
    handle = norm.register_forward_hook(lambda mod, args, out: out + 0 * head.weight.sum())
    try:
        with memory_saving(model, sparse_embedding=True), pytest.raises(CritlibError, match="sparse_embedding_grad"):
            collect(model, windows, ["grad_x_weight"])
    finally:
        handle.remove()
    assert all(p.grad is None for p in model.parameters())


def test_wanda_equals_the_reference_codes_definition(windows):
    """An independent transcription of locuslab/wanda (lib/layerwrapper.py, WrappedGPT.add_batch, and
    lib/prune.py): per Linear layer a running `scaler_row`, updated per batch of `tmp` samples as
    scaler_row *= nsamples / (nsamples + tmp); nsamples += tmp; scaler_row += ‖inp‖₂² / nsamples (norm over
    every token of the batch), and W_metric = |W| · √scaler_row."""
    model = tiny("tiny-llama")
    state = {}

    def add_batch(name):
        def hook(mod, args, out):
            inp = args[0].detach().float()
            tmp = inp.shape[0]
            inp = inp.reshape(-1, inp.shape[-1]).t()
            row, n = state.get(name, (torch.zeros(inp.shape[0]), 0))
            row = row * (n / (n + tmp))
            n += tmp
            state[name] = (row + torch.norm(inp, p=2, dim=1) ** 2 / n, n)
        return hook

    handles = [m.register_forward_hook(add_batch(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        for batch in windows.split(3):  # the reference feeds calibration samples in batches
            model(input_ids=batch)
    for h in handles:
        h.remove()
    got = collect(model, windows, ["wanda"], batch_size=2)["wanda"]
    assert len(state) == 2 * 7
    for name, (row, _) in state.items():
        ref = dict(model.named_parameters())[f"{name}.weight"].detach().abs() * row.sqrt()[None, :]
        torch.testing.assert_close(got[f"{name}.weight"], ref, rtol=2e-5, atol=0)


def test_fisher_is_the_mean_over_sequences_whatever_the_batch_size(windows):
    model = tiny("tiny-llama")
    ref, _ = ref_grads(model, windows, per_sequence=True)
    for bs in (1, 3, 4):
        got = collect(model, windows, ["fisher"], batch_size=bs)["fisher"]
        for name, f in got.items():
            assert_close(f, ref[name], f"{name} (batch_size {bs})")
