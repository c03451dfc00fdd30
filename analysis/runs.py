"""MLflow runs as a pandas DataFrame: load them from any tracking store, select, and say which were used.

One row per run, with the column names of `mlflow.search_runs`: `run_id`, `experiment` (its name),
`experiment_id`, `status`, `start_time`, `end_time`, `run_name`, then `params.<dotted config key>`,
`metrics.<key>` (the last value logged) and `tags.<key>`. Every value of a param or tag is a string,
as MLflow stores it.

Opening a store never creates one: a missing SQLite file or folder is an error, not an empty store.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pandas as pd

from soda.errors import SodaError, TrackingError, first_line
from soda.record import STUDY, SWEEP, SWEEP_PARENT, TRIAL, TRIAL_STATE
from soda.store import Store, default_tracking_uri, quick_http_failures, redact

RUN_COLUMNS = ["run_id", "experiment", "experiment_id", "status", "start_time", "end_time", "run_name"]
PAGE_SIZE = 1000


class AnalysisError(SodaError):
    """Runs that cannot be read or tabulated; the message says what to change."""


def open_store(tracking_uri: str):
    """An MlflowClient on `tracking_uri`, checked readable (soda.store.Store.for_reading);
    AnalysisError (one line) if it is not."""
    try:
        return Store.for_reading(tracking_uri, option="--tracking-uri").client
    except TrackingError as error:
        raise AnalysisError(str(error)) from None


def _all_pages(search, **kwargs) -> list:
    """Every item of a paginated MLflow search."""
    items, token = [], None
    while True:
        page = search(max_results=PAGE_SIZE, page_token=token, **kwargs)
        items.extend(page)
        token = page.token
        if not token:
            return items


def load_runs(tracking_uri: str | None = None, experiments: Iterable[str] | None = None) -> pd.DataFrame:
    """Every active (not deleted) run of `experiments` (names; all experiments when None), oldest first."""
    from mlflow.entities import ViewType

    uri = tracking_uri or default_tracking_uri()
    client = open_store(uri)
    try:
        with quick_http_failures():
            known = {e.name: e.experiment_id for e in _all_pages(client.search_experiments)}
            if experiments is None:
                names = sorted(known)
            else:
                names = list(dict.fromkeys(experiments))
                missing = [name for name in names if name not in known]
                if missing:
                    raise AnalysisError(
                        f"no experiment {missing[0]!r} in {redact(uri)}; it has: {', '.join(sorted(known)) or 'none'}"
                    )
            runs = (
                _all_pages(
                    client.search_runs,
                    experiment_ids=[known[name] for name in names],
                    run_view_type=ViewType.ACTIVE_ONLY,
                )
                if names
                else []
            )
    except AnalysisError:
        raise
    except Exception as error:
        raise AnalysisError(f"cannot read the runs of {redact(uri)} ({first_line(error)})") from None

    by_id = {experiment_id: name for name, experiment_id in known.items()}
    rows = [
        {
            "run_id": run.info.run_id,
            "experiment": by_id.get(run.info.experiment_id, run.info.experiment_id),
            "experiment_id": run.info.experiment_id,
            "status": run.info.status,
            "start_time": pd.Timestamp(run.info.start_time, unit="ms", tz="UTC"),
            "end_time": pd.Timestamp(run.info.end_time, unit="ms", tz="UTC") if run.info.end_time else pd.NaT,
            "run_name": run.info.run_name,
            **{f"params.{key}": value for key, value in run.data.params.items()},
            **{f"metrics.{key}": value for key, value in run.data.metrics.items()},
            **{f"tags.{key}": value for key, value in run.data.tags.items()},
        }
        for run in runs
    ]
    frame = pd.DataFrame(rows, columns=None if rows else RUN_COLUMNS)
    extra = sorted(column for column in frame.columns if column not in RUN_COLUMNS)
    frame = frame[RUN_COLUMNS + extra]
    return frame.sort_values(["start_time", "run_id"], kind="stable").reset_index(drop=True)


def parse_pairs(pairs: Iterable[str], what: str) -> dict[str, str]:
    """["model.name=tiny", ...] -> {"model.name": "tiny"}; AnalysisError for an item without '='."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AnalysisError(f"--{what} {pair!r} is not KEY=VALUE")
        parsed[key] = value
    return parsed


