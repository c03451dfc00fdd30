"""analysis/: MLflow runs -> tables, plots, the README's results section, the CLI and the notebook.

One MLflow store, built here with MlflowClient, holds what the training code and the sweeper
record: several seeds of a configuration, two sweeps with their parent runs, failed, pruned,
running and interrupted runs, and runs that lack a metric. The expected cells are worked out by
hand from the values logged below.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from analysis import (
    ablation_table,
    exclusion_note,
    finished_runs,
    format_table,
    load_history,
    load_runs,
    main_table,
    probe_curves,
    provenance,
    select_runs,
)
from analysis.__main__ import main as cli
from analysis.bench import BENCH_END, BENCH_START, regenerate_bench
from analysis.readme import END, START
from soda.record import KNN_ACC, LATENT_GAP, LINEAR_ACC, RECON_MSE, TRAIN_LOSS, TRIAL_STATE, parent_tags, trial_tags
from soda.store import STORE_DIR_ENV, TRACKING_URI_ENV

REPO = Path(__file__).resolve().parents[1]
HOUR_MS = 3_600_000
T0 = 1_793_491_200_000  # 2026-11-01 00:00 UTC
R18, R50 = (11_234_496, 39_595_139), (23_770_000, 39_595_139)
VIEW_CROP = {"reference": "0.95", "flip": "1.0", "none": "0.0"}

# (source view, target view) -> (k-NN, linear probe, recon MSE) of seeds 0 and 1.
ABLATION = {
    ("reference", "reference"): ((0.60, 0.62), (0.64, 0.66), (0.30, 0.32)),
    ("reference", "flip"): ((0.58, 0.60), (0.61, 0.63), (0.20, 0.22)),
    ("reference", "none"): ((0.55, 0.57), (0.59, 0.61), (0.10, 0.12)),
    ("none", "reference"): ((0.40, 0.44), (0.45, 0.47), (0.31, 0.33)),
    ("none", "flip"): ((0.38, 0.40), (0.42, 0.44), (0.21, 0.23)),
    ("none", "none"): ((0.35, 0.37), (0.40, 0.42), (0.11, 0.13)),
}


def config(model, dataset, size, epochs, seed, source="reference", target="reference", lr="0.0003", counts=None):
    """Flattened params as soda.train logs them (the keys that matter here, and some that do not)."""
    params = {
        "model.name": model,
        "model.arch": "resnet50" if model == "soda_r50_ddpm" else "resnet18",
        "dataset.name": dataset,
        "dataset.image_size": str(size),
        "schedule.epochs": str(epochs),
        "schedule.decoder_lr": lr,
        "seed": str(seed),
        "augmentation.name": "seed",
        "augmentation.source.name": source,
        "augmentation.source.crop_prob": VIEW_CROP[source],
        "augmentation.target.name": target,
        "augmentation.target.crop_prob": VIEW_CROP[target],
        "tracking.uri": f"sqlite:///somewhere/{seed}/mlflow.db",  # bookkeeping: not part of a configuration
        "schedule.checkpoint_every": str(10 + seed),
    }
    if counts is not None:
        params["model.encoder_parameters"], params["model.decoder_parameters"] = map(str, counts)
    return params


class Store:
    def __init__(self, path: Path):
        self.uri = f"sqlite:///{path}"
        self.client = MlflowClient(self.uri)
        self.clock = 0
        self.ids: dict[str, list[str]] = {}

    def experiment(self, name: str) -> str:
        return self.client.create_experiment(name, artifact_location=str(Path(self.uri[10:]).parent / "artifacts"))

    def run(self, experiment_id, label, params, finals=None, history=None, tags=None, status="FINISHED") -> str:
        """A run started one hour after the previous one; `finals`: {metric: value} logged at the
        last epoch, `history`: {metric: [(epoch, value), ...]}."""
        self.clock += 1
        start = T0 + self.clock * HOUR_MS
        run = self.client.create_run(experiment_id, start_time=start, tags={"git_dirty": "false", **(tags or {})})
        run_id = run.info.run_id
        epochs = int(params.get("schedule.epochs", 1))
        points = [(key, epoch, value) for key, series in (history or {}).items() for epoch, value in series]
        points += [(key, epochs, value) for key, value in (finals or {}).items()]
        metrics = [Metric(key, value, start + step, step) for key, step, value in points]
        self.client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
        if status != "RUNNING":
            self.client.set_terminated(run_id, status=status, end_time=start + HOUR_MS // 2)
        self.ids.setdefault(label, []).append(run_id)
        return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    store = Store(tmp_path_factory.mktemp("mlflow") / "mlflow.db")

    # The reference runs: three seeds of R18 on CIFAR-10 (plus a failed, a running and an interrupted
    # one), an older R18 CIFAR-100 run without parameter counts, an R50 run without a linear probe.
    soda = store.experiment("soda")
    for seed, knn, linear in [(0, 0.80, 0.79), (1, 0.81, 0.80), (2, 0.82, 0.84)]:
        curve = {KNN_ACC: [(0, 0.30 + seed / 100), (400, 0.70)], LINEAR_ACC: [(0, 0.35), (400, 0.72)]}
        store.run(
            soda,
            "r18-cifar10",
            config("soda_r18_ddpm", "cifar10", 32, 800, seed, counts=R18),
            finals={KNN_ACC: knn, LINEAR_ACC: linear, TRAIN_LOSS: 0.05},
            history=curve,
            tags={"git_sha": "a" * 40, "seed": str(seed)},
        )
    store.run(soda, "failed", config("soda_r18_ddpm", "cifar10", 32, 800, 3, counts=R18), status="FAILED")
    store.run(
        soda,
        "running",
        config("soda_r18_ddpm", "cifar10", 32, 800, 4, counts=R18),
        history={KNN_ACC: [(400, 0.10)]},
        status="RUNNING",
    )
    store.run(
        soda,
        "interrupted",
        config("soda_r18_ddpm", "cifar10", 32, 800, 5, counts=R18),
        history={KNN_ACC: [(400, 0.10)]},
        status="KILLED",
    )
    store.run(
        soda,
        "r18-cifar100",
        config("soda_r18_ddpm", "cifar100", 32, 800, 0),
        finals={KNN_ACC: 0.514, LINEAR_ACC: 0.549},
        tags={"git_sha": "b" * 40, "git_dirty": "true"},
    )
    store.run(
        soda,
        "r50-cifar10",
        config("soda_r50_ddpm", "cifar10", 32, 800, 0, counts=R50),
        finals={KNN_ACC: 0.70},
        tags={"git_sha": "b" * 40},
    )

    # Two sweeps of the demo: the augmentation ablation (6 cells x 2 seeds, one pruned trial) and a
    # learning-rate search (two trials, one failed); each with its parent run.
    demo = store.experiment("soda-demo")
    for study in ("augment_ablation", "lr_search"):
        store.run(
            demo,
            f"{study}-parent",
            {"sweep.study_name": study, "sweep.n_jobs": "2"},
            finals={"best_value": 0.9},
            tags={**parent_tags(study), "git_sha": "c" * 40},
        )
    trial = 0
    for (source, target), values in ABLATION.items():
        for seed in (0, 1):
            knn, linear, recon = (series[seed] for series in values)
            store.run(
                demo,
                "ablation",
                config("tiny", "shapes", 16, 2, seed, source, target, counts=(11_200_000, 190_000)),
                finals={KNN_ACC: knn, LINEAR_ACC: linear, RECON_MSE: recon},
                tags=_trial_tags("augment_ablation", trial, "COMPLETE"),
            )
            trial += 1
    store.run(
        demo,
        "pruned",
        config("tiny", "shapes", 16, 2, 2, "reference", "none"),
        history={LINEAR_ACC: [(1, 0.1)]},
        tags=_trial_tags("augment_ablation", trial, "PRUNED"),
        status="KILLED",
    )
    for trial, lr in enumerate(("0.001", "0.0001")):
        store.run(
            demo,
            "lr",
            config("tiny", "shapes", 16, 2, 0, lr=lr),
            finals={KNN_ACC: 0.5, LINEAR_ACC: 0.52},
            tags=_trial_tags("lr_search", trial, "COMPLETE"),
        )
    store.run(
        demo,
        "lr-failed",
        config("tiny", "shapes", 16, 2, 0, lr="1.0"),
        tags=_trial_tags("lr_search", 2, "FAIL"),
        status="FAILED",
    )
    store.run(demo, "lr-failed", config("tiny", "shapes", 16, 2, 0, lr="1.0"), status="FAILED")

    store.experiment("empty")
    no_eval = store.experiment("no-eval")
    store.run(no_eval, "no-eval", config("tiny", "shapes", 16, 2, 0), finals={TRAIN_LOSS: 0.2})
    return store


def _trial_tags(study: str, number: int, state: str) -> dict[str, str]:
    return {**trial_tags(study, number), TRIAL_STATE: state, "git_sha": "c" * 40}


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli(list(args))
    out, err = capsys.readouterr()
    return code, out, err


README = f"""# Project

