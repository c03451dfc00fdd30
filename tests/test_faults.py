"""The fast part of the fault campaign (`make faults` runs all of it): a few SIGKILLs at random
moments, inside checkpoint and MLflow writes, and a few bad inputs of each kind."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_kills_and_bad_inputs_lose_nothing(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "bench/faults.py",
            "--only",
            "kills",
            "garbage",
            "--kills",
            "3",
            "--quick",
            "--workdir",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    last = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0 and last.endswith("failed=0"), result.stdout[-6000:] + result.stderr[-3000:]
    assert "3 SIGKILLs (1 in checkpoint writes, 1 in MLflow writes, 1 at random times)" in result.stdout
    assert "garbage: 7/7 bad inputs ended in one error line" in result.stdout
