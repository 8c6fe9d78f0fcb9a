"""Super weights after Yu et al. 2024, "The Super Weight in Large Language Models": data-free detection of
*candidates*, and a causal test that *confirms* only those whose removal alone matters.

Detection. Hook every block's MLP down projection on a few short prompts (`PROMPTS`, tokenized as the
tokenizer itself does, like the reference code's `tokenizer(text)`). On a prompt, a block spikes when its
largest |output| is at least `spike_ratio` × the median of the other blocks' largest |output| (relative) and
at least `min_activation` (absolute; the reference code flags |activation| > 50). Its candidate is the weight
linking the largest-|input| channel to the largest-|output| channel at the spiking token; each candidate
counts the prompts it spikes on.

Confirmation. A candidate is confirmed when zeroing it alone raises held-out perplexity by a ratio of at
least `effect_size` and the lower bound of that ratio's 95% interval (paired bootstrap over windows,
critlib.effects) lies above the upper bound of the random control: one random weight of the same tensor
zeroed, `random_draws` draws, a t-interval of their mean (`draws_interval`). Then the confirmed ones are
zeroed and detection runs again (a super weight can hide a smaller one, e.g. in its own block); the search
stops when a round confirms nothing new. The control is drawn only for tensors where a candidate reaches the
effect size (below it the verdict does not need it). Effects are measured through an `Evaluations` store under
`intervention_key(selection, Zero())`, so another phase zeroing the same weights on the same windows reads
the same number. The model is restored bit for bit afterwards.

Orientation: a Linear weight is [out, in], so row = output channel, col = input channel; a GPT-2 Conv1D
weight is [in, out], so row = input channel, col = output channel. `row`/`col` are always the tensor's own
coordinates (as in Phase 1's tables); `in_channel`/`out_channel` name the activations.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import zlib
from dataclasses import dataclass

import torch

from . import CritlibError
from .effects import LEVEL, Evaluations, draws_interval, intervention_key, window_set
from .layout import layer_of
from .perturb import Selection, Zero, perturbed, select_random
from .progress import track
from .scores import hooks, scored_parameters

DOWN_PROJECTIONS = ("mlp.down_proj", "mlp.c_proj", "mlp.fc2", "mlp.dense_4h_to_h", "mlp.w2")
PROMPTS = (  # short and varied; the first is Yu et al.'s
    "Apple Inc. is a worldwide tech company.",
    "The quick brown fox jumps over the lazy dog.",
    "In 1905, Albert Einstein published four papers.",
    "def add(a, b):\n    return a + b",
    "Paris is the capital and largest city of France.",
    "She opened the door and saw that the rain had stopped.",
    "1 2 3 4 5 6 7 8 9 10",
    "Water boils at 100 degrees Celsius at sea level.",
)
DEFAULT_TEXT = PROMPTS[0]
FALLBACK_IDS = [0, 11, 29, 3, 47, 18, 5, 62, 9, 33]  # prompt 0 without a tokenizer; others drawn from a seed
MAX_ITERS = 10


@dataclass(frozen=True)
class SuperWeightConfig:
    """The detection thresholds and the confirmation rule (field names are the params' keys)."""
    sw_spike_ratio: float = 10.0  # a block spikes at ≥ this × the median block's max |output| ...
    sw_min_activation: float = 50.0  # ... and at |output| ≥ this (the reference code's threshold)
    sw_effect_size: float = 1.05  # confirmed: ppl ratio when zeroed alone ≥ this, and its interval above the control
    sw_prompts: int = len(PROMPTS)  # detection prompts: the first n of PROMPTS
    sw_random_draws: int = 8  # random weights of the same tensor in the control
    seed: int = 0

    def __post_init__(self):
        if not self.sw_spike_ratio > 1:
            raise CritlibError(f"sw_spike_ratio={self.sw_spike_ratio} must be > 1 (a spike is that many times the "
                               "median block)")
        if not self.sw_min_activation >= 0:
            raise CritlibError(f"sw_min_activation={self.sw_min_activation} must be ≥ 0 (0: the relative "
                               "threshold alone)")
        if not self.sw_effect_size > 1:
            raise CritlibError(f"sw_effect_size={self.sw_effect_size} must be a perplexity ratio > 1, e.g. 1.05")
        if not 1 <= int(self.sw_prompts) <= len(PROMPTS):
            raise CritlibError(f"sw_prompts={self.sw_prompts} must lie in [1, {len(PROMPTS)}] (built-in prompts)")
        if int(self.sw_random_draws) < 2:
            raise CritlibError(f"sw_random_draws={self.sw_random_draws} must be ≥ 2: an interval needs two draws")


@dataclass(frozen=True)
class BlockActivation:
    """One block's down projection on one prompt: its largest |output| and where it is."""
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
    in_max: float  # largest |input| anywhere on the prompt


@dataclass(frozen=True)
class Candidate:
    """A spike's weight, with what it did on the prompt where it spiked most."""
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
    spike_ratio: float  # out_max / median of the other blocks' out_max, on that prompt
    iteration: int  # detection round that found it (0: nothing zeroed)
    prompts: tuple[int, ...] = ()  # the prompts it spikes on

    @property
    def coord(self) -> tuple[str, int]:
        return self.param, self.flat

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), prompts=list(self.prompts), n_prompts=len(self.prompts))