Intro text that `make table` must not touch.

## Results

Generated by `make table`.

{START}
No results yet: run `make table`.
{END}

### Tables and plots

More text after the markers.

## Tests
"""


# Loading and selecting.


def test_load_runs_gives_one_row_per_run_with_params_metrics_and_tags(store):
    runs = load_runs(store.uri, ["soda"])
    assert len(runs) == 8
    assert list(runs["start_time"]) == sorted(runs["start_time"])
    assert set(runs["experiment"]) == {"soda"}
    first = runs.iloc[0]
    assert first["run_id"] == store.ids["r18-cifar10"][0]
    assert first["params.model.name"] == "soda_r18_ddpm"
    assert first[f"metrics.{KNN_ACC}"] == pytest.approx(0.80)  # the last value, at epoch 800
    assert first["tags.git_sha"] == "a" * 40
    assert sorted(runs["status"].unique()) == ["FAILED", "FINISHED", "KILLED", "RUNNING"]
    assert len(load_runs(store.uri)) == 8 + 19 + 1  # every experiment


def test_select_runs_by_sweep_tag_and_config_value(store):
    runs = load_runs(store.uri, ["soda", "soda-demo"])
    ablation = select_runs(runs, sweep="augment_ablation")
    assert len(ablation) == 1 + 12 + 1  # parent, trials, the pruned trial
    flip = select_runs(runs, sweep="augment_ablation", params={"augmentation.target.name": "flip"})
    assert list(flip["run_id"]) == store.ids["ablation"][2:4] + store.ids["ablation"][8:10]
    assert list(select_runs(runs, tags={"git_dirty": "true"})["run_id"]) == store.ids["r18-cifar100"]
    assert select_runs(runs, params={"model.name": "no-such-model"}).empty
    assert select_runs(runs, tags={"no-such-tag": "x"}).empty


def test_failed_pruned_and_unfinished_runs_are_excluded_and_counted(store):
    reference = load_runs(store.uri, ["soda"])
    assert exclusion_note(reference) == "excluded: 1 failed, 2 unfinished"  # RUNNING and interrupted (KILLED)
    table = main_table(reference)
    cifar10 = table.numbers.iloc[0]
    assert cifar10["run_ids"].split() == store.ids["r18-cifar10"]  # not the failed, running or killed seeds
    assert "excluded: 1 failed, 2 unfinished" in table.notes

    demo = load_runs(store.uri, ["soda-demo"])
    assert exclusion_note(demo) == "excluded: 2 failed, 1 pruned"  # parents are not results, not excluded
    assert main_table(demo).numbers["runs"].sum() == 12 + 2


def test_each_sweep_trial_counts_once_its_finished_run_kept():
    def run(run_id, status, hour, study=None, trial=None, **tags):
        row = {"run_id": run_id, "status": status, "start_time": pd.Timestamp(T0 + hour * HOUR_MS, unit="ms")}
        if study is not None:
            row["tags.optuna_study"] = study
        if trial is not None:
            row["tags.trial"] = trial
        return row | {f"tags.{key}": value for key, value in tags.items()}

    runs = pd.DataFrame(
        [
            run("parent", "KILLED", 0, "s", sweep="parent"),
            run("a-closed", "KILLED", 1, "s", "0", trial_state="FAIL"),  # closed by the sweeper, then ...
            run("a", "FINISHED", 2, "s", "0", trial_state="COMPLETE"),  # ... the trial's job finished it
            run("b-first", "FINISHED", 3, "s", "1", trial_state="COMPLETE"),
            run("b-again", "FINISHED", 4, "s", "1", trial_state="COMPLETE"),  # a study started over: the newest
            run("c-failed", "FAILED", 5, "s", "2"),
            run("c-killed", "KILLED", 6, "s", "2"),  # none finished: the newest says how the trial ended
            run("d", "FINISHED", 7, "t", "0", trial_state="COMPLETE"),  # another sweep's trial 0
            run("plain", "FINISHED", 8),  # runs that are no sweep's trials: each one counts
            run("plain-again", "FINISHED", 9),
            run("plain-killed", "KILLED", 10),
        ]
    )
    assert list(finished_runs(runs)["run_id"]) == ["a", "b-again", "d", "plain", "plain-again"]
    assert exclusion_note(runs) == "excluded: 2 unfinished, 3 duplicates"  # c-killed, plain-killed
    assert exclusion_note(runs[runs["run_id"].isin(["a-closed", "a"])]) == "excluded: 1 duplicate"
    assert exclusion_note(runs[runs["run_id"].isin(["plain", "plain-again"])]) == ""


def test_a_trial_recorded_more_than_once_is_one_run_of_the_table(tmp_path):
    # Trial 0's runs: one of a study of the same name that was started over, a run the sweeper
    # closed, and the one its job finished.
    store = Store(tmp_path / "mlflow.db")
    demo = store.experiment("soda-demo")
    seed0, seed1 = config("tiny", "shapes", 16, 2, 0), config("tiny", "shapes", 16, 2, 1)
    finals = {KNN_ACC: 0.6, LINEAR_ACC: 0.64}
    store.run(
        demo, "earlier", seed0, finals={KNN_ACC: 0.1, LINEAR_ACC: 0.1}, tags=_trial_tags("ablation", 0, "COMPLETE")
    )
    store.run(demo, "closed", seed0, tags=_trial_tags("ablation", 0, "FAIL"), status="KILLED")
    store.run(demo, "trial", seed0, finals=finals, tags=_trial_tags("ablation", 0, "COMPLETE"))
    store.run(demo, "trial", seed1, finals=finals, tags=_trial_tags("ablation", 1, "COMPLETE"))
    table = main_table(load_runs(store.uri))
    assert table.numbers["runs"].tolist() == [2] and table.numbers["run_ids"][0].split() == store.ids["trial"]
    assert table.numbers[f"{KNN_ACC}.mean"][0] == pytest.approx(0.6)
    assert table.notes == ("excluded: 2 duplicates",)


# The tables.


def test_main_table_has_seed_means_stds_and_counts(store):
    table = main_table(load_runs(store.uri, ["soda"]))
    expected = pd.DataFrame(
        [
            ["Res18+DDPM", "CIFAR-10", "32x32", "800", "11 + 40", "81.0 ± 1.0", "81.0 ± 2.6", "3"],
            ["Res18+DDPM", "CIFAR-100", "32x32", "800", "–", "51.4", "54.9", "1"],
            ["Res50+DDPM", "CIFAR-10", "32x32", "800", "24 + 40", "70.0", "–", "1"],
        ],
        columns=["Model", "Dataset", "Res", "Epochs", "Params (M)", "k-NN", "Linear probe", "Runs"],
    )
    pd.testing.assert_frame_equal(table.cells, expected)
    first = table.numbers.iloc[0]
    assert first[f"{KNN_ACC}.mean"] == pytest.approx(0.81)
    assert first[f"{KNN_ACC}.std"] == pytest.approx(0.01)
    assert first[f"{LINEAR_ACC}.std"] == pytest.approx(7**0.5 / 100)  # sample std of .79, .80, .84
    assert first[f"{KNN_ACC}.n"] == 3
    r50 = store.ids["r50-cifar10"][0]
    assert f"{LINEAR_ACC} missing in 1 of 5 finished runs ({r50[:8]})" in table.notes


def test_main_table_names_the_setting_that_tells_rows_apart(store):
    table = main_table(load_runs(store.uri, ["soda-demo"]))
    assert list(table.cells.columns) == [
        "Model",
        "Dataset",
        "Res",
        "Epochs",
        "Params (M)",
        "Setting",
        "k-NN",
        "Linear probe",
        "Runs",
    ]
    settings = list(table.cells["Setting"])
    assert len(settings) == 8 == len(set(settings))  # 6 ablation cells and 2 learning rates
    # The view names stand for the view's other values (crop_prob here); the bookkeeping params
    # (tracking.uri, schedule.checkpoint_every) and the seed are not part of a configuration.
    assert settings[0] == ("augmentation.source.name=none, augmentation.target.name=flip, schedule.decoder_lr=0.0003")
    assert (
        "augmentation.source.name=reference, augmentation.target.name=reference, schedule.decoder_lr=0.001" in settings
    )
    assert all("crop_prob" not in s and "tracking" not in s and "seed" not in s for s in settings)
    assert set(table.cells["Params (M)"]) == {"11 + 0.19", "–"}  # the lr trials recorded no counts


def test_ablation_table_crosses_source_and_target_views(store):
    table = ablation_table(load_runs(store.uri))
    expected = pd.DataFrame(
        [
            ["reference", "reference", "61.0 ± 1.4", "65.0 ± 1.4", "0.3100 ± 0.0141", "2"],
            ["reference", "flip", "59.0 ± 1.4", "62.0 ± 1.4", "0.2100 ± 0.0141", "2"],
            ["reference", "none", "56.0 ± 1.4", "60.0 ± 1.4", "0.1100 ± 0.0141", "2"],
            ["none", "reference", "42.0 ± 2.8", "46.0 ± 1.4", "0.3200 ± 0.0141", "2"],
            ["none", "flip", "39.0 ± 1.4", "43.0 ± 1.4", "0.2200 ± 0.0141", "2"],
            ["none", "none", "36.0 ± 1.4", "41.0 ± 1.4", "0.1200 ± 0.0141", "2"],
        ],
        columns=["Source", "Target", "k-NN", "Linear probe", "Recon. MSE", "Runs"],
    )
    pd.testing.assert_frame_equal(table.cells, expected)
    assert table.notes == ("all runs: tiny on shapes 16x16, 2 epochs", "excluded: 1 pruned")
    assert table.name == "augment_ablation"


def test_formats_text_markdown_csv_and_latex(store):
    table = main_table(load_runs(store.uri, ["soda"]))
    markdown = format_table(table, "markdown").splitlines()
    assert markdown[0].startswith("| Model      | Dataset   |")
    assert markdown[1].startswith("|------------|-----------|")
    assert markdown[2] == "| Res18+DDPM | CIFAR-10  | 32x32 | 800    | 11 + 40    | 81.0 ± 1.0 | 81.0 ± 2.6   | 3    |"
    text = format_table(table, "text").splitlines()
    assert text[0].split() == ["Model", "Dataset", "Res", "Epochs", "Params", "(M)", "k-NN", "Linear", "probe", "Runs"]
    assert text[2].split()[:5] == ["Res18+DDPM", "CIFAR-10", "32x32", "800", "11"]
    csv = pd.read_csv(io.StringIO(format_table(table, "csv")))
    assert list(csv["runs"]) == [3, 1, 1]
    assert csv.loc[0, f"{KNN_ACC}.mean"] == pytest.approx(0.81)  # raw fractions in CSV
    assert csv.loc[0, "run_ids"].split() == store.ids["r18-cifar10"]
    latex = format_table(table, "latex")
    assert r"Res18+DDPM & CIFAR-10 & 32x32 & 800 & 11 + 40 & 81.0 $\pm$ 1.0 & 81.0 $\pm$ 2.6 & 3 \\" in latex
    assert r"\begin{tabular}{lllrlrrr}" in latex  # numbers right-aligned


def test_provenance_names_experiments_dates_and_commits(store):
    assert provenance(load_runs(store.uri, ["soda"])) == (
        "5 finished runs of experiment `soda`, started 2026-11-01, git aaaaaaa, bbbbbbb (dirty)"
    )


# Plots.


def test_probe_curves_average_each_configuration_over_its_seeds(store):
    table = main_table(load_runs(store.uri, ["soda"]))
    run_ids = [run_id for ids in table.numbers["run_ids"] for run_id in ids.split()]
    history = load_history(store.uri, run_ids, [KNN_ACC, LINEAR_ACC])
    curves = probe_curves(history, table)
    knn = curves[(curves["row"] == 0) & (curves["key"] == KNN_ACC)]
    assert list(knn["step"]) == [0, 400, 800]
    assert list(knn["n"]) == [3, 3, 3]
    assert knn["mean"].tolist() == pytest.approx([0.31, 0.70, 0.81])
    assert knn["label"].iloc[0] == "Res18+DDPM · CIFAR-10 · 32x32 · epochs 800"


def test_plots_command_writes_nonempty_pngs(store, tmp_path, capsys):
    code, out, err = run_cli(capsys, "plots", "--tracking-uri", store.uri, "--out", str(tmp_path / "plots"))
    assert code == 0, err
    written = [Path(line) for line in out.splitlines()]
    assert sorted(path.name for path in written) == ["augment_ablation.png", "probe_accuracy.png"]
    for path in written:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


# The CLI.


def test_cli_prints_the_tables_in_each_format(store, capsys):
    code, out, err = run_cli(
        capsys, "main", "--tracking-uri", store.uri, "--experiment", "soda", "--format", "markdown"
    )
    assert code == 0, err
    assert "| Res18+DDPM | CIFAR-10  | 32x32 | 800    | 11 + 40    | 81.0 ± 1.0 |" in out
    assert "note: excluded: 1 failed, 2 unfinished" in err
    code, out, err = run_cli(capsys, "ablation", "--tracking-uri", store.uri, "--format", "csv")
    assert code == 0, err
    assert out.splitlines()[0].startswith("augmentation.source.name,augmentation.target.name,setting,runs")
    code, out, _ = run_cli(
        capsys, "main", "--tracking-uri", store.uri, "--sweep", "lr_search", "--param", "schedule.decoder_lr=0.001"
    )
    assert code == 0
    assert out.splitlines()[2].split()[:4] == ["tiny", "shapes", "16x16", "2"]
    assert len(out.splitlines()) == 3  # header, rule, the one matching run


BAD_INPUTS = {
    "unreachable server": (["--tracking-uri", "http://127.0.0.1:{port}"], "is unreachable"),
    "missing store": (["--tracking-uri", "sqlite:///{tmp}/nothing.db"], "no MLflow store at sqlite:///"),
    "unknown experiment": (["--experiment", "nope"], "no experiment 'nope' in"),
    "experiment without runs": (["--experiment", "empty"], "no finished runs match experiment 'empty' in"),
    "no run matches": (["--param", "model.name=nope"], "no finished runs match model.name=nope in"),
    "runs missing the metrics": (["--experiment", "no-eval"], f"recorded {KNN_ACC} or {LINEAR_ACC}"),
    "malformed filter": (["--tag", "git_sha"], "--tag 'git_sha' is not KEY=VALUE"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_error_line_and_exit_2(store, tmp_path, capsys, case):
    args, message = BAD_INPUTS[case]
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [arg.format(port=port, tmp=tmp_path) for arg in args]
    if "--tracking-uri" not in args:
        args += ["--tracking-uri", store.uri]
    code, out, err = run_cli(capsys, "main", *args)
    assert code == 2
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "nothing.db").exists()  # reading never creates a store


@pytest.mark.integration  # a process of its own
def test_python_m_analysis_exits_2_with_one_error_line(tmp_path):
    missing = f"sqlite:///{tmp_path}/nothing.db"
    result = subprocess.run(
        [sys.executable, "-m", "analysis", "main", "--tracking-uri", missing],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: no MLflow store at {missing}") and result.stderr.count("\n") == 1


# The README.


def markdown_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row in `text`."""
    return [
        [cell.strip() for cell in line.strip()[1:-1].split("|")] for line in text.splitlines() if line.startswith("|")
    ]


