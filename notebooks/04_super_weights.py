# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: critlib (.venv)
#     language: python
#     name: critlib
# ---

# %% [markdown]
# # Phase 4 — Super weights (Yu et al. 2024): candidates and confirmed
#
# **Candidates** (data-free detection): on each of `sw_prompts` short prompts, a block whose MLP down
# projection's largest |output| is at least `sw_spike_ratio` × the median block's and at least
# `sw_min_activation` spikes; its candidate is the weight linking the largest-|input| channel to the
# largest-|output| channel at that token. Each candidate counts the prompts it spikes on.
#
# **Confirmed**: zeroing the candidate alone multiplies held-out perplexity by at least `sw_effect_size`, and
# the lower bound of that ratio's 95% interval (paired bootstrap over the windows) lies above the upper bound
# of the random control (one random weight of the same tensor zeroed, `sw_random_draws` draws, a t-interval
# of their mean). Confirmed ones are then zeroed and detection runs again, until a round confirms nothing new.
# Only confirmed super weights count in the headlines and are kept in Phase 6's quantization.
#
# Effects are measured on Phase 3's window set (the first `perturb_heldout` held-out windows) through the
# run's store of evaluations, so zeroing one weight reads the same number here and in Phase 3. Written to
# `superweights.json`, every candidate with its rank in Phase 1's global top-K of every metric.

# %% tags=["parameters"]
params_file = None  # params YAML; None: built-in defaults, the embedded default model
output_dir = None  # folder for tables and JSON; None: the output_dir of the params
write_dir = None  # where files are written; None: output_dir (critlib run writes to a staging folder)
# Any run parameter (params/default.yaml, README "Parameters"): None takes it from params_file, else
# the built-in default; a value here, or papermill's `-p key value` / `-f params/X.yaml`, overrides it.
model = None
tokenizer = None
revision = None
trust_remote_code = None
data = None
text_field = None
seq_len = None
n_sequences = None
n_heldout = None
batch_size = None
prepend_bos = None
metrics = None
topk_per_layer = None
topk_global = None
seed = None
dtype = None
device = None
exact_stats = None
chunk_size = None
fisher_dtype = None
kernel = None
gradient_checkpointing = None
sparse_embedding_grad = None
device_map = None
max_memory = None
quant_bits = None
quant_group_size = None
quant_symmetric = None
quant_keep_percents = None
quant_clip_z = None
quant_include_head = None
prune_sparsities = None
prune_modes = None
prune_protect_k = None
bitflip_top_n = None
bitflip_bits = None
bitflip_eval_windows = None
bitflip_break_factor = None
bitflip_cap = None
bitflip_draws = None
perturb_ks = None
perturb_methods = None
n_random_draws = None
stability_seeds = None
stability_data = None
stability_tokens = None
perturb_heldout = None
applications_heldout = None
token_explorer_top = None
sw_spike_ratio = None
sw_min_activation = None
sw_effect_size = None
sw_prompts = None
sw_random_draws = None

# %%
import pandas as pd
from IPython.display import Markdown, display

from critlib import summary, viz
from critlib.run import notebook, sensitivity, super_weights

P, ctx, out = notebook.start(globals())
p1 = sensitivity.results(ctx, out)
r4 = super_weights.run(ctx, p1, out)
display(Markdown(f"**In short.** {summary.phase_answer('04_super_weights', out)}"))
cands, sw, base = r4["candidates"], r4["super_weights"], r4["baseline"]
display(Markdown(
    f"**{len(sw)} confirmed super weight(s) of {len(cands)} candidate(s).** Rule: {r4['rule']['text']}.\n\n"
    f"Window set **`{base['window_set']}`** ({base['n_windows']} held-out windows, Phase 3's): unperturbed "
    f"perplexity {base['ppl']:.4g} over {base['n_tokens']:,} predicted tokens. Detection: "
    f"{len(r4['detection']['prompts'])} prompts, spike ≥ {r4['detection']['spike_ratio']:g} × the median block "
    f"and |output| ≥ {r4['detection']['min_activation']:g}; {len(r4['iterations'])} round(s), stopped: "
    f"{r4['stopped']}."))

