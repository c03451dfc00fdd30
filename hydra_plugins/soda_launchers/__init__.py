"""submitit launchers (local and SLURM) that check a job before it is submitted."""
