"""launch.py's command line: what happens before Hydra runs and around it.

launch.py holds the @hydra.main function (its config_path is relative to launch.py, and the
launchers pickle it) and hands it to `main`, which makes every check and shows every note the
command line asks for before Hydra starts, then runs it; `one_job` wraps each job's call of
soda.train.run. Errors a user can act on become one `error:` line and exit status 2.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator

from launching import dryrun, jobs, site
from launching.adapters.hydra import parse_launch_arguments
from soda.errors import SodaError, Terminated, first_line

UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.ENOSPC, errno.EDQUOT}


def main(hydra_main: Callable[[], object]) -> None:
    """Run `python launch.py <sys.argv[1:]>`: check and show what the arguments ask for, then
    call `hydra_main` (launch.py's @hydra.main function, which reads sys.argv) unless a dry run
    or `--cfg hydra` already answered. Exits with 2 on an error, 130 on Ctrl-C, 143 on SIGTERM."""
    # Let errors reach us instead of Hydra's multi-line report; known ones become one line.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        _check_a_shown_config()
        if _show_hydra_config(hydra_main):
            return
        _say_where_the_jobs_run()
        dry_run = dryrun.main(sys.argv[1:])  # hydra.launcher.dry_run=true: show, check, submit nothing
        if dry_run is not None:
            sys.exit(dry_run)
        hydra_main()
    except SodaError as error:
        _exit_with_error(one_line(error))
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
            _exit_with_error(one_line(error))
        # Hydra creates the run directory (and .hydra/, launch.log) before any of our code runs.
        if isinstance(error, OSError) and error.filename is not None and error.errno in UNWRITABLE:
            _exit_with_error(
                f"cannot write {error.filename} ({error.strerror}); make it writable, or give the "
                f"run another directory (hydra.run.dir=... / hydra.sweep.dir=...)"
            )
        raise


@contextlib.contextmanager
def one_job() -> Iterator[None]:
    """Around one job's run, inside Hydra: a sweep file without -m is refused, and a SodaError is
    one line; a run's ends the process with status 2, a multirun job's goes to the job's log and
    on to the sweeper, which records the failed trial and goes on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra = HydraConfig.get()
    try:
        if hydra.mode == RunMode.RUN:
            jobs.refuse_a_sweep_without_multirun(hydra.runtime.choices.get("sweep"), hydra.overrides.task)
        yield
    except SodaError as error:
        if hydra.mode == RunMode.MULTIRUN:
            logging.getLogger("launch").error("error: %s", one_line(error))
            raise
        # One run: say what is wrong in one line (Hydra would add its own "Error executing job").
        _exit_with_error(one_line(error))


def one_line(error: BaseException) -> str:
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


def _exit_with_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _check_a_shown_config() -> None:
    """`--cfg job` is the dry check before a long job: it refuses what the run would refuse."""
    sys.argv[1:], note = jobs.check_shown_config(sys.argv[1:])
    if note is not None:
        print(note, file=sys.stderr)


def _show_hydra_config(hydra_main: Callable[[], object]) -> bool:
    """`--cfg hydra`: Hydra prints the config, with a comment on each launcher value saying where
    it came from (the site profile, a sweep file, the command line, ...). False for other runs."""
    args = parse_launch_arguments(sys.argv[1:])
    if args.cfg != "hydra" or args.package or args.help or args.hydra_help or args.info:
        return False
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        hydra_main()
    print(site.annotate_shown_config(sys.argv[1:], shown.getvalue()), end="")
    return True


def _say_where_the_jobs_run() -> None:
    note = site.launch_note(sys.argv[1:])
    if note is not None:
        print(note, flush=True)
