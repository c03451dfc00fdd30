"""Named moments a fault campaign may aim at (`make faults`, tests/system/).

With SODA_FAULT_MARKS=checkpoint.write,mlflow.log_metrics in its environment, a process prints
`soda-fault-mark <name>` on stderr each time it reaches one of those moments, so that an outside
killer can land its SIGKILL inside a checkpoint write or an MLflow write instead of only where a
random timer happens to fall. Without the variable (always, outside the campaign) a mark is one
set lookup.
"""

from __future__ import annotations

import os
import sys

ENV = "SODA_FAULT_MARKS"
_MARKS = frozenset(name for name in os.environ.get(ENV, "").split(",") if name)


def mark(name: str) -> None:
    if name in _MARKS:
        print(f"soda-fault-mark {name}", file=sys.stderr, flush=True)
