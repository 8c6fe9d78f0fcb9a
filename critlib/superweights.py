"""Data-free super-weight detection after Yu et al. 2024, "The Super Weight in Large Language Models".

A super weight sits in an MLP down projection and, on the first token of any prompt, turns one huge input
activation into a huge output activation (the "super activation") that the residual stream carries on.
Detection: hook every block's down projection on one short prompt; a block whose max |output| exceeds
`threshold` × the median of the other blocks' max |output| spikes; its weight is the one linking the
max-|input| channel to the max-|output| channel at the spiking token. The earliest spiking block is taken
(later spikes may only be reactions to it), the weights found so far are zeroed, and detection repeats
until no new spike appears or `max_iters` is reached. The model is restored bit for bit afterwards.

Orientation: a Linear weight is [out, in], so row = output channel, col = input channel; a GPT-2 Conv1D
weight is [in, out], so row = input channel, col = output channel. `row`/`col` are always the tensor's own
coordinates (as in Phase 1's tables); `in_channel`/`out_channel` name the activations.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass

import torch

from . import CritlibError
from .evaluate import evaluate
from .layout import layer_of
from .perturb import Selection, Zero, perturbed, select_random
from .scores import hooks, scored_parameters

DOWN_PROJECTIONS = ("mlp.down_proj", "mlp.c_proj", "mlp.fc2", "mlp.dense_4h_to_h", "mlp.w2")
DEFAULT_TEXT = "Apple Inc. is a worldwide tech company."
FALLBACK_IDS = [0, 11, 29, 3, 47, 18, 5, 62, 9, 33]
THRESHOLD = 50.0


@dataclass(frozen=True)
class BlockActivation:
    """One block's down projection on the prompt: its largest |output| and where it is."""
    layer: int | None
    module: str
    param: str
    conv1d: bool
    out_max: float
    position: int  # token position of the largest |output|
    in_channel: int  # largest |input| channel at that position
    out_channel: int
    in_activation: float  # signed values at that position
    out_activation: float


@dataclass(frozen=True)
class SuperWeight:
    param: str
    module: str
    layer: int | None
    row: int
    col: int
    flat: int
    weight: float
    in_channel: int
    out_channel: int
    position: int
    in_activation: float
    out_activation: float
    spike_ratio: float  # out_max / median of the other blocks' out_max
    iteration: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_prompt_ids(tokenizer=None, text: str = DEFAULT_TEXT) -> torch.Tensor:
    """[1, t] ids: BOS (when the tokenizer has one) + `text`; without a tokenizer a fixed list from id 0."""
    if tokenizer is None:
        return torch.tensor([FALLBACK_IDS])
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return torch.tensor([ids])


def down_projections(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str, bool]]:
    """(module name, module, weight's parameter name, is Conv1D) of every block's MLP down projection."""
    from transformers.pytorch_utils import Conv1D
    names = {id(p): n for n, p in scored_parameters(model)}
    out = []
    for mname, mod in model.named_modules():
        if not mname.endswith(DOWN_PROJECTIONS) or not isinstance(mod, (torch.nn.Linear, Conv1D)):
            continue
        out.append((mname, mod, names[id(mod.weight)], isinstance(mod, Conv1D)))
    if len(out) < 2:
        raise CritlibError(f"found {len(out)} MLP down projection(s) (modules ending in "
                           f"{', '.join(DOWN_PROJECTIONS)}); super-weight detection compares blocks and needs ≥ 2")
    return out


def _ids(prompt_ids, device) -> torch.Tensor:
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise CritlibError(f"prompt_ids must be one non-empty sequence of token ids, got shape {tuple(ids.shape)}")
    return ids.to(device)


@torch.no_grad()
def activation_profile(model: torch.nn.Module, prompt_ids) -> list[BlockActivation]:
    """Each block's down-projection spike statistics on one prompt."""
    downs = down_projections(model)
    seen: dict[str, BlockActivation] = {}

    def hook(mname, pname, conv1d):
        def fn(mod, args, out):
            x, y = args[0][0].float(), out[0].float()  # [t, in], [t, out]
            pos, out_ch = divmod(int(y.abs().argmax()), y.shape[-1])
            in_ch = int(x[pos].abs().argmax())
            seen[mname] = BlockActivation(layer_of(mname), mname, pname, conv1d, float(y.abs().max()), pos,
                                          in_ch, out_ch, float(x[pos, in_ch]), float(y[pos, out_ch]))
        return fn

    with hooks([mod.register_forward_hook(hook(m, p, c)) for m, mod, p, c in downs]):
        model(input_ids=_ids(prompt_ids, model.get_input_embeddings().weight.device))
    return [seen[m] for m, _, _, _ in downs if m in seen]


