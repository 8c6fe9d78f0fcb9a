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
# # Phase 2 — Do the metrics agree, and how much does each agree with itself?
#
# Overlap, Jaccard and Spearman between every pair of metrics' global top-K, and the same top-K computed on
# other data windows (`stability_seeds`) and on another corpus (`stability_data`). A cross-metric overlap
# means little without this baseline: two metrics cannot agree more than each agrees with itself.

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

from critlib import agreement, summary, viz
from critlib.run import cross_metric, notebook, sensitivity

P, ctx, out = notebook.start(globals())
p1 = sensitivity.results(ctx, out)
sens = p1.sens
r2 = cross_metric.run(ctx, p1, out)
display(Markdown(f"**In short.** {summary.phase_answer('02_cross_metric', out)}"))
display(Markdown(f"Top-K: K = {P.topk_global}. Runs compared: " + ", ".join(f"`{r}`" for r in r2["runs"])))

# %% [markdown]
# ## Metric vs metric
# Spearman is computed over the union of the two top-K sets, from the scores of both metrics at every
# weight of the union.

# %%
viz.agreement_heatmaps(r2["cross"], sens.metrics)

# %%
import itertools

pairs = {f"{a} vs {b}": agreement.rank_pairs(sens, a, b) for a, b in itertools.combinations(sens.metrics, 2)}
viz.rank_scatter(pairs) if pairs else Markdown("One metric only: no pairs to compare.")

# %% [markdown]
# ## Stability: the same metric on other windows and another corpus
# Each other seed scores windows that Phase 1 and the earlier seeds did not (while the corpus has enough;
# `repeated_windows` counts those that had to repeat), so the agreement is not inflated by shared data.
# `magnitude` = |w| does not depend on data, so its top-K is identical across runs (Jaccard 1.0) by
# construction.

# %%
display(viz.stability_bars(r2["stability"]))
r2["stability"].round(4)

# %%
viz.cross_vs_baseline(r2["cross"]) if len(r2["cross"]) else None

# %%
r2["cross"].round(4)

# %% [markdown]
# ## How much data makes a ranking stable
# Each data-dependent metric's top-K on two disjoint sets of windows from the scoring corpus, compared as both
# sets grow (`stability_tokens`; each size holds the smaller ones). A Jaccard that still climbs at the largest
# size says the ranking has not settled: score on more tokens before trusting its exact members. Sizes the
# corpus cannot hold twice are left out (named below); give more data (`data:`) to measure them.

# %%
by_tokens, skipped = r2["stability_tokens"], r2["token_sizes"]["skipped"]
if len(by_tokens):
    display(viz.stability_by_tokens(by_tokens))
    display(by_tokens.pivot(index="tokens", columns="metric", values="jaccard").round(3))
Markdown(f"Not measured (the corpus holds too few windows for two sets of this size): {skipped} tokens."
         if skipped else "" if len(by_tokens) else "`stability_tokens` is empty, or no metric depends on data.")

# %% [markdown]
# ## The published study's claims, re-tested
# Each claim of the study (a critical-weight analysis of Llama-3.1-8B, one data seed) measured here on Phase 1
# and on every other data seed of `stability_seeds`: the mean over seeds with a 95% t-interval (the other
# seeds' percentiles are from one pass, within 2⁻⁷). The verdict compares the study's number with the interval
# only on the same model family; on another model the study's number is context, not a target. Shares are of
# the grad×weight global top-K (K = `topk_global`, 1000 by default as in the study).

# %%
claims = r2["claims"]
claims[["text", "value", "lo", "hi", "n_seeds", "per_seed", "study", "verdict"]] if claims is not None else \
    Markdown("The claims need grad_x_weight among the metrics.")
