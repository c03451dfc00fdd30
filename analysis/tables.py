"""Result tables: runs -> one row per configuration, aggregated over seeds, and its text, Markdown,
CSV or LaTeX.

A configuration is a run's whole resolved config minus what only says how it was tracked, seeded or
checkpointed (`NOT_CONFIGURATION`): runs that differ only in their seed are one row, with the mean,
the sample standard deviation (ddof 1) and the count of each metric. When two rows would look the
same in the shown columns, a Setting column names the config values that tell them apart.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from analysis.runs import AnalysisError, exclusion_note, finished_runs, select_runs
from soda.record import KNN_ACC, LATENT_GAP, LINEAR_ACC, RECON_MSE

METRIC_LABELS = {KNN_ACC: "k-NN", LINEAR_ACC: "Linear probe", RECON_MSE: "Recon. MSE", LATENT_GAP: "Latent gap (%)"}
ACCURACIES = (KNN_ACC, LINEAR_ACC)  # fractions, shown in % with one decimal
PERCENT_DIGITS = {KNN_ACC: 1, LINEAR_ACC: 1, LATENT_GAP: 2}  # fractions shown in %, with these decimals
ABLATION_STUDY = "augment_ablation"
UNSET = "unset"  # a config key some run did not record (an older run, say)
NO_VALUE = "–"

# Config keys that say how a run was tracked, seeded, logged or checkpointed, not what it computed.
# The final probes run at the last epoch whatever `eval.every` is, so the cadence is not part of a
# result either. Keys ending in "." are prefixes.
NOT_CONFIGURATION = (
    "seed",
    "objective",
    "device",
    "tracking.",
    "sweep.",
    "dataset.root",
    "dataset.download",
    "schedule.checkpoint_every",
    "schedule.log_every",
    "eval.every",
    "eval.every_seconds",
    "eval.at_start",
    "eval.linear_probe",
    "model.encoder_parameters",
    "model.decoder_parameters",
)

MAIN_KEYS = {"model.name": "Model", "dataset.name": "Dataset", "dataset.image_size": "Res", "schedule.epochs": "Epochs"}
ABLATION_KEYS = {"augmentation.source.name": "Source", "augmentation.target.name": "Target"}
VIEW_ORDER = ("reference", "flip", "none")  # the sweep's order: most augmentation first
MODEL_NAMES = {"soda_r18_ddpm": "Res18+DDPM", "soda_r50_ddpm": "Res50+DDPM"}
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "tiny_imagenet": "Tiny-ImageNet"}
FORMATS = ("text", "markdown", "csv", "latex")


@dataclass(frozen=True)
class Table:
    """One row per configuration. `numbers` holds the values (accuracies as fractions, counts, the
    run ids behind each row) for CSV and further analysis; `cells` the same rows as they are shown;
    `notes` what the rows leave out or have in common."""

    name: str  # short, for file names: "main", or the ablation's sweep
    title: str
    numbers: pd.DataFrame
    cells: pd.DataFrame
    notes: tuple[str, ...] = ()


def _is_configuration(key: str) -> bool:
    return not any(key.startswith(item) if item.endswith(".") else key == item for item in NOT_CONFIGURATION)


def configuration_params(runs: pd.DataFrame) -> pd.DataFrame:
    """The config values that make a run's configuration, as strings; UNSET where a run lacks one."""
    columns = sorted(c for c in runs.columns if c.startswith("params.") and _is_configuration(c[len("params.") :]))
    return runs[columns].astype(object).fillna(UNSET).astype(str).rename(columns=lambda c: c[len("params.") :])


def _param(runs: pd.DataFrame, key: str) -> pd.Series:
    column = f"params.{key}"
    if column not in runs:
        return pd.Series(UNSET, index=runs.index, dtype=object)
    return runs[column].astype(object).fillna(UNSET).astype(str)


def _count(runs: pd.DataFrame, key: str) -> float:
    """A parameter count the runs recorded (the same for one configuration), NaN if none did."""
    values = pd.to_numeric(runs[f"params.{key}"], errors="coerce").dropna() if f"params.{key}" in runs else []
    return float(values.iloc[0]) if len(values) else math.nan


