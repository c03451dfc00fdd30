"""Entry point: compose conf/, train one run, return the objective (for sweepers).

python launch.py experiment=demo
python launch.py -m sweep=augment_ablation
python launch.py --help

What happens before Hydra runs (the checks of `--cfg job`, the dry run, the notes on where the
jobs run) and the one-line errors are launching/cli.py's; this file keeps the @hydra.main
function, whose config_path is relative to it and which the launchers pickle.
"""

from __future__ import annotations

import importlib

import hydra
from omegaconf import DictConfig

from launching import cli

# Imported for what they register with Hydra's ConfigStore: the launchers' schemas (soda.config,
# which launching imports, registers the run's).
importlib.import_module("hydra_plugins.soda_launchers.launchers")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    with cli.one_job():  # a sweep file without -m is refused; an error is one line
        from soda.train import run  # after the check: it imports torch, which takes seconds

        return run(cfg)


if __name__ == "__main__":
    cli.main(main)