# ------------------------------------------------------------------------------------------- prompts

def default_prompt_ids(tokenizer=None, text: str = DEFAULT_TEXT) -> torch.Tensor:
    """[1, t] ids of `text` with the special tokens the tokenizer itself adds; without one, FALLBACK_IDS."""
    if tokenizer is None:
        return torch.tensor([FALLBACK_IDS])
    return torch.tensor([list(tokenizer(text).input_ids)])


def detection_prompts(tokenizer=None, n: int = len(PROMPTS), vocab_size: int = 64) -> list[dict]:
    """[{text, ids}] of the first `n` PROMPTS; without a tokenizer, FALLBACK_IDS and n-1 seeded id lists
    (text None) of the same length from ids < min(vocab_size, 64)."""
    if tokenizer is not None:
        return [{"text": t, "ids": default_prompt_ids(tokenizer, t)[0].tolist()} for t in PROMPTS[:n]]
    top = min(int(vocab_size), 64)
    out = [{"text": None, "ids": [i % top for i in FALLBACK_IDS]}]
    for i in range(1, n):
        g = torch.Generator().manual_seed(i)
        out.append({"text": None, "ids": torch.randint(0, top, (len(FALLBACK_IDS),), generator=g).tolist()})
    return out


def _ids(prompt_ids, device) -> torch.Tensor:
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise CritlibError(f"prompt_ids must be one non-empty sequence of token ids, got shape {tuple(ids.shape)}")
    return ids.to(device)


def _prompt_list(prompts) -> list:
    """One prompt ([t] or [1, t] ids) or several ([n, t] tensor, list of id lists) as a list of prompts."""
    if isinstance(prompts, torch.Tensor):
        return [prompts] if prompts.ndim < 2 or prompts.shape[0] <= 1 else list(prompts)
    prompts = list(prompts)
    return [prompts] if not prompts or not isinstance(prompts[0], (list, tuple, torch.Tensor)) else prompts


# ------------------------------------------------------------------------------------------- detection

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
                                          in_ch, out_ch, float(x[pos, in_ch]), float(y[pos, out_ch]),
                                          float(x.abs().max()))
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


def _check_thresholds(spike_ratio: float, min_activation: float) -> None:
    SuperWeightConfig(sw_spike_ratio=spike_ratio, sw_min_activation=min_activation)


