"""The site profile's text that `make site` writes (render) and the few lines it prints (summary),
from what launching/site_survey.py found. Every value names its source in a comment; what was not
found is null or commented out with the reason, never guessed.
"""

from __future__ import annotations

import json
import shlex
import textwrap
from pathlib import Path

import yaml

from launching.site_survey import ENVIRONMENT, Machine, Partition, Reply
from launching.slurm import slurm_minutes
from soda.progress import plural
from soda.store import redact

WIDTH = 100  # of the comment lines
DAY_MIN = 1440  # conf/hydra/launcher/slurm.yaml's timeout_min, the most a profile asks for


def scalar(value) -> str:
    """`value` as a YAML scalar that loads back as itself: plain when it can be, else quoted
    (a string like `yes`, `1440` or `a: b` would load as something else)."""
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)
    text = str(value)
    try:
        plain = yaml.safe_load(text) == text and " #" not in text and "\n" not in text
    except yaml.YAMLError:
        plain = False
    return text if plain else json.dumps(text)


class Writer:
    """The profile's lines. A value line's comment goes on its right, aligned with those of the
    lines around it (a block: the lines between two blank lines)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str | None]] = []  # (text, comment on its right)

    def comment(self, text: str, indent: int = 0, wrap: bool = True) -> None:
        """Comment lines, each of `text`'s lines wrapped at WIDTH (a reason quoting an error can be
        long), but for `wrap=False` (YAML shown as an example, a table)."""
        for line in text.splitlines() or [""]:
            wrapped = textwrap.wrap(line, WIDTH - indent - 2, break_on_hyphens=False) if wrap else [line]
            wrapped = wrapped or [""]
            # A wrapped line of an indented list goes on further in; prose straight below.
            leading = len(line) - len(line.lstrip())
            continued = " " * (leading + 2) if leading else ""
            for number, part in enumerate(wrapped):
                part = part if number == 0 else continued + part
                self.lines.append((" " * indent + ("# " + part).rstrip(), None))

    def line(self, text: str, comment: str | None = None, indent: int = 0) -> None:
        self.lines.append((" " * indent + text, comment))

    def blank(self) -> None:
        self.lines.append(("", None))

    def text(self) -> str:
        out, block = [], []

        def flush() -> None:
            width = max((len(text) for text, comment in block if comment), default=0)
            out.extend(f"{text:<{width}}  # {comment}" if comment else text for text, comment in block)
            block.clear()

        for text, comment in self.lines:
            if not text.strip():
                flush()
                out.append(text)
            else:
                block.append((text, comment))
        flush()
        return "\n".join(out) + "\n"


def render(machine: Machine) -> str:
    """The profile's text: valid YAML whose every value names its source in a comment."""
    out = Writer()
    _header(out, machine)
    out.blank()
    out.line("defaults:")
    _launcher_choice(out, machine)
    tracking_env = _tracking_source(machine)
    if tracking_env and _is_server(machine.environment[tracking_env]):
        out.line("- override /tracking: server", f"an MLflow server: ${tracking_env} is http(s)", indent=2)
    else:
        out.comment(
            "- override /tracking: server  # a shared MLflow server (set tracking.uri below)", indent=2, wrap=False
        )
    out.blank()
    if machine.slurm:
        _slurm_launcher(out, machine)
    else:
        _commented_slurm_launcher(out)
    out.blank()
    _stores(out, machine)
    return out.text()


def _header(out: Writer, machine: Machine) -> None:
    asked = "\n".join(f"  {reply.command}" for reply in machine.replies())
    asked += "" if machine.slurm else " (no SLURM: nothing else asked)"
    variables = ", ".join(f"${name}" for name in ENVIRONMENT)
    out.line("# @package _global_")
    out.comment(
        f"The site profile of {machine.host}: how SODA's jobs run on this machine or cluster (launcher, "
        "partition, account, interpreter), where runs are tracked, sweeps stored and datasets read.\n"
        f"Written by `make site` (python -m launching.site_init) on {machine.when} on {machine.host}, from:\n"
        f"{asked}\n"
        f"  the virtualenv of the command ({machine.python}) and {variables}\n"
        "Each value's comment names its source; what could not be found is null or commented out.\n"
        "\n"
        "Composed after conf/ (config.yaml and its groups), before the experiment= and sweep= files and "
        "the command line, which override it (a launcher named on the command line starts from conf/'s "
        "settings, not these). Read from $SODA_SITE (a path), else conf/site/default.yaml "
        "(git-ignored: it describes this machine, not the experiment).\n"
        "  check it:                python launch.py -m sweep=augment_ablation hydra.launcher.dry_run=true\n"
        "  one command without it:  SODA_SITE=none python launch.py ...\n"
        "  write it again:          make site FORCE=1"
    )


