"""Optuna sweeps for real: the sweeper plugin, Optuna journal and PostgreSQL storages, MLflow
parent and child runs, the local launcher (and SLURM), failures, pruning and resume."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import optuna
import psutil
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from analysis import exclusion_note, finished_runs, load_runs
from launching.sweeper.search_space import override_value, parse_space
from soda.sweep import PRUNER_ATTR, SweepError, TrialReporter, open_storage
from tests.helpers import REPO, SMOKE, launch
from tests.support import services
from tests.support.services import POSTGRES, needs_postgres, needs_slurm

EXPERIMENT = "sweeps"
# One cell of augment_ablation's views, so that a test's own dimensions make its grid.
PINNED = ["augmentation/view@augmentation.target=reference", "augmentation/view@augmentation.source=reference"]


def _sweep_args(tmp_path: Path, *args: str) -> list[str]:
    return [
        "-m",
        *SMOKE,
        f"tracking.experiment={EXPERIMENT}",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"tracking.artifact_location={tmp_path}/artifacts",
        f"sweep.storage={tmp_path}/optuna.log",
        f"hydra.sweep.dir={tmp_path}/sweep",
        *args,
    ]


def _study(tmp_path: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(f"{tmp_path}/optuna.log"))


def _runs(uri: str) -> tuple[list, list]:
    """(parent runs, child runs) of the sweeps experiment."""
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = [] if experiment is None else client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if "trial" in r.data.tags]
    return parents, children


def _start(args: list[str], quiet: bool = False) -> subprocess.Popen:
    """launch.py in the background, in a process group of its own (as a terminal would start it)."""
    output = subprocess.DEVNULL if quiet else subprocess.PIPE
    return subprocess.Popen(
        [sys.executable, str(REPO / "launch.py"), *args],
        cwd=REPO,
        stdout=output,
        stderr=output,
        text=True,
        start_new_session=True,
    )


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stdout[-2000:]
    assert lines and lines[-1].startswith("error: "), result.stderr[-3000:]
    return lines[-1]


def _write_sweep(folder: Path, name: str, body: str) -> str:
    """A sweep file in a search-path folder of the test's own; returns the searchpath override."""
    (folder / "sweep").mkdir(parents=True, exist_ok=True)
    (folder / "sweep" / f"{name}.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /hydra/sweeper: soda_optuna\n" + body
    )
    return f"hydra.searchpath=[file://{folder}]"


# ---------------------------------------------------------------------------------------------
# The search space and the override round trip (no jobs)