def spike_ratios(profile: list[BlockActivation]) -> list[float]:
    """Each block's max |output| over the median of the other blocks' max |output|."""
    out = []
    for i, b in enumerate(profile):
        med = statistics.median([o.out_max for j, o in enumerate(profile) if j != i])
        out.append(b.out_max / med if med > 0 else (math.inf if b.out_max > 0 else 0.0))
    return out


def _weight(model, b: BlockActivation) -> tuple[int, int, int, float]:
    p = dict(scored_parameters(model))[b.param]
    row, col = (b.in_channel, b.out_channel) if b.conv1d else (b.out_channel, b.in_channel)
    flat = row * p.shape[1] + col
    return row, col, flat, float(p.detach().reshape(-1)[flat])


def find_super_weights(model: torch.nn.Module, prompt_ids, threshold: float = THRESHOLD,
                       max_iters: int = 10) -> list[SuperWeight]:
    """Super weights in detection order (one per iteration; see the module docstring)."""
    if not threshold > 1:
        raise CritlibError(f"threshold={threshold} must be > 1 (a spike is that many times the typical block)")
    found: list[SuperWeight] = []
    for it in range(int(max_iters)):
        with perturbed(model, Selection.from_list([(s.param, s.flat) for s in found]), Zero()):
            profile = activation_profile(model, prompt_ids)
            new = None
            for b, r in zip(profile, spike_ratios(profile)):
                if r <= threshold:
                    continue
                row, col, flat, w = _weight(model, b)
                if any(s.param == b.param and s.flat == flat for s in found):
                    continue
                new = SuperWeight(b.param, b.module, b.layer, row, col, flat, w, b.in_channel, b.out_channel,
                                  b.position, b.in_activation, b.out_activation, r, it)
                break
        if new is None:
            break
        found.append(new)
    return found


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt_ids, n_new: int = 20) -> list[int]:
    """Greedy continuation (full forward per token, no cache: simple and architecture-agnostic)."""
    x = _ids(prompt_ids, model.get_input_embeddings().weight.device)
    start = x.shape[1]
    for _ in range(n_new):
        nxt = model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)
        x = torch.cat([x, nxt], dim=1)
    return x[0, start:].tolist()


def _decode(tokenizer, ids):
    return None if tokenizer is None else tokenizer.decode(ids, skip_special_tokens=False)


def _mean_std(values: list[float]) -> dict:
    return {"n": len(values), "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "values": values}


def _random_same_tensor(model, counts: dict[str, int], exclude: set, seed: int) -> Selection:
    """counts[param] random weights of each param, none of them in `exclude`."""
    pairs = []
    for j, (name, m) in enumerate(counts.items()):
        n_ex = sum(1 for p, _ in exclude if p == name)
        cand = select_random(model, m + n_ex, seed * 1_000_003 + j, params=[name]).to_list()
        pairs += [c for c in cand if c not in exclude][:m]
    return Selection.from_list(pairs)


def validate_super_weights(model: torch.nn.Module, found: list[SuperWeight], heldout_windows: torch.Tensor,
                           n_random: int = 3, seed: int = 0, generate_prompt_ids=None, tokenizer=None,
                           batch_size: int = 8, max_new_tokens: int = 20) -> dict:
    """Held-out effect of zeroing each super weight alone, all jointly, all but one (leave-one-out), and
    the same for random weights of the same tensors (`n_random` draws); greedy text before/after zeroing
    all. The model is bit-identical afterwards."""
    if heldout_windows is None or len(heldout_windows) == 0:
        raise CritlibError("validating super weights needs held-out windows; set n_heldout ≥ 1")
    base = evaluate(model, heldout_windows, batch_size, keep_logprobs=True)
    ref = base.pop("logprobs")

    def ablate(pairs) -> dict:
        with perturbed(model, Selection.from_list(pairs), Zero()) as applied:
            r = evaluate(model, heldout_windows, batch_size, reference=ref) if applied.n_changed else \
                dict(base, kl=0.0)
        return {"n_zeroed": applied.n_selected, "n_changed": applied.n_changed, "ppl": r["ppl"],
                "ppl_ratio": r["ppl"] / base["ppl"], "accuracy": r["accuracy"], "kl": r["kl"]}

    coords = [(s.param, s.flat) for s in found]
    where = lambda s: {"param": s.param, "row": s.row, "col": s.col}  # noqa: E731
    single = [dict(where(s), **ablate([c])) for s, c in zip(found, coords)]
    loo = [dict(where(s), **ablate([c for c in coords if c != own])) for s, own in zip(found, coords)]
    joint = dict(ablate(coords), weights=[where(s) for s in found]) if found else None

    exclude = set(coords)
    per_tensor = {}
    for name in dict.fromkeys(s.param for s in found):
        ratios = [ablate(_random_same_tensor(model, {name: 1}, exclude, seed * 7919 + d).to_list())["ppl_ratio"]
                  for d in range(n_random)]
        per_tensor[name] = _mean_std(ratios)
    counts: dict[str, int] = {}
    for s in found:
        counts[s.param] = counts.get(s.param, 0) + 1
    joint_random = _mean_std([ablate(_random_same_tensor(model, counts, exclude, seed * 7919 + 104729 + d)
                                     .to_list())["ppl_ratio"] for d in range(n_random)]) if found else None

    prompt = default_prompt_ids(tokenizer) if generate_prompt_ids is None else _ids(generate_prompt_ids, "cpu")
    before = greedy(model, prompt, max_new_tokens)
    with perturbed(model, Selection.from_list(coords), Zero()):
        after = greedy(model, prompt, max_new_tokens)
    diff = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), None)
    prompt_list = _ids(prompt, "cpu")[0].tolist()
    generation = {"prompt_ids": prompt_list, "prompt": _decode(tokenizer, prompt_list),
                  "before_ids": before, "after_ids": after, "before": _decode(tokenizer, before),
                  "after": _decode(tokenizer, after), "first_difference": diff, "n_zeroed": len(coords)}
    return {"baseline": {k: base[k] for k in ("ppl", "nll", "accuracy", "n_tokens")}, "single": single,
            "leave_one_out": loo, "joint": joint,
            "random_control": {"n_draws": n_random, "single_per_tensor": per_tensor, "joint": joint_random},
            "generation": generation}


