"""launch.py's command line as a user meets it: --help, the option lists Hydra shows, and
`--cfg job` as a dry check that refuses what the run would refuse."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import CONF, REPO, launch
from tests.test_config import THIRD_PARTY_LAUNCHERS
from tests.test_docs import Snippet, check_command, commands, launch_arguments

GROUPS = ["model", "dataset", "augmentation", "schedule", "eval", "tracking", "experiment", "sweep"]


def _options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def _lines(stream: str) -> list[str]:
    return [line for line in stream.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def app_help() -> str:
    result = launch(["--help"], timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help_says_what_the_app_does_and_where_the_docs_are(app_help: str):
    text = " ".join(app_help.split())
    assert "encoder" in text and "diffusion decoder" in text and "linear-probe" in text
    assert "python launch.py -m" in text and "README.md" in text and "docs/" in text
    assert "--hydra-help" in text
    assert "_base" not in app_help and "$" not in app_help.replace("$SODA_DATA", "").replace("$SODA_SITE", "")


def test_help_lists_every_group_with_its_options(app_help: str):
    for group in GROUPS:
        assert f"\n{group}: {', '.join(_options(group))}\n" in app_help, group
    listed = re.search(r"^hydra/launcher: ([\w, ]+?)(?:  |$)", app_help, flags=re.M)
    assert listed is not None
    assert set(listed[1].split(", ")) == {"local", "slurm"}


def test_help_examples_run_the_ablation_dry_run_and_override_a_value(app_help: str):
    examples = [
        command
        for command in commands(Snippet(Path("help"), 1, tuple(app_help.splitlines()), True))
        if launch_arguments(command) is not None and "[" not in command.text
    ]
    arguments = [launch_arguments(command) for command in examples]
    assert ["experiment=demo"] in arguments
    assert ["-m", "sweep=augment_ablation"] in arguments
    assert ["-m", "sweep=augment_ablation", "hydra.launcher.dry_run=true"] in arguments
    assert any(any("." in word.split("=")[0] for word in a) and "-m" not in a for a in arguments)
    for command in examples:
        check_command(command)


def test_hydra_help_still_works_and_offers_no_internal_config():
    result = launch(["--hydra-help"], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "== Flags ==" in result.stdout and "--cfg" in result.stdout
    launchers = re.search(r"^hydra/launcher: (.*)$", result.stdout, flags=re.M)
    assert launchers is not None and set(launchers[1].split(", ")) - THIRD_PARTY_LAUNCHERS == {"local", "slurm"}
    assert "_base" not in result.stdout


def test_an_unknown_launcher_lists_only_ours_and_hydras():
    result = launch(["-m", "hydra/launcher=nope"], timeout=120)
    assert result.returncode == 2
    (line,) = _lines(result.stderr)
    listed = re.search(r"Available options in 'hydra/launcher': (.*)$", line)
    assert listed is not None, line
    assert set(listed[1].split(", ")) - THIRD_PARTY_LAUNCHERS == {"local", "slurm"}


def test_tab_completion_offers_only_ours_and_hydras():
    env = {**os.environ, "COMP_LINE": "python launch.py hydra/launcher="}
    result = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), "-sc", "query=bash"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    offered = {word.split("=", 1)[1] for word in result.stdout.split()}
    assert offered - THIRD_PARTY_LAUNCHERS == {"local", "slurm"}


@pytest.mark.parametrize("show", [["--cfg", "job"], ["-c", "all"]])
def test_cfg_refuses_an_out_of_range_value_as_the_run_does(show: list[str]):
    result = launch(["experiment=demo", "schedule.epochs=-1", *show], timeout=120)
    assert result.returncode == 2
    assert _lines(result.stderr) == ["error: schedule.epochs=-1 must be at least 1"]
    assert result.stdout == ""


def test_cfg_prints_a_valid_config():
    result = launch(["experiment=demo", "schedule.epochs=7", "--cfg", "job"], timeout=120)
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["schedule"]["epochs"] == 7 and shown["model"]["name"] == "tiny" and "hydra" not in shown


def test_cfg_with_multirun_checks_every_job_and_names_the_bad_one():
    result = launch(["-m", "experiment=demo", "seed=0,1", "schedule.epochs=2,0", "--cfg", "job"], timeout=120)
    assert result.returncode == 2
    assert _lines(result.stderr) == [
        "error: schedule.epochs=0 must be at least 1 (in job 1 of 4: experiment=demo seed=0 schedule.epochs=0)"
    ]


def test_cfg_with_multirun_prints_the_first_job():
    arguments = ["-m", "experiment=demo", "seed=3,4", "augmentation/view@augmentation.target=flip,none", "-c", "job"]
    result = launch(arguments, timeout=120)
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["seed"] == 3 and shown["augmentation"]["target"]["name"] == "flip"
    assert _lines(result.stderr) == [
        "checked all 4 jobs of the sweep; shown: job 0 (experiment=demo seed=3 "
        "augmentation/view@augmentation.target=flip)"
    ]
