"""The lint setup: pre-commit runs the ruff that `make lint` runs, with the repository's rules."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PRE_COMMIT = REPO / ".pre-commit-config.yaml"


def _pins(text: str) -> set[str]:
    return set(re.findall(r"ruff==([0-9][0-9.]*)", text))


def test_pre_commit_pins_the_ruff_of_the_dev_dependencies():
    ours = _pins((REPO / "pyproject.toml").read_text())
    hooks = _pins(PRE_COMMIT.read_text())
    assert len(ours) == 1 and hooks == ours, f"pyproject pins ruff {ours}, .pre-commit-config.yaml {hooks}"


def _ruff_check(folder: Path, source: str) -> subprocess.CompletedProcess:
    """`ruff check` of one file holding `source`, under the repository's rules."""
    (folder / "checked.py").write_text(source)
    command = [sys.executable, "-m", "ruff", "check", "--no-cache", "checked.py"]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True)


def test_a_noqa_that_silences_nothing_is_reported(tmp_path):
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    result = _ruff_check(tmp_path, "import os  # noqa: F401\n\nprint(1)\n")
    assert result.returncode == 0, result.stdout  # F401 is real here: the noqa is used
    result = _ruff_check(tmp_path, "import os  # noqa: E731\n\nprint(os.sep)\n")
    assert result.returncode == 1 and "RUF100" in result.stdout


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_pre_commit_hook_refuses_a_commit_that_make_lint_would_refuse(tmp_path):
    """Runs the configured hooks on a scratch repository: pre-commit builds the pinned ruff in its
    own environment (from the package index, once per machine), then flags an undefined name."""
    pre_commit = Path(sys.executable).with_name("pre-commit")
    assert pre_commit.exists(), "pre-commit is a dev dependency: make install"
    for name in (".pre-commit-config.yaml", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "bad.py").write_text("print(undefined_name)\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "."], cwd=tmp_path, check=True)
    run = subprocess.run(
        [str(pre_commit), "run", "--all-files"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 1 and "F821" in run.stdout + run.stderr, run.stdout + run.stderr
    (tmp_path / "bad.py").write_text("print(1)\n")
    subprocess.run([*git, "add", "."], cwd=tmp_path, check=True)
    run = subprocess.run([str(pre_commit), "run", "--all-files"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
