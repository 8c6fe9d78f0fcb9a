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
# # Phase 5 — Token explorer
#
# Each token owns one row of the embedding matrix and one of the lm_head (the same row when they are tied).
# Pick a token to see its rows' scores per dimension, its rank among all tokens by each row's total score,
# and its top dimensions. The picker needs a live kernel (JupyterLab); the static report shows the same for
# the top tokens through the figure's menu and the table below. Per-token totals of every token:
# `token_summary.parquet` / `.csv`.

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
from critlib.run import notebook, token_explorer

P, ctx, out = notebook.start(globals())
ts = token_explorer.run(ctx, out)
display(Markdown(f"**In short.** {summary.phase_answer('05_token_explorer', out)}"))
metric, role = ts.metrics[0], next(iter(ts.roles))
display(Markdown(f"{ts.vocab_size:,} tokens; rows: " + ", ".join(f"{r} = `{n}`" for r, n in ts.roles.items())))

# %% [markdown]
# ## Live picker (JupyterLab)

# %%
import ipywidgets as w

from critlib import CritlibError

query = w.Text(value="", description="token", placeholder="text or id", continuous_update=False)
which = w.Dropdown(options=ts.metrics, value=metric, description="metric")
view = w.Output()


def card(text, m):
    try:
        tid = ts.find(text)
    except CritlibError as e:
        return [Markdown(str(e))]
    rows = viz.token_rows({ts.text(tid): {(m, r): ts.row(m, r, tid) for r in ts.roles}}, [m], list(ts.roles))
    return ([Markdown(f"token **{ts.text(tid)}** (id {tid})"), ts.token_card(tid), rows]
            + [x for r in ts.roles for x in (Markdown(f"top dimensions of the {r} row ({m})"),
                                             ts.top_dims(m, r, tid, 10))])


def show(*_):
    view.clear_output()
    with view:
        display(*card(query.value, which.value))


query.observe(show, names="value")
which.observe(show, names="value")
hint = w.Label("type a token (its text or id) and press Enter, or change the metric")
display(w.VBox([w.HBox([query, which]), hint, view]))

# %% [markdown]
# ## Static view: the top tokens
# The top tokens by the total score of their row (first metric of the run); use the menu to switch token.

# %%
top = ts.top_tokens(metric, role, P.token_explorer_top)
viz.token_ranks(ts.summary(), metric, role, min(40, ts.vocab_size))

# %%
viz.token_rows({f"{ts.text(t)} ({t})": {(m, r): ts.row(m, r, t) for m in ts.metrics for r in ts.roles} for t in top},
               ts.metrics, list(ts.roles))

# %%
import pandas as pd

pd.concat([ts.token_card(t).assign(token=ts.text(t), token_id=t) for t in top], ignore_index=True)