def find_candidates(model: torch.nn.Module, prompts, spike_ratio: float = SuperWeightConfig.sw_spike_ratio,
                    min_activation: float = SuperWeightConfig.sw_min_activation, iteration: int = 0,
                    profiles: list | None = None) -> list[Candidate]:
    """One detection round: every spiking block's weight on each prompt, merged over prompts (each candidate
    keeps the prompts it spikes on and its values where it spiked most), in block order. `profiles`, when
    given, receives each prompt's profile as JSON-ready dicts."""
    _check_thresholds(spike_ratio, min_activation)
    found: dict[tuple[str, int], Candidate] = {}
    for i, prompt in enumerate(_prompt_list(prompts)):
        profile = activation_profile(model, prompt)
        ratios = spike_ratios(profile)
        if profiles is not None:
            profiles.append([dict(dataclasses.asdict(b), spike_ratio=r) for b, r in zip(profile, ratios)])
        for b, r in zip(profile, ratios):
            if not (r >= spike_ratio and b.out_max >= min_activation):
                continue
            row, col, flat, w = _weight(model, b)
            old = found.get((b.param, flat))
            if old is None or b.out_max > abs(old.out_activation):
                found[(b.param, flat)] = Candidate(b.param, b.module, b.layer, row, col, flat, w, b.in_channel,
                                                   b.out_channel, b.position, b.in_activation, b.out_activation, r,
                                                   iteration, (old.prompts if old else ()) + (i,))
            else:
                found[(b.param, flat)] = dataclasses.replace(old, prompts=old.prompts + (i,))
    order = {m: j for j, (m, *_) in enumerate(down_projections(model))}
    return sorted(found.values(), key=lambda c: (order[c.module], c.row, c.col))


def find_super_weights(model: torch.nn.Module, prompts, spike_ratio: float = SuperWeightConfig.sw_spike_ratio,
                       min_activation: float = SuperWeightConfig.sw_min_activation,
                       max_iters: int = MAX_ITERS) -> list[Candidate]:
    """Data-free detection alone (no data, no confirmation): candidates of rounds that zero every candidate
    found so far and detect again, until a round finds nothing new. `super_weight_study` confirms them."""
    found: list[Candidate] = []
    for it in range(int(max_iters)):
        with perturbed(model, Selection.from_list([c.coord for c in found]), Zero()):
            seen = {c.coord for c in found}
            new = [c for c in find_candidates(model, prompts, spike_ratio, min_activation, it) if c.coord not in seen]
        if not new:
            break
        found += new
    return found


# ------------------------------------------------------------------------------------------- effects

def _zero(store: Evaluations, windows: torch.Tensor, pairs) -> dict:
    """Effect of zeroing `pairs` (param, flat) on `windows`, through the store (measured once per key)."""
    sel = Selection.from_list(pairs)
    return store.measure(intervention_key(sel, Zero()), windows, lambda: perturbed(store.model, sel, Zero()))


def _random_same_tensor(model, counts: dict[str, int], exclude: set, seed: int) -> Selection:
    """counts[param] random weights of each param, none of them in `exclude`."""
    pairs = []
    for j, (name, m) in enumerate(counts.items()):
        n_ex = sum(1 for p, _ in exclude if p == name)
        cand = select_random(model, m + n_ex, seed * 1_000_003 + j, params=[name]).to_list()
        pairs += [c for c in cand if c not in exclude][:m]
    return Selection.from_list(pairs)


def random_control(store: Evaluations, windows: torch.Tensor, counts: dict[str, int], exclude: set, draws: int,
                   seed: int) -> dict:
    """Perplexity ratios of zeroing counts[param] random weights of each tensor (none in `exclude`), one per
    draw, with the t-interval of their mean: {mean, lo, hi, n, std, values}."""
    values = [_zero(store, windows, _random_same_tensor(store.model, counts, exclude, seed + d).to_list())["ppl_ratio"]
              for d in range(int(draws))]
    return dict(draws_interval(values), std=statistics.stdev(values) if len(values) > 1 else None, values=values)


def verdict(effect: dict, control: dict | None, effect_size: float) -> str:
    """"confirmed", or why not: the rule of the module docstring for one candidate (`control`: its tensor's
    random control, needed only past the effect size)."""
    if not effect["ppl_ratio"] >= effect_size:
        return "below the effect size"
    if control is None:
        raise CritlibError("a candidate past the effect size needs its tensor's random control")
    if not effect["ppl_ratio_lo"] > control["hi"]:
        return "interval overlaps the random control"
    return "confirmed"


# ------------------------------------------------------------------------------------------- generation

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


