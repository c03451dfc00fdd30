"""make gpu-check keeps working between the sessions that have a GPU: its CPU-sized run goes
through every stage (tiny JPEG folder, cuda tests collected, throughput bench, a time-boxed
launch.py run read back from MLflow) and writes its record and summary line; the rehearsal runs
the documented device calls on the device's torch, offline, on a tree without .git; and what
protects the device time (fixed budgets, process groups ended whole, a record that survives a
signal, the tree's commit without git) holds."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from soda.record import (
    COMPILE,
    FIRST_STEP_SECONDS,
    IMAGES_PER_SECOND,
    IMAGES_SEEN,
    KNN_ACC,
    LATENT_GAP,
    LINEAR_ACC,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    latent_gap_at,
)

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(
    r"gpu-check ok e2e=(\d+) step=(\d+) mfu=- knn_start=([\d.]+) knn_end=([\d.]+) images=(\d+) latent_gap=(-?[\d.]+)"
)


@pytest.mark.heavy
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
    assert all(stages[name]["budget_seconds"] > 0 and stages[name]["call"] == 1 for name in stages)
    assert record["preflight"]["status"] == "ok" and record["preflight"]["min_torch"] == "2.11"
    assert record["torchvision"] and record["card"] == "cpu" and record["packages"]["machine"]["torch"]
    assert [call["stages"] for call in record["calls"]] == [["data", "cuda_tests", "throughput", "training"]]
    assert stages["data"]["images"] == {"train": 400, "test": 200}
    assert stages["data"]["source"] == "a tiny CIFAR-shaped folder"
    assert stages["cuda_tests"]["collected"] >= 7 and stages["cuda_tests"]["ran"] is False
    assert round(stages["throughput"]["end_to_end_images_per_s"]) == int(match.group(1))

    training = stages["training"]
    knn = training["curves"][KNN_ACC]
    assert knn[0][0] == 0 and len(knn) >= 2  # the untrained encoder, then at least the end
    assert [step for step, _ in training["curves"][LINEAR_ACC]] == [knn[-1][0]]  # the probe at the end only
    assert [training["knn_start"], training["knn_end"]] == [knn[0][1], knn[-1][1]]
    assert float(match.group(3)) == round(knn[0][1], 4) and float(match.group(4)) == round(knn[-1][1], 4)
    assert 0.1 < training["knn_start"] <= 1  # 10 classes that a pixel k-NN tells apart
    gaps = training["curves"][LATENT_GAP]
    assert len(gaps) == len(knn) and training["latent_gap_end"] == gaps[-1][1]
    for timestep in (500, 700):  # the run's eval.latent_gap_timesteps (conf/eval/reference.yaml)
        assert [step for step, _ in training["curves"][latent_gap_at(timestep)]] == [step for step, _ in knn]
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


def _bench(name: str):
    """A module of bench/, imported as bench/gpu_check.py imports its siblings."""
    import importlib

    sys.path.insert(0, str(REPO / "bench"))
    return importlib.import_module(name)


def test_the_gpu_only_parts_read_pytest_reports_and_judge_the_targets(tmp_path):
    """What only runs on a GPU, on fabricated inputs: the pytest report of the cuda tests, and the
    targets and summary line of a CUDA record."""
    gpu_stages, gpu_record = _bench("gpu_stages"), _bench("gpu_record")
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
    counts, failures = gpu_stages.read_junit(report)
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
    assert gpu_record.targets(record) == {
        "end_to_end_at_least_6000": True,
        "step_at_least_5400": False,
        "zero_host_syncs_per_step": True,
        "compiled": True,
        "knn_end_above_start": True,
        "latent_gap_grew": False,
    }
    assert gpu_record.summary_line(record) == (
        "gpu-check ok e2e=6100 step=5000 mfu=0.314 knn_start=0.3100 knn_end=0.3500 images=1024000 latent_gap=0.0010"
    )


def _check(tmp_path, kind="cuda", budgets=None, deadline=None, export=None):
    """A Check with the stages' budgets of bench/gpu_check.py's SIZES, or those given."""
    gpu_record = _bench("gpu_record")
    budgets = {**_bench("gpu_check").SIZES[kind]["budgets"], **(budgets or {})}
    check = gpu_record.Check(tmp_path / "record.json", tmp_path / "work", kind, budgets, deadline, export)
    check.record = {"stages": {name: {} for name in gpu_record.STAGES}}
    return check


def test_the_training_budget_comes_from_its_own_share_and_the_cache_on_disk(tmp_path, monkeypatch):
    """Never from another stage's record: a throughput stage that timed out (or never ran) changes
    nothing; a cold cache that leaves too little trains eager instead of refusing."""
    gpu_training, check = _bench("gpu_training"), _check(tmp_path)
    cache = tmp_path / "inductor"
    cache.mkdir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    cold = gpu_training.training_plan(check, None)
    assert (cold["cache"], cold["compile"], cold["overhead_estimate"]) == ("cold", "none", 70)
    assert cold["train_seconds"] == 240 - 70 and "trained eager" in cold["why_eager"]
    check.record["stages"]["throughput"] = {"status": "cut", "compile_seconds": None}
    (cache / "fxgraph").mkdir()
    (cache / "fxgraph" / "graph.py").write_text("")
    warm = gpu_training.training_plan(check, None)
    assert (warm["cache"], warm["compile"], warm["train_seconds"]) == ("warm", "auto", 240 - 70 - 30)
    assert gpu_training.training_plan(check, 60.0)["train_seconds"] == 60  # --train-seconds caps it
    roomy = _check(tmp_path, budgets={"training": 400})
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "empty"))
    compiled = gpu_training.training_plan(roomy, None)  # room for a cold compile: compiled
    assert (compiled["compile"], compiled["train_seconds"]) == ("auto", 400 - 70 - 165)
    cpu = _check(tmp_path, kind="cpu")
    assert gpu_training.training_plan(cpu, 8.0) == {
        "limit": 300.0,
        "compile": "auto",
        "cache": None,
        "overhead_estimate": 45.0,
        "train_seconds": 8.0,
    }
    # The call's deadline cuts a stage's share only when it is nearer.
    late = _check(tmp_path, deadline=time.time() + 100)
    limit, by = late.timeout("training")
    assert 85 <= limit <= 90 and by == "the call's --deadline"
    assert late.timeout("data") == (60.0, "its 60 s budget")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.parametrize("ends", ["cut at its budget", "leaves a grandchild behind"])
def test_a_stages_whole_process_group_is_ended(tmp_path, ends):
    """A cut stage, and one that exits leaving a grandchild (a DDP rank, a pytest worker), leave
    nothing running that could hold the GPU for the next stage."""
    gpu_process, check = _bench("gpu_process"), _check(tmp_path, budgets={"data": 2})
    check.work.mkdir()
    pids = tmp_path / "pids"
    waits = "sleep 300" if ends == "cut at its budget" else "true"
    script = f"sleep 300 & echo $! > {pids}; {waits}"
    began = time.time()
    if ends == "cut at its budget":
        with pytest.raises(_bench("gpu_record").Cut, match=r"cut at its 2 s budget; its process group was ended"):
            gpu_process.run_logged(check, "data", ["bash", "-c", script])
    else:
        assert gpu_process.run_logged(check, "data", ["bash", "-c", script]) == 0
    assert check.record["stages"]["data"]["group_ended"] == "SIGTERM"
    grandchild = int(pids.read_text())
    for _ in range(50):
        if not _alive(grandchild):
            break
        time.sleep(0.1)
    assert not _alive(grandchild) and time.time() - began < 20


@pytest.mark.heavy
def test_a_call_ended_by_a_signal_records_the_cut_stage_and_prints_its_line(tmp_path):
    """SIGTERM (the device tool's limit) during a stage: the stage's processes are ended, the
    record says which stage was cut and why, its log is already in $OUT, the line comes last."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out)}
    command = [sys.executable, "bench/gpu_check.py", "--smoke", "--work", str(tmp_path / "work")]
    process = subprocess.Popen(
        [*command, "--stages", "data,throughput"], cwd=REPO, stdout=subprocess.PIPE, text=True, env=env
    )
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("## throughput"):
            break
    time.sleep(3)
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=60)
    last = rest.strip().splitlines()[-1]
    assert process.returncode == 128 + signal.SIGTERM, "".join(seen) + rest
    assert last == "gpu-check failed throughput: the call was ended (SIGTERM) during this stage"
    record = json.loads((out / "gpu-check.json").read_text())
    assert record["summary"] == last and record["calls"][-1]["ended_by"] == "SIGTERM"
    stages = record["stages"]
    assert stages["data"]["status"] == "ok" and stages["throughput"]["status"] == "cut"
    assert stages["throughput"]["group_ended"] in ("SIGTERM", "SIGKILL")
    assert stages["cuda_tests"] == {"status": "not run"} and stages["training"] == {"status": "not run"}
    assert (out / "gpu-check-throughput.log").is_file() and (out / "gpu-check-data.log").is_file()

    # The next call continues the record: what was done stays, the cut stage runs again.
    again = subprocess.run(
        [*command, "--stages", "cuda_tests"], cwd=REPO, capture_output=True, text=True, env=env, timeout=300
    )
    record = json.loads((out / "gpu-check.json").read_text())
    assert [call["stages"] for call in record["calls"]] == [["data", "throughput"], ["cuda_tests"]]
    assert record["stages"]["cuda_tests"]["status"] == "ok" and record["stages"]["cuda_tests"]["call"] == 2
    assert again.stdout.strip().splitlines()[-1] == last  # still failed: the cut stage has not run again


def test_a_call_killed_without_a_word_is_recorded_as_cut_by_the_next(tmp_path):
    check = _check(tmp_path, kind="cpu")
    check.work.mkdir()
    check.begin(time.time(), ["data"])
    check.record["stages"]["data"] = {"status": "running", "call": 1}
    check.save()  # then SIGKILL: nothing more was written
    later = _check(tmp_path, kind="cpu")
    later.begin(time.time(), ["training"])
    assert later.call_index == 2
    assert later.record["stages"]["data"]["status"] == "cut"
    assert "killed during this stage" in later.record["stages"]["data"]["reason"]
    (check.work / "record.json").write_text(json.dumps({**later.record, "git_sha": "0" * 40}))
    other = _check(tmp_path, kind="cpu")
    other.begin(time.time(), ["data"])  # another commit: a record of its own
    assert other.call_index == 1 and other.record["stages"] == {}


def test_the_tree_sent_without_git_is_checked_against_the_carried_commit(tmp_path):
    gpu_env = _bench("gpu_env")
    tree, carry = tmp_path / "tree", tmp_path / "tree" / ".carry"
    (tree / "soda").mkdir(parents=True)
    carry.mkdir()
    (tree / "soda" / "a.py").write_text("a = 1\n")
    (tree / "b.txt").write_bytes(b"\x00binary\n")
    (tree / "link").symlink_to("soda")
    hashed = subprocess.run(
        ["git", "hash-object", "soda/a.py", "b.txt"], cwd=tree, capture_output=True, text=True, check=True
    ).stdout.split()
    assert [gpu_env.blob_id(tree / "soda" / "a.py"), gpu_env.blob_id(tree / "b.txt")] == hashed
    files = {"soda/a.py": hashed[0], "b.txt": hashed[1], "link": gpu_env.blob_id(tree / "link")}
    manifest = {"git_sha": "c" * 40, "carried": "2026-12-06T00:00:00+00:00", "files": files}
    (carry / "source.json").write_text(json.dumps(manifest))
    state = gpu_env.source_state(carry, tree)
    assert (state["git_sha"], state["git_dirty"]) == ("c" * 40, "false") and "checked file by file" in state[
        "git_source"
    ]
    (tree / "soda" / "a.py").write_text("a = 2\n")
    (tree / "b.txt").unlink()
    state = gpu_env.source_state(carry, tree)
    assert (state["git_dirty"], state["git_changed"]) == ("true", ["b.txt", "soda/a.py"])
    assert state["git_note"] == f"2 of 3 files differ from commit {'c' * 7}"
    (carry / "source.json").unlink()
    assert gpu_env.source_state(carry, tree)["git_source"] is None


