"""End-to-end runs of the real config on tiny sizes, read back from MLflow."""

import re
from pathlib import Path

import mlflow
import pytest
import torch

from soda import loop, progress, train
from soda.checkpoint import load_checkpoint
from soda.errors import CheckpointError, TrackingError
from soda.record import COMPILE, KNN_ACC, LATENT_GAP, LINEAR_ACC, RECON_MSE, TRAIN_LOSS, latent_gap_at
from tests.helpers import CONF, SMOKE, compose_config, launch


def _runs(tmp_path: Path, experiment: str = "soda"):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


EXPERIMENTS = sorted(path.stem for path in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.smoke  # the whole run that make test-fast keeps
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_smoke_run_writes_a_complete_mlflow_record(experiment, tmp_path):
    """Every experiment of conf/experiment/, shrunk to a smoke run (tiny model, shapes, 1 epoch)."""
    cfg = compose_config([f"experiment={experiment}", *SMOKE, "tracking.experiment=soda"], tmp_path)
    objective = train.run(cfg, run_dir=tmp_path / "run")

    (run,) = _runs(tmp_path)
    assert run.info.status == "FINISHED"
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["model.name"] == "tiny" and params["dataset.name"] == "shapes"
    assert params["schedule.epochs"] == "1" and params["seed"] == "0"
    assert len(tags["git_sha"]) in (40, 7) or tags["git_sha"] == "unknown"
    assert tags["git_dirty"] in ("true", "false", "unknown") and tags["seed"] == "0"
    assert tags[COMPILE] == "eager"  # schedule.compile=auto compiles on CUDA only
    for key in (KNN_ACC, LINEAR_ACC):
        assert 0.0 <= metrics[key] <= 1.0
    assert objective == metrics[cfg.objective]
    assert metrics[TRAIN_LOSS] > 0 and RECON_MSE in metrics
    assert -1 < metrics[LATENT_GAP] < 1 and latent_gap_at(700) in metrics
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    history = client.get_metric_history(run.info.run_id, KNN_ACC)
    epochs = [0, 1] if cfg.eval.at_start else [1]  # eval.at_start evaluates the untrained encoder too
    assert [m.step for m in history] == epochs
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts and "samples" in artifacts
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert samples == [f"samples/reconstructions_epoch{epoch:04d}.png" for epoch in epochs]
    config_text = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()
    assert "name: tiny" in config_text and "hydra" not in config_text


def _interrupt_at(monkeypatch, epoch_to_fail: int):
    original = loop.Trainer.train_epoch

    def failing(self, epoch):
        if epoch == epoch_to_fail:
            raise RuntimeError("simulated preemption")
        return original(self, epoch)

    monkeypatch.setattr(loop.Trainer, "train_epoch", failing)


def test_resume_after_an_interruption_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    overrides = [*SMOKE, "schedule.epochs=3", "schedule.checkpoint_every=1", "eval.at_start=false"]
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = train.run(compose_config(overrides, straight_dir), run_dir=straight_dir / "run")

    with monkeypatch.context() as patch:
        _interrupt_at(patch, 3)
        with pytest.raises(RuntimeError, match="simulated preemption"):
            train.run(compose_config(overrides, resumed_dir), run_dir=resumed_dir / "run")
    (failed,) = _runs(resumed_dir)
    assert failed.info.status == "FAILED" and "simulated preemption" in failed.data.tags["error"]
    assert (
        load_checkpoint(
            resumed_dir / "run" / train.CHECKPOINT, train.signature(train.to_settings(compose_config(overrides)))
        )["epoch"]
        == 2
    )

    resumed = train.run(compose_config(overrides, resumed_dir), run_dir=resumed_dir / "run")
    assert resumed == straight
    (run,) = _runs(resumed_dir)  # the same MLflow run, continued
    assert run.info.run_id == failed.info.run_id and run.info.status == "FINISHED"
    client = mlflow.MlflowClient(f"sqlite:///{resumed_dir}/mlflow.db")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/knn_acc")] == [1, 2, 3]
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert len({m.step for m in losses}) == len(losses)  # no step recorded twice
    a = torch.load(straight_dir / "run" / train.CHECKPOINT, weights_only=True)["model"]
    b = torch.load(resumed_dir / "run" / train.CHECKPOINT, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_checkpoint_stops_the_run_before_anything_is_recorded(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / train.CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        train.run(compose_config(SMOKE, tmp_path), run_dir=run_dir)
    assert _runs(tmp_path) == []
    assert (run_dir / train.CHECKPOINT).read_bytes() == b"not a checkpoint"


def test_unreachable_tracking_server_fails_at_start(tmp_path):
    cfg = compose_config([*SMOKE, "tracking=server", "tracking.uri=http://127.0.0.1:9"])
    with pytest.raises(TrackingError, match=r"http://127.0.0.1:9 is unreachable"):
        train.run(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_launch_runs_a_job_and_prints_the_final_summary_line(tmp_path):
    # Its output is a pipe, not a terminal: the progress must be in lines, in the run's launch.log.
    result = launch(
        [
            "experiment=demo",
            *SMOKE,
            "schedule.epochs=2",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.artifact_location={tmp_path}/artifacts",
            f"hydra.run.dir={tmp_path}/run",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    final = [line for line in result.stdout.splitlines() if line.startswith("final ")]
    assert len(final) == 1 and "eval/knn_acc=" in final[0] and "eval/linear_acc=" in final[0]
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()

    # The run's log: each epoch with the time left, each evaluation's stages, then its metrics.
    log = (tmp_path / "run" / "launch.log").read_text()
    assert re.search(r"\[soda.loop\]\[INFO\] - epoch 1/2  [\d.]+ s  \d+ images/s  eta \d+s\n", log), log
    assert re.search(r"\[soda.loop\]\[INFO\] - epoch 2/2  [\d.]+ s  \d+ images/s  eta \d+s\n", log), log
    for stage in ("k-NN features", "linear probe 0/2 epochs", "k-NN and linear test", "latent gap 0/2 timesteps"):
        assert re.search(f"eval epoch 2: {stage}.*  [\\d.]+ s\n", log), (stage, log)
    assert re.search(r"eval epoch 2: eval/knn_acc=.* eval/factor/background_colour=.*  \([\d.]+ s\)\n", log), log

    # What the launcher reads for its line on this job: the final line's values.
    written = progress.read_result(tmp_path / "run")
    assert written is not None and written["epoch"] == 2
    for name, value in written["metrics"].items():
        assert f"{name}={value:.4f}" in final[0]
    assert written["objective"] == {"eval/linear_acc": written["metrics"]["eval/linear_acc"]}
    assert written["mlflow_run_id"] in final[0]


def test_unreachable_tracking_server_is_one_line_from_launch(tmp_path):
    result = launch([*SMOKE, "tracking=server", "tracking.uri=http://127.0.0.1:9", f"hydra.run.dir={tmp_path}/run"])
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unreachable" in lines[0] and "tracking=local" in lines[0]


def test_a_nan_loss_fails_the_run_with_its_reason_recorded(tmp_path, monkeypatch):
    from soda.errors import DivergenceError
    from soda.models import SODA

    monkeypatch.setattr(SODA, "loss", lambda self, source, target: self.encoder(source).sum() * float("nan"))
    with pytest.raises(DivergenceError, match=r"train/loss is nan at step 1"):
        train.run(compose_config([*SMOKE, "eval.at_start=false"], tmp_path), run_dir=tmp_path / "run")
    (run,) = _runs(tmp_path)
    assert run.info.status == "FAILED" and "train/loss is nan" in run.data.tags["error"]


def test_sigusr1_checkpoints_mid_epoch_and_the_rerun_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    import os
    import signal

    overrides = [*SMOKE, "schedule.epochs=2", "eval.at_start=false", "eval.every=2"]
    straight_dir, preempted_dir = tmp_path / "straight", tmp_path / "preempted"
    straight = train.run(compose_config(overrides, straight_dir), run_dir=straight_dir / "run")

    original = loop.Trainer.train_step

    def signalling(self, images):
        if self.global_step == 4:  # in the second epoch (3 steps per epoch)
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, images)

    with monkeypatch.context() as patch:
        patch.setattr(loop.Trainer, "train_step", signalling)
        with pytest.raises(SystemExit, match=r"preempted: checkpoint saved at epoch 1 \+ 2 steps"):
            train.run(compose_config(overrides, preempted_dir), run_dir=preempted_dir / "run")
    (stopped,) = _runs(preempted_dir)
    assert stopped.info.status == "KILLED"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL and signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL

    resumed = train.run(compose_config(overrides, preempted_dir), run_dir=preempted_dir / "run")
    assert resumed == straight
    (run,) = _runs(preempted_dir)
    assert run.info.status == "FINISHED" and run.info.run_id == stopped.info.run_id
    client = mlflow.MlflowClient(f"sqlite:///{preempted_dir}/mlflow.db")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_time_boxed_run_stops_on_its_training_clock_and_probes_linearly_at_the_end(tmp_path, monkeypatch):
    """schedule.train_seconds and eval.every_seconds on a fake clock: every step takes 0.25 s, the
    first step (compilation) is not counted, evaluations pause the clock. 3 steps per epoch."""
    import types

    clock = [0.0]
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: clock[0], sleep=lambda s: None))
    original = loop.Trainer.train_step

    def timed_step(self, images):
        clock[0] += 0.25
        return original(self, images)

    monkeypatch.setattr(loop.Trainer, "train_step", timed_step)
    overrides = [
        *SMOKE,
        "schedule.epochs=1000",
        "schedule.train_seconds=1.6",
        "eval.every=1000",
        "eval.every_seconds=0.75",
        "eval.at_start=true",
        "eval.linear_probe=last",
        "eval.latent_gap_images=8",
        "eval.num_reconstructions=0",
    ]
    objective = train.run(compose_config(overrides, tmp_path), run_dir=tmp_path / "run")

    (run,) = _runs(tmp_path)
    assert run.info.status == "FINISHED"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")

    def history(key):
        return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]

    # Clock after each epoch: 0.5 (its first step uncounted), 1.25 (>= 0.75 since the last
    # evaluation: evaluate), then 1.75 two steps into epoch 3: spent, so epoch 3 is the last.
    assert [step for step, _ in history("eval/knn_acc")] == [0, 2, 3]
    assert history("train/seconds") == [(0, 0.0), (2, 1.25), (3, 1.75)]
    assert history("train/images_seen") == [(0, 0.0), (2, 6 * 32.0), (3, 8 * 32.0)]
    assert history("eval/linear_acc") == [(3, objective)]  # the linear probe only at the end
    gaps = history("eval/latent_gap")
    assert [step for step, _ in gaps] == [0, 2, 3] and all(abs(gap) < 1 for _, gap in gaps)
    assert [step for step, _ in history("eval/latent_gap_t500")] == [0, 2, 3]
    (first_step,) = history("train/first_step_seconds")
    assert first_step == (1, 0.25)
    checkpoint = torch.load(tmp_path / "run" / train.CHECKPOINT, weights_only=True)
    assert checkpoint["epoch"] == 3 and checkpoint["global_step"] == 8 and checkpoint["train_seconds"] == 1.75

    # The same command again: the budget is spent, so the run is finished and nothing is added.
    again = train.run(compose_config(overrides, tmp_path), run_dir=tmp_path / "run")
    assert again == objective
    assert [step for step, _ in history("eval/knn_acc")] == [0, 2, 3]
