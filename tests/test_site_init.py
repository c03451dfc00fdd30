"""`make site` (launching/site_init.py): the profile it writes from what SLURM and the environment say.

SLURM's commands are small scripts on a PATH of their own that print recorded answers, so each
machine (a GPU cluster, one without accounting, one without SLURM, one whose controller hangs) is
a fixture; the test marked `slurm` asks the real cluster of `make slurm-up`."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from launching import site_init, site_render, site_survey
from tests.support.services import REPO, needs_slurm

# A GPU cluster as SLURM 22.05 prints it: partition gpu (the default: 4 nodes of 4 A100s and 64
# CPUs, MaxTime two days) and partition cpu (2 nodes without GPUs, MaxTime a week).
CONFIG = (
    "Configuration data as of 2026-01-01T00:00:00\n"
    "AccountingStorageType   = accounting_storage/slurmdbd\n"
    "ClusterName             = vision\n"
)
CONFIG_WITHOUT_ACCOUNTING = CONFIG.replace("accounting_storage/slurmdbd", "accounting_storage/none")
PARTITIONS = (
    "PartitionName=gpu AllowGroups=ALL Default=YES QoS=N/A DefaultTime=NONE MaxNodes=UNLIMITED "
    "MaxTime=2-00:00:00 MinNodes=0 Nodes=g[01-04] State=UP TotalCPUs=256 TotalNodes=4 "
    "MaxCPUsPerNode=UNLIMITED DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED TRES=cpu=256,node=4,gres/gpu=16\n"
    "PartitionName=cpu AllowGroups=ALL Default=NO QoS=N/A DefaultTime=NONE MaxNodes=UNLIMITED "
    "MaxTime=7-00:00:00 MinNodes=0 Nodes=c[01-02] State=UP TotalCPUs=256 TotalNodes=2 "
    "MaxCPUsPerNode=UNLIMITED DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED TRES=cpu=256,node=2\n"
)
NODES = "".join(
    f"NodeName=g0{n} Arch=x86_64 CPUAlloc=0 CPUEfctv=64 CPUTot=64 Gres=gpu:a100:4(S:0-1) "
    "OS=Linux 6.1.0 #1 SMP PREEMPT_DYNAMIC RealMemory=512000 State=IDLE Partitions=gpu\n"
    for n in range(1, 5)
) + "".join(
    f"NodeName=c0{n} Arch=x86_64 CPUAlloc=0 CPUEfctv=128 CPUTot=128 Gres=(null) "
    "OS=Linux 6.1.0 #1 SMP PREEMPT_DYNAMIC RealMemory=256000 State=IDLE Partitions=cpu\n"
    for n in range(1, 3)
)
NO_ACCOUNTING = (
    "You are not running a supported accounting_storage plugin\nOnly 'accounting_storage/slurmdbd' is supported."
)


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A PATH holding only the fake commands `tool(name, {arguments prefix: answer})` makes; an
    answer is stdout, or (stdout, stderr, exit status), or "hang". No store variable is set."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("USER", "alice")
    for name in site_survey.ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)

    def tool(name: str, answers: dict) -> None:
        cases = []
        for number, (prefix, answer) in enumerate(answers.items()):
            if answer == "hang":
                cases.append(f"  {shlex.quote(prefix)}*) exec /bin/sleep 60 ;;")
                continue
            stdout, stderr, status = (answer, "", 0) if isinstance(answer, str) else answer
            (bin_dir / f"{name}.{number}.out").write_text(stdout)
            (bin_dir / f"{name}.{number}.err").write_text(stderr)
            cases.append(
                f"  {shlex.quote(prefix)}*) /bin/cat {bin_dir}/{name}.{number}.out; "
                f"/bin/cat {bin_dir}/{name}.{number}.err >&2; exit {status} ;;"
            )
        script = bin_dir / name
        script.write_text(
            f'#!/bin/sh\necho "$*" >> {bin_dir}/asked\ncase "$*" in\n'
            + "\n".join(cases)
            + '\nesac\necho "unexpected: $*" >&2; exit 3\n'
        )
        script.chmod(0o755)

    tool.asked = lambda: (bin_dir / "asked").read_text().splitlines() if (bin_dir / "asked").exists() else []
    return tool


def gpu_cluster(tool, config=CONFIG, sacctmgr="proj-vision\n") -> None:
    tool("sbatch", {"--version": "slurm 22.05.8\n"})
    tool("scontrol", {"show config": config, "show partition": PARTITIONS, "show node": NODES})
    tool("sacctmgr", {"-nP show user alice format=DefaultAccount": sacctmgr})


def write(tmp_path, capsys, *args) -> tuple[dict, str, str]:
    """Run `python -m launching.site_init --output <tmp>/site.yaml`: (the loaded profile, its text, stdout)."""
    output = tmp_path / "site" / "default.yaml"
    assert site_init.main(["--output", str(output), *args]) == 0
    text = output.read_text()
    loaded = OmegaConf.to_container(OmegaConf.load(output))
    assert loaded == yaml.safe_load(text)
    return loaded, text, capsys.readouterr().out


def comment_of(text: str, key: str) -> str:
    """The comment on the right of the value line `key:`, and the comment lines just above it."""
    lines = text.splitlines()
    number = next(n for n, line in enumerate(lines) if re.match(rf"\s*{re.escape(key)}:", line))
    above = []
    for line in reversed(lines[:number]):
        if not line.lstrip().startswith("#") or line.lstrip().startswith("# The partitions"):
            break
        above.insert(0, line.strip().lstrip("# "))
    right = lines[number].partition("  # ")[2]
    return " ".join(above + [right])


def test_a_gpu_cluster_gets_its_default_partition_sized_for_one_rank_per_gpu(machine, tmp_path, capsys):
    gpu_cluster(machine)
    profile, text, out = write(tmp_path, capsys)

    assert profile["defaults"] == [{"override /hydra/launcher": "slurm"}]
    assert profile["hydra"]["launcher"] == {
        "partition": "gpu",
        "account": "proj-vision",
        "qos": None,
        "gpus_per_node": 4,
        "tasks_per_node": 4,
        "cpus_per_task": 16,
        "mem_gb": None,
        "timeout_min": 1440,
        "python": "python",
        "setup": [f"source {Path(sys.prefix) / 'bin' / 'activate'}"],
        "additional_parameters": {},
    }
    # Trials in flight: one per node like the one a job is sized for (gpu has 4), with the reason.
    assert profile["sweep"] == {"n_jobs": 4}
    assert comment_of(text, "n_jobs") == (
        "trials in flight at once: one per node of gpu like the one a job is sized for (4 nodes; a job takes a "
        "whole node); SLURM queues the rest"
    )
    assert set(profile) == {"defaults", "hydra", "sweep"}  # nothing in the environment: the rest is commented out

    # Each value names where it came from.
    assert "Default=YES" in comment_of(text, "partition")
    assert re.search(r"#\s+cpu\s+up\s+MaxTime 7-00:00:00\s+2 nodes: 128 CPUs, 250 GB, no GPUs", text)
    assert re.search(r"#\s+gpu\*\s+up\s+MaxTime 2-00:00:00\s+4 nodes: 64 CPUs, 500 GB, 4 GPUs", text)
    assert "sacctmgr" in comment_of(text, "account") and "alice" in comment_of(text, "account")
    assert "Gres=gpu:a100:4(S:0-1)" in comment_of(text, "gpus_per_node")
    assert "64 CPUs / 4 tasks" in comment_of(text, "cpus_per_task")
    assert "RealMemory=512000 MB" in text and "DefMemPerNode (UNLIMITED); the node has 500 GB" in comment_of(
        text, "mem_gb"
    )
    assert "MaxTime (2-00:00:00)" in comment_of(text, "timeout_min")
    assert f"virtualenv {sys.prefix}" in comment_of(text, "python")
    assert "cluster vision" in text and "sbatch --version: slurm 22.05.8" in text
    for command in ("scontrol show partition --oneliner", "scontrol show node --oneliner", "sacctmgr -nP show user"):
        assert command in text.split("\n\n")[0]  # the header lists what was asked
    assert "# data_root:" in text and "#   storage: postgresql://" in text and "# - override /tracking: server" in text

    assert "cluster vision" in out and f"wrote {tmp_path / 'site' / 'default.yaml'}" in out
    assert "account: proj-vision" in out and "check: account" not in out


def test_a_partition_with_a_short_max_time_caps_the_time_limit(machine, tmp_path, capsys):
    gpu_cluster(machine)
    machine(
        "scontrol",
        {"show config": CONFIG, "show partition": PARTITIONS.replace("2-00:00:00", "4:00:00"), "show node": NODES},
    )
    profile, text, _ = write(tmp_path, capsys)
    assert profile["hydra"]["launcher"]["timeout_min"] == 240
    assert "gpu's MaxTime (4:00:00)" in comment_of(text, "timeout_min")


def test_without_accounting_the_account_is_null_and_says_why(machine, tmp_path, capsys, monkeypatch):
    gpu_cluster(machine, config=CONFIG_WITHOUT_ACCOUNTING, sacctmgr=("", NO_ACCOUNTING, 1))
    monkeypatch.setattr(sys, "prefix", sys.base_prefix)  # and no virtualenv
    profile, text, out = write(tmp_path, capsys)

    launcher = profile["hydra"]["launcher"]
    assert launcher["account"] is None
    assert launcher["python"] is None and launcher["setup"] == []
    reason = comment_of(text, "account")
    assert "could not tell" in reason and "You are not running a supported accounting_storage plugin" in reason
    assert "accounting is off (AccountingStorageType=accounting_storage/none)" in reason
    assert sys.executable in comment_of(text, "python")
    assert "check: account" in out and "accounting is off" in out


def test_an_empty_default_account_is_null_and_says_so(machine, tmp_path, capsys):
    gpu_cluster(machine, sacctmgr="\n")
    profile, text, out = write(tmp_path, capsys)
    assert profile["hydra"]["launcher"]["account"] is None
    assert "sacctmgr knows no default account of alice" in comment_of(text, "account")
    assert "check: account" in out


def test_without_sbatch_jobs_run_here_and_slurm_is_not_asked(machine, tmp_path, capsys):
    machine("scontrol", {"": "anything\n"})  # on PATH, but only sbatch decides
    profile, text, out = write(tmp_path, capsys)

    assert profile == {"defaults": [{"override /hydra/launcher": "local"}]}
    assert "sbatch was not found on PATH, so jobs run on this machine" in text
    assert "# hydra:\n#   launcher:\n#     partition: gpu" in text  # the SLURM keys, commented out
    assert machine.asked() == []
    assert "no SLURM" in out


def test_a_hung_controller_costs_the_timeout_and_is_reported(machine, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(site_survey, "TIMEOUT_S", 0.5)
    gpu_cluster(machine)
    machine("scontrol", {"show config": "hang", "show partition": "hang", "show node": "hang"})
    profile, text, out = write(tmp_path, capsys)

    launcher = profile["hydra"]["launcher"]
    assert launcher["partition"] is None and launcher["gpus_per_node"] is None and launcher["cpus_per_task"] is None
    assert "scontrol show partition --oneliner gave no answer (timed out after 0.5 s)" in comment_of(text, "partition")
    assert "timed out after 0.5 s" in out and "check: partition" in out


def test_store_settings_come_from_the_environment_and_say_which_variable(machine, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SODA_DATA", "/shared/datasets")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setenv("SODA_SWEEP_STORAGE", "postgresql://soda:secret@db:5432/optuna")
    profile, text, out = write(tmp_path, capsys)

    assert profile["defaults"] == [{"override /hydra/launcher": "local"}, {"override /tracking": "server"}]
    assert profile["data_root"] == "/shared/datasets" and "$SODA_DATA" in comment_of(text, "data_root")
    assert profile["tracking"] == {"uri": "http://mlflow.example:5000"}
    assert "$MLFLOW_TRACKING_URI" in comment_of(text, "uri")
    assert profile["sweep"] == {"storage": "postgresql://soda:secret@db:5432/optuna"}
    assert "$SODA_SWEEP_STORAGE" in comment_of(text, "storage")
    assert "secret" not in out and "soda:***@db" in out
    assert (tmp_path / "site" / "default.yaml").stat().st_mode & 0o077 == 0  # a password: the owner's alone


@pytest.mark.parametrize("value", ["/plain/path", "http://h:5000", "yes", "null", "1440", "a: b", "x #y", "[1]", "*x"])
def test_scalars_load_back_as_the_same_string(value):
    line = f"key: {site_render.scalar(value)}  # a comment"
    assert yaml.safe_load(line) == {"key": value}
    assert OmegaConf.create(line).key == value


def test_an_existing_profile_is_kept_without_force(machine, tmp_path, capsys):
    output = tmp_path / "site" / "default.yaml"
    output.parent.mkdir()
    output.write_text("mine: true\n")
    assert site_init.main(["--output", str(output)]) == 2
    _, err = capsys.readouterr()
    assert err == f"error: {output} exists; keep it, or replace it with --force (make site FORCE=1)\n"
    assert output.read_text() == "mine: true\n"

    assert site_init.main(["--output", str(output), "--force"]) == 0
    assert OmegaConf.load(output).defaults == [{"override /hydra/launcher": "local"}]


def test_an_unwritable_output_is_one_error_line(machine, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert site_init.main(["--output", str(tmp_path / "a_file" / "default.yaml")]) == 2
    _, err = capsys.readouterr()
    assert re.fullmatch(rf"error: cannot write {re.escape(str(tmp_path))}/a_file/default.yaml: .+\n", err), err


@pytest.mark.slurm
@needs_slurm
def test_the_profile_of_this_cluster_matches_sinfo(tmp_path):
    output = tmp_path / "site.yaml"
    env = {name: value for name, value in os.environ.items() if name not in site_survey.ENVIRONMENT}
    done = subprocess.run(
        [sys.executable, "-m", "launching.site_init", "--output", str(output)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    sinfo = subprocess.run(["sinfo", "-h", "-o", "%P|%c|%G"], capture_output=True, text=True, check=True).stdout
    default = next(line for line in sinfo.splitlines() if line.split("|")[0].endswith("*"))
    name, cpus, gres = default.split("|")
    profile = OmegaConf.to_container(OmegaConf.load(output))
    launcher = profile["hydra"]["launcher"]
    text = output.read_text()

    assert profile["defaults"] == [{"override /hydra/launcher": "slurm"}]
    assert launcher["partition"] == name.rstrip("*") == "debug"
    assert gres == "(null)" and launcher["gpus_per_node"] is None and launcher["tasks_per_node"] == 1
    assert launcher["cpus_per_task"] == int(cpus)
    # Accounting is off on this cluster: sacctmgr cannot answer, and the profile says so.
    assert launcher["account"] is None
    assert "accounting is off" in comment_of(text, "account") and "accounting is off" in done.stdout
    assert f"wrote {output}" in done.stdout

    # The README's next line: the dry run of the headline command with that profile, as written.
    dry = subprocess.run(
        [sys.executable, "launch.py", "-m", "sweep=augment_ablation", "hydra.launcher.dry_run=true"],
        cwd=REPO,
        env={**env, "SODA_SITE": str(output)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert dry.stdout.splitlines()[0] == f"site profile {output}: hydra/launcher=slurm (partition debug)"
    assert dry.stdout.count("source ") == 12 and dry.stdout.count("#SBATCH --partition=debug") == 12
    assert dry.stdout.rstrip().endswith(
        "dry run: sbatch --test-only accepted 12 of 12 trials in 12 submissions; nothing was submitted"
    )
