"""Fixtures of the fault campaigns, and the summary `make faults` prints: one line per campaign
(what was done to the runs, and the guarantee that held) and `faults passed=<n> failed=<m>`
(tests). Each test module is one campaign, named after it (test_kills.py: kills)."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Everything here runs the public command as real processes: a `system` test."""
    for item in items:
        if item.path.parent == HERE:
            item.add_marker(pytest.mark.system)


def campaign_of(path: str | Path) -> str:
    return Path(path).stem.removeprefix("test_")


@pytest.fixture(scope="module")
def work(request, tmp_path_factory) -> Path:
    """The campaign's scratch folder: its stores, run directories and data."""
    return tmp_path_factory.mktemp(campaign_of(request.path)).resolve()


@dataclass
class Campaign:
    """What a campaign's tests did, for its summary line."""

    counts: Counter = field(default_factory=Counter)  # e.g. kills by where they landed
    facts: list[str] = field(default_factory=list)  # parts of the line, e.g. each store's crowd
    details: list[str] = field(default_factory=list)  # lines under it, e.g. each bad input's error
    seconds: list[float] = field(default_factory=list)  # e.g. each bad input's run


CAMPAIGNS = pytest.StashKey[dict]()


@pytest.fixture
def record(request) -> Campaign:
    """The record of the requesting test's campaign, shared by its tests."""
    campaigns = request.config.stash.setdefault(CAMPAIGNS, defaultdict(Campaign))
    return campaigns[campaign_of(request.path)]


# ------------------------------------------------------------------------------------------------
# The summary: per campaign, what was done (from its record), then the guarantee when every one of
# its tests passed, or which failed.


def _kills(campaign: Campaign, outcomes: dict) -> str:
    counts = campaign.counts
    return (
        f"{counts['kills']} SIGKILLs ({counts['checkpoint.write']} in checkpoint writes, "
        f"{counts['mlflow.log_metrics']} in MLflow writes, {counts['random']} at random times) "
        f"over {counts['runs']} run(s)"
    )


def _garbage(campaign: Campaign, outcomes: dict) -> str:
    passed = sum(outcome == "passed" for outcome, _ in outcomes.values())
    ran = sum(outcome != "skipped" for outcome, _ in outcomes.values())
    slowest = max(campaign.seconds, default=0.0)
    return f"{passed}/{ran} bad inputs ended in one error line with a non-zero exit, slowest {slowest:.1f} s"


SUMMARIES = {  # campaign: (what was done, the guarantee its tests check), in this order
    "kills": (
        _kills,
        "each finished once in MLflow with every epoch's metrics once, its params and config, no damaged "
        "checkpoint met, no temporary file left, and final metrics bit-equal to the uninterrupted run",
    ),
    "requeue": (
        lambda campaign, _: f"a 2-task SLURM job preempted and requeued {campaign.counts['requeues']} times",
        "it finished once in MLflow with every epoch's metrics once and final metrics equal to the uninterrupted job's",
    ),
    "node_loss": (
        lambda campaign, _: "; ".join(campaign.facts),
        "SLURM requeued it, and it finished once in MLflow on other nodes with every epoch's metrics once and "
        "metrics within rounding of the uninterrupted job's",
    ),
    "crowd": (
        lambda campaign, _: "; ".join(["16 trials, 4 in flight", *campaign.facts]),
        "every trial finished, no metric point lost, no lock error",
    ),
    "trials": (
        lambda campaign, _: "8-trial sweep, 1 raised, 1 diverged to NaN, 1 SIGKILLed",
        "the other 5 finished, the 3 failures are FAIL in Optuna and FAILED in MLflow with their errors, "
        "and the re-run retried only those 3",
    ),
    "garbage": (_garbage, "the earlier record intact"),
    "tracking_outage": (
        lambda campaign, _: "; ".join(campaign.facts),
        "one error line, the checkpoint kept, and the re-run continued the same MLflow run, saying how it had ended",
    ),
    "outages": (
        lambda campaign, _: "; ".join(campaign.facts),
        "one error line naming the storage without its password, both MLflow runs saying the storage was lost, "
        "and the re-run continued the same study and parent run",
    ),
    "frozen": (
        lambda campaign, _: "; ".join(campaign.facts),
        "one error line naming the rank and its host, the frozen process gone, the run FAILED with the reason, "
        "and the re-run resumed from the checkpoint",
    ),
}
SEVERITY = {"passed": 0, "skipped": 1, "failed": 2}


def _outcomes(terminalreporter) -> tuple[dict[str, dict[str, tuple[str, float]]], dict[str, str]]:
    """Per campaign, per test: (passed | skipped | failed, seconds of setup, call and teardown);
    and why each skipped test was skipped."""
    root = terminalreporter.config.rootpath
    tests: dict[str, tuple[str, float]] = {}
    reasons: dict[str, str] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if not isinstance(report, pytest.TestReport) or (root / report.location[0]).parent != HERE:
                continue
            outcome = "failed" if report.failed else "skipped" if report.skipped else "passed"
            previous, seconds = tests.get(report.nodeid, ("passed", 0.0))
            worst = max(previous, outcome, key=SEVERITY.__getitem__)
            tests[report.nodeid] = (worst, seconds + report.duration)
            if report.skipped and isinstance(report.longrepr, tuple):
                reasons[report.nodeid] = report.longrepr[2].removeprefix("Skipped: ")
    by_campaign: dict[str, dict] = defaultdict(dict)
    for nodeid, result in tests.items():
        by_campaign[campaign_of(nodeid.split("::")[0])][nodeid] = result
    return by_campaign, reasons


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    by_campaign, reasons = _outcomes(terminalreporter)
    if not by_campaign:
        return
    records = config.stash.get(CAMPAIGNS, defaultdict(Campaign))
    terminalreporter.write_sep("=", "fault campaigns")
    order = [name for name in SUMMARIES if name in by_campaign] + sorted(set(by_campaign) - set(SUMMARIES))
    totals = Counter()
    for name in order:
        outcomes = by_campaign[name]
        campaign = records[name]
        done, guarantee = SUMMARIES.get(name, (lambda _, tests: f"{len(tests)} tests", "all passed"))
        counts = Counter(outcome for outcome, _ in outcomes.values())
        totals.update(counts)
        line = f"{name}: {done(campaign, outcomes)}"
        if counts["failed"]:
            failed = [nodeid.split("::")[-1] for nodeid, (outcome, _) in outcomes.items() if outcome == "failed"]
            line += f"; FAILED {counts['failed']} of {len(outcomes)} tests: {', '.join(failed)}"
        elif counts["passed"]:
            line += f"; {guarantee}"
        if counts["skipped"]:
            skipped = sorted({reasons.get(nodeid, "?") for nodeid in outcomes if outcomes[nodeid][0] == "skipped"})
            line += f"; {counts['skipped']} skipped ({'; '.join(skipped)})"
        terminalreporter.write_line(f"{line} ({sum(seconds for _, seconds in outcomes.values()):.0f} s)")
        for detail in campaign.details:
            terminalreporter.write_line(f"    {detail}")
    last = f"faults passed={totals['passed']} failed={totals['failed']}"
    terminalreporter.write_line(last + (f" skipped={totals['skipped']}" if totals["skipped"] else ""))
