"""Entry point: compose conf/, train one run, return the objective (for sweepers).

python launch.py experiment=demo
python launch.py -m sweep=augment_ablation
"""

from __future__ import annotations

import errno
import importlib
import os
import signal
import sys

import hydra
from omegaconf import DictConfig

from soda.errors import SodaError, Terminated, first_line

# Imported for what they register with Hydra's ConfigStore: the run schema and the launchers' schemas.
for _module in ("soda.config", "hydra_plugins.soda_launchers.launchers"):
    importlib.import_module(_module)

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
            raise  # the sweeper records the failed trial and goes on
        # One run: say what is wrong in one line (Hydra would add its own "Error executing job").
        print(f"error: {_one_line(error)}", file=sys.stderr)
        sys.exit(2)


def _refuse_a_sweep_without_multirun() -> None:
    """A sweep file sets hydra.sweeper, which only -m uses: without it, it would be one plain run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from soda.errors import ConfigError

    hydra = HydraConfig.get()
    sweep = hydra.runtime.choices.get("sweep")
    if hydra.mode == RunMode.RUN and sweep is not None:
        command = " ".join(["python launch.py -m", *hydra.overrides.task])
        raise ConfigError(f"sweep={sweep} is a sweep: run it with -m ({command})")


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
    return "; ".join(k.rstrip(".") for k in kept) or type(error).__name__


if __name__ == "__main__":
    # Let errors reach us instead of Hydra's multi-line report; known ones become one line.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
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