def _metric(runs: pd.DataFrame, metric: str) -> pd.Series:
    column = f"metrics.{metric}"
    return runs[column].astype(float) if column in runs else pd.Series(math.nan, index=runs.index)


def summarize(
    runs: pd.DataFrame,
    keys: Iterable[str],
    metrics: Sequence[str],
    orders: Mapping[str, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """One row per configuration of `runs` (result runs, FINISHED): the `keys` config values, a
    `setting` that tells apart rows alike in those, `runs`, the encoder's and decoder's parameter
    counts, `<metric>.mean`, `.std` (NaN for one run) and `.n` (runs that recorded it), `run_ids`.
    Rows are sorted by the keys (numbers as numbers, values in `orders` in that order), then setting."""
    keys = list(keys)
    config = configuration_params(runs)
    shown = {key: _param(runs, key) for key in keys}
    members: dict[tuple, list] = {}
    for index, values in zip(runs.index, config.itertuples(index=False, name=None), strict=True):
        members.setdefault(values, []).append(index)

    rows, configs = [], []
    for values, indices in members.items():
        group = runs.loc[indices]
        row = {key: shown[key][indices[0]] for key in keys}
        row["runs"] = len(group)
        row["encoder_parameters"] = _count(group, "model.encoder_parameters")
        row["decoder_parameters"] = _count(group, "model.decoder_parameters")
        for metric in metrics:
            recorded = _metric(group, metric).dropna()
            row[f"{metric}.mean"] = recorded.mean() if len(recorded) else math.nan
            row[f"{metric}.std"] = recorded.std(ddof=1) if len(recorded) > 1 else math.nan
            row[f"{metric}.n"] = len(recorded)
        row["run_ids"] = " ".join(group["run_id"])
        rows.append(row)
        configs.append(dict(zip(config.columns, values, strict=True)))

    settings = _settings(configs, [tuple(row[key] for key in keys) for row in rows], set(keys))
    for row, setting in zip(rows, settings, strict=True):
        row["setting"] = setting
    columns = [*keys, "setting", "runs", "encoder_parameters", "decoder_parameters"]
    columns += [f"{metric}.{stat}" for metric in metrics for stat in ("mean", "std", "n")] + ["run_ids"]
    table = pd.DataFrame(rows, columns=columns)
    orders = orders or {}
    order = sorted(
        range(len(rows)),
        key=lambda i: (*(sort_key(rows[i][key], orders.get(key, ())) for key in keys), rows[i]["setting"]),
    )
    return table.iloc[order].reset_index(drop=True)


def sort_key(value: str, order: Sequence[str]) -> tuple:
    """Sort key: values in `order` first in that order, then numbers by value, then text, then UNSET."""
    if value in order:
        return (0, order.index(value), 0.0, "")
    if value == UNSET:
        return (3, 0, 0.0, "")
    try:
        return (1, 0, float(value), "")
    except ValueError:
        return (2, 0, 0.0, value)


def _settings(configs: list[dict], shown: list[tuple], shown_keys: set[str]) -> list[str]:
    """For rows whose shown values coincide, the config values in which they differ ("" otherwise).
    A key below a differing option name (`augmentation.target.flip_prob` below
    `augmentation.target.name`) is left out, since the name says it, unless that leaves two rows alike."""
    settings = [""] * len(configs)
    clusters: dict[tuple, list[int]] = {}
    for i, values in enumerate(shown):
        clusters.setdefault(values, []).append(i)
    for rows in clusters.values():
        if len(rows) < 2:
            continue
        keys = sorted({k for i in rows for k in configs[i]} - shown_keys)
        differing = [k for k in keys if len({configs[i].get(k, UNSET) for i in rows}) > 1]
        named = [k for k in differing if not _below_differing_name(k, differing)]
        for candidate in (named, differing):
            texts = [", ".join(f"{k}={configs[i].get(k, UNSET)}" for k in candidate) for i in rows]
            if len(set(texts)) == len(texts):
                break
        for i, text in zip(rows, texts, strict=True):
            settings[i] = text
    return settings


def _below_differing_name(key: str, differing: list[str]) -> bool:
    parts = key.split(".")
    return any(
        f"{'.'.join(parts[:depth])}.name" in differing and key != f"{'.'.join(parts[:depth])}.name"
        for depth in range(1, len(parts))
    )


def missing_metric_notes(runs: pd.DataFrame, metrics: Sequence[str]) -> list[str]:
    """One note per metric some of the runs did not record, naming up to three of them."""
    notes = []
    for metric in metrics:
        missing = runs.loc[_metric(runs, metric).isna(), "run_id"].tolist()
        if missing:
            named = ", ".join(run_id[:8] for run_id in missing[:3]) + (", ..." if len(missing) > 3 else "")
            notes.append(f"{metric} missing in {len(missing)} of {len(runs)} finished runs ({named})")
    return notes


def _require_metrics(runs: pd.DataFrame, metrics: Sequence[str], what: str) -> None:
    if all(_metric(runs, metric).isna().all() for metric in metrics):
        raise AnalysisError(
            f"none of the {len(runs)} finished runs for {what} recorded {' or '.join(metrics)} (were they evaluated?)"
        )


def _millions(count: float) -> str:
    if math.isnan(count):
        return NO_VALUE
    millions = count / 1e6
    return f"{millions:.0f}" if millions >= 10 else f"{millions:.1f}" if millions >= 1 else f"{millions:.2f}"


def metric_cell(row: Mapping, metric: str) -> str:
    """ "80.4 ± 0.3" (accuracies in %), "0.1234 ± 0.0050" (MSE); no ± for one run; "(n=2)" when
    fewer runs than the row's recorded the metric; "–" when none did."""
    n, runs = int(row[f"{metric}.n"]), int(row["runs"])
    if n == 0:
        return NO_VALUE
    scale, digits = (100, PERCENT_DIGITS[metric]) if metric in PERCENT_DIGITS else (1, 4)
    text = f"{row[f'{metric}.mean'] * scale:.{digits}f}"
    if n > 1:
        text += f" ± {row[f'{metric}.std'] * scale:.{digits}f}"
    return text + (f" (n={n})" if n < runs else "")


def _cells(numbers: pd.DataFrame, keys: Mapping[str, str], metrics: Sequence[str], params: bool) -> pd.DataFrame:
    shown = {}
    for key, label in keys.items():
        shown[label] = numbers[key]
    if "dataset.image_size" in keys:
        shown[keys["dataset.image_size"]] = [
            f"{s}x{s}" if s != UNSET else NO_VALUE for s in numbers["dataset.image_size"]
        ]
    if "model.name" in keys:
        shown[keys["model.name"]] = [MODEL_NAMES.get(name, name) for name in numbers["model.name"]]
    if "dataset.name" in keys:
        shown[keys["dataset.name"]] = [DATASET_NAMES.get(name, name) for name in numbers["dataset.name"]]
    if params:
        shown["Params (M)"] = [
            NO_VALUE if math.isnan(enc) or math.isnan(dec) else f"{_millions(enc)} + {_millions(dec)}"
            for enc, dec in zip(numbers["encoder_parameters"], numbers["decoder_parameters"], strict=True)
        ]
    if numbers["setting"].ne("").any():
        shown["Setting"] = numbers["setting"]
    for metric in metrics:
        shown[METRIC_LABELS.get(metric, metric)] = [metric_cell(row, metric) for _, row in numbers.iterrows()]
    shown["Runs"] = numbers["runs"].astype(str)
    return pd.DataFrame(shown).astype(str).reset_index(drop=True)


def main_table(runs: pd.DataFrame) -> Table:
    """The README's main table (the paper's columns): model, data set, resolution, epochs, parameters
    (encoder + decoder, millions), k-NN and linear probe in %, the latent gap in % when recorded
    (does the decoder use each image's latent?), and the runs behind each row.
    `runs`: any selection; failed and unfinished runs and sweep parents are left out and counted."""
    finished = finished_runs(runs)
    if finished.empty:
        note = exclusion_note(runs)
        raise AnalysisError("no finished runs to tabulate" + (f" ({note})" if note else ""))
    _require_metrics(finished, ACCURACIES, "the main table")
    metrics = [*ACCURACIES, *([LATENT_GAP] if _metric(finished, LATENT_GAP).notna().any() else [])]
    numbers = summarize(finished, MAIN_KEYS, metrics)
    notes = [exclusion_note(runs), *missing_metric_notes(finished, metrics)]
    return Table("main", "Main results", numbers, _cells(numbers, MAIN_KEYS, metrics, params=True), _kept(notes))


def ablation_table(runs: pd.DataFrame, study: str = ABLATION_STUDY) -> Table:
    """The augmentation ablation: source view x target view, k-NN and linear probe in %, and the
    reconstruction error when recorded, over the runs of sweep `study` among `runs`."""
    study_runs = select_runs(runs, sweep=study)
    finished = finished_runs(study_runs)
    if finished.empty:
        note = exclusion_note(study_runs)
        raise AnalysisError(f"no finished runs of sweep {study!r}" + (f" ({note})" if note else ""))
    _require_metrics(finished, ACCURACIES, f"sweep {study!r}")
    metrics = [*ACCURACIES, *([RECON_MSE] if _metric(finished, RECON_MSE).notna().any() else [])]
    orders = dict.fromkeys(ABLATION_KEYS, VIEW_ORDER)
    numbers = summarize(finished, ABLATION_KEYS, metrics, orders)
    notes = [common_setup(finished), exclusion_note(study_runs), *missing_metric_notes(finished, metrics)]
    cells = _cells(numbers, ABLATION_KEYS, metrics, params=False)
    return Table(study, f"Augmentation ablation (sweep {study})", numbers, cells, _kept(notes))


def common_setup(runs: pd.DataFrame) -> str:
    """ "all runs: tiny on shapes 16x16, 2 epochs" when the runs share these, else ""."""
    values = {key: _param(runs, key).unique() for key in MAIN_KEYS}
    if any(len(v) != 1 or v[0] == UNSET for v in values.values()):
        return ""
    model, dataset, size, epochs = (values[key][0] for key in MAIN_KEYS)
    model, dataset = MODEL_NAMES.get(model, model), DATASET_NAMES.get(dataset, dataset)
    return f"all runs: {model} on {dataset} {size}x{size}, {epochs} epochs"


def _kept(notes: Sequence[str]) -> tuple[str, ...]:
    return tuple(note for note in notes if note)


def format_table(table: Table, fmt: str = "text") -> str:
    """The table as aligned text, Markdown (GitHub pipes), CSV (`numbers`: raw values, fractions)
    or a LaTeX tabular (booktabs). Notes are not included; print `table.notes` beside it."""
    if fmt == "csv":
        return table.numbers.to_csv(index=False, lineterminator="\n")
    header, rows = list(table.cells.columns), table.cells.values.tolist()
    if fmt == "markdown":
        escaped = [[cell.replace("|", "\\|") for cell in row] for row in [header, *rows]]
        widths = [max(len(row[i]) for row in escaped) for i in range(len(header))]
        lines = [
            "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in escaped
        ]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines) + "\n"
    if fmt == "text":
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines) + "\n"
    if fmt == "latex":
        align = "".join("r" if label in (*METRIC_LABELS.values(), "Runs", "Epochs") else "l" for label in header)
        body = [" & ".join(_latex(cell) for cell in row) + r" \\" for row in rows]
        lines = [
            r"% needs \usepackage{booktabs}",
            rf"\begin{{tabular}}{{{align}}}",
            r"\toprule",
            " & ".join(_latex(cell) for cell in header) + r" \\",
            r"\midrule",
            *body,
            r"\bottomrule",
            r"\end{tabular}",
        ]
        return "\n".join(lines) + "\n"
    raise AnalysisError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


LATEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "–": "--",
}


def _latex(text: str) -> str:
    return "".join(LATEX_ESCAPES.get(char, char) for char in text)
