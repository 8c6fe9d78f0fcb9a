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
# # Phase 6 — Applications: putting the rankings to use
#
# Three measured experiments on the held-out windows, each selector (every metric of the run) next to the
# magnitude and random baselines:
#
# - **quantization**: round-to-nearest per-group fake quantization of every Linear weight, with the top p % of
#   each tensor kept in original precision, chosen by each selector (`quant_bits`, `quant_keep_percents`);
# - **pruning**: zero the lowest-scored share of the Linear weights, per tensor and model-wide
#   (`prune_sparsities`, `prune_modes`);
# - **bit flips**: what one flipped bit of a selector's top weights does, and how many flips, most damaging
#   first, break the model (ppl ≥ `bitflip_break_factor` × base) against random flips.
#
# Every change is undone bit for bit before the next. Tables: `quantization`, `pruning`, `bitflip_single`,
# `bitflip_ranked`, `bitflip_break` (`.parquet` + `.csv`); the critical weights as `critical_fingerprint.json`
# and `freeze_masks.safetensors`. The same runs from the shell: `critlib applications -p params/X.yaml`.

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
from critlib.applications import selectors
from critlib.run import applications, notebook, sensitivity

P, ctx, out = notebook.start(globals())
p1 = sensitivity.results(ctx, out)
r6 = applications.run(ctx, p1, out)
display(Markdown(f"**In short.** {summary.phase_answer('06_applications', out)}"))
ref = r6["pruning"][r6["pruning"]["kind"] == "reference"]
sw = r6["super_weights"]
display(Markdown(
    f"Unperturbed held-out perplexity {ref['ppl'].iloc[0]:.5g} over {r6['heldout_windows']} windows of "
    f"{P.seq_len} tokens (bit flips: the first {min(P.bitflip_eval_windows, len(ctx.windows.heldout))}). "
    f"Selectors: {', '.join(selectors(P.metrics))}. "
    + (f"Super weights found (kept in the super-weight-aware quantization): "
       f"{', '.join(f'`{n}[{r},{c}]`' for n, r, c in sw)}." if sw else "No super weight found.")))

# %% [markdown]
# ## Quantization with kept outliers
# Held-out perplexity against the share of each tensor kept in original precision (each tensor keeps its own
# top p %); the dashed line is quantization alone. A metric that finds the weights quantization hurts most
# sits below the magnitude and random lines. Hover for the memory (bits per weight, outliers at 6 bytes each).

# %%
viz.quantization_curves(r6["quantization"])

# %%
q = r6["quantization"]
q[["bits", "clip_z", "selector", "kind", "keep_percent", "n_kept", "bits_per_weight", "ppl", "ppl_ratio", "kl",
   "accuracy"]].round(5)

# %% [markdown]
# ## Pruning
# Zeroing the lowest-scored Linear weights: a better metric keeps perplexity lower at the same sparsity.

# %%
viz.pruning_curves(r6["pruning"])

# %%
r6["pruning"][["mode", "sparsity", "selector", "kind", "protected", "achieved_sparsity", "n_changed", "ppl",
               "ppl_ratio", "kl", "accuracy"]].round(5)

# %% [markdown]
# ## Bit flips: one flipped bit in a top weight
# Each selector's top-N weights, each bit of `bitflip_bits` flipped alone. Hatched bars at the top: the flip
# made the perplexity NaN or infinite.

# %%
viz.bitflip_damage(r6["bitflip_single"])

# %%
r6["bitflip_ranked"].head(10)[["selector", "rank", "param", "row", "col", "bit", "bit_kind", "value_before",
                               "value_after", "ppl", "ppl_ratio", "kl"]]

# %% [markdown]
# ## Flips to break the model
# The measured single flips applied together, most damaging first, until perplexity reaches the break factor
# (doubling, then bisection), against flips of random weights at random bit positions.

# %%
viz.flips_to_break_bars(r6["bitflip_break"])

# %%
r6["bitflip_break"][["selector", "kind", "order", "draw", "n_available", "n_flips", "base_ppl", "target_ppl",
                     "ppl_before", "ppl_at", "n_evals"]]

# %% [markdown]
# ## Protecting the critical weights
# The union of each metric's global top-K as an integrity fingerprint (`critlib verify MODEL
# critical_fingerprint.json` checks a deployed copy) and as freeze masks for fine-tuning
# (`critlib.freeze.freeze_weights(model, load_masks("freeze_masks.safetensors"), optimizer)`). The check below
# flips one exponent bit of the top weight inside a `perturbed` block, verifies, and verifies again once the
# block has restored it.

# %%
from critlib.integrity import format_report

pr = r6["protection"]
name, flat, metric = pr["flipped_weight"]
display(Markdown(
    f"{pr['n_critical']:,} critical weights (top-{pr['k']} of each metric) in `{pr['fingerprint'].name}` and "
    f"`{pr['masks'].name}` ({pr['mask_tensors']} mask tensors, {pr['masks'].stat().st_size / 2**20:.1f} MiB).\n\n"
    f"**Bit {pr['flipped_bit']} of `{name}` flat {flat}** (top-1 of {metric}) flipped:\n```\n"
    f"{format_report(pr['flipped_report'])}\n```\nAfter the flip was undone:\n```\n"
    f"{format_report(pr['restored_report'])}\n```"))
