"""What the latent learns: the learning study's table (latent gap and factor probes per setting,
against the untrained encoder) and two plots against training steps (the factor probes and the
latent gap; the training diagnostics).

The untrained encoder is each run's evaluation at epoch 0 (`eval.at_start=true`), read from the
metric history; at a fixed seed it is the same network in every setting, so its row is one row.
A run's steps are its optimiser steps: `train/images_seen` / `schedule.batch_size`.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.runs import AnalysisError, exclusion_note, finished_runs, select_runs
from analysis.tables import NO_VALUE, Table, common_setup, missing_metric_notes, summarize
from soda.data.shapes import FACTORS
from soda.record import (
    DIAGNOSTICS,
    FACTOR_PREFIX,
    IMAGES_SEEN,
    KNN_ACC,
    LINEAR_ACC,
    TRAIN_LOSS,
    factor_metric,
    latent_gap_at,
)

LEARNING_STUDY = "learning_study"
GAP = latent_gap_at(500)  # the yardstick: the decoder's error at t = 500 with another latent
UNTRAINED = "untrained encoder (epoch 0)"
DIAGNOSTIC_LABELS = {
    TRAIN_LOSS: "training loss",
    "train/encoder_grad_norm": "encoder gradient norm",
    "train/decoder_grad_norm": "decoder gradient norm",
    "train/latent_norm": "latent norm",
    "train/latent_std": "latent std per dimension",
    "train/latent_effective_rank": "latent effective rank",
    "train/modulation_std": "modulation spread between images",
}


def factor_metrics(keys: Iterable[str]) -> list[str]:
    """The factor-probe metrics among `keys`, in shapes' order of factors (others after, sorted)."""
    order = {factor_metric(name): index for index, name in enumerate(FACTORS)}
    found = {key for key in keys if key.startswith(FACTOR_PREFIX)}
    return sorted(found, key=lambda key: (order.get(key, len(order)), key))


def metric_label(metric: str) -> str:
    if metric.startswith(FACTOR_PREFIX):
        name = metric[len(FACTOR_PREFIX) :].replace("_", " ")
        return f"{name} (acc. %)" if name == "shape" else f"{name} (R²)"
    return {GAP: "Latent gap t500 (%)", LINEAR_ACC: "Linear probe (%)", KNN_ACC: "k-NN (%)"}.get(metric, metric)


def _cell(row, metric: str) -> str:
    """Accuracies and the gap in % (one decimal), R^2 with two decimals; "± std" over seeds;
    "(n=2)" when fewer of the row's runs recorded the metric."""
    n = int(row[f"{metric}.n"])
    if n == 0:
        return NO_VALUE
    r2 = metric.startswith(FACTOR_PREFIX) and not metric.endswith("/shape")
    scale, digits = (1, 2) if r2 else (100, 1)
    mean, std = scale * row[f"{metric}.mean"], scale * row[f"{metric}.std"]
    if abs(mean) < 0.5 * 10**-digits:
        mean = 0.0  # not "-0.0"
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 and not math.isnan(std) else "")
    return text + (f" (n={n})" if n < int(row["runs"]) else "")


def learning_keys(finished: pd.DataFrame) -> list[str]:
    """The evaluation metrics of the study's table, in its order."""
    recorded = [c[len("metrics.") :] for c in finished.columns if c.startswith("metrics.")]
    return [GAP, *factor_metrics(recorded), LINEAR_ACC, KNN_ACC]


def learning_table(runs: pd.DataFrame, history: pd.DataFrame, study: str = LEARNING_STUDY) -> Table:
    """One row per setting of sweep `study` (the config values its runs differ in, seeds pooled),
    after a first row for the untrained encoder: the latent gap at t = 500, each factor probe,
    the linear probe and k-NN. `history`: load_history of the study's runs for these metrics."""
    study_runs = select_runs(runs, sweep=study)
    finished = finished_runs(study_runs)
    if finished.empty:
        note = exclusion_note(study_runs)
        raise AnalysisError(f"no finished runs of sweep {study!r}" + (f" ({note})" if note else ""))
    metrics = learning_keys(finished)
    numbers = summarize(finished, [], metrics)
    start = history[(history["step"] == 0) & history["run_id"].isin(finished["run_id"])]
    baseline = {"setting": UNTRAINED, "runs": start["run_id"].nunique()}
    for metric in metrics:
        values = start.loc[start["key"] == metric, "value"]
        baseline.update(
            {
                f"{metric}.mean": values.mean() if len(values) else math.nan,
                f"{metric}.std": values.std(ddof=1) if len(values) > 1 else math.nan,
                f"{metric}.n": len(values),
            }
        )
    numbers = pd.concat([pd.DataFrame([baseline]), numbers], ignore_index=True)
    numbers["setting"] = numbers["setting"].replace("", "(one setting)")
    cells = pd.DataFrame(
        {
            "Setting": numbers["setting"],
            **{metric_label(m): [_cell(row, m) for _, row in numbers.iterrows()] for m in metrics},
            "Runs": numbers["runs"].astype(int).astype(str),
        }
    )
    notes = [common_setup(finished), exclusion_note(study_runs), *missing_metric_notes(finished, metrics)]
    return Table(study, f"What the latent learns (sweep {study})", numbers, cells, tuple(n for n in notes if n))