def test_search_space_maps_hydra_sweep_syntax_to_optuna_distributions():
    dims, fixed = parse_space(
        {
            "augmentation/view@augmentation.target": "choice(reference, flip, none)",
            "seed": "range(0, 3)",
            "schedule.decoder_lr": "tag(log, interval(1e-4, 1e-2))",
            "model.latent_dim": "tag(int, interval(8, 64))",
            "schedule.epochs": 2,
        },
        ["eval.every=1", "seed=range(0, 6, 2)"],
    )
    d = optuna.distributions
    assert dims["augmentation/view@augmentation.target"].distribution == d.CategoricalDistribution(
        ["reference", "flip", "none"]
    )
    assert dims["seed"].distribution == d.IntDistribution(0, 4, step=2)  # the command line wins
    assert dims["seed"].grid == [0, 2, 4]
    assert dims["schedule.decoder_lr"].distribution == d.FloatDistribution(1e-4, 1e-2, log=True)
    assert dims["schedule.decoder_lr"].grid is None
    assert dims["model.latent_dim"].distribution == d.IntDistribution(8, 64)
    assert fixed == ["schedule.epochs=2", "eval.every=1"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"seed": "range(3, 3)"}, "has no values (an empty grid)"),
        ({"seed": "choice(1, 1)"}, "repeats a value"),
        ({"schedule.decoder_lr": "interval(1e-2, 1e-4)"}, "the interval is empty"),
        ({"schedule.decoder_lr": "tag(log, interval(0, 1))"}, "a log interval needs low > 0"),
        ({"schedule.decoder_lr": "intervl(1, 2)"}, "Unknown function 'intervl'"),
    ],
)
def test_bad_search_spaces_name_the_problem(params, message):
    with pytest.raises(SweepError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_space(params, [])


@pytest.mark.parametrize("value", ["flip", "a b", "it's", "1e-3", "true", "null", 3, 0.0003, 1e-8, True, None, "x=y"])
def test_override_values_read_back_with_their_type(value):
    parsed = OverridesParser.create().parse_override(f"key={override_value(value)}").value()
    assert parsed == value and type(parsed) is type(value)


def test_a_trial_reports_to_its_study_and_the_pruner_stops_it(tmp_path):
    storage = f"{tmp_path}/optuna.log"
    study = optuna.create_study(study_name="s", storage=open_storage(storage), direction="maximize")
    study.set_user_attr(PRUNER_ATTR, {"name": "threshold", "options": {"lower": 0.5}})
    trial = study.ask()
    reporter = TrialReporter(storage, "s", trial.number)  # as the trial's own process does
    assert reporter.report(0.8, step=1) is False
    assert reporter.report(0.3, step=2) is True
    assert _study(tmp_path, "s").trials[0].intermediate_values == {1: 0.8, 2: 0.3}


def test_an_unreachable_postgres_storage_is_one_line():
    with pytest.raises(SweepError, match=r"postgresql://u:\*\*\*@127.0.0.1:9/db cannot be used .*make postgres-up"):
        open_storage("postgresql://u:secret@127.0.0.1:9/db")


# ---------------------------------------------------------------------------------------------
# Whole sweeps through launch.py and the local launcher


# One augment_ablation cell per target view (3 trials): what the tests below read, or launch again.
ABLATION = ["sweep=augment_ablation", "augmentation/view@augmentation.source=reference", "seed=0"]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    """(folder, result): one augment_ablation sweep, run once for the tests that share it."""
    folder = tmp_path_factory.mktemp("ablation")
    return folder, launch(_sweep_args(folder, *ABLATION), timeout=600)


def test_augment_ablation_runs_every_cell_with_a_parent_run_and_a_child_per_trial(ablation):
    tmp_path, result = ablation
    assert result.returncode == 0, result.stderr[-4000:]
    study = _study(tmp_path, "augment_ablation")
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    targets = sorted(t.params["augmentation/view@augmentation.target"] for t in trials)
    assert targets == ["flip", "none", "reference"]

    parents, children = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert (
        parent.data.params["sweep.sampler"] == "grid" and parent.data.params["sweep.study_name"] == "augment_ablation"
    )
    by_number = {int(c.data.tags["trial"]): c for c in children}
    for trial in trials:
        child = by_number[trial.number]
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.params["augmentation.target.name"] == trial.params["augmentation/view@augmentation.target"]
        assert child.data.metrics["eval/linear_acc"] == pytest.approx(trial.value)
        # Its trial's MLflow run says what ran: study, trial number, swept values.
        target = trial.params["augmentation/view@augmentation.target"]
        assert child.info.run_name == f"augment_ablation #{trial.number}: target={target}"
    assert parent.info.run_name == "augment_ablation"
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)
    assert "sweep augment_ablation: 3 trials in the study (3 complete, 0 pruned, 0 failed)" in result.stdout
    # One line as each trial ends, naming its log (the trial's folder holds it).
    for trial in trials:
        (line,) = [x for x in result.stdout.splitlines() if f"trial {trial.number} COMPLETE, " in x]
        log_file = line.rsplit("; log ", 1)[1]
        assert f" done: {trial.value:.4g}; log " in line and Path(log_file).is_file(), line
        assert Path(log_file).parent == tmp_path / "sweep" / str(trial.number)
    assert sorted(int(x.split(", ")[1].split("/")[0]) for x in result.stdout.splitlines() if " COMPLETE, " in x) == [
        1,
        2,
        3,
    ]


