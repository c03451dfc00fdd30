"""What the SLURM cluster can run, from `scontrol`: a partition's limits and its nodes, read before
a job is submitted (SLURM would accept a request no node can satisfy and leave it pending forever)
and by `make site` (launching/site_init.py)."""

from __future__ import annotations

import logging
import re
import subprocess

from soda import progress

log = logging.getLogger(__name__)


def partition_check(params: dict) -> str | None:
    """What makes the request one the partition (the default one when none is named) can never run,
    in one line, or None: the launch refuses it before submission, as SLURM would accept it and
    leave it pending forever."""
    partition = params.get("partition")
    command = ["scontrol", "show", "partition", "--oneliner", *([partition] if partition else [])]
    found = subprocess.run(command, capture_output=True, text=True)
    if found.returncode != 0:
        message = (found.stderr or found.stdout).strip().splitlines()[0]
        return f"SLURM: {message} (hydra.launcher.partition={partition}; see `sinfo`)"
    records = scontrol_records(found.stdout)
    if not partition:
        records = [record for record in records if record.get("Default") == "YES"][:1]
    nodes = subprocess.run(["scontrol", "show", "node", "--oneliner"], capture_output=True, text=True)
    if not records or nodes.returncode != 0:
        log.warning("could not read the partition's limits from scontrol; the job is submitted unchecked")
        return None
    return partition_problem(params, records[0], scontrol_records(nodes.stdout))


def scontrol_records(text: str) -> list:
    """The `Key=Value` fields of each line of `scontrol show ... --oneliner` as a dict. A value
    runs to the next ` Key=` (OS=Linux 6.1 #1 SMP holds spaces; TRES=cpu=8,mem=4G holds '=')."""
    records = []
    for line in text.splitlines():
        keys = list(re.finditer(r"(?:^|\s)([A-Za-z][\w:/.]*)=", line))
        if keys:
            ends = [key.start() for key in keys[1:]] + [len(line)]
            records.append({key[1]: line[key.end() : end].strip() for key, end in zip(keys, ends, strict=True)})
    return records


def slurm_minutes(text: str) -> float | None:
    """A SLURM time (`30`, `30:00`, `1:00:00`, `2-00:00:00`, `2-12`) in minutes; None = no limit."""
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(part) for part in clock.split(":")]
    if days:  # days-hours[:minutes[:seconds]]
        hours, minutes, seconds = (parts + [0, 0])[:3]
    else:  # minutes | minutes:seconds | hours:minutes:seconds
        hours, minutes, seconds = ([0, 0] + parts)[-3:] if len(parts) == 3 else (0, *(parts + [0])[:2])
    return int(days or 0) * 1440 + hours * 60 + minutes + seconds / 60


def gres_gpus(gres: str) -> int:
    """The GPUs of a node's Gres (`gpu:4`, `gpu:a100:4(S:0-1)`, `gpu:a100:2,gpu:v100:2`)."""
    return sum(int(count) for count in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))


