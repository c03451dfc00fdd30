"""Evaluate an encoder: the probes, the latent gap and reconstructions of a SODA model.

Training calls `soda.evaluator.Evaluator` at each evaluation; `python -m soda.evaluate <run dir>`
is its second caller, for a saved run:

    python -m soda.evaluate outputs/2026-11-28/12-00-00-a1b2c3                # the run's own eval settings
    python -m soda.evaluate outputs/... eval=dino eval.knn_k=200 --name knn200
    python -m soda.evaluate outputs/... eval.latent_gap_timesteps=[100,300,500,700,900] --no-record

It loads the EMA model from the run's `checkpoints/last.pt` and its config from
`config.yaml` (`.hydra/config.yaml` for runs that have none), applies an `eval=<option>` group
and `eval.*` overrides, prints the metrics and the latent test per timestep (with the latent of the image, of another image, and dropped),
and records the metrics on the run's MLflow record as `<name>/<metric>` (default name `posthoc`:
`posthoc/knn_acc`, ...) at the step of the checkpoint's epoch, with the overrides in the tag
`<name>.overrides`. Training-time points (`eval/...`) are never touched. A name is recorded once
per epoch: a second evaluation under it stops with one line, at once while the first still works
(its lock in the run directory, soda.saved_run), after it by the record's check.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from soda.errors import SodaError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m soda.evaluate",
        description=__doc__.split("\n\n")[0],
        epilog="overrides: eval=<option of conf/eval>, eval.<key>=<value>, device=cpu|cuda|auto",
    )
    parser.add_argument(
        "run_dir",
        type=Path,
        help="a run directory of launch.py: its config.yaml (.hydra/config.yaml where there is none), "
        "checkpoints/last.pt, and mlflow_run_id unless --no-record",
    )
    parser.add_argument("overrides", nargs="*", help="eval=<option>, eval.<key>=<value>, device=...")
    parser.add_argument("--name", default="posthoc", help="metric prefix on the MLflow run (default: posthoc)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave the MLflow record as it is")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from soda.saved_run import evaluate_saved_run  # imports torch, which takes seconds: after --help

    try:
        evaluate_saved_run(args.run_dir, args.overrides, name=args.name, record=not args.no_record)
    except SodaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
