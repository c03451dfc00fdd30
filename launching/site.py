"""The site profile: one YAML file per machine or cluster that says how runs are launched there
(the launcher and its resources, where the data is, the tracking server, the sweep storage).

It is `$SODA_SITE` when that is set (a path; `none` or empty: no profile), else the git-ignored
`conf/site/default.yaml` when it exists. `make site` writes a starting one (launching/site_init.py).
Hydra composes it as the config `site/default` (package `_global_`): after conf/'s groups, before
the experiment and sweep files and the command line, which override it.

Its launcher settings are served as a launcher option of their own, `hydra/launcher=site`, built
on the launcher the profile picks (`override /hydra/launcher: slurm`) with its `hydra.launcher`
keys on top. So a launcher named on the command line (`hydra/launcher=local`) starts from conf/'s
settings, not from the profile's; and a sweep file's or the command line's `hydra.launcher.*`
override the profile's. The Hydra plugin that serves both configs is hydra_plugins/soda_site.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from soda.errors import ConfigError

ENV = "SODA_SITE"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_PROFILE = REPO / "conf" / "site" / "default.yaml"
LAUNCHER_OPTION = "site"  # hydra/launcher=site: the profile's launcher settings
# conf/launcher_default.yaml's choice, which a profile's launcher settings build on unless it names one.
DEFAULT_LAUNCHER = "local"
_LAUNCHER_GROUP = re.compile(r"^(override\s+)?/?hydra/launcher$")


def profile_path() -> Path | None:
    """The profile in force: $SODA_SITE (which need not exist: reading it says so), or
    conf/site/default.yaml when it exists; None when there is none."""
    value = os.environ.get(ENV)
    if value is not None:
        if value.strip().lower() in ("", "none"):
            return None
        return Path(value).expanduser().absolute()
    return DEFAULT_PROFILE if DEFAULT_PROFILE.is_file() else None


def shown(path: Path) -> str:
    """A profile's path as messages show it: relative to the repository when inside it."""
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class Profile:
    path: Path
    values: dict[str, Any]  # the file as YAML, its defaults list included
    package: str | None  # its `# @package` header

    @property
    def launcher(self) -> str | None:
        """The launcher option the profile picks (`override /hydra/launcher: slurm`), if any."""
        for entry in self.values.get("defaults") or []:
            if isinstance(entry, dict):
                for key, value in entry.items():
                    if _LAUNCHER_GROUP.match(str(key).strip()):
                        return str(value)
        return None

    @property
    def launcher_settings(self) -> dict[str, Any]:
        """Its `hydra.launcher` keys."""
        return dict(((self.values.get("hydra") or {}).get("launcher")) or {})

    @property
    def serves_a_launcher(self) -> bool:
        return self.launcher is not None or bool(self.launcher_settings)

    @property
    def base_launcher(self) -> str:
        """The conf/hydra/launcher option that hydra/launcher=site builds on."""
        return self.launcher or DEFAULT_LAUNCHER

    def site_config(self) -> dict[str, Any]:
        """What Hydra composes as site/default: the profile, its launcher choice pointing at
        hydra/launcher=site and its hydra.launcher keys moved there (launcher_config)."""
        values = copy.deepcopy(self.values)
        if not self.serves_a_launcher:
            return values
        defaults = [
            entry
            for entry in values.get("defaults") or []
            if not (isinstance(entry, dict) and any(_LAUNCHER_GROUP.match(str(k).strip()) for k in entry))
        ]
        values["defaults"] = [*defaults, {"override /hydra/launcher": LAUNCHER_OPTION}]
        hydra = values.get("hydra") or {}
        hydra.pop("launcher", None)
        if hydra:
            values["hydra"] = hydra
        else:
            values.pop("hydra", None)
        return values

    def launcher_config(self) -> dict[str, Any]:
        """What Hydra composes as hydra/launcher/site: the picked launcher's config with the
        profile's hydra.launcher keys on top."""
        return {"defaults": [self.base_launcher, "_self_"], **copy.deepcopy(self.launcher_settings)}


