"""The two things `mlflow.start_run` adds to a run that MlflowClient has no public call for, used by
the live run (soda.tracking.Tracker), which writes through its own client bound to its store
instead of MLflow's process-wide tracking URI and active-run stack.

Each is MLflow's own code, reached by a module path its docs do not list (the public gap is named
on each); tests/test_adapters.py fails if MLflow changes either.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def context_tags(tags: dict[str, str]) -> dict[str, str]:
    """`tags` plus the context tags `mlflow.start_run` gives a new run (mlflow.source.name,
    mlflow.source.type, mlflow.user, mlflow.source.git.commit, ...).
    Public gap: MlflowClient.create_run records only the tags it is given."""
    from mlflow.tracking.context.registry import resolve_tags

    return resolve_tags(tags)


def watch_system(run_id: str, uri: str, resumed: bool):
    """Start MLflow's system-metrics monitor (system/* metrics: CPU, memory, disk, network, GPU)
    for `run_id`, writing to the store at `uri`; the monitor, whose finish() stops it, or None
    when it cannot start (logged, as `mlflow.start_run` does: the run goes on without them).
    Public gap: only `mlflow.start_run(log_system_metrics=True)` starts it, and only for the
    process-wide active run and tracking URI."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as error:
        log.error("system metrics monitoring did not start: %s", error)
        return None
