"""Result plots as PNG: probe accuracy against epoch per configuration, and the ablation as bars.

Figures are made on matplotlib's Agg canvas directly, without pyplot: no display, no global figure
state, the same bytes for the same data (so `make table` run twice rewrites nothing).
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis.runs import AnalysisError, load_history
from analysis.tables import ACCURACIES, METRIC_LABELS, UNSET, VIEW_ORDER, Table, sort_key
from soda.files import write_atomically

SOURCE, TARGET = "augmentation.source.name", "augmentation.target.name"
NOT_IN_LABELS = {*METRIC_LABELS.values(), "Runs", "Params (M)"}
BARE_IN_LABELS = {"Model", "Dataset", "Res"}  # other columns are shown as "epochs 800"
PROBE_PLOT = "probe_accuracy.png"


def row_labels(table: Table) -> list[str]:
    """Each row of `table` in a few words, its setting with short keys:
    "tiny · shapes · 16x16 · epochs 2 · source=none, target=flip"."""
    columns = [c for c in table.cells.columns if c not in NOT_IN_LABELS and c != "Setting"]
    labels = []
    for _, row in table.cells.iterrows():
        parts = [row[c] if c in BARE_IN_LABELS else f"{c.lower()} {row[c]}" for c in columns if row[c]]
        if "Setting" in table.cells and row["Setting"]:
            parts.append(short_setting(row["Setting"]))
        labels.append(" · ".join(parts))
    return labels


def short_setting(setting: str) -> str:
    """A setting with short keys, for legends: "augmentation.source.name=none, schedule.decoder_lr=0.001"
    -> "source=none, decoder_lr=0.001" (tables keep the whole keys, which are what an override names)."""
    parts = []
    for item in setting.split(", "):
        key, _, value = item.partition("=")
        key = key.removesuffix(".name")
        parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return ", ".join(parts)


def probe_curves(history: pd.DataFrame, table: Table) -> pd.DataFrame:
    """The metric history of each row's runs (from load_history), aggregated over them at each
    epoch: columns row (the table's row), label, epochs (the row's schedule.epochs), key, step,
    mean, std (NaN for one run), n."""
    row_of = {run_id: row for row, ids in enumerate(table.numbers["run_ids"]) for run_id in ids.split()}
    mine = history[history["run_id"].isin(row_of)].assign(row=lambda h: h["run_id"].map(row_of))
    curves = (
        mine.groupby(["row", "key", "step"], sort=True)["value"].agg(mean="mean", std="std", n="count").reset_index()
    )
    labels = row_labels(table)
    budgets = table.numbers["schedule.epochs"] if "schedule.epochs" in table.numbers else [""] * len(table.numbers)
    curves.insert(1, "label", [labels[row] for row in curves["row"]])
    curves.insert(2, "epochs", [str(budgets[row]) for row in curves["row"]])
    return curves


def probe_curves_figure(curves: pd.DataFrame) -> Figure:
    """k-NN and linear-probe accuracy (%) against epoch, a line per configuration with a band of ±
    one standard deviation over its seeds where there are several; one row of panels per training
    length, so that a 2-epoch run is not drawn on an 800-epoch axis."""
    keys = [key for key in ACCURACIES if key in set(curves["key"])]
    if not keys:
        raise AnalysisError(f"no {' or '.join(ACCURACIES)} history to plot")
    rows = sorted(set(curves["row"]))
    budgets = sorted(set(curves["epochs"]), key=lambda epochs: sort_key(epochs, ()))
    figure = Figure(figsize=(11, 3.4 * len(budgets) + 0.25 * len(rows)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(budgets), len(keys), squeeze=False)
    handles, labels = [], []
    for index, row in enumerate(rows):
        curve = curves[curves["row"] == row]
        style = {"color": f"C{index % 10}", "linestyle": ("-", "--", ":", "-.")[index // 10 % 4]}
        line = budgets.index(curve["epochs"].iloc[0])
        for column, key in enumerate(keys):
            points = curve[curve["key"] == key]
            mean, spread = 100 * points["mean"], 100 * points["std"]
            (handle,) = axes[line, column].plot(points["step"], mean, marker="o", markersize=3, **style)
            band = spread.notna()
            if band.any():
                axes[line, column].fill_between(
                    points["step"][band], (mean - spread)[band], (mean + spread)[band], color=style["color"], alpha=0.2
                )
        handles.append(handle)
        labels.append(textwrap.shorten(curve["label"].iloc[0], 120, placeholder=" ..."))
    for line, budget in enumerate(budgets):
        for column, key in enumerate(keys):
            axis = axes[line, column]
            axis.set_title(METRIC_LABELS[key] + (f", {budget}-epoch runs" if budget not in ("", UNSET) else ""))
            axis.set_xlabel("epoch")
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.set_ylabel("accuracy (%)")
            axis.grid(alpha=0.3)
    figure.legend(handles, labels, loc="outside lower center", fontsize="small", frameon=False)
    return figure


def ablation_figure(table: Table) -> Figure:
    """The ablation table as grouped bars: one panel per metric, target views along x, one bar per
    source view, error bars of one standard deviation over seeds (none for a single run)."""
    numbers = table.numbers
    if SOURCE not in numbers or TARGET not in numbers:
        raise AnalysisError("ablation_figure needs an ablation table (source and target views)")
    metrics = [metric for metric in METRIC_LABELS if f"{metric}.mean" in numbers]
    targets = sorted(set(numbers[TARGET]), key=lambda view: sort_key(view, VIEW_ORDER))
    hues = list(dict.fromkeys(zip(numbers[SOURCE], numbers["setting"], strict=True)))
    width = 0.8 / len(hues)
    figure = Figure(figsize=(4.2 * len(metrics), 3.8 + 0.25 * len(hues)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for axis, metric in zip(axes, metrics, strict=True):
        scale = 100 if metric in ACCURACIES else 1
        for index, (source, setting) in enumerate(hues):
            bars = numbers[(numbers[SOURCE] == source) & (numbers["setting"] == setting)].set_index(TARGET)
            positions = [targets.index(target) - 0.4 + width * (index + 0.5) for target in bars.index]
            heights = [scale * value for value in bars[f"{metric}.mean"]]
            errors = [0.0 if math.isnan(value) else scale * value for value in bars[f"{metric}.std"]]
            label = f"source view: {source}" + (
                f" ({textwrap.shorten(setting, 60, placeholder=' ...')})" if setting else ""
            )
            axis.bar(positions, heights, width, yerr=errors, capsize=3, color=f"C{index % 10}", label=label)
        axis.set_xticks(range(len(targets)), [f"target: {target}" for target in targets])
        axis.set_title(METRIC_LABELS[metric])
        axis.set_ylabel("accuracy (%)" if metric in ACCURACIES else "mean squared error")
        axis.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", fontsize="small", frameon=False)
    return figure


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG, without the matplotlib version in its metadata (so it changes with the data only)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def write_png(figure: Figure, path: Path) -> bool:
    """Save the figure to `path` (atomically; untouched when the same). Returns whether it changed."""
    return write_if_changed(Path(path), png_bytes(figure))


def write_if_changed(path: Path, data: bytes) -> bool:
    """Replace `path` by `data` through soda.files.write_atomically, unless it holds them already:
    regenerating unchanged results touches no file (nor its time). Returns whether it changed."""
    path = Path(path)
    if path.is_file() and path.read_bytes() == data:
        return False
    write_atomically(path, lambda handle: handle.write(data))
    return True


def save_plots(tracking_uri: str, main: Table, ablation: Table | None, folder: Path) -> dict[str, Path]:
    """Write the probe curves of `main`'s rows (their metric history read from `tracking_uri`) and,
    if given, the ablation's bars into `folder`, as probe_accuracy.png and `<study>.png`.
    Returns {table name: file} for the files written or already up to date."""
    folder = Path(folder)
    run_ids = [run_id for ids in main.numbers["run_ids"] for run_id in ids.split()]
    curves = probe_curves(load_history(tracking_uri, run_ids, ACCURACIES), main)
    written = {}
    if not curves.empty:
        written[main.name] = folder / PROBE_PLOT
        write_png(probe_curves_figure(curves), written[main.name])
    if ablation is not None:
        written[ablation.name] = folder / f"{ablation.name}.png"
        write_png(ablation_figure(ablation), written[ablation.name])
    return written
