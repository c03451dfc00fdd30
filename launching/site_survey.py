"""What `make site` asks the machine: SLURM's commands (when sbatch answers), the virtualenv,
the environment variables a profile value may come from (launching/site_init.py writes the profile
from it).

Each command gets TIMEOUT_S seconds and runs in its own process group, so a hung slurmctld costs
seconds, not the whole command; what a command could not say is kept with the reason.
"""

from __future__ import annotations

import getpass
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from launching.slurm import gres_gpus, scontrol_records

TIMEOUT_S = 10.0  # per command: a controller that does not answer must not hang `make site`


@dataclass
class Reply:
    """One command's answer: its stdout, or why there is none."""

    command: str  # as a user would type it
    output: str | None  # stdout when it exited 0
    problem: str | None = None  # e.g. "not on PATH", "timed out after 10 s", "exit 1: <its error>"


def ask(*command: str, timeout: float | None = None) -> Reply:
    """Run `command` with a time limit. The command runs in its own process group, killed whole
    on timeout: a wrapper script's children would otherwise keep its pipes open, and us waiting."""
    timeout = TIMEOUT_S if timeout is None else timeout
    shown = shlex.join(command)
    if shutil.which(command[0]) is None:
        return Reply(shown, None, f"{command[0]} is not on PATH")
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
    except OSError as error:
        return Reply(shown, None, f"could not start: {error.strerror or error}")
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return Reply(shown, None, f"timed out after {timeout:g} s")
    if process.returncode != 0:
        said = (stderr.strip() or stdout.strip()).splitlines()
        return Reply(shown, None, f"exit {process.returncode}: {said[0] if said else 'no message'}")
    return Reply(shown, stdout)


@dataclass
class Partition:
    """A partition and the nodes it holds, as `scontrol show partition / node` describe them."""

    name: str
    default: bool  # Default=YES: where a job that names no partition goes
    state: str  # UP, DOWN, DRAIN, INACTIVE
    max_time: str  # as SLURM writes it: UNLIMITED, 2-00:00:00
    nodes: int
    cpus: int | None  # per node, of its most common node; None when the nodes were not read
    mem_mb: int | None  # RealMemory of that node
    gpus: int | None  # GPUs (Gres) of that node
    like_it: int = 0  # how many of the nodes are like that node (the rest differ)
    gres: str = ""  # that node's Gres, as scontrol writes it
    max_cpus_per_node: str = "UNLIMITED"
    def_mem: str = "UNLIMITED"  # DefMemPerNode: what a job without --mem gets

    @property
    def usable_cpus(self) -> int | None:
        cap = self.max_cpus_per_node
        return min(self.cpus, int(cap)) if self.cpus is not None and cap.isdigit() else self.cpus


def read_partitions(partition_text: str, node_text: str | None) -> list[Partition]:
    """The partitions of `scontrol show partition --oneliner`, each with the shape (CPUs, memory,
    GPUs) of most of its nodes from `scontrol show node --oneliner` (None: no node records)."""
    nodes = scontrol_records(node_text or "")
    partitions = []
    for record in scontrol_records(partition_text):
        name = record.get("PartitionName", "?")
        members = [node for node in nodes if name in node.get("Partitions", "").split(",")]
        shapes = {id(node): _shape(node) for node in members}
        counts = Counter(shapes.values())
        # The most common node, and of equally common ones the biggest: what a job is sized for.
        shape, like_it = max(counts.items(), key=lambda item: (item[1], item[0]), default=((None,) * 3, 0))
        gpus, cpus, mem_mb = shape
        gres = next((node.get("Gres", "") for node in members if shapes[id(node)] == shape), "")
        partitions.append(
            Partition(
                name=name,
                default=record.get("Default") == "YES",
                state=record.get("State", "?"),
                max_time=record.get("MaxTime", "UNLIMITED"),
                nodes=len(members) or int(record.get("TotalNodes") or 0),
                cpus=cpus,
                mem_mb=mem_mb,
                gpus=gpus,
                like_it=like_it,
                gres=gres,
                max_cpus_per_node=record.get("MaxCPUsPerNode", "UNLIMITED"),
                def_mem=record.get("DefMemPerNode", "UNLIMITED"),
            )
        )
    return partitions


def _shape(node: dict) -> tuple:
    """(GPUs, CPUs, memory in MB) of a `scontrol show node` record."""
    cpus = node.get("CPUEfctv") or node.get("CPUTot") or 0  # CPUEfctv: without the CPUs slurmd keeps
    return gres_gpus(node.get("Gres", "")), int(cpus), int(node.get("RealMemory") or 0)


def config_values(text: str) -> dict:
    """`scontrol show config`'s `Key = Value` lines as a dict."""
    pairs = (line.split("=", 1) for line in text.splitlines() if " = " in line)
    return {key.strip(): value.strip() for key, value in pairs}


@dataclass
class Machine:
    """What `make site` found: the command answers and the environment the profile is made from."""

    host: str
    when: str
    sbatch: Reply
    config: Reply | None = None  # scontrol show config
    partitions: Reply | None = None
    nodes: Reply | None = None
    account: Reply | None = None  # sacctmgr's default account of `user`
    user: str = ""
    venv: Path | None = None  # the virtualenv this command runs in
    python: str = sys.executable
    environment: dict = field(default_factory=dict)  # the variables a profile value may come from

    @property
    def slurm(self) -> bool:
        return self.sbatch.output is not None

    @property
    def cluster_config(self) -> dict:
        return config_values(self.config.output) if self.config and self.config.output else {}

    @property
    def partition_list(self) -> list[Partition]:
        if not self.partitions or self.partitions.output is None:
            return []
        return read_partitions(self.partitions.output, self.nodes.output if self.nodes else None)

    def replies(self) -> list[Reply]:
        return [r for r in (self.sbatch, self.config, self.partitions, self.nodes, self.account) if r is not None]


ENVIRONMENT = ("SODA_DATA", "SODA_TRACKING_URI", "MLFLOW_TRACKING_URI", "SODA_SWEEP_STORAGE")


def survey() -> Machine:
    """Ask this machine: SLURM's commands (only when sbatch answers), the virtualenv, the
    environment variables a profile value may come from."""
    machine = Machine(
        host=socket.gethostname(),
        when=datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        sbatch=ask("sbatch", "--version"),
        venv=Path(sys.prefix) if sys.prefix != sys.base_prefix else None,
        python=sys.executable,
        environment={name: os.environ[name] for name in ENVIRONMENT if os.environ.get(name)},
    )
    if machine.slurm:
        machine.config = ask("scontrol", "show", "config")
        machine.partitions = ask("scontrol", "show", "partition", "--oneliner")
        machine.nodes = ask("scontrol", "show", "node", "--oneliner")
        machine.user = os.environ.get("USER") or getpass.getuser()  # $USER is unset under some shells (root, cron)
        machine.account = ask("sacctmgr", "-nP", "show", "user", machine.user, "format=DefaultAccount")
    return machine