def _launcher_choice(out: Writer, machine: Machine) -> None:
    if machine.slurm:
        cluster = machine.cluster_config.get("ClusterName")
        where = (
            f"cluster {cluster}, scontrol show config"
            if cluster
            else f"the cluster's name is unknown: {machine.config.command} {_why(machine.config)}"
        )
        out.comment(
            f"SLURM answers here (sbatch --version: {machine.sbatch.output.strip()}; {where}): each trial "
            "of a sweep (sweeps/) is a job of its own on the partition below, sweep.n_jobs of them at once; "
            "a plain multirun (seed=0,1,2) is one job array.",
            indent=2,
        )
        out.line("- override /hydra/launcher: slurm", indent=2)
        return
    if machine.sbatch.problem and machine.sbatch.problem.endswith("not on PATH"):
        out.comment("sbatch was not found on PATH, so jobs run on this machine (submitit's local executor).", indent=2)
    else:
        out.comment(f"sbatch is on PATH but `sbatch --version` failed ({machine.sbatch.problem}),", indent=2)
        out.comment("so jobs run on this machine; fix SLURM and run `make site FORCE=1` again.", indent=2)
    out.line("- override /hydra/launcher: local", indent=2)


def _slurm_launcher(out: Writer, machine: Machine) -> None:
    """hydra.launcher for SLURM, sized for a node of the default partition."""
    partitions = machine.partition_list
    chosen = next((p for p in partitions if p.default), partitions[0] if partitions else None)
    out.line("hydra:")
    out.line("launcher:", indent=2)

    # The partition, with the others to choose from.
    if chosen is None:
        out.comment(f"{machine.partitions.command} {_why(machine.partitions)}: set the partition and sizes.", 4)
        out.line("partition: null", "unknown: scontrol listed no partitions (above)", 4)
    else:
        out.comment("The partitions (scontrol show partition / node; * = the default):", 4)
        for p in partitions:
            out.comment(f"  {_partition_line(p)}", 4, wrap=False)
        why = "the default partition (Default=YES)" if chosen.default else "none is the default: the first listed"
        out.line(f"partition: {scalar(chosen.name)}", why, 4)
    account = _account(machine)
    if account is None and machine.account.problem:
        out.comment(f"{machine.account.command}: {machine.account.problem}{_accounting_off(machine)}.", 4)
    out.line(f"account: {scalar(account)}", _account_comment(machine), 4)
    out.line("qos: null", "null: the account's default QOS", 4)

    # The job's size: one DDP rank per GPU, sharing the node's CPUs.
    if chosen is None or chosen.cpus is None:
        if chosen is not None:
            out.comment(f"{machine.nodes.command} {_why(machine.nodes)}: set the sizes of a job.", 4)
        unknown = "unknown: scontrol described no nodes (above); set it"
        out.line("gpus_per_node: null", unknown, 4)
        out.line("tasks_per_node: 1", "one DDP rank per GPU: must equal gpus_per_node", 4)
        out.line("cpus_per_task: null", unknown, 4)
        out.line("mem_gb: null", "null: the partition's default memory per node (DefMemPerNode)", 4)
    else:
        gpus, cpus = chosen.gpus, chosen.usable_cpus
        tasks = gpus or 1
        cap = f" (MaxCPUsPerNode={chosen.max_cpus_per_node} of its {chosen.cpus})" if cpus != chosen.cpus else ""
        out.comment(
            f"Sized for a node of {chosen.name}: {cpus} CPUs{cap}, {chosen.mem_mb // 1024} GB "
            f"(RealMemory={chosen.mem_mb} MB), {plural(gpus, 'GPU') if gpus else 'no GPUs'} (Gres={chosen.gres})"
            + ("." if chosen.like_it == chosen.nodes else f"; {chosen.like_it} of its {chosen.nodes} nodes are so."),
            4,
        )
        out.line(f"gpus_per_node: {scalar(gpus or None)}", f"the node's GPUs{'' if gpus else ': none'}", 4)
        out.line(f"tasks_per_node: {tasks}", "one DDP rank per GPU: must equal gpus_per_node", 4)
        out.line(
            f"cpus_per_task: {max(1, cpus // tasks)}",
            f"the node's {cpus} CPUs / {plural(tasks, 'task')}: one job per node at a time",
            4,
        )
        out.line("mem_gb: null", f"null: DefMemPerNode ({chosen.def_mem}); the node has {chosen.mem_mb // 1024} GB", 4)
    if chosen is None:
        out.line(f"timeout_min: {DAY_MIN}", "a day; the partition's MaxTime is unknown", 4)
    else:
        limit = slurm_minutes(chosen.max_time)
        timeout = DAY_MIN if limit is None else min(int(limit), DAY_MIN)
        why = f"a day, within {chosen.name}'s MaxTime" if timeout == DAY_MIN else f"{chosen.name}'s MaxTime"
        out.line(f"timeout_min: {timeout}", f"{why} ({chosen.max_time})", 4)

    # The interpreter on the nodes.
    if machine.venv is not None:
        out.comment(
            f"This command ran in the virtualenv {machine.venv}: each job activates it (the nodes must "
            "see that path) and runs its python.",
            4,
        )
        out.line("python: python", "the one setup puts on PATH", 4)
        out.line("setup:", "shell lines before the job", 4)
        out.line(f"- {scalar('source ' + shlex.quote(str(machine.venv / 'bin' / 'activate')))}", indent=6)
    else:
        out.comment(f"No virtualenv: each job runs {machine.python}; the nodes must see it at that path.", 4)
        out.line("python: null", "null: the submitting interpreter", 4)
        out.line("setup: []", 'shell lines before the job, e.g. ["module load cuda"]', 4)
    out.line("additional_parameters: {}", "any other sbatch option, e.g. {mail-type: END}", 4)


