"""`hydra/sweeper=soda_optuna`: Optuna studies launched through Hydra's launchers (see optuna_sweeper)."""