def test_gpu_carrys_manifest_names_heads_blobs():
    gpu_carry = _bench("gpu_carry")
    manifest = gpu_carry.source_manifest()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    blob = subprocess.run(
        ["git", "rev-parse", "HEAD:launch.py"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    assert manifest["git_sha"] == head and manifest["files"]["launch.py"] == blob
    assert "conf/sweep" in manifest["files"] and ".venv" not in "".join(manifest["files"])


def test_the_preflight_names_an_unsupported_torch_in_one_line(monkeypatch):
    import torch

    gpu_env = _bench("gpu_env")
    assert gpu_env.torch_problem() is None and gpu_env.import_problem() is None
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu128")
    assert gpu_env.torch_problem() == "torch 2.9.1+cu128 is older than 2.11, the oldest the project supports"
    monkeypatch.setattr(torch, "__version__", "2.11.0")
    monkeypatch.delattr(torch, "_foreach_lerp_")
    assert gpu_env.torch_problem() == "torch 2.11.0 lacks torch._foreach_lerp_, which the project uses"
    assert [gpu_env.card(name) for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB")] == [
        "h100",
        "h200",
        "a100",
    ]


def test_the_docs_give_the_device_calls_gpu_carry_prints():
    gpu_carry = _bench("gpu_carry")
    doc = (REPO / "docs" / "performance.md").read_text()
    for stages, timeout in gpu_carry.CALLS:
        assert f"command='{gpu_carry.call_command(stages, timeout)}', carry=['.carry'], timeout_s={timeout})" in doc


@pytest.mark.heavy
def test_the_rehearsal_runs_the_documented_calls_offline_on_the_devices_torch(tmp_path):
    """make gpu-rehearsal: torch 2.11 (the device's) and the device's packages only, the carried
    wheels, a tree without .git, no network; both calls, and their records checked."""
    result = subprocess.run(
        [sys.executable, "bench/gpu_rehearsal.py", "--work", str(tmp_path), "--keep"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    assert result.returncode == 0 and last.startswith("gpu-rehearsal ok torch=2.11.0"), result.stdout + result.stderr
    record = json.loads((tmp_path / "out2" / "gpu-check.json").read_text())
    assert [record["stages"][name]["call"] for name in ("cuda_tests", "throughput", "training")] == [1, 1, 2]
    assert record["stages"]["data"]["call"] == 2 and record["stages"]["data"]["decode_cache"] == "reused"
    assert record["packages"]["carried"]["hydra-core"] and record["packages"]["machine"]["torch"] == "2.11.0"
    assert record["git_source"].startswith("source.json of make gpu-carry")
    assert not (tmp_path / "tree" / ".git").exists()


def test_the_training_record_is_read_back_by_the_record_contract(tmp_path):
    """read_training_record on a store written through soda.tracking's keys and tags, with the
    latent gap at the timesteps the run's config names (not necessarily the default ones)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    gpu_training = _bench("gpu_training")
    store = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.create_experiment("gpu-check", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    series = {
        KNN_ACC: [(0, 0.2), (1, 0.3), (2, 0.4)],
        LINEAR_ACC: [(2, 0.45)],
        LATENT_GAP: [(0, 0.001), (1, 0.002), (2, 0.004)],
        latent_gap_at(100): [(0, 0.01), (1, 0.02), (2, 0.03)],
        latent_gap_at(900): [(0, 0.0), (1, 0.0), (2, 0.001)],
        IMAGES_SEEN: [(1, 640), (2, 1280)],
        TRAIN_SECONDS: [(1, 4.0), (2, 8.5)],
        IMAGES_PER_SECOND: [(1, 100.0), (2, 150.0)],
        FIRST_STEP_SECONDS: [(0, 3.0)],
        TRAIN_LOSS: [(step, 1.0 / (step + 1)) for step in range(7)],
    }
    client.log_batch(
        run_id,
        metrics=[Metric(key, value, 0, step) for key, points in series.items() for step, value in points],
        params=[Param("eval.latent_gap_timesteps", "[100, 900]")],
        tags=[RunTag(COMPILE, "eager")],
    )
    client.set_terminated(run_id)

    record = gpu_training.read_training_record(store)
    assert record["mlflow_run_id"] == run_id and record["status"] == "FINISHED" and record["compile"] == "eager"
    assert (record["epochs"], record["knn_start"], record["knn_end"], record["linear_end"]) == (2, 0.2, 0.4, 0.45)
    assert (record["latent_gap_start"], record["latent_gap_end"]) == (0.001, 0.004)
    assert (record["images_seen"], record["train_seconds"], record["first_step_seconds"]) == (1280, 8.5, 3.0)
    assert record["images_per_s_median"] == 150.0  # the epochs after the first
    assert record["loss_points"] == 7 and TRAIN_LOSS not in record["curves"]
    assert record["curves"][latent_gap_at(100)] == [[0, 0.01], [1, 0.02], [2, 0.03]]
    assert record["curves"][latent_gap_at(900)] == [[0, 0.0], [1, 0.0], [2, 0.001]]
    assert latent_gap_at(500) not in record["curves"]  # not measured by this run
