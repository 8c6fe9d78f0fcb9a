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
# # Phase 1 — Sensitivity: which weights matter, by each metric
#
# Every weight of the model is scored by each metric of the run (`grad_x_weight` = |g·w|, `grad_squared` = g²,
# `fisher` = Σᵢ gᵢ², `magnitude` = |w|, `wanda` = |w|·‖x‖). Nothing here holds all scores at once: the
# histograms come from exact counts in float32 bit-pattern bins, top-K lists are exact.
#
# Run alone: `papermill notebooks/01_sensitivity.ipynb out.ipynb -f params/default.yaml`; the whole report:
# `make run` or `critlib run -p params/X.yaml`.

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

from critlib import summary, tables, viz
from critlib.run import notebook, sensitivity

P, ctx, out = notebook.start(globals())
p1 = sensitivity.run(ctx, out)
display(Markdown(f"**In short.** {summary.phase_answer('01_sensitivity', out)}"))
sens = p1.sens
display(Markdown(f"**Model** `{P.model}` ({ctx.loaded.info.get('n_params', 0):,} parameters, {P.dtype}), "
                 f"**data** `{P.data}`: {len(ctx.windows.score)} scoring + {len(ctx.windows.heldout)} held-out "
                 f"windows of {P.seq_len} tokens. Held-out perplexity "
                 f"{p1.heldout.get('ppl', float('nan')):.4g}."
                 + (" (Phase 1 scores from this run's cache)" if p1.from_cache else "")))

# %% [markdown]
# ## Statistics over all weights
# Exact over every weight (two-pass radix selection): percentiles, max/mean and the share of the total score
# held by the top 0.01 %, 0.1 % and 1 % of weights.

# %%
import pandas as pd

rows = []
for m in sens.metrics:
    g = sens.stats[m]["global"]
    rows.append({"metric": m, "weights": g["count"], "mean": g["mean"], "max": g["max"],
                 "max / mean": g["max_over_mean"], **{f"p{k}": v for k, v in g["percentiles"].items()},
                 **{f"top {k} share": v for k, v in g["top_share"].items()}, "exact": g["exact"]})
pd.DataFrame(rows).set_index("metric")

# %% [markdown]
# ## The heavy tail
# Log-binned histogram (weights per octave of score) and the complementary CDF P(score ≥ x), both over ALL
# weights. A straight CCDF on log-log axes is a power-law tail.

# %%
hists = {m: sens.hist[m].numpy() for m in sens.metrics}
viz.score_histogram(hists)

# %%
viz.score_ccdf(hists)

# %% [markdown]
# ## Where the score sits: layer × component
# Share of each metric's total score per (layer, component), and how many of its global top-K weights fall
# there (hover for the parameters and numbers; pick the metric in the menu).

# %%
cells = tables.cells_frame(sens)
viz.layer_component_heatmap(cells, "score_share")

# %%
viz.layer_component_heatmap(cells, "topk")

# %%
viz.per_layer(cells)

# %% [markdown]
# ## Top weights
# The first global ranks of each metric; `token` decodes the row of an embedding / lm_head matrix.
# The full table (global and per-tensor top-K) is `top_weights.parquet` / `.csv`.

# %%
tables.top_weights_view(p1.table, 10)