def test_readme_section_is_replaced_alone_and_regenerating_changes_nothing(store, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    code, out, err = run_cli(capsys, "readme", "--tracking-uri", store.uri, "--readme", str(readme))
    assert code == 0, err
    assert "results section updated, from 20 finished runs" in out
    text = readme.read_text()
    head, rest = text.split(START)
    section, tail = rest.split(END)
    assert head == README.split(START)[0]
    assert tail == README.split(END)[1]
    assert "No results yet" not in section
    rows = markdown_rows(section)
    assert ["Res18+DDPM", "CIFAR-10", "32x32", "800", "11 + 40", "", "81.0 ± 1.0", "81.0 ± 2.6", "3"] in rows
    # The no-eval run has the configuration of the ablation's (reference, reference) cell: 3 runs,
    # 2 of which recorded the probes.
    reference = "augmentation.source.name=reference, augmentation.target.name=reference, schedule.decoder_lr=0.0003"
    assert ["tiny", "shapes", "16x16", "2", "11 + 0.19", reference, "61.0 ± 1.4 (n=2)", "65.0 ± 1.4 (n=2)", "3"] in rows
    assert ["reference", "flip", "59.0 ± 1.4", "62.0 ± 1.4", "0.2100 ± 0.0141", "2"] in rows
    assert "From 20 finished runs of experiments `no-eval`, `soda`, `soda-demo` (sweeps `augment_ablation`, " in section
    assert "git aaaaaaa, bbbbbbb (dirty), ccccccc, unknown; excluded: 3 failed, 1 pruned, 2 unfinished; " in section
    assert "### Augmentation ablation (sweep `augment_ablation`)" in section
    assert "all runs: tiny on shapes 16x16, 2 epochs; excluded: 1 pruned." in section
    assert "![k-NN and linear-probe accuracy against epoch](docs/results/probe_accuracy.png)" in section
    assert "![The augmentation ablation](docs/results/augment_ablation.png)" in section
    pngs = {path: path.read_bytes() for path in (tmp_path / "docs" / "results").iterdir()}
    assert sorted(path.name for path in pngs) == ["augment_ablation.png", "probe_accuracy.png"]
    assert all(data.startswith(b"\x89PNG") for data in pngs.values())

    code, out, err = run_cli(capsys, "table", "--tracking-uri", store.uri, "--readme", str(readme))
    assert code == 0, err
    assert "results section already up to date" in out
    assert readme.read_text() == text
    assert {path: path.read_bytes() for path in pngs} == pngs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "docs"]  # no temporary files left