def _commented_slurm_launcher(out: Writer) -> None:
    out.comment("On a SLURM cluster (`override /hydra/launcher: slurm` above; `make site` fills these there):")
    out.comment(
        "hydra:\n"
        "  launcher:\n"
        "    partition: gpu\n"
        "    account: null\n"
        "    gpus_per_node: 4\n"
        "    tasks_per_node: 4      # one DDP rank per GPU: must equal gpus_per_node\n"
        "    cpus_per_task: 8\n"
        "    mem_gb: null\n"
        "    timeout_min: 1440\n"
        "    python: null           # null: the submitting interpreter; python: the one setup puts on PATH\n"
        "    setup:\n"
        "      - source /path/to/.venv/bin/activate\n"
        "    additional_parameters: {}",
        wrap=False,
    )


def _stores(out: Writer, machine: Machine) -> None:
    """data_root, tracking and sweep: from the environment when set there, else commented examples."""
    env = machine.environment
    if "SODA_DATA" in env:
        out.line(f"data_root: {scalar(env['SODA_DATA'])}", "from $SODA_DATA; datasets live in <data_root>/<name>")
    else:
        out.comment(
            "data_root: /shared/datasets  # datasets live in <data_root>/<name>; default $SODA_DATA, else ./data",
            wrap=False,
        )
    out.blank()
    tracking_env = _tracking_source(machine)
    if tracking_env:
        out.line("tracking:")
        out.line(f"uri: {scalar(env[tracking_env])}", f"from ${tracking_env}", indent=2)
    else:
        out.comment("An MLflow server shared by all jobs (with `override /tracking: server` above):")
        out.comment("tracking:\n  uri: http://host:5000", wrap=False)
    out.blank()
    n_jobs = _trials_at_once(machine)
    if "SODA_SWEEP_STORAGE" in env or n_jobs is not None:
        out.line("sweep:")
    if n_jobs is not None:
        out.line(f"n_jobs: {n_jobs[0]}", n_jobs[1], 2)
    if "SODA_SWEEP_STORAGE" in env:
        out.line(f"storage: {scalar(env['SODA_SWEEP_STORAGE'])}", "from $SODA_SWEEP_STORAGE: the Optuna storage", 2)
    else:
        out.comment("Optuna's storage, a database every trial can reach (the default is a journal file here):")
        out.comment("  storage: postgresql://user@host:5432/optuna", wrap=False)
    if n_jobs is None:
        out.comment("Trials in flight at once (default 1; the local launcher shares this machine's GPUs among them):")
        out.comment("sweep:\n  n_jobs: 2", wrap=False)


def _trials_at_once(machine: Machine) -> tuple[int, str] | None:
    """sweep.n_jobs on SLURM, and why: one trial per node like the one a job is sized for (a job
    takes a whole node); None off SLURM or when the nodes are unknown."""
    partitions = machine.partition_list if machine.slurm else []
    chosen = next((p for p in partitions if p.default), partitions[0] if partitions else None)
    if chosen is None or chosen.cpus is None:
        return None
    nodes = max(1, chosen.like_it or chosen.nodes)
    return nodes, (
        f"trials in flight at once: one per node of {chosen.name} like the one a job is sized for "
        f"({plural(nodes, 'node')}; a job takes a whole node); SLURM queues the rest"
    )