def steps_of(history: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """`history` of evaluation metrics (step = epoch) with each point's optimiser step instead,
    from the run's train/images_seen at that epoch and its schedule.batch_size."""
    batch = runs.set_index("run_id")["params.schedule.batch_size"].astype(float)
    seen = history[history["key"] == IMAGES_SEEN].set_index(["run_id", "step"])["value"]
    points = history[history["key"] != IMAGES_SEEN].copy()
    index = pd.MultiIndex.from_frame(points[["run_id", "step"]])
    points["step"] = (seen.reindex(index).to_numpy() / batch.reindex(points["run_id"]).to_numpy()).round()
    return points.dropna(subset=["step"])


def _curves(points: pd.DataFrame, table: Table) -> dict[str, pd.DataFrame]:
    """{setting: mean and std over its runs of each key at each step}."""
    curves = {}
    for _, row in table.numbers.iloc[1:].iterrows():
        mine = points[points["run_id"].isin(str(row["run_ids"]).split())]
        curves[row["setting"]] = mine.groupby(["key", "step"])["value"].agg(mean="mean", std="std").reset_index()
    return curves


def _panels(
    curves: dict[str, pd.DataFrame], keys: list[str], labels: dict[str, str], scale: dict[str, float]
) -> Figure:
    columns = min(4, len(keys))
    rows = math.ceil(len(keys) / columns)
    figure = Figure(figsize=(3.6 * columns, 2.9 * rows + 0.3 * len(curves)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    handles = []
    for index, (setting, curve) in enumerate(curves.items()):
        colour = f"C{index % 10}"
        for axis, key in zip(axes, keys, strict=False):
            points = curve[curve["key"] == key]
            factor = scale.get(key, 1.0)
            mean, std = factor * points["mean"], factor * points["std"]
            (handle,) = axis.plot(points["step"], mean, marker="o", markersize=2.5, color=colour)
            band = std.notna()
            if band.any():
                axis.fill_between(points["step"][band], (mean - std)[band], (mean + std)[band], color=colour, alpha=0.2)
        handles.append((handle, textwrap.shorten(setting, 110, placeholder=" ...")))
    for axis, key in zip(axes, keys, strict=False):
        axis.set_title(labels.get(key, key), fontsize="medium")
        axis.set_xlabel("optimiser step")
        axis.grid(alpha=0.3)
    for axis in axes[len(keys) :]:
        axis.set_visible(False)
    figure.legend(
        [h for h, _ in handles], [label for _, label in handles], loc="outside lower center", fontsize="small"
    )
    return figure


def learning_figure(points: pd.DataFrame, table: Table) -> Figure:
    """The latent gap (t = 500), each factor probe and the linear probe against optimiser steps, a
    line per setting (± one standard deviation over seeds); step 0 is the untrained encoder."""
    keys = [m for m in (GAP, *factor_metrics(set(points["key"])), LINEAR_ACC) if m in set(points["key"])]
    if not keys:
        raise AnalysisError("no latent gap or factor-probe history to plot")
    scale = {GAP: 100, LINEAR_ACC: 100, f"{FACTOR_PREFIX}shape": 100}
    return _panels(_curves(points, table), keys, {k: metric_label(k) for k in keys}, scale)


def diagnostics_figure(history: pd.DataFrame, table: Table) -> Figure:
    """The training diagnostics logged at log points (step = optimiser step), a line per setting."""
    keys = [key for key in (TRAIN_LOSS, *DIAGNOSTICS) if key in set(history["key"])]
    if not keys:
        raise AnalysisError("no training diagnostics to plot (runs from before they were logged?)")
    return _panels(_curves(history, table), keys, DIAGNOSTIC_LABELS, {})