def test_readme_names_the_runs_it_used(store, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    code, _, err = run_cli(
        capsys, "readme", "--tracking-uri", store.uri, "--readme", str(readme), "--experiment", "soda"
    )
    assert code == 0, err
    section = readme.read_text().split(START)[1].split(END)[0]
    r50 = store.ids["r50-cifar10"][0]
    assert (
        "From 5 finished runs of experiment `soda`, started 2026-11-01, git aaaaaaa, bbbbbbb (dirty); "
        "selected: experiment 'soda'; excluded: 1 failed, 2 unfinished; "
        f"{LINEAR_ACC} missing in 1 of 5 finished runs ({r50[:8]})."
    ) in section
    assert "Augmentation ablation" not in section  # no ablation runs in this experiment


def test_readme_plots_and_store_default_to_the_working_directory(store, tmp_path, monkeypatch, capsys):
    # `make table` runs from the repository root: README.md, docs/results/ and the store the runs
    # wrote there (mlflow.db) are found in the working directory, wherever this package lies.
    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    monkeypatch.delenv(STORE_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlflow.db").symlink_to(store.uri[len("sqlite:///") :])
    readme = tmp_path / "README.md"
    readme.write_text(README)
    readme.chmod(0o640)  # the rewrite keeps the README's mode (the atomic writer's temporary file is 0600)
    code, out, err = run_cli(capsys, "readme")
    assert code == 0, err
    assert out.startswith("README.md: results section updated, from 20 finished runs")
    assert "No results yet" not in readme.read_text()
    assert readme.stat().st_mode & 0o777 == 0o640
    umask = os.umask(0)
    os.umask(umask)
    for name in ("probe_accuracy.png", "augment_ablation.png"):
        png = tmp_path / "docs" / "results" / name
        assert png.read_bytes().startswith(b"\x89PNG")
        assert png.stat().st_mode & 0o777 == 0o666 & ~umask  # what open() gives a new file
    assert sorted(p.name for p in (tmp_path / "docs" / "results").iterdir()) == [
        "augment_ablation.png",
        "probe_accuracy.png",
    ]  # no temporary files left

    code, out, err = run_cli(capsys, "plots", "--experiment", "soda")
    assert code == 0, err
    assert out.splitlines() == [str(Path("docs") / "results" / "probe_accuracy.png")]


def test_missing_readme_says_where_it_looked(store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "readme", "--tracking-uri", store.uri)
    assert code == 2
    assert err == f"error: no README at {tmp_path / 'README.md'} (run from the repository root, or pass --readme)\n"


def test_readme_is_untouched_when_no_run_matches(store, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    code, out, err = run_cli(
        capsys, "readme", "--tracking-uri", store.uri, "--readme", str(readme), "--experiment", "empty"
    )
    assert code == 2
    assert err.startswith("error: no finished runs match experiment 'empty' in sqlite:///")
    assert readme.read_text() == README
    assert not (tmp_path / "docs").exists()  # no plots either


def test_readme_without_markers_is_an_error_and_untouched(store, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n\nNo markers here.\n")
    code, _, err = run_cli(capsys, "readme", "--tracking-uri", store.uri, "--readme", str(readme))
    assert code == 2
    assert err == (
        f"error: the README has no {START} and {END} line; add the two marker lines where the results should go\n"
    )
    assert readme.read_text() == "# Project\n\nNo markers here.\n"


def test_the_repository_readme_has_the_markers_once_in_order():
    text = (REPO / "README.md").read_text()
    assert text.count(START) == 1 == text.count(END)
    assert text.index("## Results") < text.index(START) < text.index(END) < text.index("## Status")


@pytest.mark.integration  # a process of its own
def test_make_table_is_listed_and_passes_the_store_and_experiment():
    listed = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    assert "make table" in listed
    dry = subprocess.run(
        ["make", "-n", "table", "TRACKING_URI=sqlite:////x/y.db", "EXPERIMENT=soda"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "-m analysis readme --tracking-uri 'sqlite:////x/y.db' --experiment 'soda'" in dry
    assert "-m analysis bench" in dry


# The notebook.


@pytest.mark.integration  # a process of its own
def test_notebook_runs_top_to_bottom_on_the_store(store, tmp_path, monkeypatch):
    # Imported here: jupytext and nbclient are dev extras, absent where bench/gpu-check.sh runs on a
    # machine without the project's .venv, and the whole module must still collect there.
    import jupytext
    from nbclient import NotebookClient

    monkeypatch.setenv(TRACKING_URI_ENV, store.uri)
    notebook = jupytext.read(REPO / "analysis" / "notebooks" / "results.py")
    NotebookClient(
        notebook, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.output_type == "error"]
    texts = "\n".join(
        output.get("text", "") + "".join(str(v) for v in output.get("data", {}).values()) for output in outputs
    )
    rows = markdown_rows(texts)
    assert ["Res18+DDPM", "CIFAR-10", "32x32", "800", "11 + 40", "", "81.0 ± 1.0", "81.0 ± 2.6", "3"] in rows
    assert ["none", "none", "36.0 ± 1.4", "41.0 ± 1.4", "0.1200 ± 0.0141", "2"] in rows
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 2


def test_main_table_shows_the_latent_gap_in_percent_when_runs_recorded_it(tmp_path):
    gap_store = Store(tmp_path / "mlflow.db")
    experiment = gap_store.experiment("soda")
    for seed, gap in [(0, 0.012), (1, 0.018)]:
        gap_store.run(
            experiment,
            "gap",
            config("soda_r18_ddpm", "cifar10", 32, 800, seed, counts=R18),
            finals={KNN_ACC: 0.8, LINEAR_ACC: 0.8, LATENT_GAP: gap},
        )
    gap_store.run(
        experiment,
        "older",
        config("soda_r18_ddpm", "cifar100", 32, 800, 0),
        finals={KNN_ACC: 0.5, LINEAR_ACC: 0.5},
    )
    table = main_table(load_runs(gap_store.uri, ["soda"]))
    assert list(table.cells["Latent gap (%)"]) == ["1.50 ± 0.42", "–"]
    assert table.numbers.loc[0, f"{LATENT_GAP}.mean"] == pytest.approx(0.015)
    assert any(note.startswith(f"{LATENT_GAP} missing in 1 of 3 finished runs") for note in table.notes)
    # Runs that recorded no gap at all (older ones) keep the table as it was.
    assert "Latent gap (%)" not in main_table(load_runs(store_uri_without_gap(tmp_path), ["soda"])).cells


def store_uri_without_gap(tmp_path: Path) -> str:
    plain = Store(tmp_path / "plain.db")
    experiment = plain.experiment("soda")
    plain.run(experiment, "plain", config("soda_r18_ddpm", "cifar10", 32, 800, 0), finals={KNN_ACC: 0.8})
    return plain.uri


# docs/performance.md's figures from bench/results/*.json (python -m analysis bench).

PERFORMANCE = f"""# Performance

Text before the figures.

{BENCH_START}
Nothing yet.
{BENCH_END}

Text after the figures.
"""


def throughput_record(**extra) -> dict:
    """A hand-built bench/throughput.py record with round figures."""
    return {
        "when": "2026-01-02T03:04:05+00:00",
        "device": "cpu",
        "cpu_threads": 4,
        "torch": "2.0.0",
        "batch": 64,
        "model": "tiny",
        "data": {"fast": {"images_per_s": 12345.6}, "baseline": {"images_per_s": 1234.5}, "batch": 128},
        "step": {
            "fast": {"images_per_s": 100.0, "host_syncs_per_step": None, "tflops": 0.0512, "fraction_of_peak": None},
            "baseline": {"images_per_s": 80.0, "tflops": 0.041, "fraction_of_peak": None},
        },
        "end_to_end": {
            "fast": {"images_per_s": 90.0, "seconds_before_timing": 2.5, "tflops": 0.046, "fraction_of_peak": None},
            "baseline": {"images_per_s": 60.0},
            "loss": {"verdict": "mean loss difference +0.0010 over 12 steps, within 3 standard errors (0.0200)"},
        },
        "eval": {"seconds": 3.25, "train_images": 4096, "test_images": 1024},
        "peak_memory_mib": {"process_max_rss": 2048.4},
        "speedup": {"data": 10.0, "step": 1.25, "end_to_end": 1.5},
        **extra,
    }


def gpu_check_record() -> dict:
    """A hand-built bench/gpu_check.py record of a GPU machine."""
    return {
        "when": "2026-01-03T00:00:00+00:00",
        "kind": "cuda",
        "device": "NVIDIA H200",
        "card": "h200",
        "driver": "580.159.03",
        "torch": "2.0.0",
        "torchvision": "0.15.0",
        "cuda": "13.0",
        "git_sha": "d" * 40,
        "git_dirty": "false",
        "packages": {"carried": {"hydra-core": "1.3.8", "optuna": "5.1.0"}, "machine": {"torch": "2.0.0"}},
        "calls": [{"call": 1}, {"call": 2}],
        "stages": {
            "cuda_tests": {"status": "ok", "seconds": 120.4},
            "throughput": {
                "status": "ok",
                "seconds": 200.0,
                "end_to_end_images_per_s": 6500.2,
                "step_images_per_s": 7000.0,
                "fraction_of_peak": 0.4567,
                "host_syncs_per_step": 0,
                "compile": "compiled",
                "record": throughput_record(device="NVIDIA H200"),
            },
            "training": {"status": "failed", "seconds": 10.0, "reason": "only 5 s left"},
        },
        "targets": {"end_to_end_at_least_6000": True, "step_at_least_5400": True, "knn_end_above_start": None},
        "summary": "gpu-check failed training: only 5 s left",
    }


def write_records(folder: Path, records: dict[str, dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, record in records.items():
        (folder / name).write_text(json.dumps(record, indent=2) + "\n")
    return folder


def bench_block(doc: Path) -> str:
    text = doc.read_text()
    assert text.count(BENCH_START) == 1 == text.count(BENCH_END)
    return text.split(BENCH_START)[1].split(BENCH_END)[0]


def test_bench_block_has_the_exact_cells_of_a_throughput_record(tmp_path, capsys):
    doc = tmp_path / "docs" / "performance.md"
    doc.parent.mkdir()
    doc.write_text(PERFORMANCE)
    results = write_records(
        tmp_path / "bench" / "results", {"throughput-cpu.json": throughput_record(git_sha="e" * 40)}
    )
    code, out, err = run_cli(capsys, "bench", "--doc", str(doc), "--results", str(results))
    assert code == 0, err
    assert f"{doc}: bench figures updated; records: {results / 'throughput-cpu.json'}" in out
    text = doc.read_text()
    assert text.split(BENCH_START)[0] == PERFORMANCE.split(BENCH_START)[0]
    assert text.split(BENCH_END)[1] == PERFORMANCE.split(BENCH_END)[1]
    block = bench_block(doc)
    assert "Nothing yet." not in block
    assert markdown_rows(block) == [
        ["", "fast images/s", "baseline images/s", "ratio", "fast TFLOP/s", "fraction of peak"],
        ["---", "---:", "---:", "---:", "---:", "---:"],
        ["data path (both views, batch 128)", "12,346", "1,234", "10.00", "–", "–"],
        ["model step (tiny model, batch 64)", "100", "80", "1.25", "0.0512", "–"],
        ["end to end", "90", "60", "1.50", "0.046", "–"],
    ]
    assert (
        "From [bench/results/throughput-cpu.json](../bench/results/throughput-cpu.json); measured "
        "2026-01-02T03:04:05+00:00; on cpu, torch 2.0.0, 4 CPU threads; git eeeeeee. "
        "Regenerate with `make bench`, then `make table`."
    ) in block
    assert "Loss of the two paths from the same weights: mean loss difference +0.0010 over 12 steps" in block
    assert "k-NN + linear probe 3.2 s on 4,096 train and 1,024 test images" in block
    # The records that are not there say how to produce them.
    assert "No `bench/results/throughput-cuda.json` yet: `make bench` on a machine with a CUDA GPU writes it." in block
    assert "No `bench/results/gpu-check-cuda.json` yet: `make gpu-check` on a machine with a CUDA GPU" in block


def test_bench_block_regenerated_twice_changes_nothing(tmp_path, capsys):
    doc = tmp_path / "performance.md"
    doc.write_text(PERFORMANCE)
    results = write_records(
        tmp_path / "results",
        {"throughput-cpu.json": throughput_record(), "gpu-check-cuda.json": gpu_check_record()},
    )
    assert run_cli(capsys, "bench", "--doc", str(doc), "--results", str(results))[0] == 0
    first, modified = doc.read_bytes(), doc.stat().st_mtime_ns
    code, out, _ = run_cli(capsys, "bench", "--doc", str(doc), "--results", str(results))
    assert code == 0
    assert "bench figures already up to date" in out
    assert doc.read_bytes() == first and doc.stat().st_mtime_ns == modified
    assert sorted(path.name for path in tmp_path.iterdir()) == ["performance.md", "results"]  # no temporary files


def test_bench_block_shows_a_gpu_checks_stages_figures_and_targets(tmp_path, capsys):
    doc = tmp_path / "performance.md"
    doc.write_text(PERFORMANCE)
    results = write_records(tmp_path / "results", {"gpu-check-cuda.json": gpu_check_record()})
    assert run_cli(capsys, "bench", "--doc", str(doc), "--results", str(results))[0] == 0
    block = bench_block(doc)
    rows = markdown_rows(block)
    assert ["cuda_tests", "ok", "120", ""] in rows
    assert ["training", "failed", "10", "only 5 s left"] in rows
    assert ["end to end, images/s", "6,500"] in rows
    assert ["fraction of the bf16 peak", "0.457"] in rows
    assert ["host syncs per step", "0"] in rows
    assert ["k-NN accuracy, start → end", "–"] in rows
    assert ["end_to_end_at_least_6000", "met"] in rows
    assert ["knn_end_above_start", "not measured"] in rows
    assert "From [bench/results/gpu-check-cuda.json](results/gpu-check-cuda.json); measured 2026-01-03" in block
    assert "on NVIDIA H200, torch 2.0.0, CUDA 13.0; git ddddddd. Regenerate with `make gpu-check`" in block
    assert "With card h200, driver 580.159.03, torchvision 0.15.0, 2 carried packages, 2 calls." in block
    assert "Last line: `gpu-check failed training: only 5 s left`" in block
    assert "No `bench/results/throughput-cpu.json` yet: `make bench` on a machine without a GPU writes it." in block


def test_bench_block_without_records_says_how_to_produce_each(tmp_path, capsys):
    doc = tmp_path / "performance.md"
    doc.write_text(PERFORMANCE)
    code, out, _ = run_cli(capsys, "bench", "--doc", str(doc), "--results", str(tmp_path / "none"))
    assert code == 0
    assert "records: none" in out
    lines = [line for line in bench_block(doc).splitlines() if line.strip()]
    assert lines[1:] == [
        "No `bench/results/throughput-cpu.json` yet: `make bench` on a machine without a GPU writes it.",
        "No `bench/results/throughput-cuda.json` yet: `make bench` on a machine with a CUDA GPU writes it.",
        "No `bench/results/gpu-check-cuda.json` yet: `make gpu-check` on a machine with a CUDA GPU writes it.",
    ]


@pytest.mark.parametrize(
    "page, message",
    [
        ("# No markers\n", f" has no {BENCH_START} and {BENCH_END} line; add the two marker lines"),
        (f"{BENCH_END}\n{BENCH_START}\n", f"'s {BENCH_END} line comes before its {BENCH_START} line"),
    ],
)
def test_bench_block_with_bad_markers_is_one_error_line_and_untouched(tmp_path, capsys, page, message):
    doc = tmp_path / "performance.md"
    doc.write_text(page)
    results = write_records(tmp_path / "results", {"throughput-cpu.json": throughput_record()})
    code, out, err = run_cli(capsys, "bench", "--doc", str(doc), "--results", str(results))
    assert code == 2 and out == ""
    assert err.startswith(f"error: {doc}{message}") and err.count("\n") == 1
    assert doc.read_text() == page


def test_a_broken_bench_record_is_one_error_line(tmp_path, capsys):
    doc = tmp_path / "performance.md"
    doc.write_text(PERFORMANCE)
    (tmp_path / "throughput-cpu.json").write_text("{ cut short")
    code, _, err = run_cli(capsys, "bench", "--doc", str(doc), "--results", str(tmp_path))
    assert code == 2
    assert err.startswith(f"error: {tmp_path / 'throughput-cpu.json'} is not a readable JSON record")
    assert doc.read_text() == PERFORMANCE


def test_the_repository_performance_page_is_generated_from_the_committed_records(tmp_path):
    """docs/performance.md's block says what `python -m analysis bench` makes of the records git
    tracks in bench/results/ (not of a local `make gpu-check`'s untracked ones)."""
    page = REPO / "docs" / "performance.md"
    copy = tmp_path / "docs" / "performance.md"
    copy.parent.mkdir()
    copy.write_bytes(page.read_bytes())
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "bench/results"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    for name in filter(None, (line.decode() for line in tracked)):
        record = tmp_path / name
        record.write_bytes((REPO / name).read_bytes())
    regenerate_bench(copy, tmp_path / "bench" / "results")
    assert bench_block(copy) == bench_block(page), "docs/performance.md is stale: run make table"


# What the latent learns: the learning study's table and plots.

GAP500 = "eval/latent_gap_t500"


def learning_store(tmp_path: Path) -> Store:
    """Sweep learning_study: two noise schedules x two seeds, each with its untrained encoder
    (epoch 0) and a trained point (epoch 10, 470 steps of batch 64), and training diagnostics."""
    learning = Store(tmp_path / "learning.db")
    demo = learning.experiment("soda-demo")
    learning.run(demo, "parent", {"sweep.study_name": "learning_study"}, tags=parent_tags("learning_study"))
    trial = 0
    for schedule, (gap, colour, shape) in {"inverted_cosine": (0.30, 0.85, 0.5), "linear": (0.02, 0.60, 0.6)}.items():
        for seed in (0, 1):
            params = {
                **config("tiny", "shapes", 16, 10, seed, "none", "none", counts=(11_200_000, 190_000)),
                "model.noise_schedule": schedule,
                "schedule.batch_size": "64",
            }
            history = {
                GAP500: [(0, 0.0), (10, gap + seed / 100)],
                "eval/factor/shape_colour": [(0, 0.56 + seed / 50), (10, colour)],
                "eval/factor/shape": [(0, 0.70), (10, shape)],
                LINEAR_ACC: [(0, 0.73), (10, 0.5)],
                KNN_ACC: [(0, 0.74), (10, 0.45)],
                "train/images_seen": [(0, 0.0), (10, 470 * 64)],
                TRAIN_LOSS: [(10, 0.3), (470, 0.2)],
                "train/encoder_grad_norm": [(10, 1.0), (470, 0.5)],
            }
            learning.run(demo, schedule, params, history=history, tags=_trial_tags("learning_study", trial, "COMPLETE"))
            trial += 1
    return learning


def test_learning_table_sets_each_setting_against_the_untrained_encoder(tmp_path):
    from analysis.learning import learning_keys, learning_table

    learning = learning_store(tmp_path)
    runs = load_runs(learning.uri)
    finished = finished_runs(select_runs(runs, sweep="learning_study"))
    keys = learning_keys(finished)
    assert keys == [GAP500, "eval/factor/shape", "eval/factor/shape_colour", LINEAR_ACC, KNN_ACC]
    table = learning_table(runs, load_history(learning.uri, finished["run_id"], keys))
    cells = table.cells.set_index("Setting")
    assert list(cells.index) == [
        "untrained encoder (epoch 0)",
        "model.noise_schedule=inverted_cosine",
        "model.noise_schedule=linear",
    ]
    untrained = cells.loc["untrained encoder (epoch 0)"]
    assert untrained["Runs"] == "4" and untrained["shape (acc. %)"] == "70.0 ± 0.0"
    assert untrained["shape colour (R²)"] == "0.57 ± 0.01"  # 0.56, 0.58, 0.56, 0.58
    trained = cells.loc["model.noise_schedule=inverted_cosine"]
    assert trained["Latent gap t500 (%)"] == "30.5 ± 0.7" and trained["shape colour (R²)"] == "0.85 ± 0.00"
    assert trained["Linear probe (%)"] == "50.0 ± 0.0" and trained["Runs"] == "2"
    assert "all runs: tiny on shapes 16x16, 10 epochs" in table.notes


def test_readme_shows_the_learning_study_and_its_plots(tmp_path, capsys):
    learning = learning_store(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    page = tmp_path / "docs" / "learning.md"
    page.parent.mkdir()
    page.write_text("# Learning\n\n<!-- learning:start -->\nold\n<!-- learning:end -->\n\nAfter.\n")
    code, out, err = run_cli(capsys, "readme", "--tracking-uri", learning.uri, "--readme", str(readme))
    assert code == 0, err
    text = readme.read_text()
    assert "### What the latent learns (sweep `learning_study`)" in text
    assert "| untrained encoder (epoch 0)" in text and "model.noise_schedule=linear" in text
    for name in ("learning_study.png", "learning_study_diagnostics.png"):
        png = tmp_path / "docs" / "results" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"](docs/results/{name})" in text
    # The docs page's block holds the same table, its plots linked from docs/.
    block = page.read_text()
    assert "| untrained encoder (epoch 0)" in block and "](results/learning_study.png)" in block
    assert (
        block.startswith("# Learning\n") and block.endswith("<!-- learning:end -->\n\nAfter.\n") and "old" not in block
    )
    code, out, err = run_cli(capsys, "learning", "--tracking-uri", learning.uri)
    assert code == 0 and "untrained encoder (epoch 0)" in out and "What the latent learns" in err
