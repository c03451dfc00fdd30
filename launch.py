"""Entry point: compose conf/, train one run, return the objective (for sweepers).

python launch.py experiment=demo
python launch.py -m sweep=augment_ablation
python launch.py --help
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import io
import logging
import os
import signal
import sys

import hydra
from omegaconf import DictConfig

from launching import dryrun, jobs, site
from soda.errors import SodaError, Terminated, first_line

# Imported for what it registers with Hydra's ConfigStore (soda.config registers the run schema).
importlib.import_module("hydra_plugins.soda_launchers.launchers")

UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.ENOSPC, errno.EDQUOT}


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        _refuse_a_sweep_without_multirun()
        from soda.train import run  # after the checks above: it imports torch, which takes seconds

        return run(cfg)
    except SodaError as error:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # The job's log says why it failed; the sweeper records the failed trial and goes on.
            logging.getLogger("launch").error("error: %s", _one_line(error))
            raise
        # One run: say what is wrong in one line (Hydra would add its own "Error executing job").
        print(f"error: {_one_line(error)}", file=sys.stderr)
        sys.exit(2)


def _refuse_a_sweep_without_multirun() -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra = HydraConfig.get()
    if hydra.mode == RunMode.RUN:
        jobs.refuse_a_sweep_without_multirun(hydra.runtime.choices.get("sweep"), hydra.overrides.task)


def _check_a_shown_config() -> None:
    """`--cfg job` is the dry check before a long job: it refuses what the run would refuse."""
    sys.argv[1:], note = jobs.check_shown_config(sys.argv[1:])
    if note is not None:
        print(note, file=sys.stderr)


def _say_where_the_jobs_run() -> None:
    note = site.launch_note(sys.argv[1:])
    if note is not None:
        print(note, flush=True)


def _show_hydra_config() -> bool:
    """`--cfg hydra`: Hydra prints the config, with a comment on each launcher value saying where
    it came from (the site profile, a sweep file, the command line, ...). False for other runs."""
    args = jobs.hydra_arguments(sys.argv[1:])
    if args.cfg != "hydra" or args.package or args.help or args.hydra_help or args.info:
        return False
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        main()
    print(site.annotate_shown_config(sys.argv[1:], shown.getvalue()), end="")
    return True


def _one_line(error: BaseException) -> str:
    """Hydra's composition errors span several lines (option lists, search paths, hints that do
    not apply under a typed schema); keep what says what is wrong, and the cause, on one line."""
    kept: list[str] = []
    for line in str(error).splitlines():
        text = line.strip()
        if text.startswith(("Config search path", "Set the environment")):
            break
        if not text or text.startswith("To append to your config"):
            continue
        if line.startswith("\t") and kept:  # an entry of "Available options in ...:"
            kept[-1] += (" " if kept[-1].endswith(":") else ", ") + text
        else:
            kept.append(text)
    cause = error.__cause__
    if cause is not None and str(cause).strip():
        kept.append(first_line(cause, limit=1000))
    return site.name_the_profile("; ".join(k.rstrip(".") for k in kept) or type(error).__name__)


if __name__ == "__main__":
    # Let errors reach us instead of Hydra's multi-line report; known ones become one line.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        _check_a_shown_config()
        if not _show_hydra_config():
            _say_where_the_jobs_run()
            dry_run = dryrun.main(sys.argv[1:])  # hydra.launcher.dry_run=true: show, check, submit nothing
            if dry_run is not None:
                sys.exit(dry_run)
            main()
    except SodaError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as stop:  # Ctrl-C: the run recorded it (KILLED) and says how to resume
        print(f"stopped: {stop or 'interrupted (SIGINT)'}", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Terminated as stop:
        print(f"stopped: {stop or 'terminated (SIGTERM)'}", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except Exception as error:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(error, HydraException | OmegaConfBaseException):  # some are OSErrors too
            print(f"error: {_one_line(error)}", file=sys.stderr)
            sys.exit(2)
        # Hydra creates the run directory (and .hydra/, launch.log) before any of our code runs.
        if isinstance(error, OSError) and error.filename is not None and error.errno in UNWRITABLE:
            print(
                f"error: cannot write {error.filename} ({error.strerror}); make it writable, or give the "
                f"run another directory (hydra.run.dir=... / hydra.sweep.dir=...)",
                file=sys.stderr,
            )
            sys.exit(2)
        raise
