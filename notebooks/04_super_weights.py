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
# # Phase 4 — Super weights (Yu et al. 2024)
#
# Data-free detection: one short prompt, the down projection whose output spikes, the weight linking its
# largest input to its largest output. Validation: zero each one (and all together) against random weights
# of the same tensor, and compare greedy generations. Written to `superweights.json`, with each super
# weight's rank in Phase 1's global top-K of every metric.

# %% tags=["parameters"]
params_file = None  # params YAML; None: built-in defaults, the embedded default model
output_dir = None  # folder for tables and JSON; None: the output_dir of the params
write_dir = None  # where files are written; None: output_dir (critlib run writes to a staging folder)

# %%
import pandas as pd
from IPython.display import Markdown, display

from critlib import viz
from critlib.run import notebook, sensitivity, super_weights

P, ctx, out = notebook.start(globals())
p1 = sensitivity.results(ctx, out)
r4 = super_weights.run(ctx, p1, out)
sw = r4["super_weights"]
display(Markdown(f"**{len(sw)} super weight(s)** found on the prompt {r4['detection']['prompt']!r} "
                 f"(threshold {r4['detection']['threshold']:g} × the median block)."))

# %% [markdown]
# ## Down-projection maxima per block

# %%
viz.activation_profile(r4["detection"]["profile"])

# %% [markdown]
# ## The super weights, their effect and their rank in Phase 1
# `rank_<metric>`: 1-based rank in that metric's global top-K (empty: outside the top-K).

# %%
cols = ["param", "layer", "row", "col", "weight", "in_activation", "out_activation", "spike_ratio",
        "ppl_ratio_when_zeroed", "random_ppl_ratio_mean", "random_ppl_ratio_std"]
table = pd.DataFrame(sw, columns=cols + [f"rank_{m}" for m in P.metrics])
table

# %%
viz.super_weight_bars(sw) if sw else Markdown("No super weight found: nothing to validate.")

# %% [markdown]
# ## Generation before and after zeroing them

# %%
g = r4["generation"]
display(Markdown(f"**prompt** {g['prompt']!r}\n\n**before** {g['before']!r}\n\n**after** {g['after']!r}\n\n"
                 f"weights zeroed: {g['n_zeroed']}; first different token: {g['first_difference']}"))
joint = r4.get("joint")
pd.DataFrame([joint]) if isinstance(joint, dict) and joint else None