def read_profile(path: Path) -> Profile:
    """The profile at `path`; a one-line ConfigError when it is missing or not a YAML mapping."""
    where = f"{ENV}={path}" if os.environ.get(ENV) else f"the site profile {shown(path)}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist: write it with `make site SITE={path}`, or unset {ENV}") from None
    except OSError as error:
        raise ConfigError(f"cannot read {where}: {error.strerror}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML{at}: {problem}") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a YAML mapping of config keys, not a {type(values).__name__}")
    header = re.search(r"^#\s*@package\s+(\S+)", text, flags=re.MULTILINE)
    return Profile(path=path, values=values, package=header[1] if header else None)


def current_profile() -> Profile | None:
    path = profile_path()
    return None if path is None else read_profile(path)


# --- where a launcher value came from (`python launch.py --cfg hydra`) ---------------------------


def launcher_sources(composed: DictConfig, overrides: Sequence[str], profile: Profile | None) -> dict[str, str]:
    """For the launcher choice ("") and each hydra.launcher key of a composition with Hydra's
    node: what set it, highest precedence first: the command line, the sweep or experiment file,
    the site profile, the launcher's file in conf/hydra/launcher/, else its schema's default."""
    choices = composed.hydra.runtime.choices
    choice = choices.get("hydra/launcher")
    on_command_line = {_override_key(o) for o in overrides}
    layers: list[tuple[str, dict[str, Any]]] = []
    for group, folder in (("sweep", "sweeps"), ("experiment", "conf/experiment")):
        name = choices.get(group)
        if name:
            file = REPO / folder / f"{name}.yaml"
            layers.append((f"{group} file {folder}/{name}.yaml", _launcher_keys(_load(file))))
    base = choice
    if choice == LAUNCHER_OPTION and profile is not None:
        layers.append((f"site profile {shown(profile.path)}", profile.launcher_settings))
        base = profile.base_launcher
    base_file = REPO / "conf" / "hydra" / "launcher" / f"{base}.yaml"
    layers.append((f"conf/hydra/launcher/{base}.yaml", _load(base_file) or {}))

    sources: dict[str, str] = {}
    if "hydra/launcher" in on_command_line:
        sources[""] = "command line"
    elif choice == LAUNCHER_OPTION and profile is not None:
        sources[""] = f"site profile {shown(profile.path)}, on hydra/launcher={base}"
    else:
        sources[""] = "conf/launcher_default.yaml" + ("" if profile is None else " (the site profile picks none)")
    for key in composed.hydra.launcher:
        if f"hydra.launcher.{key}" in on_command_line:
            sources[key] = "command line"
            continue
        sources[key] = next((name for name, keys in layers if key in keys), "schema default")
    return sources


def annotate(hydra_yaml: str, sources: dict[str, str]) -> str:
    """Hydra's `--cfg hydra` text with a comment after the launcher line and each of its keys
    saying where the value came from (launcher_sources)."""
    lines = hydra_yaml.splitlines()
    out: list[str] = []
    inside = False
    for line in lines:
        if line.rstrip() == "  launcher:":
            inside = True
            out.append(f"{line}  # hydra/launcher: {sources.get('', '?')}")
            continue
        if inside:
            indent = len(line) - len(line.lstrip(" "))
            if line.strip() and indent <= 2:
                inside = False
            else:
                key = re.match(r"^    ([A-Za-z_][\w]*):(\s|$)", line)
                if key and key[1] in sources:
                    out.append(f"{line}  # {sources[key[1]]}")
                    continue
        out.append(line)
    return "\n".join(out) + ("\n" if hydra_yaml.endswith("\n") else "")


def _override_key(override: str) -> str:
    key = override.split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[0]


def _load(path: Path) -> dict[str, Any] | None:
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return values if isinstance(values, dict) else None


def _launcher_keys(values: dict[str, Any] | None) -> dict[str, Any]:
    return dict((((values or {}).get("hydra") or {}).get("launcher")) or {})


# --- what launch.py says ---------------------------------------------------------------------------