# %% [markdown]
# ## Down-projection maxima per block
# Each block's largest |output| over the median of the other blocks' (the spike ratio), on every detection
# prompt; the dashed line is `sw_spike_ratio`. Below it, the first prompt's maxima themselves.

# %%
viz.spike_ratios(r4["detection"])

# %%
viz.activation_profile(r4["detection"]["profile"])

# %% [markdown]
# ## Candidates: effect of zeroing each alone, leave-one-out, and the random control
# `ppl_ratio_when_zeroed` (`_lo`, `_hi`: 95% bootstrap interval over the windows); `loo_ppl_ratio`: every
# other candidate zeroed; `random_ppl_ratio_*`: one random weight of the same tensor zeroed (mean and
# t-interval over draws; drawn only for tensors where a candidate reaches the effect size); `n_prompts`:
# detection prompts it spikes on; `iteration`: the round that found it (0: nothing zeroed); `rank_<metric>`:
# 1-based rank in that metric's global top-K (empty: outside).

# %%
cols = ["param", "layer", "row", "col", "weight", "n_prompts", "iteration", "out_activation", "spike_ratio",
        "ppl_ratio_when_zeroed", "ppl_ratio_when_zeroed_lo", "ppl_ratio_when_zeroed_hi", "kl_when_zeroed",
        "loo_ppl_ratio", "loo_ppl_ratio_lo", "loo_ppl_ratio_hi", "random_ppl_ratio_mean", "random_ppl_ratio_lo",
        "random_ppl_ratio_hi", "confirmed", "verdict"]
table = pd.DataFrame(cands, columns=cols + [f"rank_{m}" for m in P.metrics])
table

# %%
if cands:
    display(viz.super_weight_candidates(cands, r4["rule"]["effect_size"]))
else:
    display(Markdown("No candidate: no block spikes on any prompt, so there is nothing to confirm."))

# %% [markdown]
# ## Joint effects
# All confirmed super weights zeroed together (what Phase 6 keeps), every candidate zeroed together, and
# the random control for the confirmed set (as many random weights of the same tensors, over draws).

# %%
rows = []
for what, e in (("all confirmed", r4["joint"]), ("all candidates", r4["joint_candidates"])):
    if e:
        rows.append({"zeroed": what, "n_weights": len(e["weights"]), "n_changed": e["n_changed"],
                     **{k: e[k] for k in ("ppl", "ppl_ratio", "ppl_ratio_lo", "ppl_ratio_hi", "kl", "kl_lo", "kl_hi",
                                          "accuracy_delta", "accuracy_delta_lo", "accuracy_delta_hi")}})
ctrl = r4["random_control"]["joint"]
if ctrl:
    rows.append({"zeroed": "random, same tensors as the confirmed", "n_weights": len(sw), "ppl_ratio": ctrl["mean"],
                 "ppl_ratio_lo": ctrl["lo"], "ppl_ratio_hi": ctrl["hi"]})
pd.DataFrame(rows) if rows else Markdown("Nothing to zero jointly.")

# %% [markdown]
# ## Where the damage sits: NLL increase by token position
# Mean increase of the next-token loss (nats) in each position bucket when each confirmed super weight is
# zeroed alone: a super weight's damage depends on the context, so a single ratio hides where it lands.

# %%
pos = pd.DataFrame([dict(p, weight=f"L{r['layer']} [{r['row']},{r['col']}]") for r in sw
                    for p in r["positions_when_zeroed"]])
if len(pos):
    display(pos.pivot(index=["start", "stop"], columns="weight", values="nll_increase"))
    display(viz.position_damage(pos, ["weight"], "NLL increase by token position when zeroed alone"))
else:
    display(Markdown("No confirmed super weight."))

# %% [markdown]
# ## Generation before and after zeroing the confirmed ones

# %%
g = r4["generation"]
display(Markdown(f"**prompt** {g['prompt']!r}\n\n**before** {g['before']!r}\n\n**after** {g['after']!r}\n\n"
                 f"weights zeroed: {g['n_zeroed']}; first different token: {g['first_difference']}"))