def _partition_line(p: Partition) -> str:
    name = f"{p.name}{'*' if p.default else ''}"
    if p.cpus is None:
        shape = "nodes unknown"
    else:
        gpus = plural(p.gpus, "GPU") if p.gpus else "no GPUs"
        shape = f"{p.cpus} CPUs, {p.mem_mb // 1024} GB, {gpus}"
        shape += f" ({p.like_it} of them)" if p.like_it != p.nodes else ""
    nodes = plural(p.nodes, "node")
    return f"{name:<12} {p.state.lower():<5} MaxTime {p.max_time:<11} {nodes}: {shape}"


def _account(machine: Machine) -> str | None:
    reply = machine.account
    if reply is None or reply.output is None:
        return None
    return reply.output.strip().splitlines()[0].strip() if reply.output.strip() else None


def _account_comment(machine: Machine) -> str:
    if _account(machine) is not None:
        return f"{machine.user}'s default account (sacctmgr)"
    if machine.account.output is not None:
        return f"could not tell: sacctmgr knows no default account of {machine.user}; set it if jobs need one"
    return "could not tell (above); set it if jobs need one"


def _accounting_off(machine: Machine) -> str:
    """Why sacctmgr cannot answer, when scontrol says: no accounting database."""
    storage = machine.cluster_config.get("AccountingStorageType", "")
    return f"; accounting is off (AccountingStorageType={storage})" if storage.endswith("/none") else ""


def _tracking_source(machine: Machine) -> str | None:
    return next((n for n in ("SODA_TRACKING_URI", "MLFLOW_TRACKING_URI") if n in machine.environment), None)


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _why(reply: Reply | None) -> str:
    return f"gave no answer ({reply.problem})" if reply is not None and reply.problem else "gave no answer"


# ---------------------------------------------------------------------------------------------
# What the user reads.


def summary(machine: Machine, output: Path) -> str:
    """A few lines: what was found, what was written where, what to check."""
    lines, check = [], []
    if machine.slurm:
        cluster = machine.cluster_config.get("ClusterName", "(name unknown)")
        partitions = machine.partition_list
        lines.append(f"SLURM: cluster {cluster}, {machine.sbatch.output.strip()}; partitions (* = default):")
        lines += [f"  {_partition_line(p)}" for p in partitions]
        if not partitions:
            lines.append(f"  none read: {machine.partitions.command} {_why(machine.partitions)}")
            check.append("partition, gpus_per_node, cpus_per_task (scontrol gave no partitions)")
        elif machine.nodes.output is None:
            check.append(f"gpus_per_node, cpus_per_task ({machine.nodes.command} {_why(machine.nodes)})")
        account = _account(machine)
        if account:
            lines.append(f"account: {account} ({_account_comment(machine)})")
        elif machine.account.problem:
            lines.append(
                f"account: null; {machine.account.command}: {machine.account.problem}{_accounting_off(machine)}"
            )
        else:
            lines.append(f"account: null; {_account_comment(machine)}")
        if account is None:
            check.append("account (sacctmgr gave none): fill it in if your cluster needs one")
    else:
        lines.append(f"no SLURM (sbatch: {machine.sbatch.problem}): jobs run on this machine (hydra/launcher=local)")
    if machine.slurm:
        lines.append(
            f"python: the virtualenv {machine.venv}, activated by setup (the nodes must see it)"
            if machine.venv
            else f"python: {machine.python} (no virtualenv; the nodes must see it at that path)"
        )
    env = machine.environment
    found = [f"{name}={redact(env[name])}" for name in ENVIRONMENT if name in env]
    lines.append(f"from the environment: {', '.join(found)}" if found else "from the environment: nothing")
    missing = [
        key
        for key, known in (
            ("data_root", "SODA_DATA" in env),
            ("tracking.uri", _tracking_source(machine) is not None),
            ("sweep.storage", "SODA_SWEEP_STORAGE" in env),
        )
        if not known
    ]
    if missing:
        check.append(f"{', '.join(missing)}: commented-out examples; fill in the shared ones")
    lines.append(f"wrote {output}")
    lines += [f"check: {item}" for item in check]
    lines.append("then: python launch.py -m sweep=augment_ablation hydra.launcher.dry_run=true")
    return "\n".join(lines)