def partition_problem(params: dict, partition: dict, nodes: list) -> str | None:
    """What of the request (hydra.launcher.*) the partition cannot satisfy, in one line, or None.
    `partition` and `nodes` are scontrol's records (scontrol_records); a node belongs to the
    partition when its Partitions field names it."""
    name = partition["PartitionName"]
    members = [node for node in nodes if name in node.get("Partitions", "").split(",")]
    count = len(members) or int(partition.get("TotalNodes", "0") or 0)
    wanted_nodes = params.get("nodes") or 1
    tasks = params.get("tasks_per_node") or 1
    cpus_per_task = params.get("cpus_per_task") or 1
    gpus = params.get("gpus_per_node") or 0
    mem_gb = params.get("mem_gb")

    # The partition as a whole.
    if wanted_nodes > count:
        return (
            f"hydra.launcher.nodes={wanted_nodes} but partition {name} has {progress.plural(count, 'node')} (see sinfo)"
        )
    max_nodes = partition.get("MaxNodes", "UNLIMITED")
    if max_nodes.isdigit() and wanted_nodes > int(max_nodes):
        return f"hydra.launcher.nodes={wanted_nodes} is above partition {name}'s MaxNodes of {max_nodes} (see sinfo)"
    max_time = partition.get("MaxTime", "UNLIMITED")
    limit = slurm_minutes(max_time)
    timeout = params.get("timeout_min")
    if limit is not None and timeout is not None and timeout > limit:
        return (
            f"hydra.launcher.timeout_min={timeout} is above partition {name}'s MaxTime of {max_time} "
            f"({limit:g} minutes; see sinfo)"
        )

    # One node: does any have enough of each?
    def cpus_of(node: dict) -> int:
        return int(node.get("CPUEfctv") or node.get("CPUTot") or 0)

    def mem_mb_of(node: dict) -> int:
        return int(node.get("RealMemory") or 0)

    cpus = cpus_per_task * tasks
    cap = partition.get("MaxCPUsPerNode", "UNLIMITED")
    most_cpus = max((cpus_of(node) for node in members), default=0)
    most_cpus = min(most_cpus, int(cap)) if cap.isdigit() else most_cpus
    most_mem = max((mem_mb_of(node) for node in members), default=0)
    cap = partition.get("MaxMemPerNode", "UNLIMITED")
    most_mem = min(most_mem, int(cap)) if cap.isdigit() else most_mem
    most_gpus = max((gres_gpus(node.get("Gres", "")) for node in members), default=0)
    if members and gpus > most_gpus:
        have = f"at most {most_gpus} GPUs" if most_gpus else "no GPUs"
        return f"hydra.launcher.gpus_per_node={gpus} but the nodes of partition {name} have {have} (Gres; see sinfo)"
    if members and cpus > most_cpus:
        return (
            f"hydra.launcher.cpus_per_task={cpus_per_task} x tasks_per_node={tasks} = {cpus} CPUs per node but "
            f"the nodes of partition {name} have at most {most_cpus} CPUs (see sinfo)"
        )
    if members and mem_gb is not None and mem_gb * 1024 > most_mem:
        return (
            f"hydra.launcher.mem_gb={mem_gb} but the nodes of partition {name} have at most {most_mem // 1024} GB "
            f"(RealMemory={most_mem} MB; see sinfo)"
        )

    # All of it at once, on enough nodes.
    fitting = [
        node
        for node in members
        if gres_gpus(node.get("Gres", "")) >= gpus
        and cpus_of(node) >= cpus
        and (mem_gb is None or mem_mb_of(node) >= mem_gb * 1024)
    ]
    if members and len(fitting) < wanted_nodes:
        wanted = [f"{gpus} GPUs"] * bool(gpus) + [f"{cpus} CPUs"] + [f"{mem_gb} GB"] * (mem_gb is not None)
        what = ", ".join(wanted[:-1]) + " and " + wanted[-1] if len(wanted) > 1 else wanted[0]
        has = f"{progress.plural(len(fitting), 'node')}" if fitting else "no node"
        return f"hydra.launcher.nodes={wanted_nodes} but partition {name} has {has} with {what} at once (see sinfo)"
    return None


# A SLURM job in one of these states has ended (its result file, if any, is written).
_ENDED_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
_FINAL_STATES: dict[str, str] = {}  # job id -> its final state, as scontrol showed it (ended_per_scontrol)
_RESTARTS: dict[str, int] = {}  # job id -> how often SLURM had requeued it at the last look


def ended_per_scontrol(job_id: str) -> str | None:
    """A SLURM job's final state as scontrol shows it (kept for final_state), or None while it has
    not ended or when scontrol cannot tell. A job the controller has already forgotten (MinJobAge)
    has ended: "ENDED"."""
    try:
        shown = subprocess.run(
            ["scontrol", "show", "job", str(job_id), "--oneliner"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if shown.returncode != 0:
        state = "ENDED" if "Invalid job id" in shown.stderr else None
    else:
        found = re.search(r"\bJobState=(\w+)", shown.stdout)
        state = found[1] if found and found[1] in _ENDED_STATES else None
        _note_requeue(str(job_id), shown.stdout)
    if state is not None:
        _FINAL_STATES[str(job_id)] = state
    return state


def _note_requeue(job_id: str, shown: str) -> None:
    """Say so once each time SLURM requeued the job (a lost node, a preemption, a time limit):
    until it starts again, the launch waits with nothing else to show."""
    restarts = re.search(r"\bRestarts=(\d+)", shown)
    if restarts is None or int(restarts[1]) <= _RESTARTS.get(job_id, 0):
        return
    _RESTARTS[job_id] = int(restarts[1])
    log.warning(
        "job %s was requeued by SLURM (%s so far): it resumes from its run's last checkpoint when it starts again",
        job_id,
        progress.plural(int(restarts[1]), "requeue"),
    )


def final_state(job_id: str) -> str | None:
    """The final state ended_per_scontrol last saw for the job, or None (sacct then tells)."""
    return _FINAL_STATES.get(str(job_id))