def select_runs(
    runs: pd.DataFrame,
    sweep: str | None = None,
    tags: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """The runs of sweep `sweep` (tag STUDY) whose tags and config values (params, dotted keys)
    equal the given ones, compared as the strings MLflow stores (`"800"`, `"True"`)."""
    wanted = {f"tags.{key}": value for key, value in (tags or {}).items()}
    wanted |= {f"params.{key}": value for key, value in (params or {}).items()}
    if sweep is not None:
        wanted[f"tags.{STUDY}"] = sweep
    keep = pd.Series(True, index=runs.index)
    for column, value in wanted.items():
        keep &= runs[column].eq(str(value)) if column in runs else False
    return runs[keep]


def describe_selection(
    experiments: Iterable[str] | None = None,
    sweep: str | None = None,
    tags: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
) -> str:
    """What a selection asked for, for messages: "experiment 'soda', sweep 'augment_ablation'"; "" for all runs."""
    parts = [f"experiment {name!r}" for name in experiments or ()]
    if sweep is not None:
        parts.append(f"sweep {sweep!r}")
    parts += [f"tag {key}={value}" for key, value in (tags or {}).items()]
    parts += [f"{key}={value}" for key, value in (params or {}).items()]
    return ", ".join(parts)


def _tag(runs: pd.DataFrame, key: str) -> pd.Series:
    column = f"tags.{key}"
    return runs[column] if column in runs else pd.Series(None, index=runs.index, dtype=object)


def sweep_parents(runs: pd.DataFrame) -> pd.Series:
    """True for a sweep's own run (soda.record.parent_tags): it holds the study, not a result."""
    return _tag(runs, SWEEP).eq(SWEEP_PARENT)


def duplicate_trials(runs: pd.DataFrame) -> pd.Series:
    """True for a run that another run of the same sweep trial (equal tags STUDY and TRIAL)
    stands for. A trial has one run, unless its job and the sweeper both created one, or a study
    was started over under the same name; of its runs the FINISHED one counts (the newest if
    several), else the newest. Runs without both tags are no duplicates."""
    study, trial = _tag(runs, STUDY), _tag(runs, TRIAL)
    tagged = study.notna() & trial.notna()
    # Newest: the latest start, else (no start times) the later row, as load_runs lists them oldest first.
    start = runs["start_time"] if "start_time" in runs else pd.Series(pd.NaT, index=runs.index)
    ranked = pd.DataFrame(
        {
            "study": study,
            "trial": trial,
            "finished": runs["status"].eq("FINISHED"),
            "start": start,
            "row": range(len(runs)),
        }
    )[tagged].sort_values(["finished", "start", "row"], ascending=False)
    counted = ranked.index[~ranked.duplicated(["study", "trial"])]
    return tagged & ~runs.index.isin(counted)


def finished_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that count as results: FINISHED, not a sweep's parent run, and one per sweep
    trial: among runs with the same tags STUDY and TRIAL only the FINISHED one (the newest if
    several) counts (`duplicate_trials`). Runs without trial tags each count."""
    return runs[runs["status"].eq("FINISHED") & ~sweep_parents(runs) & ~duplicate_trials(runs)]


def exclusion_note(runs: pd.DataFrame) -> str:
    """Which result runs a table leaves out, e.g. "excluded: 1 failed, 1 pruned, 2 unfinished,
    1 duplicate"; "" when none. Unfinished: still running, or killed (interrupted or preempted,
    to be resumed). Duplicate: another run of the same sweep trial counts instead."""
    candidates = runs[~sweep_parents(runs)]
    duplicates = duplicate_trials(candidates)
    trials = candidates[~duplicates]  # each trial once, as its counted run says it ended
    status = trials["status"]
    pruned = status.eq("KILLED") & _tag(trials, TRIAL_STATE).eq("PRUNED")
    counts = {
        "failed": int(status.eq("FAILED").sum()),
        "pruned": int(pruned.sum()),
        "unfinished": int((~status.isin(["FINISHED", "FAILED"]) & ~pruned).sum()),
    }
    parts = [f"{count} {word}" for word, count in counts.items() if count]
    if duplicates.any():
        parts.append(_counted(int(duplicates.sum()), "duplicate"))
    return f"excluded: {', '.join(parts)}" if parts else ""


def require_results(runs: pd.DataFrame, tracking_uri: str, selection: str) -> pd.DataFrame:
    """The finished result runs, or AnalysisError saying that none match and what was left out."""
    finished = finished_runs(runs)
    if finished.empty:
        note = exclusion_note(runs)
        raise AnalysisError(
            f"no finished runs{f' match {selection}' if selection else ''} in {redact(tracking_uri)}"
            + (f" ({note})" if note else "")
        )
    return finished


def provenance(runs: pd.DataFrame) -> str:
    """Which runs a table is made of: count, experiments, sweeps, dates started and git commits."""
    finished = finished_runs(runs)
    if finished.empty:
        return "no finished runs"
    experiments = sorted(finished["experiment"].unique())
    sweeps = sorted(_tag(finished, STUDY).dropna().unique())
    text = f"{_counted(len(finished), 'finished run')} of {_named(experiments, 'experiment')}"
    if sweeps:
        text += f" ({_named(sweeps, 'sweep')})"
    first, last = (
        moment.strftime("%Y-%m-%d") for moment in (finished["start_time"].min(), finished["start_time"].max())
    )
    text += f", started {first}" + (f" to {last}" if last != first else "")
    return f"{text}, git {_commits(finished)}"


def _counted(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def _named(names: list[str], noun: str) -> str:
    """ "experiment `soda`", "experiments `a`, `b`"."""
    return f"{noun}{'s' if len(names) != 1 else ''} " + ", ".join(f"`{name}`" for name in names)


def _commits(runs: pd.DataFrame) -> str:
    """Short shas, oldest first, each marked "(dirty)" when some of its runs had uncommitted changes."""
    sha = _tag(runs, "git_sha").fillna(_tag(runs, "mlflow.source.git.commit")).fillna("unknown")
    dirty = _tag(runs, "git_dirty").eq("true")
    shown = []
    for commit in dict.fromkeys(sha):  # runs are oldest first
        label = commit[:7] if commit != "unknown" else commit
        shown.append(f"{label} (dirty)" if dirty[sha.eq(commit)].any() else label)
    if len(shown) > 6:
        shown = [*shown[:6], f"and {len(shown) - 6} more"]
    return ", ".join(shown)


def load_history(tracking_uri: str, run_ids: Iterable[str], keys: Iterable[str]) -> pd.DataFrame:
    """Every logged value of metrics `keys` for the runs: columns run_id, key, step, value, sorted.
    Eval metrics are logged with step = epoch, so this is the accuracy curve of each run."""
    client = open_store(tracking_uri)
    rows = []
    try:
        with quick_http_failures():
            for run_id in run_ids:
                for key in keys:
                    rows += [(run_id, key, m.step, m.value) for m in client.get_metric_history(run_id, key)]
    except Exception as error:
        raise AnalysisError(f"cannot read metric history from {redact(tracking_uri)} ({first_line(error)})") from None
    history = pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])
    # A resumed run may hold a step twice (the tracker prevents it; older runs may not): keep the last.
    history = history.drop_duplicates(["run_id", "key", "step"], keep="last")
    return history.sort_values(["run_id", "key", "step"], kind="stable").reset_index(drop=True)
