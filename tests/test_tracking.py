"""soda.tracking's record contract: where the stores are by default, what a redacted URL shows, and
tags that the readers (analysis/) recognise as the writers (the sweeper, soda.train) set them."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis.runs import exclusion_note, finished_runs, select_runs, sweep_parents
from soda.record import (
    KNN_ACC,
    LATENT_GAP,
    LINEAR_ACC,
    OBJECTIVES,
    PARENT_RUN,
    RECON_MSE,
    STUDY,
    TRIAL,
    TRIAL_STATE,
    latent_gap_at,
    parent_tags,
    run_name,
    shown_order,
    trial_run_name,
    trial_tags,
)
from soda.store import (
    MLFLOW_URI_ENV,
    STORE_DIR_ENV,
    SWEEP_STORAGE_ENV,
    TRACKING_URI_ENV,
    default_artifact_location,
    default_sweep_storage,
    default_tracking_uri,
    redact,
    store_dir,
)
from tests.helpers import compose_config

STORE_ENVS = (TRACKING_URI_ENV, MLFLOW_URI_ENV, SWEEP_STORAGE_ENV, STORE_DIR_ENV)


@pytest.fixture
def no_store_env(monkeypatch):
    for name in STORE_ENVS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# Where the stores are by default.


def test_default_stores_lie_in_the_working_directory(no_store_env, tmp_path):
    for folder in (tmp_path / "a", tmp_path / "b"):
        folder.mkdir()
        no_store_env.chdir(folder)
        assert store_dir() == folder.resolve()
        assert default_tracking_uri() == f"sqlite:///{folder.resolve()}/mlflow.db"
        assert default_sweep_storage() == f"{folder.resolve()}/optuna-journal.log"
        assert default_artifact_location() == f"{folder.resolve()}/mlartifacts"


def test_the_tracking_uri_is_the_command_lines_then_soda_then_mlflows_variable(no_store_env, tmp_path):
    no_store_env.chdir(tmp_path)
    no_store_env.setenv(MLFLOW_URI_ENV, "http://mlflow.example:5000")
    assert compose_config([]).tracking.uri == "http://mlflow.example:5000"  # tracking=local honours it
    no_store_env.setenv(TRACKING_URI_ENV, "sqlite:////tmp/soda.db")
    assert compose_config([]).tracking.uri == "sqlite:////tmp/soda.db"
    assert compose_config(["tracking.uri=http://other:5000"]).tracking.uri == "http://other:5000"


def test_store_dir_env_moves_both_embedded_stores(no_store_env, tmp_path):
    no_store_env.chdir(tmp_path)
    no_store_env.setenv(STORE_DIR_ENV, "stores")  # relative: to the working directory
    stores = (tmp_path / "stores").resolve()
    assert default_tracking_uri() == f"sqlite:///{stores}/mlflow.db"
    assert default_sweep_storage() == f"{stores}/optuna-journal.log"
    no_store_env.chdir("/")
    no_store_env.setenv(STORE_DIR_ENV, str(tmp_path))
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_uri_envs_win_over_the_store_dir(no_store_env, tmp_path):
    no_store_env.chdir(tmp_path)
    no_store_env.setenv(STORE_DIR_ENV, str(tmp_path / "stores"))
    no_store_env.setenv(TRACKING_URI_ENV, "http://127.0.0.1:5000")
    no_store_env.setenv(SWEEP_STORAGE_ENV, "postgresql://soda@localhost:5433/optuna")
    assert default_tracking_uri() == "http://127.0.0.1:5000"
    assert default_sweep_storage() == "postgresql://soda@localhost:5433/optuna"
    # Each variable names one store: the sweep's does not move the tracking store, nor the reverse.
    no_store_env.delenv(TRACKING_URI_ENV)
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/stores/mlflow.db"
    no_store_env.delenv(SWEEP_STORAGE_ENV)
    no_store_env.setenv(TRACKING_URI_ENV, "http://127.0.0.1:5000")
    assert default_sweep_storage() == f"{tmp_path.resolve()}/stores/optuna-journal.log"


def test_composed_config_resolves_the_stores_where_it_is_launched(no_store_env, tmp_path):
    no_store_env.chdir(tmp_path)
    cfg = compose_config([])
    assert cfg.tracking.uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert cfg.tracking.artifact_location == f"{tmp_path.resolve()}/mlartifacts"
    assert cfg.sweep.storage == f"{tmp_path.resolve()}/optuna-journal.log"


def test_composed_config_follows_the_environment(no_store_env, tmp_path):
    no_store_env.chdir(tmp_path)
    no_store_env.setenv(TRACKING_URI_ENV, "http://127.0.0.1:5000")
    no_store_env.setenv(STORE_DIR_ENV, str(tmp_path / "stores"))
    cfg = compose_config([])
    assert cfg.tracking.uri == "http://127.0.0.1:5000"
    assert cfg.sweep.storage == f"{(tmp_path / 'stores').resolve()}/optuna-journal.log"


# Redaction.


@pytest.mark.parametrize(
    "url, secret, shown",
    [
        ("postgresql://user:pw@host/db", "pw", "postgresql://user:***@host/db"),
        (
            "postgresql+psycopg://soda:s3cr:et@127.0.0.1:5433/optuna",
            "s3cr:et",
            "postgresql+psycopg://soda:***@127.0.0.1:5433/optuna",
        ),
        ("http://alice:hunter2@mlflow.example:5000", "hunter2", "http://alice:***@mlflow.example:5000"),
    ],
)
def test_redact_hides_the_password(url, secret, shown):
    assert redact(url) == shown
    assert secret not in redact(url)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://user@host/db",
        "postgresql://host:5432/db",
        "http://127.0.0.1:5000",
        "sqlite:////tmp/mlflow.db",
        "/home/me/optuna-journal.log",
    ],
)
def test_redact_leaves_a_url_without_a_password_as_it_is(url):
    assert redact(url) == url


# Keys and tags.


def test_latent_gap_at_a_timestep_extends_the_gap_key():
    assert latent_gap_at(500) == LATENT_GAP + "_t500"
    assert latent_gap_at(500) != latent_gap_at(700)


def test_objectives_are_evaluation_metrics():
    assert set(OBJECTIVES) == {KNN_ACC, LINEAR_ACC, RECON_MSE, LATENT_GAP}


def test_trial_tags_name_the_study_the_trial_and_the_sweeps_run():
    assert trial_tags("ablation", 3) == {TRIAL: "3", STUDY: "ablation"}
    tags = trial_tags("ablation", 3, parent_run_id="abc123")
    assert tags[PARENT_RUN] == "abc123"
    assert PARENT_RUN == "mlflow.parentRunId"  # MLflow's own tag, which nests runs in its UI


def _runs(*rows: tuple[str, str, dict[str, str]]) -> pd.DataFrame:
    """Runs as analysis.runs.load_runs gives them: run_id, status and `tags.<key>` columns."""
    return pd.DataFrame(
        [
            {"run_id": run_id, "status": status, **{f"tags.{k}": v for k, v in tags.items()}}
            for run_id, status, tags in rows
        ]
    )


def test_analysis_recognises_the_tags_sweeps_write():
    runs = _runs(
        ("ablation-parent", "FINISHED", parent_tags("ablation")),
        ("trial-0", "FINISHED", trial_tags("ablation", 0, "ablation-parent")),
        ("trial-1", "FINISHED", trial_tags("ablation", 1, "ablation-parent")),
        ("pruned", "KILLED", {**trial_tags("ablation", 2), TRIAL_STATE: "PRUNED"}),
        ("lr-parent", "FINISHED", parent_tags("lr")),
        ("lr-trial", "FAILED", trial_tags("lr", 0, "lr-parent")),
        ("single", "FINISHED", {}),
    )
    assert list(sweep_parents(runs)) == [True, False, False, False, True, False, False]
    ablation = select_runs(runs, sweep="ablation")
    assert list(ablation["run_id"]) == ["ablation-parent", "trial-0", "trial-1", "pruned"]
    assert list(finished_runs(ablation)["run_id"]) == ["trial-0", "trial-1"]  # the parent holds no result
    assert exclusion_note(ablation) == "excluded: 1 pruned"
    assert list(finished_runs(runs)["run_id"]) == ["trial-0", "trial-1", "single"]
    assert exclusion_note(runs) == "excluded: 1 failed, 1 pruned"
    assert select_runs(runs, sweep="lr")["run_id"].tolist() == ["lr-parent", "lr-trial"]


def test_lines_show_the_probes_and_the_gap_before_the_factor_probes():
    metrics = {"eval/factor/size": 0.5, "eval/linear_acc": 0.7, "eval/factor/shape": 0.6, "eval/knn_acc": 0.8}
    assert [key for key, _ in shown_order(metrics)] == [
        "eval/knn_acc",
        "eval/linear_acc",
        "eval/factor/shape",
        "eval/factor/size",
    ]


def test_run_names_say_what_ran():
    from soda.config import compose_config, to_settings

    assert run_name(to_settings(compose_config(["experiment=demo", "seed=3"]))) == "tiny shapes seed=3"
    trial = to_settings(compose_config(["sweep.study_name=ablation", "sweep.trial=4"]))
    assert run_name(trial) == "ablation #4: soda_r18_ddpm cifar10 seed=0"
    params = {"augmentation/view@augmentation.target": "flip", "schedule.decoder_lr": 3.16227766e-4, "seed": 1}
    assert trial_run_name("augment_ablation", 3, params) == (
        "augment_ablation #3: target=flip decoder_lr=0.000316 seed=1"
    )
    assert trial_run_name("s", 0, {}) == "s #0"