def test_a_finished_sweep_launched_again_runs_nothing(ablation):
    tmp_path, _ = ablation
    # The same command again: the study is complete, nothing runs, the parent is reused.
    again = launch(_sweep_args(tmp_path, *ABLATION), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(_study(tmp_path, "augment_ablation").trials) == 3
    parents, children = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert len(parents) == 1 and len(children) == 3
    # Where and how it runs may change: another tracking store, the same study, nothing to run.
    other = [f"tracking.uri=sqlite:///{tmp_path}/other.db", "schedule.log_every=5"]
    elsewhere = launch([*_sweep_args(tmp_path, *ABLATION), *other], timeout=120)
    assert elsewhere.returncode == 0, elsewhere.stderr[-3000:]
    said = elsewhere.stderr + elsewhere.stdout
    assert "study augment_ablation (grid): 3 of 3 trials already finished; 0 grid cells to run" in said


def test_a_sweep_with_other_fixed_settings_is_not_the_same_study(ablation):
    tmp_path, _ = ablation
    # The same sweep at another size: refused before any job, naming what differs.
    other = launch([*_sweep_args(tmp_path, *ABLATION), "schedule.epochs=2", "model.latent_dim=32"], timeout=120)
    assert _one_line_error(other) == (
        "error: study augment_ablation was run with other fixed settings: model.latent_dim=32 (the study's: 64), "
        "schedule.epochs=2 (the study's: 1); run it with the same settings to resume it, or give another "
        "sweep.study_name for a study of its own"
    )
    assert len(_study(tmp_path, "augment_ablation").trials) == 3


@pytest.mark.heavy
def test_failed_trials_are_recorded_and_max_failure_rate_stops_the_sweep(tmp_path):
    # A data set that is not there: the job itself raises, after launch (the config cannot tell).
    space = ["dataset.name=choice(shapes, nowhere)", "seed=range(0, 2)", "sweep.max_failure_rate=0.5", *PINNED]
    result = launch(_sweep_args(tmp_path, "sweep=augment_ablation", "sweep.study_name=tolerant", *space), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    trials = _study(tmp_path, "tolerant").get_trials()
    states = {(t.params["dataset.name"], t.params["seed"]): t.state.name for t in trials}
    assert states == {
        ("shapes", 0): "COMPLETE",
        ("shapes", 1): "COMPLETE",
        ("nowhere", 0): "FAIL",
        ("nowhere", 1): "FAIL",
    }
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert all("nowhere not found under" in t.user_attrs["error"] for t in failed)
    _, children = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    failed_runs = [c for c in children if c.info.status == "FAILED"]
    assert len(failed_runs) == 2 and all("nowhere not found" in c.data.tags["error"] for c in failed_runs)

    # A stricter sweep stops as soon as more than 25 % of its 4 trials (so 2) have failed.
    strict = ["dataset.name=choice(nowhere, nothere, gone, shapes)", "seed=0", "sweep.max_failure_rate=0.25", *PINNED]
    strict += ["sweep.n_jobs=1"]
    result = launch(_sweep_args(tmp_path, "sweep=augment_ablation", "sweep.study_name=strict", *strict), timeout=600)
    line = _one_line_error(result)
    assert "stopped: more than max_failure_rate=0.25 of 4 trials failed" in line
    assert [t.state.name for t in _study(tmp_path, "strict").trials] == ["FAIL", "FAIL"]
    parents, _ = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert {p.data.tags["optuna_study"]: p.info.status for p in parents} == {"tolerant": "FINISHED", "strict": "FAILED"}


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _job_pids(sweep_dir: Path) -> list[int]:
    """The local launcher's job ids are the processes' ids."""
    folder = sweep_dir / ".submitit"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


@pytest.mark.heavy
def test_a_job_that_dies_is_a_failed_trial_and_the_sweep_goes_on(tmp_path):
    args = _sweep_args(
        tmp_path, "sweep=augment_ablation", "sweep.study_name=dies", "seed=range(0, 2)", "sweep.max_failure_rate=0.5"
    )
    args += PINNED
    args += ["schedule.epochs=10", "sweep.n_jobs=1"]  # long enough to be killed while it trains
    sweeper = _start(args)
    try:
        first = _wait_for(
            lambda: (tmp_path / "sweep" / "0" / "mlflow_run_id").exists() and _job_pids(tmp_path / "sweep"),
            180,
            "trial 0 to start",
        )
        time.sleep(2)
        # The job id is submitit's controller; the training runs in its child: kill that one, as
        # the kernel's OOM killer would.
        tasks = psutil.Process(first[0]).children(recursive=True)
        assert tasks
        for task in tasks:
            task.kill()
        stdout, stderr = sweeper.communicate(timeout=600)
    finally:
        sweeper.kill()
    assert sweeper.returncode == 0, stderr[-4000:]
    trials = _study(tmp_path, "dies").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[0].user_attrs["error"].startswith("job died:")
    _, children = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    status = {c.data.tags["trial"]: (c.info.status, c.data.tags.get("error", "")) for c in children}
    assert status["0"][0] == "FAILED" and status["0"][1].startswith("job died:")
    assert status["1"][0] == "FINISHED"


@pytest.mark.heavy
def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    args = _sweep_args(tmp_path, "sweep=augment_ablation", "sweep.study_name=resumed", "seed=range(0, 3)")
    args += PINNED
    args += ["sweep.n_jobs=1", "schedule.epochs=2"]
    # Kill the whole process group, the sweeper and its job, without warning (a lost login node).
    sweeper = _start(args, quiet=True)
    try:

        def second_trial_running():
            try:
                trials = _study(tmp_path, "resumed").get_trials()
            except KeyError:
                return False
            states = [t.state.name for t in trials]
            return states[:2] == ["COMPLETE", "RUNNING"] and (tmp_path / "sweep" / "1" / "mlflow_run_id").exists()

        _wait_for(second_trial_running, 300, "trial 0 complete and trial 1 running")
    finally:
        os.killpg(sweeper.pid, signal.SIGKILL)
        sweeper.wait()

    result = launch(args, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    trials = _study(tmp_path, "resumed").get_trials()
    complete = {t.params["seed"]: t.number for t in trials if t.state.name == "COMPLETE"}
    assert complete[0] == 0  # finished before the interruption: kept, not run again
    assert sorted(complete) == [0, 1, 2]
    interrupted = [t for t in trials if t.state.name == "FAIL"]
    assert [t.params["seed"] for t in interrupted] == [1]
    assert interrupted[0].user_attrs["error"].startswith("interrupted")
    assert len(trials) == 4
    parents, children = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED", "FINISHED", "KILLED"]


def test_fixed_settings_leave_out_what_the_sweep_varies_and_where_it_runs():
    from launching.sweeper.study import fixed_settings

    config = {
        "seed": 0,
        "model": {"name": "tiny", "latent_dim": 64},
        "augmentation": {"name": "seed", "source": {"name": "reference"}, "target": {"name": "flip"}},
        "schedule": {"epochs": 20, "log_every": 10},
        "tracking": {"uri": "sqlite:///x.db"},
        "dataset": {"name": "shapes", "root": "/data/shapes"},
    }
    swept = ["augmentation/view@augmentation.target", "seed", "model.latent_dim"]
    assert fixed_settings(config, swept) == {
        "model.name": "tiny",
        "augmentation.name": "seed",
        "augmentation.source.name": "reference",
        "schedule.epochs": "20",
        "dataset.name": "shapes",
    }


def test_a_sweep_file_run_as_the_demo_is_a_study_of_its_own():
    from soda.config import compose_config, to_settings

    assert to_settings(compose_config(["sweep=augment_ablation"])).sweep.study_name == "augment_ablation"
    demo = to_settings(compose_config(["sweep=augment_ablation", "experiment=demo"]))
    assert demo.sweep.study_name == "augment_ablation-demo"
    named = to_settings(compose_config(["sweep=lr_search", "experiment=demo", "sweep.study_name=mine"]))
    assert named.sweep.study_name == "mine"


@pytest.mark.heavy
def test_ctrl_c_cancels_the_jobs_in_flight_and_records_them_as_interrupted(tmp_path):
    args = _sweep_args(tmp_path, "sweep=augment_ablation", "sweep.study_name=ctrl_c", "seed=range(0, 2)")
    args += PINNED
    args += ["sweep.n_jobs=2", "schedule.epochs=30"]
    sweeper = _start(args)
    try:
        _wait_for(lambda: len(_job_pids(tmp_path / "sweep")) == 2, 180, "both trials to start")
        _wait_for(lambda: (tmp_path / "sweep" / "1" / "mlflow_run_id").exists(), 180, "trial 1 to train")
        os.kill(sweeper.pid, signal.SIGINT)  # the sweeper only: it must stop its jobs itself
        _, stderr = sweeper.communicate(timeout=180)
    finally:
        sweeper.kill()
    line = stderr.strip().splitlines()[-1]
    assert sweeper.returncode != 0 and line.startswith("error: sweep ctrl_c interrupted"), stderr[-3000:]
    assert "re-run the same command to resume" in line
    for pid in _job_pids(tmp_path / "sweep"):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    trials = _study(tmp_path, "ctrl_c").trials
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
    assert all(t.user_attrs["error"].startswith("interrupted") for t in trials)
    parents, children = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert parents[0].info.status == "KILLED" and [c.info.status for c in children] == ["KILLED", "KILLED"]


@pytest.mark.heavy
def test_ctrl_c_in_the_terminal_keeps_the_finished_trial_and_says_one_line_per_stopped_job(tmp_path):
    # A terminal's Ctrl-C reaches its whole foreground process group: the sweeper, each job's
    # controller and the job's training process. Trial 0 (one epoch) has finished; trial 1 (many)
    # is training.
    args = _sweep_args(tmp_path, "sweep=augment_ablation", "sweep.study_name=terminal", "seed=0", *PINNED)
    args += ["schedule.epochs=choice(1, 50)", "sweep.n_jobs=1"]
    sweeper = _start(args)
    try:

        def trial_1_training():
            try:
                states = [t.state.name for t in _study(tmp_path, "terminal").get_trials()]
            except KeyError:  # no study yet
                return False
            return states == ["COMPLETE", "RUNNING"] and (tmp_path / "sweep" / "1" / "mlflow_run_id").exists()

        _wait_for(trial_1_training, 300, "trial 0 complete and trial 1 training")
        time.sleep(2)
        os.killpg(sweeper.pid, signal.SIGINT)
        stdout, stderr = sweeper.communicate(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the group
            os.killpg(sweeper.pid, signal.SIGKILL)
        sweeper.wait()

    # The terminal: one line per stopped job, the summary, and no traceback from any process.
    folder = tmp_path / "sweep" / ".submitit"
    (job,) = [pid for pid in _job_pids(tmp_path / "sweep") if not list((folder / str(pid)).glob("*_result.pkl"))]
    stopped = [line for line in stdout.splitlines() if "stopped" in line]
    assert len(stopped) == 1, stdout[-3000:]
    assert stopped[0].endswith(f"trial 1 (job {job}): stopped; it will run again when you re-run the command")
    assert "Traceback" not in stdout + stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert sweeper.returncode != 0 and stderr.strip().splitlines() == [
        "error: sweep terminal interrupted: 1 of 2 trials finished, 1 stopped; re-run the same command to resume"
    ]

    # The finished trial stays complete, in Optuna and in MLflow; the stopped one runs again.
    trials = _study(tmp_path, "terminal").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL"]
    assert trials[1].user_attrs["error"].startswith("interrupted")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _, children = _runs(uri)
    ends = {c.data.tags["trial"]: (c.info.status, c.data.tags.get("trial_state")) for c in children}
    # Trial 1's run ends as its own process recorded it: KILLED, or FAILED when Ctrl-C hit a
    # checkpoint's write (soda.files hands on torch.save's error then, not the interrupt).
    assert ends["0"] == ("FINISHED", "COMPLETE") and ends["1"] in {("KILLED", "FAIL"), ("FAILED", "FAIL")}
    runs = load_runs(uri, [EXPERIMENT])
    assert finished_runs(runs)["tags.trial"].tolist() == ["0"]
    assert exclusion_note(runs) in ("excluded: 1 unfinished", "excluded: 1 failed")
    for pid in _job_pids(tmp_path / "sweep"):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.heavy
def test_a_pruned_trial_is_recorded_as_pruned_in_optuna_and_mlflow(tmp_path):
    # A contrived pruner: no linear probe reaches 101 %, so every trial stops at its first
    # evaluation after the warm-up (epoch 1 of 3); the untrained evaluation (epoch 0) is not reported.
    searchpath = _write_sweep(
        tmp_path / "conf",
        "contrived",
        """
sweep:
  study_name: contrived
  n_trials: 2
hydra:
  sweeper:
    direction: maximize
    sampler: {name: random, seed: 0}
    pruner: {name: threshold, options: {lower: 1.01, n_warmup_steps: 1}}
    params:
      schedule.decoder_lr: tag(log, interval(1e-4, 1e-3))
""",
    )
    result = launch(
        _sweep_args(tmp_path, "sweep=contrived", searchpath, "schedule.epochs=3", "eval.at_start=true"), timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    trials = _study(tmp_path, "contrived").trials
    assert [t.state.name for t in trials] == ["PRUNED", "PRUNED"]
    assert all(sorted(t.intermediate_values) == [1] for t in trials)
    _, children = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert [c.info.status for c in children] == ["KILLED", "KILLED"]
    assert all(c.data.tags["trial_state"] == "PRUNED" for c in children)
    assert all("eval/linear_acc" in c.data.metrics for c in children)


def test_lr_search_composes_and_validates_its_space(tmp_path):
    # The shipped search, checked all the way to the first trial's composition, then stopped by
    # an impossible trial count (no job is launched).
    result = launch(_sweep_args(tmp_path, "sweep=lr_search", "experiment=demo", "sweep.n_trials=0"), timeout=120)
    assert "sweep.n_trials=0 must be >= 1 or null" in _one_line_error(result)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("schedule.no_such_key: choice(1, 2)", "schedule.no_such_key"),
        ("schedule.decoder_lr: intervl(1e-4, 1e-3)", "Unknown function 'intervl'"),
        ("seed: range(2, 2)", "seed=range(2, 2) has no values (an empty grid)"),
        ("augmentation/view@augmentation.target: choice(reference, blurry)", "blurry"),
        ("schedule.decoder_lr: choice(1e-3, -1.0)", "schedule.decoder_lr=-1.0 must be positive"),
        ("schedule.decoder_lr: interval(1e-4, 1e-3)", "the grid sampler needs choice(...) or range(...)"),
    ],
)
def test_bad_sweep_files_fail_before_any_job_with_one_line(tmp_path, params, message):
    searchpath = _write_sweep(
        tmp_path / "conf",
        "bad",
        f"""
sweep:
  study_name: bad
hydra:
  sweeper:
    sampler: {{name: grid}}
    params:
      {params}
""",
    )
    result = launch(_sweep_args(tmp_path, "sweep=bad", searchpath), timeout=120)
    assert message in _one_line_error(result)
    assert not (tmp_path / "sweep" / ".submitit").exists()  # nothing was launched
    parents, children = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert parents == [] and children == []


def test_n_jobs_needs_a_launcher_with_processes(tmp_path):
    result = launch(
        _sweep_args(tmp_path, "sweep=augment_ablation", "hydra/launcher=basic", "sweep.n_jobs=2"), timeout=120
    )
    assert "sweep.n_jobs=2 needs a launcher that runs jobs in their own processes" in _one_line_error(result)


# ---------------------------------------------------------------------------------------------
# Cluster scale: PostgreSQL-backed MLflow server and Optuna storage; SLURM


@pytest.fixture
def mlflow_server(tmp_path):
    with services.mlflow_server(tmp_path, workers=2) as uri:
        yield uri


@needs_postgres
@pytest.mark.postgres
def test_concurrent_trials_log_every_metric_to_a_postgres_backed_mlflow_server(tmp_path, mlflow_server):
    study = f"crowd_{uuid.uuid4().hex[:8]}"
    args = _sweep_args(tmp_path, "sweep=augment_ablation", f"sweep.study_name={study}", "seed=range(0, 4)")
    args += PINNED
    args += ["sweep.n_jobs=4", "tracking=server", f"tracking.uri={mlflow_server}", f"tracking.experiment={EXPERIMENT}"]
    args += [f"sweep.storage={POSTGRES}/optuna", "schedule.epochs=2"]
    result = launch(args, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    loaded = optuna.load_study(study_name=study, storage=f"{POSTGRES}/optuna")
    assert [t.state.name for t in loaded.trials] == ["COMPLETE"] * 4

    client = mlflow.MlflowClient(mlflow_server)
    parents, children = _runs(mlflow_server)
    assert len(parents) == 1 and len(children) == 4
    # 96 images / batch 32 = 3 steps per epoch, 2 epochs, a loss point per step, one eval per epoch.
    expected = {"train/loss": 6, "train/lr": 6, "eval/linear_acc": 2, "eval/knn_acc": 2, "eval/recon_mse": 2}
    expected |= {"train/epoch_seconds": 2, "train/images_per_second": 2, "eval/seconds": 2}
    written = read = 0
    for child in children:
        assert child.info.status == "FINISHED"
        for key, count in expected.items():
            history = client.get_metric_history(child.info.run_id, key)
            written += count
            read += len(history)
            assert len(history) == count, (key, [m.step for m in history])
    assert read == written == 4 * sum(expected.values())


@needs_slurm
@pytest.mark.slurm
def test_a_sweep_runs_its_trials_as_slurm_jobs(tmp_path):
    args = _sweep_args(tmp_path, "sweep=augment_ablation", "sweep.study_name=slurm", "seed=range(0, 2)")
    args += PINNED
    args += ["hydra/launcher=slurm", "sweep.n_jobs=2"]
    result = launch(args, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [t.state.name for t in _study(tmp_path, "slurm").trials] == ["COMPLETE", "COMPLETE"]
    job_ids = [p.name for p in (tmp_path / "sweep" / ".submitit").iterdir() if p.name[0].isdigit()]
    assert len(job_ids) == 2  # two SLURM job ids, one per trial
    _, children = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert sorted(c.data.tags["trial"] for c in children) == ["0", "1"]


def test_local_jobs_share_the_cores_instead_of_oversubscribing_them(monkeypatch):
    from hydra_plugins.soda_launchers import launchers
    from launching import local

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(local, "_SET_BY_US", set())
    monkeypatch.setattr(local.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU: the ranks are the 2 asked for
    launcher = launchers.SodaLocalLauncher(tasks_per_node=2, threads_per_task=None)
    launcher.run_trials(jobs_at_once=4)  # a sweeper with sweep.n_jobs=4
    assert (launcher.jobs_at_once, launcher.runs_trials) == (4, True)
    local.share_cores(local.plan_launch(launcher.params, launcher.jobs_at_once, [], 0))
    assert os.environ["OMP_NUM_THREADS"] == "2"  # 16 cores / (4 jobs x 2 ranks)
    local.share_cores(local.plan_launch(launcher.params, 3, [], 0))  # a plain multirun of 3 points
    assert os.environ["OMP_NUM_THREADS"] == "2"  # 16 // 6
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # the user's choice wins
    monkeypatch.setattr(local, "_SET_BY_US", set())
    local.share_cores(local.plan_launch(launcher.params, 8, [], 0))
    assert os.environ["OMP_NUM_THREADS"] == "5"


@pytest.mark.heavy
def test_a_multi_objective_search_tells_optuna_every_objective(tmp_path):
    searchpath = _write_sweep(
        tmp_path / "conf",
        "pareto",
        """
objective: [eval/linear_acc, eval/recon_mse]
sweep:
  study_name: pareto
  n_trials: 2
hydra:
  sweeper:
    direction: [maximize, minimize]
    sampler: {name: nsga2, seed: 0}
    params:
      schedule.decoder_lr: tag(log, interval(1e-4, 1e-3))
""",
    )
    result = launch(_sweep_args(tmp_path, "sweep=pareto", searchpath), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    trials = _study(tmp_path, "pareto").trials
    _, children = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    by_number = {int(c.data.tags["trial"]): c.data.metrics for c in children}
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for trial in trials:
        metrics = by_number[trial.number]
        assert trial.values == pytest.approx([metrics["eval/linear_acc"], metrics["eval/recon_mse"]])


@pytest.mark.heavy
def test_a_custom_search_space_adds_a_parameter_to_the_trials_that_need_it(tmp_path):
    # A function of the user's, importable where the sweep is launched: the second seed's trial
    # also gets a decoder learning rate; the first keeps the config's.
    (tmp_path / "spaces").mkdir()
    (tmp_path / "spaces" / "lr_for_seed_1.py").write_text(
        "def configure(config, trial):\n"
        "    assert config.objective == 'eval/linear_acc' and 'sweeper' in config.hydra\n"
        "    if trial.params['seed'] == 1:\n"
        "        trial.suggest_float('schedule.decoder_lr', 1e-4, 1e-3, log=True)\n"
    )
    searchpath = _write_sweep(
        tmp_path / "conf",
        "conditional",
        """
  - override /hydra/sweeper/sampler: grid
sweep:
  study_name: conditional
hydra:
  sweeper:
    custom_search_space: lr_for_seed_1.configure
    params:
      seed: range(0, 2)
""",
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'spaces'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = launch(_sweep_args(tmp_path, "sweep=conditional", searchpath, *PINNED), timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    trials = {t.params["seed"]: t for t in _study(tmp_path, "conditional").trials}
    assert [t.state.name for t in trials.values()] == ["COMPLETE", "COMPLETE"]
    assert "schedule.decoder_lr" not in trials[0].params
    lr = trials[1].params["schedule.decoder_lr"]
    assert 1e-4 <= lr <= 1e-3
    _, children = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    recorded = {int(c.data.tags["trial"]): c.data.params for c in children}
    assert float(recorded[trials[1].number]["schedule.decoder_lr"]) == pytest.approx(lr)
    assert float(recorded[trials[0].number]["schedule.decoder_lr"]) != pytest.approx(lr)


def test_an_unknown_custom_search_space_fails_before_any_trial(tmp_path):
    result = launch(
        _sweep_args(tmp_path, "sweep=augment_ablation", "hydra.sweeper.custom_search_space=nowhere.configure"),
        timeout=120,
    )
    line = _one_line_error(result)
    assert line.startswith("error: hydra.sweeper.custom_search_space=nowhere.configure: "), line
    assert not (tmp_path / "sweep" / ".submitit").exists()


def test_directions_must_match_the_objectives(tmp_path):
    result = launch(_sweep_args(tmp_path, "sweep=lr_search", "objective=[eval/linear_acc,eval/knn_acc]"), timeout=120)
    assert "1 direction(s) ['maximize'] for 2 objective(s)" in _one_line_error(result)


@pytest.mark.heavy
def test_a_search_resumed_with_another_seed_is_refused_unless_asked_and_then_recorded(tmp_path):
    searchpath = _write_sweep(
        tmp_path / "conf",
        "seeded",
        """
sweep:
  study_name: seeded
  n_trials: 1
hydra:
  sweeper:
    sampler: {name: random, seed: 1}
    params:
      schedule.decoder_lr: tag(log, interval(1e-4, 1e-3))
""",
    )
    args = _sweep_args(tmp_path, "sweep=seeded", searchpath, *PINNED)
    first = launch(args, timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]

    other = [*args, "hydra.sweeper.sampler.seed=2", "sweep.n_trials=2"]
    refused = _one_line_error(launch(other, timeout=120))
    assert refused.startswith(
        "error: study seeded was run with other sweep settings: hydra.sweeper.sampler.seed=2 (the study's: 1); "
    ), refused
    assert "hydra.sweeper.resume_with_changes=true" in refused
    assert len(_study(tmp_path, "seeded").trials) == 1

    asked = launch([*other, "hydra.sweeper.resume_with_changes=true"], timeout=600)
    assert asked.returncode == 0, asked.stderr[-4000:]
    assert [t.state.name for t in _study(tmp_path, "seeded").trials] == ["COMPLETE", "COMPLETE"]
    [parent], _ = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert parent.data.params["sweep.sampler_seed"] == "1"  # what it started with; the tag says what changed
    change = parent.data.tags["resume_changes"]
    assert change.endswith(" hydra.sweeper.sampler.seed: 1 -> 2, sweep.n_trials: 1 -> 2"), change