def generation(model, coords: list[tuple[str, int]], prompt_ids, tokenizer=None, max_new_tokens: int = 20) -> dict:
    """Greedy text on `prompt_ids` before and after zeroing `coords` (the same text when there are none)."""
    before = greedy(model, prompt_ids, max_new_tokens)
    if coords:
        with perturbed(model, Selection.from_list(coords), Zero()):
            after = greedy(model, prompt_ids, max_new_tokens)
    else:
        after = list(before)
    diff = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), None)
    prompt = _ids(prompt_ids, "cpu")[0].tolist()
    return {"prompt_ids": prompt, "prompt": _decode(tokenizer, prompt), "before_ids": before, "after_ids": after,
            "before": _decode(tokenizer, before), "after": _decode(tokenizer, after), "first_difference": diff,
            "n_zeroed": len(coords)}


# ------------------------------------------------------------------------------------------- the study

def super_weight_study(model: torch.nn.Module, windows: torch.Tensor, tokenizer=None,
                       config: SuperWeightConfig = SuperWeightConfig(), store: Evaluations | None = None,
                       batch_size: int = 8, max_iters: int = MAX_ITERS, max_new_tokens: int = 20) -> dict:
    """Candidates, their confirmation on `windows` and the joint effects, JSON-ready (superweights.json).

    Every effect comes from `store` (a new one when None; `batch_size` then sets its batches) under
    `intervention_key(selection, Zero())` on `windows`. Per candidate: its effect alone (with a 95% interval),
    leave-one-out (every other candidate zeroed) and its tensor's random control; `confirmed` by the rule of
    the module docstring. `super_weights` lists the confirmed ones; `joint` zeroes them all, `joint_candidates`
    every candidate."""
    if windows is None or len(windows) == 0:
        raise CritlibError("confirming super weights needs held-out windows; set n_heldout ≥ 1")
    store = store if store is not None else Evaluations(model, batch_size, config.seed)
    if store.model is not model:
        raise CritlibError("the evaluation store belongs to another model; pass the store made for this one")
    vocab = model.get_input_embeddings().num_embeddings
    prompts = detection_prompts(tokenizer, int(config.sw_prompts), vocab)
    ids = [p["ids"] for p in prompts]
    base = store.baseline(windows)

    candidates: list[Candidate] = []
    effects: dict[tuple[str, int], dict] = {}
    controls: dict[str, dict] = {}
    verdicts: dict[tuple[str, int], str] = {}
    rounds, profiles, stopped = [], [], f"max_iters={max_iters} reached"
    for it in range(int(max_iters)):
        zeroed = [c.coord for c in candidates if verdicts[c.coord] == "confirmed"]
        seen = {c.coord for c in candidates}
        with perturbed(model, Selection.from_list(zeroed), Zero()):
            new = [c for c in find_candidates(model, ids, config.sw_spike_ratio, config.sw_min_activation, it,
                                              profiles if it == 0 else None) if c.coord not in seen]
        for c in track(new, f"super weights: round {it + 1}'s candidates zeroed"):
            effects[c.coord] = _zero(store, windows, [c.coord])
        exclude = seen | {c.coord for c in new}
        for name in dict.fromkeys(c.param for c in new if effects[c.coord]["ppl_ratio"] >= config.sw_effect_size):
            if name not in controls:  # the rule needs the control only past the effect size
                controls[name] = random_control(store, windows, {name: 1}, exclude, config.sw_random_draws,
                                                config.seed * 7919 + zlib.crc32(name.encode()) % 1_000_003)
        for c in new:
            verdicts[c.coord] = verdict(effects[c.coord], controls.get(c.param), config.sw_effect_size)
        candidates += new
        n_new = sum(verdicts[c.coord] == "confirmed" for c in new)
        rounds.append({"iteration": it, "zeroed": [list(z) for z in zeroed], "new_candidates": len(new),
                       "new_confirmed": n_new})
        if not new or not n_new:
            stopped = "no new candidate" if not new else "no new candidate confirmed"
            break

    coords = [c.coord for c in candidates]
    confirmed = [c.coord for c in candidates if verdicts[c.coord] == "confirmed"]
    loo = {c: _zero(store, windows, [o for o in coords if o != c])
           for c in track(coords, "super weights: leave-one-out")}
    at = {c.coord: {"param": c.param, "row": c.row, "col": c.col, "flat": c.flat} for c in candidates}
    joint = dict(_zero(store, windows, confirmed), weights=[at[c] for c in confirmed]) if confirmed else None
    joint_all = dict(_zero(store, windows, coords), weights=[at[c] for c in coords]) if coords else None
    counts: dict[str, int] = {}
    for p, _ in confirmed:
        counts[p] = counts.get(p, 0) + 1
    joint_control = random_control(store, windows, counts, set(coords), config.sw_random_draws,
                                   config.seed * 7919 + 1_000_033) if confirmed else None

    records = []
    for c in candidates:
        e, lo, ctrl = effects[c.coord], loo[c.coord], controls.get(c.param, {})
        records.append(dict(
            c.as_dict(), confirmed=verdicts[c.coord] == "confirmed", verdict=verdicts[c.coord],
            ppl_ratio_when_zeroed=e["ppl_ratio"], ppl_ratio_when_zeroed_lo=e["ppl_ratio_lo"],
            ppl_ratio_when_zeroed_hi=e["ppl_ratio_hi"], kl_when_zeroed=e.get("kl"), kl_when_zeroed_lo=e.get("kl_lo"),
            kl_when_zeroed_hi=e.get("kl_hi"), accuracy_delta_when_zeroed=e["accuracy_delta"],
            accuracy_delta_when_zeroed_lo=e["accuracy_delta_lo"], accuracy_delta_when_zeroed_hi=e["accuracy_delta_hi"],
            loo_ppl_ratio=lo["ppl_ratio"], loo_ppl_ratio_lo=lo["ppl_ratio_lo"], loo_ppl_ratio_hi=lo["ppl_ratio_hi"],
            loo_kl=lo.get("kl"), random_ppl_ratio_mean=ctrl.get("mean"), random_ppl_ratio_lo=ctrl.get("lo"),
            random_ppl_ratio_hi=ctrl.get("hi"), random_ppl_ratio_std=ctrl.get("std"), random_n=ctrl.get("n"),
            key=e["key"], positions_when_zeroed=e["positions"]))
    first = prompts[0]["ids"]
    return {
        "candidates": records, "super_weights": [r for r in records if r["confirmed"]],
        "n_candidates": len(records), "n_confirmed": len(confirmed),
        "rule": {"effect_size": config.sw_effect_size, "level": LEVEL, "random_draws": int(config.sw_random_draws),
                 "text": f"confirmed: zeroing the weight alone multiplies held-out perplexity by ≥ "
                         f"{config.sw_effect_size:g} and the {LEVEL:.0%} interval's lower bound lies above the "
                         f"upper bound of the random control (one random weight of the same tensor zeroed, "
                         f"{int(config.sw_random_draws)} draws)"},
        "iterations": rounds, "stopped": stopped, "joint": joint, "joint_candidates": joint_all,
        "random_control": {"single_per_tensor": controls, "joint": joint_control},
        "baseline": {k: base[k] for k in ("ppl", "nll", "accuracy", "n_tokens")} | {
            "window_set": window_set(windows), "n_windows": len(windows)},
        "generation": generation(model, confirmed, first, tokenizer, max_new_tokens),
        "detection": {"prompts": prompts, "spike_ratio": config.sw_spike_ratio,
                      "min_activation": config.sw_min_activation, "max_iters": int(max_iters),
                      "profile": profiles[0] if profiles else [], "profiles": profiles},
    }


def rank_in_phase1(records: list[dict], sens) -> list[dict]:
    """Copies of `records` with `rank_<metric>`: 1-based rank in that metric's global top-K, None outside."""
    ranks = {m: {(n, f): r for r, (n, f, _) in enumerate(sens.global_top(m), 1)} for m in sens.metrics}
    return [dict(rec, **{f"rank_{m}": ranks[m].get((rec["param"], rec["flat"])) for m in sens.metrics})
            for rec in records]
