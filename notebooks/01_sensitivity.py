# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
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

# %%
from IPython.display import Markdown, display

from critlib import tables, viz
from critlib.run import notebook, sensitivity

P, ctx, out = notebook.start(globals())
p1 = sensitivity.run(ctx, out)
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
