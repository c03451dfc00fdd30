"""Hydra's private APIs that the launch side relies on (see launching/adapters/__init__.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def get_args_parser():
    """hydra.main's own command-line parser. Gap: Hydra has no public way to read a command line
    as hydra.main reads it (-m, --cfg, --config-name, overrides), which launch.py's checks and
    dry run need before hydra.main runs."""
    from hydra._internal.utils import get_args_parser as hydra_parser

    return hydra_parser()


def parse_launch_arguments(arguments: Sequence[str]):
    """launch.py's command line (without the program name) as hydra.main reads it: an
    argparse.Namespace with overrides, multirun, cfg, help, config_path, config_name, ..."""
    return get_args_parser().parse_args(list(arguments))


def job_outcome(result) -> Any:
    """What a job handed back: its return value, or the exception it raised. Gap: the public
    JobReturn.return_value re-raises a failed job's exception *and* writes "Error executing job"
    to stderr, which a pruned trial or a job the launcher merely reports on is not; Hydra has no
    other accessor."""
    return result._return_value
