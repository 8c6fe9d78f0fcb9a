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
# # Phase 3 — The causal test: perturb the top-K and watch held-out quality
#
# Selectors: each metric's top-K, random-K (several draws), the largest-magnitude-K and each metric's
# bottom-K; methods from `perturb_methods` (zero, sign flip, scale, relative Gaussian noise, tensor mean, bit
# flips). Every perturbation is undone bit for bit before the next. All effects are measured on one window
# set, the first `perturb_heldout` held-out windows, named below (`<n>x<len>:<sha256 prefix>`), through the
# run's store of evaluations: the same intervention on the same windows is evaluated once and reads the same
# number in every phase (Phase 4 zeroing a super weight that is some metric's top-1 reads this page's value).
#
# Every effect carries a 95% confidence interval (`*_lo`, `*_hi`): for one selection, a paired bootstrap
# over the held-out windows (the windows are resampled, the same windows for both models); for the random
# control, a t-interval of the mean over its draws. With few windows or draws the intervals are wide, as
# they should be. Results: `perturbation` (one row per draw), `perturbation_summary` (per selector, method,
# K) and `perturbation_positions` (the damage by token position).

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
from IPython.display import Markdown, display

from critlib import summary, viz
from critlib.run import notebook, perturbation, sensitivity

P, ctx, out = notebook.start(globals())
p1 = sensitivity.results(ctx, out)
r3 = perturbation.run(ctx, p1, out)
display(Markdown(f"**In short.** {summary.phase_answer('03_perturbation', out)}"))
base, ws = r3["baseline"], r3["window_set"]
bos = ws["bos"]
display(Markdown(
    f"Window set **`{ws['name']}`**: the first {ws['n_windows']} held-out windows of {ws['seq_len']} tokens "
    f"({'each starting with BOS ' + repr(bos['token']) if bos else 'no BOS prepended'}). Unperturbed on it: "
    f"perplexity {base.get('ppl', float('nan')):.4g}, next-token accuracy {base.get('accuracy', float('nan')):.3f} "
    f"over {base.get('n_tokens', 0):,} predicted tokens. K ∈ {P.perturb_ks}; methods {P.perturb_methods}; "
    f"{P.n_random_draws} random draws."))

# %% [markdown]
# ## Perplexity ratio (perturbed / unperturbed)

# %%
viz.dose_response(r3["summary"], "ppl_ratio")

# %% [markdown]
# ## Next-token accuracy

# %%
viz.dose_response(r3["summary"], "accuracy", log_y=False)

# %% [markdown]
# ## KL(unperturbed ‖ perturbed) per token

# %%
viz.dose_response(r3["summary"], "kl")

# %% [markdown]
# ## At the largest K, with 95% intervals
# `interval`: `windows` = bootstrap over the held-out windows (one selection), `draws` = t-interval of the
# mean over the random draws.

# %%
s = r3["summary"]
s[s["k"] == s["k"].max()][["selector", "method", "method_arg", "k", "n_changed_mean", "ppl_ratio_mean",
                            "ppl_ratio_lo", "ppl_ratio_hi", "kl_mean", "kl_lo", "kl_hi", "accuracy_delta_mean",
                            "accuracy_delta_lo", "accuracy_delta_hi", "n_draws", "interval"]].round(5)

# %% [markdown]
# ## Where in the context the damage sits
# Mean NLL increase per token (nats) by token position, for zeroing each metric's top-K and the magnitude
# and random controls at the smallest and largest K. One average perplexity ratio hides this: damage that
# sits on the first tokens weighs more in short windows than in long ones.

# %%
pos = r3["positions"]
viz.position_damage(pos, ["selector", "k"], f"NLL increase by token position ({ws['name']})",
                    controls=("random", "magnitude"))

# %%
pos.pivot_table(index=["selector", "k"], columns="start", values="nll_increase", sort=False).round(4)