def launch_note(arguments: Sequence[str]) -> str | None:
    """The first line of a multirun: where its jobs run and why (the site profile, or that there is
    none and how to make one). None for a single run, for flags that print instead of running, and
    when the command line names the launcher itself."""
    from launching.adapters.hydra import parse_launch_arguments

    args = parse_launch_arguments(arguments)
    if not args.multirun or args.cfg or args.help or args.hydra_help or args.info or args.shell_completion:
        return None
    named = [o.split("=", 1)[-1] for o in args.overrides if _override_key(o) == "hydra/launcher"]
    if named:
        return (
            f"hydra/launcher=local: the jobs run on this machine, with {visible_gpus().text}"
            if named[-1] == "local"
            else None
        )
    path = profile_path()
    if path is None:
        why = (
            f"{ENV}=none" if os.environ.get(ENV) is not None else f"no site profile ({ENV} or {shown(DEFAULT_PROFILE)})"
        )
        return (
            f"{why}: the jobs run on this machine (hydra/launcher={DEFAULT_LAUNCHER}), with {visible_gpus().text}; "
            "to send them to SLURM, `make site` writes a profile, or add hydra/launcher=slurm"
        )
    profile = read_profile(path)
    if not profile.serves_a_launcher:
        return (
            f"site profile {shown(path)}: it picks no launcher; the jobs run on this machine (hydra/launcher=local), "
            f"with {visible_gpus().text}"
        )
    settings = profile.launcher_settings
    shown_settings = ", ".join(
        f"{key} {settings[key]}" for key in ("partition", "account", "gpus_per_node") if settings.get(key) is not None
    )
    gpus = (
        f", with {visible_gpus().text}" if profile.base_launcher == "local" and "gpus_per_node" not in settings else ""
    )
    return (
        f"site profile {shown(path)}: hydra/launcher={profile.base_launcher}"
        + (f" ({shown_settings})" if shown_settings else "")
        + gpus
    )


def annotate_shown_config(arguments: Sequence[str], text: str) -> str:
    """`--cfg hydra`'s text with where each launcher value came from (launcher_sources)."""
    from launching.adapters.hydra import parse_launch_arguments
    from launching.jobs import compose_as_launched

    composed = compose_as_launched(arguments)
    sources = launcher_sources(composed, parse_launch_arguments(arguments).overrides, current_profile())
    return annotate(text, sources)


def name_the_profile(message: str) -> str:
    """Hydra names the profile's configs by their config paths (`In 'site/default': ...`): name
    the file instead, which is what the user can open."""
    if "'site/default'" not in message and "'hydra/launcher/site'" not in message:
        return message
    path = profile_path()
    where = f"the site profile {shown(path)}" if path is not None else "the site profile"
    message = message.replace("In 'site/default'", f"In {where}")
    return message.replace("In 'hydra/launcher/site'", f"In {where} (its launcher: hydra.launcher)")


# ---------------------------------------------------------------------------------------------
# This machine's GPUs, as a local launch hands them to its jobs.


@dataclass(frozen=True)
class VisibleGPUs:
    """The GPUs a process started here may use: `ids` as CUDA_VISIBLE_DEVICES names them (indices,
    or GPU-/MIG- UUIDs), and where that came from (`source`, for messages)."""

    ids: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def text(self) -> str:
        """`2 GPUs (CUDA_VISIBLE_DEVICES=0,1)` or `no GPU (nvidia-smi was not found)`."""
        if not self.ids:
            return f"no GPU ({self.source})"
        count = f"{len(self.ids)} GPU{'s' * (len(self.ids) != 1)}"
        return f"{count} ({self.source})"


def visible_gpus() -> VisibleGPUs:
    """The GPUs of this machine that its jobs may use, without importing torch: those
    CUDA_VISIBLE_DEVICES names when it is set (CUDA's rule: the list ends at the first entry
    that is not a GPU; empty or -1 is none), else those `nvidia-smi` lists."""
    import shutil
    import subprocess

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = []
        for entry in (e.strip() for e in listed.split(",")):
            if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
                break
            ids.append(entry)
        return VisibleGPUs(tuple(ids), f"CUDA_VISIBLE_DEVICES={listed}")
    if shutil.which("nvidia-smi") is None:
        return VisibleGPUs((), "nvidia-smi was not found")
    try:
        found = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return VisibleGPUs((), f"nvidia-smi failed: {error}")
    if found.returncode != 0:
        why = (found.stderr or found.stdout).strip().splitlines()
        return VisibleGPUs((), f"nvidia-smi failed: {why[0] if why else f'status {found.returncode}'}")
    ids = tuple(line.strip() for line in found.stdout.splitlines() if line.strip().isdigit())
    return VisibleGPUs(ids, "nvidia-smi")
