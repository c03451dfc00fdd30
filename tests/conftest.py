import os
from pathlib import Path

import pytest
import torch

# A site profile of the machine running the tests (conf/site/default.yaml, $SODA_SITE) would change
# every composition and send the tests' jobs elsewhere: the tests run without one, and those about
# profiles set SODA_SITE to their own. Set here, before any test, so subprocesses inherit it too.
os.environ["SODA_SITE"] = "none"

# Modules whose tests run the public commands as real processes: sweeps, SLURM and local jobs, DDP
# ranks, run-directory locks, the benchmarks, whole training runs. Their tests are `integration`:
# `make test` runs them, `make test-fast` leaves them out (but for those marked `smoke`).
INTEGRATION_MODULES = {
    "test_bench.py",
    "test_cluster.py",
    "test_compiled.py",
    "test_distributed.py",
    "test_evaluate.py",
    "test_gpu_check.py",
    "test_launch_cli.py",
    "test_launchers.py",
    "test_learning.py",
    "test_rundir.py",
    "test_sweep.py",
    "test_train.py",
}


def pytest_collection_modifyitems(config, items):
    """Marks the tiers; `cuda` tests need a GPU: without one they are skipped (`make test`
    deselects them, so CI, which has no GPU, does not count them; `make gpu-check` runs them)."""
    integration = pytest.mark.integration
    for item in items:
        if Path(str(item.fspath)).name in INTEGRATION_MODULES and "smoke" not in item.keywords:
            item.add_marker(integration)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run by make gpu-check)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI every selected test must run: a skip there is a failure, not a pass."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every selected test must run: {report.longrepr}"


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield
