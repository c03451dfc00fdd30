# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # SODA results
#
# The runs of an MLflow store as tables and plots, with the same functions as `make table` and
# `python -m analysis`. Open it as a notebook (`jupytext --to ipynb analysis/notebooks/results.py`,
# or Jupyter with jupytext installed). It reads the store the runs write by default
# (soda.store.default_tracking_uri): `$SODA_TRACKING_URI`, else `mlflow.db` in `$SODA_STORE_DIR`,
# else in the working directory. Jupyter starts the kernel in the notebook's folder, not where the
# runs were launched, so name the store: e.g. `SODA_STORE_DIR=$PWD jupyter lab` from the repository
# root, or set TRACKING_URI below.

# %%
from IPython.display import Image, Markdown, display

from analysis import (
    ablation_figure,
    ablation_table,
    exclusion_note,
    finished_runs,
    format_table,
    load_history,
    load_runs,
    main_table,
    png_bytes,
    probe_curves,
    probe_curves_figure,
    provenance,
    select_runs,
)
from soda.record import KNN_ACC, LINEAR_ACC
from soda.store import default_tracking_uri

TRACKING_URI = default_tracking_uri()
EXPERIMENTS = None  # a list of experiment names, e.g. ["soda"]; None reads every experiment
ABLATION = "augment_ablation"  # the ablation's sweep (Optuna study)

# %% [markdown]
# ## Load and filter
#
# One row per run: `params.<config key>` (strings, as MLflow stores them), `metrics.<key>` (the
# last value), `tags.<key>`. Select by sweep, tag or config value with `select_runs`; the tables
# keep the FINISHED runs and leave out sweep parents, failed and unfinished runs.

# %%
runs = load_runs(TRACKING_URI, EXPERIMENTS)
shown = ["run_id", "experiment", "status", "params.model.name", "params.dataset.name", "params.seed"]
display(runs[[column for column in shown if column in runs]])

# %%
print(provenance(runs))
print(exclusion_note(runs) or "nothing excluded")
finished = finished_runs(runs)
print(f"runs in the tables: {len(finished)}")
# For example, only the trials of one sweep, or one model:
#   select_runs(runs, sweep="lr_search"), select_runs(runs, params={"model.name": "tiny"})

# %% [markdown]
# ## The main table
#
# One row per configuration (the whole config but the seed and bookkeeping), mean ± standard
# deviation over seeds; `table.numbers` has the raw values and the run ids behind each row.

# %%
table = main_table(runs)
display(Markdown(format_table(table, "markdown")))
for note in table.notes:
    print(note)
display(table.numbers)

# %% [markdown]
# ## Probe accuracy against epoch
#
# The eval metrics are logged with step = epoch; each line is one configuration, averaged over its
# runs, with a band of ± one standard deviation.

# %%
run_ids = [run_id for ids in table.numbers["run_ids"] for run_id in ids.split()]
history = load_history(TRACKING_URI, run_ids, [KNN_ACC, LINEAR_ACC])
curves = probe_curves(history, table)
display(Image(png_bytes(probe_curves_figure(curves))))
display(curves)

# %% [markdown]
# ## The augmentation ablation
#
# Source view (to the encoder) x target view (to the decoder). Recon. MSE, when recorded, says how
# well the decoder reconstructs a test image from its latent.

# %%
if not finished_runs(select_runs(runs, sweep=ABLATION)).empty:
    ablation = ablation_table(runs, ABLATION)
    display(Markdown(format_table(ablation, "markdown")))
    for note in ablation.notes:
        print(note)
    display(Image(png_bytes(ablation_figure(ablation))))
else:
    print(f"no finished runs of sweep {ABLATION!r} in this store")