def super_weight_records(found: list[SuperWeight], validation: dict | None = None, sens=None) -> list[dict]:
    """One JSON-ready dict per super weight: where it is, its value and activations, and (with
    `validation`) ppl ratios when zeroed alone, leave-one-out and for random same-tensor weights."""
    records = []
    for i, s in enumerate(found):
        r = s.as_dict()
        r.update(ppl_ratio_when_zeroed=None, kl_when_zeroed=None, loo_ppl_ratio=None, loo_kl=None,
                 random_ppl_ratio_mean=None, random_ppl_ratio_std=None, random_n=None)
        if validation is not None:
            one, loo = validation["single"][i], validation["leave_one_out"][i]
            ctrl = validation["random_control"]["single_per_tensor"].get(s.param, {})
            r.update(ppl_ratio_when_zeroed=one["ppl_ratio"], kl_when_zeroed=one["kl"],
                     loo_ppl_ratio=loo["ppl_ratio"], loo_kl=loo["kl"], random_ppl_ratio_mean=ctrl.get("mean"),
                     random_ppl_ratio_std=ctrl.get("std"), random_n=ctrl.get("n"))
        records.append(r)
    return rank_in_phase1(records, sens) if sens is not None else records


def rank_in_phase1(records: list[dict], sens) -> list[dict]:
    """Copies of `records` with `rank_<metric>`: 1-based rank in that metric's global top-K, None outside."""
    ranks = {m: {(n, f): r for r, (n, f, _) in enumerate(sens.global_top(m), 1)} for m in sens.metrics}
    return [dict(rec, **{f"rank_{m}": ranks[m].get((rec["param"], rec["flat"])) for m in sens.metrics})
            for rec in records]


def super_weight_study(model: torch.nn.Module, heldout_windows: torch.Tensor, tokenizer=None, seed: int = 0,
                       batch_size: int = 8, threshold: float = THRESHOLD, max_iters: int = 10, n_random: int = 3,
                       max_new_tokens: int = 20) -> dict:
    """Detection on the default prompt and validation on `heldout_windows`, JSON-ready (superweights.json)."""
    prompt = default_prompt_ids(tokenizer)
    profile = activation_profile(model, prompt)
    found = find_super_weights(model, prompt, threshold, max_iters)
    val = validate_super_weights(model, found, heldout_windows, n_random, seed, prompt, tokenizer, batch_size,
                                 max_new_tokens)
    return {"super_weights": super_weight_records(found, val), "joint": val["joint"],
            "leave_one_out": val["leave_one_out"], "generation": val["generation"],
            "random_control": val["random_control"], "baseline": val["baseline"],
            "detection": {"prompt_ids": prompt[0].tolist(), "prompt": _decode(tokenizer, prompt[0].tolist()),
                          "threshold": threshold, "max_iters": max_iters,
                          "profile": [dict(dataclasses.asdict(b), spike_ratio=r)
                                      for b, r in zip(profile, spike_ratios(profile))]}}
