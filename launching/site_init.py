"""`make site`: write a starting site profile from what this machine says about itself.

    python -m launching.site_init                       # conf/site/default.yaml of the repository
    python -m launching.site_init --output ~/soda-site.yaml --force

A site profile is one YAML file per machine or cluster, outside the tracked config (conf/site/ is
git-ignored): the launcher, partition, account, interpreter and stores that every run there
shares. Launches compose it after conf/'s groups, before the experiment= and sweep= files and the
command line (launching/site.py); $SODA_SITE names another file, SODA_SITE=none skips it.

Every value written says in its comment where it came from (which command, which variable), and
what could not be found is written as null or left commented out with the reason, never guessed:
the file is a start the user reads and completes. Each command gets a few seconds, so a hung
slurmctld costs seconds, not the whole command.

Asking the machine is launching/site_survey.py's; the profile's text, launching/site_render.py's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from launching import site
from launching.site_render import render, summary
from launching.site_survey import ENVIRONMENT, survey
from soda.files import write_atomically
from soda.store import redact

DEFAULT_OUTPUT = site.DEFAULT_PROFILE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launching.site_init", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help=f"where to write (default: {DEFAULT_OUTPUT})"
    )
    parser.add_argument("--force", action="store_true", help="replace the file when it exists")
    args = parser.parse_args(argv)
    output = args.output.expanduser().absolute()
    if output.exists() and not args.force:
        print(f"error: {output} exists; keep it, or replace it with --force (make site FORCE=1)", file=sys.stderr)
        return 2
    machine = survey()
    text = render(machine)
    secret = any(redact(value) != value for name, value in os.environ.items() if name in ENVIRONMENT)
    try:
        write_atomically(output, lambda handle: handle.write(text.encode()))
        if secret:  # a store URL with its password: the profile is its owner's alone
            output.chmod(0o600)
    except OSError as error:
        print(f"error: cannot write {output}: {error.strerror or error}", file=sys.stderr)
        return 2
    print(summary(machine, output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
