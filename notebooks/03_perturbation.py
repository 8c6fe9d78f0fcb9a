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
# # Phase 3 — The causal test: perturb the top-K and watch held-out quality
#
# Selectors: each metric's top-K, random-K (several draws: mean ± std), the largest-magnitude-K and each
# metric's bottom-K; methods from `perturb_methods` (zero, sign flip, scale, relative Gaussian noise, tensor
# mean, bit flips). Every perturbation is undone bit for bit before the next. Results:
# `perturbation.parquet` / `.csv` (one row per draw) and `perturbation_summary`.

# %% tags=["parameters"]
params_file = None  # params YAML; None: built-in defaults, the embedded default model
output_dir = None  # folder for tables and JSON; None: the output_dir of the params
write_dir = None  # where files are written; None: output_dir (critlib run writes to a staging folder)

# %%
from IPython.display import Markdown, display

from critlib import viz
from critlib.run import notebook, perturbation, sensitivity

P, ctx, out = notebook.start(globals())
p1 = sensitivity.results(ctx, out)
r3 = perturbation.run(ctx, p1, out)
base = r3["baseline"]
display(Markdown(f"Unperturbed held-out perplexity {base.get('ppl', float('nan')):.4g}, next-token accuracy "
                 f"{base.get('accuracy', float('nan')):.3f} over {base.get('n_tokens', 0):,} tokens. "
                 f"K ∈ {P.perturb_ks}; methods {P.perturb_methods}; {P.n_random_draws} random draws."))

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
# ## At the largest K

# %%
s = r3["summary"]
s[s["k"] == s["k"].max()][["selector", "method", "method_arg", "k", "n_changed_mean", "ppl_ratio_mean",
                            "ppl_ratio_std", "accuracy_mean", "kl_mean", "n_draws"]].round(5)
