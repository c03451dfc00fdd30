"""make gpu-check keeps working between the sessions that have a GPU: its CPU-sized run goes
through every stage (tiny JPEG folder, cuda tests collected, throughput bench, a time-boxed
launch.py run read back from MLflow) and writes its record and summary line."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from soda import tracking

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(
    r"gpu-check ok e2e=(\d+) step=(\d+) mfu=- knn_start=([\d.]+) knn_end=([\d.]+) images=(\d+) latent_gap=(-?[\d.]+)"
)


def test_cpu_sized_gpu_check_runs_every_stage_and_writes_its_record(tmp_path):
    record_path = tmp_path / "record.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    result = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--smoke", "--work", str(tmp_path / "work"), "--out", str(record_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    last = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    match = SUMMARY.fullmatch(last)
    assert match, last
    record = json.loads(record_path.read_text())
    assert record["summary"] == last and record["kind"] == "cpu"
    assert record["torch"] and len(record["git_sha"]) == 40 and record["git_source"] == "git"
    stages = record["stages"]
    assert [stages[name]["status"] for name in ("data", "cuda_tests", "throughput", "training")] == ["ok"] * 4
    assert all(stage["seconds"] > 0 for stage in stages.values())
    assert stages["data"]["images"] == {"train": 400, "test": 200}
    assert stages["cuda_tests"]["collected"] >= 7 and stages["cuda_tests"]["ran"] is False
    assert round(stages["throughput"]["end_to_end_images_per_s"]) == int(match.group(1))

    training = stages["training"]
    knn = training["curves"][tracking.KNN_ACC]
    assert knn[0][0] == 0 and len(knn) >= 2  # the untrained encoder, then at least the end
    assert [step for step, _ in training["curves"][tracking.LINEAR_ACC]] == [knn[-1][0]]  # the probe at the end only
    assert [training["knn_start"], training["knn_end"]] == [knn[0][1], knn[-1][1]]
    assert float(match.group(3)) == round(knn[0][1], 4) and float(match.group(4)) == round(knn[-1][1], 4)
    assert 0.1 < training["knn_start"] <= 1  # 10 classes that a pixel k-NN tells apart
    gaps = training["curves"][tracking.LATENT_GAP]
    assert len(gaps) == len(knn) and training["latent_gap_end"] == gaps[-1][1]
    for timestep in (500, 700):  # the run's eval.latent_gap_timesteps (conf/eval/reference.yaml)
        assert [step for step, _ in training["curves"][tracking.latent_gap_at(timestep)]] == [step for step, _ in knn]
    images = training["images_seen"]
    assert images == int(match.group(5)) > 0 and images % 64 == 0
    assert training["train_seconds"] >= training["train_seconds_budget"] > 0
    assert training["compile"] == stages["throughput"]["compile"] == "eager"  # compile=auto: CUDA only
    assert set(record["targets"]) >= {"knn_end_above_start", "latent_gap_grew"}


def test_gpu_check_without_the_packages_or_carried_wheels_says_what_to_do(tmp_path):
    env = {**os.environ, "SODA_PYTHON": sys.executable, "SODA_CARRY": str(tmp_path / "nothing"), "PYTHONPATH": ""}
    env["PYTHONNOUSERSITE"] = "1"
    # A Python without hydra: the interpreter in isolated mode does not see the project's site-packages.
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')
    python.chmod(0o755)
    env["SODA_PYTHON"] = str(python)
    result = subprocess.run(
        ["bash", "bench/gpu-check.sh"], cwd=REPO, capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 1
    assert result.stdout.strip().startswith("gpu-check failed install:")
    assert "make gpu-carry" in result.stdout and "make install" in result.stdout


def _gpu_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_only_parts_read_pytest_reports_and_judge_the_targets(tmp_path):
    """What only runs on a GPU, on fabricated inputs: the pytest report of the cuda tests, and the
    targets and summary line of a CUDA record."""
    gpu_check = _gpu_check_module()
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_good(): pass\n"
        "def test_bad(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='no')\n"
        "def test_skipped(): pass\n"
    )
    report = tmp_path / "report.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", "test_sample.py"],
        cwd=tmp_path,
        capture_output=True,
        env={k: v for k, v in os.environ.items() if k != "CI"},
        timeout=120,
    )
    counts, failures = gpu_check._junit(report)
    assert counts == {"tests": 3, "failed": 1, "errors": 0, "skipped": 1, "passed": 1}
    assert len(failures) == 1 and failures[0].startswith("test_bad: AssertionError: one is not two")

    record = {
        "kind": "cuda",
        "stages": {
            "throughput": {
                "end_to_end_images_per_s": 6100.4,
                "step_images_per_s": 5000.0,
                "fraction_of_peak": 0.3141,
                "host_syncs_per_step": 0.0,
                "compile": "compiled",
            },
            "training": {
                "knn_start": 0.31,
                "knn_end": 0.35,
                "latent_gap_start": 0.002,
                "latent_gap_end": 0.001,
                "images_seen": 1_024_000,
            },
        },
    }
    assert gpu_check.targets(record) == {
        "end_to_end_at_least_6000": True,
        "step_at_least_5400": False,
        "zero_host_syncs_per_step": True,
        "compiled": True,
        "knn_end_above_start": True,
        "latent_gap_grew": False,
    }
    assert gpu_check.summary_line(record) == (
        "gpu-check ok e2e=6100 step=5000 mfu=0.314 knn_start=0.3100 knn_end=0.3500 images=1024000 latent_gap=0.0010"
    )


def test_the_training_budget_leaves_room_for_a_compile_the_cache_did_not_save(tmp_path):
    gpu_check = _gpu_check_module()
    check = gpu_check.Check(tmp_path / "record.json", tmp_path, deadline=0.0, kind="cuda")
    assert gpu_check.training_overhead(check) == 70 + 165  # nothing filled the cache
    check.record["stages"]["cuda_tests"] = {"status": "ok"}
    assert gpu_check.training_overhead(check) == 70 + 30  # the CUDA tests compiled the graph
    check.record["stages"]["throughput"] = {"compile_seconds": 180.0}
    assert gpu_check.training_overhead(check) == 70 + 180  # the bench saw a miss: so will training
    assert gpu_check.training_overhead(gpu_check.Check(tmp_path / "r.json", tmp_path, 0.0, "cpu")) == 45


def test_the_training_record_is_read_back_by_the_record_contract(tmp_path):
    """read_training_record on a store written through soda.tracking's keys and tags, with the
    latent gap at the timesteps the run's config names (not necessarily the default ones)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    gpu_check = _gpu_check_module()
    store = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.create_experiment("gpu-check", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    series = {
        tracking.KNN_ACC: [(0, 0.2), (1, 0.3), (2, 0.4)],
        tracking.LINEAR_ACC: [(2, 0.45)],
        tracking.LATENT_GAP: [(0, 0.001), (1, 0.002), (2, 0.004)],
        tracking.latent_gap_at(100): [(0, 0.01), (1, 0.02), (2, 0.03)],
        tracking.latent_gap_at(900): [(0, 0.0), (1, 0.0), (2, 0.001)],
        tracking.IMAGES_SEEN: [(1, 640), (2, 1280)],
        tracking.TRAIN_SECONDS: [(1, 4.0), (2, 8.5)],
        tracking.IMAGES_PER_SECOND: [(1, 100.0), (2, 150.0)],
        tracking.FIRST_STEP_SECONDS: [(0, 3.0)],
        tracking.TRAIN_LOSS: [(step, 1.0 / (step + 1)) for step in range(7)],
    }
    client.log_batch(
        run_id,
        metrics=[Metric(key, value, 0, step) for key, points in series.items() for step, value in points],
        params=[Param("eval.latent_gap_timesteps", "[100, 900]")],
        tags=[RunTag(tracking.COMPILE, "eager")],
    )
    client.set_terminated(run_id)

    record = gpu_check.read_training_record(store)
    assert record["mlflow_run_id"] == run_id and record["status"] == "FINISHED" and record["compile"] == "eager"
    assert (record["epochs"], record["knn_start"], record["knn_end"], record["linear_end"]) == (2, 0.2, 0.4, 0.45)
    assert (record["latent_gap_start"], record["latent_gap_end"]) == (0.001, 0.004)
    assert (record["images_seen"], record["train_seconds"], record["first_step_seconds"]) == (1280, 8.5, 3.0)
    assert record["images_per_s_median"] == 150.0  # the epochs after the first
    assert record["loss_points"] == 7 and tracking.TRAIN_LOSS not in record["curves"]
    assert record["curves"][tracking.latent_gap_at(100)] == [[0, 0.01], [1, 0.02], [2, 0.03]]
    assert record["curves"][tracking.latent_gap_at(900)] == [[0, 0.0], [1, 0.0], [2, 0.001]]
    assert tracking.latent_gap_at(500) not in record["curves"]  # not measured by this run
